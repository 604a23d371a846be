"""Sparse FFN execution: GLU FFNs that read only the weight rows of the kept entries.

``SparseFFNExecution`` swaps each chosen decoder layer's MLP module for a ``SparseGLU`` inside a
``with`` block and puts the original modules back on exit (also when the body raises). Where
skipping work is possible:

* ``intermediate`` (the input of W_d): the down projection reads only the rows of ``W_d^T``
  [I, H] of the kept entries;
* ``input`` (the FFN input x): gate and up read only the rows of ``[W_g; W_u]^T`` [H, 2I] of
  the kept inputs;
* ``all_inputs``: both.

``up`` and ``gate`` are not executed sparsely: their mask is a function of the projection's own
full output, so that projection is always computed in full, and only the other projection's rows
and the down projection's rows of the dropped entries could be skipped (the CATS scheme). That
needs a row-gather GEMV of a second layout and is left out here; the study's masked-dense hooks
cover them.

The kept set is per token, from one of two rules:

* top-p (``value=p``), the study's rule, ``common.core.rules.keep_mask`` per token;
* fixed per-layer thresholds on ``|x|`` (``thresholds=``, see ``common.execution.thresholds``),
  TEAL style, which costs a comparison instead of a selection.

Outputs equal the masked dense computation (the same mask, the dropped entries zeroed, the
dense product) up to float summation order.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn as nn

from common.core.hooks import ModelHooks
from common.core.rules import keep_mask, validate_rule
from common.core.sites import detect_architecture, expand_sites, layer_list_path, resolve_layers
from common.execution.kernels import GatherGemv, kept_entries, resolve_kernel
from common.execution.thresholds import LayerThresholds, magnitude_mask

EXECUTION_SITES = ("input", "intermediate")
MaskFn = Callable[[torch.Tensor], torch.Tensor]


def execution_sites(sites) -> tuple[str, ...]:
    """Validate and expand site names to the sites that can execute sparsely."""
    expanded = expand_sites(sites)
    unsupported = [site for site in expanded if site not in EXECUTION_SITES]
    if unsupported:
        raise ValueError(f"site(s) {', '.join(unsupported)} cannot skip weight reads (their mask needs the full "
                         f"projection); choose from {', '.join(EXECUTION_SITES)} or all_inputs")
    return expanded


def _linear(module: nn.Module, name: str) -> nn.Linear:
    linear = getattr(module, name, None)
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"{type(module).__name__} has no nn.Linear {name!r}; sparse execution needs a GLU MLP "
                         "with gate_proj, up_proj, down_proj and act_fn (transformers' Llama/Qwen/Gemma layout)")
    return linear


class SparseGLU(nn.Module):
    """``down(act(gate(x)) * up(x))`` with sparse gather-GEMVs at the masked sites.

    ``masks`` maps a site ("input", "intermediate") to a function ``[T, D] -> [T, D] bool``
    (True = kept). The weights of the sparse products are stored once, transposed, at
    construction; the original Linear modules are shared, not copied. Kept and seen entry counts
    per site accumulate in ``kept`` / ``seen`` (host integers: the kept count is known once the
    kept indices are).
    """

    def __init__(self, mlp: nn.Module, masks: dict[str, MaskFn], kernel: str | GatherGemv = "embedding_bag"):
        super().__init__()
        unknown = set(masks) - set(EXECUTION_SITES)
        if unknown:
            raise ValueError(f"SparseGLU masks only {', '.join(EXECUTION_SITES)}, got {', '.join(sorted(unknown))}")
        self.gate_proj, self.up_proj, self.down_proj = (_linear(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
        if not callable(getattr(mlp, "act_fn", None)):
            raise ValueError(f"{type(mlp).__name__} has no act_fn; sparse execution needs a GLU MLP")
        self.act_fn = mlp.act_fn
        self.masks = dict(masks)
        self.kernel = resolve_kernel(kernel)
        self.intermediate_size = self.gate_proj.out_features
        self.row_bytes: dict[str, int] = {}
        with torch.no_grad():
            if "input" in masks:
                weight = torch.cat([self.gate_proj.weight, self.up_proj.weight])  # [2I, H]
                self.register_buffer("gate_up_rows", weight.t().contiguous(), persistent=False)  # [H, 2I]
                biases = (self.gate_proj.bias, self.up_proj.bias)
                bias = None if biases[0] is None and biases[1] is None else torch.cat(
                    [b if b is not None else torch.zeros_like(self.gate_proj.weight[:, 0]) for b in biases])
                self.register_buffer("gate_up_bias", bias, persistent=False)
                self.row_bytes["input"] = self.gate_up_rows[0].numel() * self.gate_up_rows.element_size()
            if "intermediate" in masks:
                self.register_buffer("down_rows", self.down_proj.weight.t().contiguous(), persistent=False)  # [I, H]
                self.row_bytes["intermediate"] = self.down_rows[0].numel() * self.down_rows.element_size()
        self.kept = {site: 0 for site in masks}
        self.seen = {site: 0 for site in masks}

    def reset_counts(self) -> None:
        for site in self.masks:
            self.kept[site] = self.seen[site] = 0

    def _sparse_product(self, site: str, x: torch.Tensor, rows: torch.Tensor, bias) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        mask = self.masks[site](tokens)
        kept_values, kept_index, offsets = kept_entries(tokens, mask)
        self.kept[site] += kept_index.numel()
        self.seen[site] += mask.numel()
        out = self.kernel(kept_values, kept_index, offsets, rows)
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], rows.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "input" in self.masks:
            gate_up = self._sparse_product("input", x, self.gate_up_rows, self.gate_up_bias)
            gate, up = gate_up.split(self.intermediate_size, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        intermediate = self.act_fn(gate) * up
        if "intermediate" in self.masks:
            return self._sparse_product("intermediate", intermediate, self.down_rows, self.down_proj.bias)
        return self.down_proj(intermediate)


def _mlp_path(model: nn.Module) -> str:
    """The MLP module relative to a decoder layer: the module whose input is the ``input`` site."""
    arch = detect_architecture(model)
    if arch.is_moe:
        raise ValueError(f"{arch.name} keeps its FFN in fused experts; sparse execution supports dense GLU models")
    location = arch.sites.get("input")
    if location is None or location.tensor != "input":
        raise ValueError(f"the site table row {arch.name!r} has no MLP module whose input is the FFN input; "
                         "sparse execution supports the transformers GLU rows (llama, qwen, gemma, ...)")
    return location.module


class SparseFFNExecution(ModelHooks):
    """Run the FFNs of ``layers`` sparsely at ``sites`` inside a ``with`` block.

    Exactly one rule: ``value`` (top-p per token, as in the study, with ``power``) or
    ``thresholds`` (a ``LayerThresholds`` with one threshold per (site, layer)). ``kernel`` is a
    gather-GEMV name from ``common.execution.kernels.GATHER_GEMV`` or a function with its
    signature.

    >>> with SparseFFNExecution(model, "intermediate", value=0.8) as sparse:
    ...     model.generate(input_ids, max_new_tokens=32)
    >>> sparse.sparsity()

    The transposed weights are packed at the first entry and reused by later entries of the same
    object while the MLP modules and their weights are unchanged (so entering once per decode
    step is cheap); counts accumulate across entries until ``reset_counts``.
    """

    def __init__(self, model: nn.Module, sites="intermediate", *, value: float | None = None, power: float = 1.0,
                 thresholds: LayerThresholds | None = None, layers=None, kernel: str | GatherGemv = "embedding_bag"):
        super().__init__(model)
        if (value is None) == (thresholds is None):
            raise ValueError("give exactly one rule: value=p (per-token top-p) or thresholds= (calibrated per layer)")
        self.sites = execution_sites(sites)
        self.layers = resolve_layers(model, layers)
        self.mlp_path = _mlp_path(model)
        self.layer_list = layer_list_path(model)
        if value is not None:
            validate_rule("topp", value, power)
        else:
            thresholds.check_covers(self.sites, self.layers)
        self.value, self.power, self.thresholds = value, power, thresholds
        self.kernel = resolve_kernel(kernel)
        self.modules_by_layer: dict[int, SparseGLU] = {}
        self._swapped: list[tuple[nn.Module, str, nn.Module]] = []
        # per layer: (original MLP, its parameters' versions, the SparseGLU packed from it)
        self._packed: dict[int, tuple[nn.Module, tuple[int, ...], SparseGLU]] = {}

    def _mask(self, site: str, layer: int) -> MaskFn:
        if self.thresholds is not None:
            return partial(magnitude_mask, threshold=self.thresholds.values[site][layer])
        return partial(keep_mask, rule="topp", value=self.value, power=self.power)

    def install(self) -> None:
        layers = self.model.get_submodule(self.layer_list)
        parent_path, _, attribute = self.mlp_path.rpartition(".")
        self.modules_by_layer = {}
        for layer in self.layers:
            parent = layers[layer].get_submodule(parent_path) if parent_path else layers[layer]
            original = getattr(parent, attribute)
            versions = tuple(p._version for p in original.parameters())  # bumped by in-place weight changes
            packed = self._packed.get(layer)
            if packed is not None and packed[0] is original and packed[1] == versions:
                sparse = packed[2]  # re-entry: the weights are unchanged, reuse their sparse layout
            else:
                sparse = SparseGLU(original, {site: self._mask(site, layer) for site in self.sites}, self.kernel)
                self._packed[layer] = (original, versions, sparse)
            setattr(parent, attribute, sparse)
            self._swapped.append((parent, attribute, original))
            self.modules_by_layer[layer] = sparse

    def uninstall(self) -> None:
        for parent, attribute, original in reversed(self._swapped):
            setattr(parent, attribute, original)
        self._swapped.clear()  # modules_by_layer stays: its counts are read after the block

    # ---- counts ------------------------------------------------------------------------------
    def reset_counts(self) -> None:
        for module in self.modules_by_layer.values():
            module.reset_counts()

    def sparsity(self) -> dict[str, dict]:
        """Per site: the pooled fraction of dropped entries (all tokens the block ran, padding
        included) and the per-layer fractions."""
        out = {}
        for site in self.sites:
            per_layer = {layer: 1.0 - m.kept[site] / m.seen[site]
                         for layer, m in self.modules_by_layer.items() if m.seen[site]}
            seen = sum(m.seen[site] for m in self.modules_by_layer.values())
            kept = sum(m.kept[site] for m in self.modules_by_layer.values())
            out[site] = {"pooled": 1.0 - kept / seen if seen else None, "per_layer": per_layer}
        return out

    def skipped_weight_bytes(self) -> int:
        """Bytes of weight rows the sparse products did not read, summed over every call so far."""
        return sum((m.seen[site] - m.kept[site]) * m.row_bytes[site]
                   for m in self.modules_by_layer.values() for site in self.sites)
