"""Per-expert sparsification of transformers 5 fused-experts MoE blocks (Qwen3-MoE, OLMoE, Mixtral).

Experts are fused 3D parameters (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``), so there
are no per-expert modules to hook. ``ExpertSparsifier`` instead:

* sparsifies the experts' *input* in a forward pre-hook on the experts module: top-p is row-wise,
  so masking each token's hidden state once equals masking it in every routed row, and the
  router, which runs before the experts, still sees the dense hidden state;
* sparsifies *up*, *gate* and *intermediate* in the gating step of the experts computation. The
  ``grouped_mm`` and ``batched_mm`` backends run through transformers' own functions, called
  with an adapter whose ``_apply_gate`` applies the rule; ``eager`` runs a loop that mirrors
  transformers' eager loop operation for operation. At p = 1 the arithmetic is therefore the
  stock backend's, bit for bit.

The backends are registered in ``ALL_EXPERTS_FUNCTIONS`` as ``activation_sparsity_<backend>``
and selected with ``model.set_experts_implementation`` only inside the context. Statistics per
(layer, expert, site): kept and counted entries and routed real tokens, from each routed row's
expert id; padding is excluded with the recorder's valid-token mask.

Criteria (``common.core.criteria``): the magnitude score with any per-token rule, and the weighted
score (WINA) at the intermediate site with a per-token rule, ranking each routed row by |x_i| times
the norm of column i of its own expert's down projection (``expert_column_norms``). Calibrated
thresholds, modes and rotations are per layer of a dense FFN and are refused here, and so is the
weighted score at the input, whose consumer differs per routed expert while the input is masked
once per token.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers.integrations.moe import (
    ALL_EXPERTS_FUNCTIONS,
    _default_apply_gate,
    batched_mm_experts_forward,
    grouped_mm_experts_forward,
)

from common.core.calibration import Calibration
from common.core.criteria import Criterion, LayerState, apply_criterion
from common.core.hooks import ModelHooks
from common.core.recorder import SparsityRecorder
from common.core.rules import sparsify_and_count
from common.core.sites import detect_architecture, expand_sites, layer_list_path, resolve_layers

from .counting import add_expert_totals

SUPPORTED_BACKENDS = ("grouped_mm", "batched_mm", "eager")
_PREFIX = "activation_sparsity_"


class _Rows:
    """How the rows of one experts call map to (token, top-k slot) and experts."""

    def __init__(self, top_k_index: torch.Tensor, backend: str):
        self.top_k_index = top_k_index
        self.tokens, self.top_k = top_k_index.shape
        flat = top_k_index.reshape(-1)
        if backend == "grouped_mm":
            self.experts, self.perm = torch.sort(flat)  # the same call as transformers: same order
        else:
            self.experts, self.perm = flat, None

    def to_slots(self, per_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-row values (in the backend's row order) -> ([tokens, top_k], None: every slot)."""
        if self.perm is None:
            return per_row.reshape(self.tokens, self.top_k), None
        slots = torch.empty_like(per_row)
        slots[self.perm] = per_row
        return slots.reshape(self.tokens, self.top_k), None


class _ExpertRows:
    """Rows of one expert in the eager loop: the (token, slot) pairs routed to it."""

    def __init__(self, top_k_index: torch.Tensor, token_idx: torch.Tensor, top_k_pos: torch.Tensor,
                 expert: torch.Tensor):
        self.top_k_index, self.token_idx, self.top_k_pos = top_k_index, token_idx, top_k_pos
        self.experts = expert.reshape(1)  # every row's expert

    def to_slots(self, per_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slots = torch.zeros(self.top_k_index.shape, dtype=per_row.dtype, device=per_row.device)
        slots[self.token_idx, self.top_k_pos] = per_row
        selected = torch.zeros(self.top_k_index.shape, dtype=torch.bool, device=per_row.device)
        selected[self.token_idx, self.top_k_pos] = True
        return slots, selected


class _ExpertState:
    """What the experts computation of one layer needs during a forward (kept on the module)."""

    def __init__(self, owner: "ExpertSparsifier", layer: int):
        self.owner, self.layer = owner, layer
        self.rows: _Rows | None = None

    def cut(self, tensor: torch.Tensor, site: str, rows) -> torch.Tensor:
        """Apply the rule to ``tensor`` rows if ``site`` is chosen; report kept counts per slot."""
        owner = self.owner
        if site not in owner.sites:
            return tensor
        if owner.criterion.is_rule:
            sparse, kept = sparsify_and_count(tensor, owner.rule, owner.value, owner.power)
        else:  # the weighted score: each row by its own expert's down-projection column norms
            norms = owner.column_norms[self.layer]
            experts = rows.experts.clamp(max=norms.shape[0] - 1)  # transformers' sentinel rows are dropped anyway
            state = LayerState(column_norms=norms.to(tensor.device, tensor.dtype)[experts].expand_as(tensor))
            sparse, kept, _ = apply_criterion(tensor, owner.criterion, owner.value, state, owner.power)
        slots, selected = rows.to_slots(kept)
        owner._report(self.layer, site, slots, selected, rows.top_k_index, tensor.shape[-1])
        return sparse

    def apply_gate(self, module: nn.Module, gate_up_out: torch.Tensor, rows=None) -> torch.Tensor:
        """act(gate) * up, as transformers' default gate, with the rule at up, gate, intermediate."""
        rows = rows or self.rows
        gate, up = gate_up_out.chunk(2, dim=-1)
        up = self.cut(up, "up", rows)
        activated = self.cut(module.act_fn(gate), "gate", rows)
        return self.cut(activated * up, "intermediate", rows)


class _GateAdapter:
    """Stands in for the experts module inside transformers' backend functions; only the gating
    step differs (it applies the rule), every other attribute is the module's own."""

    def __init__(self, module: nn.Module, state: _ExpertState):
        self._module, self._state = module, state

    def __getattr__(self, name):
        return getattr(self._module, name)

    def _apply_gate(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        return self._state.apply_gate(self._module, gate_up_out)


def _eager_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' eager experts loop, with the gating step going through the sparsifier."""
    state: _ExpertState = self._activation_sparsity
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
        expert_mask = expert_mask.permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == self.num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        rows = _ExpertRows(top_k_index, token_idx, top_k_pos, expert_idx)
        current_state = hidden_states[token_idx]
        gate_up = nn.functional.linear(current_state, self.gate_up_proj[expert_idx])
        current_hidden_states = state.apply_gate(self, gate_up, rows)
        current_hidden_states = nn.functional.linear(current_hidden_states, self.down_proj[expert_idx])
        current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
    return final_hidden_states


def _dispatch(stock):
    def forward(self, hidden_states, top_k_index, top_k_weights):
        state = getattr(self, "_activation_sparsity", None)
        if state is None:  # outside an ExpertSparsifier: behave as the stock backend
            return stock(self, hidden_states, top_k_index, top_k_weights)
        return stock(_GateAdapter(self, state), hidden_states, top_k_index, top_k_weights)
    return forward


def _eager_dispatch(self, hidden_states, top_k_index, top_k_weights):
    return _eager_forward(self, hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register(_PREFIX + "grouped_mm", _dispatch(grouped_mm_experts_forward))
ALL_EXPERTS_FUNCTIONS.register(_PREFIX + "batched_mm", _dispatch(batched_mm_experts_forward))
ALL_EXPERTS_FUNCTIONS.register(_PREFIX + "eager", _eager_dispatch)


def experts_modules(model: nn.Module) -> dict[int, nn.Module]:
    """Layer index -> fused experts module; a clear error for a layout this package does not know."""
    arch = detect_architecture(model)
    if not arch.is_moe:
        raise ValueError(f"{arch.name} is not a mixture-of-experts model; use experiments/dense_sweep.py for it")
    prefix = layer_list_path(model, arch)
    out = {}
    for index, layer in enumerate(model.get_submodule(prefix)):
        try:
            module = layer.get_submodule(arch.experts)
        except AttributeError:
            continue  # a dense layer inside an MoE model (e.g. Qwen3-MoE mlp_only_layers)
        params = dict(module.named_parameters(recurse=False))
        gate_up, down = params.get("gate_up_proj"), params.get("down_proj")
        if (gate_up is None or down is None or gate_up.dim() != 3 or getattr(module, "has_bias", False)
                or getattr(module, "is_transposed", False) or not getattr(module, "has_gate", True)
                or not getattr(module, "is_concatenated", True)
                or type(module)._apply_gate is not _default_apply_gate):
            raise ValueError(f"unrecognised MoE experts layout at {prefix}.{index}.{arch.experts} "
                             f"({type(module).__name__}); supported: fused gate_up_proj [E, 2I, H] without bias")
        out[index] = module
    if not out:
        raise ValueError(f"no fused experts found under {prefix}.*.{arch.experts}")
    return out


def check_expert_criterion(criterion: Criterion, sites) -> None:
    """A one-line error for a criterion the fused experts cannot take (see the module docstring)."""
    if criterion.is_rule:
        return
    if criterion.score == "weighted" and not criterion.calibrated and set(expand_sites(sites)) <= {"intermediate"}:
        return
    raise ValueError(f"criterion {criterion.name} does not apply to fused MoE experts at "
                     f"{', '.join(expand_sites(sites))}: they take the magnitude score, or the weighted score at "
                     "the intermediate site, with a per-token rule (topp, topk, maxp)")


def expert_column_norms(model: nn.Module, layers=None) -> dict[int, torch.Tensor]:
    """Layer -> [E, I] (float32): the norm of column i of expert e's down projection (WINA's
    weight for the intermediate entry i of a row routed to e)."""
    chosen = set(resolve_layers(model, layers))
    return {layer: module.down_proj.detach().double().pow(2).sum(dim=1).sqrt().float()
            for layer, module in experts_modules(model).items() if layer in chosen}


def expert_calibration(model: nn.Module, criterion: Criterion, layers=None) -> Calibration:
    """The calibration of a criterion on fused experts: the per-expert column norms [E, I] of the
    weighted score at the intermediate site (nothing for the magnitude score)."""
    calibration = Calibration(criterion)
    if criterion.score == "weighted":
        calibration.column_norms = {(layer, "intermediate"): norms
                                    for layer, norms in expert_column_norms(model, layers).items()}
    return calibration


class ExpertSparsifier(ModelHooks):
    """Context manager: sparsify expert sites with a rule; counts per (layer, expert, site).

    ``per_token_sink(layer, site, kept_slots [T, K], selected, top_k_index [T, K], width)`` gets the
    kept count of every routed (token, slot) when given (the lm-eval bridge commits them later
    with lm-eval's own request lengths); otherwise counts go to ``recorder`` right away.
    ``criterion``: the weighted score at the intermediate site besides the magnitude rule; its
    per-expert column norms come from ``calibration`` (``expert_calibration``) or the weights.
    """

    def __init__(self, model: nn.Module, sites="intermediate", rule: str = "topp", value: float = 1.0,
                 power: float = 1.0, layers=None, recorder: SparsityRecorder | None = None,
                 per_token_sink=None, criterion: Criterion | None = None, calibration: Calibration | None = None):
        self.criterion = Criterion("magnitude", rule) if criterion is None else criterion
        self.criterion.check_value(value, power)
        check_expert_criterion(self.criterion, sites)
        super().__init__(model, recorder)
        self.modules = experts_modules(model)
        chosen = set(resolve_layers(model, layers))
        self.modules = {i: m for i, m in self.modules.items() if i in chosen}
        self.sites = set(expand_sites(sites))
        self.rule, self.value, self.power = self.criterion.selection, float(value), float(power)
        self.column_norms: dict[int, torch.Tensor] = {}
        if self.criterion.score == "weighted":
            given = calibration.column_norms if calibration is not None else {}
            computed = expert_column_norms(model, layers) if not given else {}
            self.column_norms = {layer: given.get((layer, "intermediate"), computed.get(layer))
                                 for layer in self.modules}
        self.per_token_sink = per_token_sink
        self.backend = getattr(model.config, "_experts_implementation", None) or "grouped_mm"
        if self.backend.startswith(_PREFIX):
            self.backend = self.backend[len(_PREFIX):]
        if self.backend not in SUPPORTED_BACKENDS:
            raise ValueError(f"experts backend {self.backend!r} is not supported; call "
                             f"model.set_experts_implementation(one of {', '.join(SUPPORTED_BACKENDS)}) first")
        self.num_experts = next(iter(self.modules.values())).num_experts
        self._valid: torch.Tensor | None = None

    # ---- counting -------------------------------------------------------------------------------
    def _report(self, layer: int, site: str, kept_slots: torch.Tensor, selected: torch.Tensor | None,
                top_k_index: torch.Tensor, width: int) -> None:
        """Kept counts of routed (token, slot) pairs [T, K] (only ``selected`` ones if given)."""
        if self.per_token_sink is not None:
            self.per_token_sink(layer, site, kept_slots, selected, top_k_index, width)
            return
        weight = torch.ones(top_k_index.shape, dtype=torch.long, device=top_k_index.device)
        if self._valid is not None:
            weight = weight * self._valid.reshape(-1, 1).long()
        if selected is not None:
            weight = weight * selected.long()
        add_expert_totals(self.recorder, layer, site, kept_slots, weight, top_k_index, self.num_experts, width)

    def _experts_pre_hook(self, layer, module, args, kwargs):
        hidden_states, top_k_index = args[0] if args else kwargs["hidden_states"], \
            args[1] if len(args) > 1 else kwargs["top_k_index"]
        state: _ExpertState = module._activation_sparsity
        state.rows = _Rows(top_k_index, self.backend)
        self._valid = self.recorder.valid_for(hidden_states) if self.recorder.enabled else None
        if "input" not in self.sites:
            return None
        sparse, kept = sparsify_and_count(hidden_states, self.rule, self.value, self.power)
        self._report(layer, "input", kept.unsqueeze(-1).expand(top_k_index.shape), None, top_k_index,
                     hidden_states.shape[-1])
        if args:
            return (sparse,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": sparse}

    def install(self) -> None:
        self._saved_backend = self.model.config._experts_implementation
        for layer, module in self.modules.items():
            module._activation_sparsity = _ExpertState(self, layer)
            self.add(module.register_forward_pre_hook(
                lambda m, a, k, layer=layer: self._experts_pre_hook(layer, m, a, k), with_kwargs=True))
        self.model.set_experts_implementation(_PREFIX + self.backend)

    def uninstall(self) -> None:
        for module in self.modules.values():
            if hasattr(module, "_activation_sparsity"):
                del module._activation_sparsity
        if getattr(self, "_saved_backend", None) is not None:
            self.model.set_experts_implementation(self._saved_backend)
            self._saved_backend = None
