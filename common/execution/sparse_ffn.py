"""Sparse FFN execution: GLU FFNs that read only the weights of the kept entries.

``SparseFFNExecution`` swaps each chosen decoder layer's MLP module for a ``SparseGLU`` inside a
``with`` block and puts the original modules back on exit (also when the body raises). Where
skipping work is possible:

* ``intermediate`` (the input of W_d): the down projection reads only the rows of ``W_d^T`` [I, H]
  of the kept entries;
* ``input`` (the FFN input x): gate and up read only the rows of ``[W_g; W_u]^T`` [H, 2I] of
  the kept inputs;
* ``all_inputs``: both;
* ``gate`` (act(W_g x), CATS): the gate is computed densely, and only the kept neurons' up rows
  and down columns are read, bundled per neuron (``common.execution.products.GateBundle``). It
  runs alone: its keep-set decides the whole intermediate.

``up`` is not executed sparsely: its mask is a function of the up projection's full output.

The kept set is per token, from one of two rules:

* top-p (``value=p``), the study's rule, ``common.core.rules.keep_mask`` per token;
* fixed per-layer thresholds on ``|x|`` (``thresholds=``, see ``common.execution.thresholds``),
  TEAL style, which costs a comparison instead of a selection, and runs in the fused CPU kernel.

Outputs equal the masked dense computation (the same mask, the dropped entries zeroed, the
dense product) up to float summation order; token rows holding a NaN or an infinity are computed
densely and counted apart (``sparsity()[site]["nonfinite_rows"]``).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from common.core.rules import keep_mask, validate_rule
from common.core.sites import detect_architecture, expand_sites, layer_list_path, resolve_layers
from common.execution.products import AUTO, GATHER_TOKENS, GateBundle, SparseProduct, check_kernel
from common.execution.swap import ModuleSwaps, skipped_bytes, sparsity_summary
from common.execution.thresholds import LayerThresholds

EXECUTION_SITES = ("input", "intermediate", "gate")


def execution_sites(sites) -> tuple[str, ...]:
    """Validate and expand site names to the sites that can execute sparsely."""
    expanded = expand_sites(sites)
    unsupported = [site for site in expanded if site not in EXECUTION_SITES]
    if unsupported:
        raise ValueError(f"site(s) {', '.join(unsupported)} cannot skip weight reads (their mask needs the full "
                         f"projection); choose from {', '.join(EXECUTION_SITES)} or all_inputs")
    if "gate" in expanded and len(expanded) > 1:
        raise ValueError("the gate site runs alone (its keep-set decides the whole intermediate); "
                         "give sites='gate' by itself")
    return expanded


def _linear(module: nn.Module, name: str) -> nn.Linear:
    linear = getattr(module, name, None)
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"{type(module).__name__} has no nn.Linear {name!r}; sparse execution needs a GLU MLP "
                         "with gate_proj, up_proj, down_proj and act_fn (transformers' Llama/Qwen/Gemma layout)")
    return linear


class SparseGLU(nn.Module):
    """``down(act(gate(x)) * up(x))`` with sparse products at the masked sites.

    ``masks`` maps a site ("input", "intermediate" or "gate" alone) to its keep rule: a threshold
    on ``|x|`` (a number) or a function ``[T, D] -> [T, D] bool`` (True = kept). The sparse
    layouts are copies made once here; the original Linear modules are shared, not changed. Kept
    and seen entries and non-finite token rows per site are in ``kept`` / ``seen`` /
    ``nonfinite`` (host integers).
    """

    def __init__(self, mlp: nn.Module, masks: dict, kernel=AUTO, gather_tokens: int = GATHER_TOKENS):
        super().__init__()
        unknown = set(masks) - set(EXECUTION_SITES)
        if unknown:
            raise ValueError(f"SparseGLU masks only {', '.join(EXECUTION_SITES)}, got {', '.join(sorted(unknown))}")
        if "gate" in masks and len(masks) > 1:
            raise ValueError("the gate site runs alone (its keep-set decides the whole intermediate)")
        self.gate_proj, self.up_proj, self.down_proj = (_linear(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
        if not callable(getattr(mlp, "act_fn", None)):
            raise ValueError(f"{type(mlp).__name__} has no act_fn; sparse execution needs a GLU MLP")
        self.act_fn = mlp.act_fn
        self.masks = dict(masks)
        self.intermediate_size = self.gate_proj.out_features
        self.products: dict[str, SparseProduct | GateBundle] = {}
        if "gate" in masks:
            self.products["gate"] = GateBundle(self.gate_proj, self.up_proj, self.down_proj, self.act_fn,
                                               masks["gate"], kernel, gather_tokens)
        if "input" in masks:
            self.products["input"] = SparseProduct([self.gate_proj, self.up_proj], masks["input"], kernel,
                                                   gather_tokens)
        if "intermediate" in masks:
            self.products["intermediate"] = SparseProduct([self.down_proj], masks["intermediate"], kernel,
                                                          gather_tokens)

    @property
    def kept(self) -> dict[str, int]:
        return {site: p.kept for site, p in self.products.items()}

    @property
    def seen(self) -> dict[str, int]:
        return {site: p.seen for site, p in self.products.items()}

    @property
    def nonfinite(self) -> dict[str, int]:
        return {site: p.nonfinite for site, p in self.products.items()}

    @property
    def row_bytes(self) -> dict[str, int]:
        return {site: p.row_bytes for site, p in self.products.items()}

    def reset_counts(self) -> None:
        for product in self.products.values():
            product.reset_counts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "gate" in self.products:
            return self.products["gate"](x)
        if "input" in self.products:
            gate, up = self.products["input"](x).split(self.intermediate_size, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        intermediate = self.act_fn(gate) * up
        if "intermediate" in self.products:
            return self.products["intermediate"](intermediate)
        return self.down_proj(intermediate)


def _mlp_path(model: nn.Module) -> str:
    """The MLP module relative to a decoder layer: the module whose input is the ``input`` site."""
    arch = detect_architecture(model)
    if arch.is_moe:
        raise ValueError(f"{arch.name} keeps its FFN in fused experts; sparse execution supports dense GLU models")
    location = arch.sites.get("input")
    if location is None or location.tensor != "input":
        raise ValueError(f"the site table row {arch.name!r} has no MLP module whose input is the FFN input; "
                         "sparse execution supports the transformers GLU rows (llama, qwen, gemma, ...); "
                         "SparseLinearExecution covers every row")
    return location.module


class SparseFFNExecution(ModuleSwaps):
    """Run the FFNs of ``layers`` sparsely at ``sites`` inside a ``with`` block.

    Exactly one rule: ``value`` (top-p per token, as in the study, with ``power``) or
    ``thresholds`` (a ``LayerThresholds`` with one threshold per (site, layer)). ``kernel``:
    ``"auto"`` (the fused CPU kernel where it applies, else ``embedding_bag``), or a gather-GEMV
    name from ``common.execution.kernels.GATHER_GEMV`` or a function with its signature, used for
    every call. ``gather_tokens``: calls with more token rows (a prefill) run the masked dense
    product under ``"auto"``.

    >>> with SparseFFNExecution(model, "intermediate", thresholds=calibrated) as sparse:
    ...     model.generate(input_ids, max_new_tokens=32)
    >>> sparse.sparsity()

    The sparse layouts are packed at the first entry and reused by later entries of the same
    object while the MLP modules and their weights are unchanged (so entering once per decode
    step is cheap); counts accumulate across entries until ``reset_counts``.
    """

    def __init__(self, model: nn.Module, sites="intermediate", *, value: float | None = None, power: float = 1.0,
                 thresholds: LayerThresholds | None = None, layers=None, kernel=AUTO,
                 gather_tokens: int = GATHER_TOKENS):
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
        check_kernel(kernel)
        self.kernel, self.gather_tokens = kernel, gather_tokens
        self.modules_by_layer: dict[int, SparseGLU] = {}

    def _rule(self, site: str, layer: int):
        if self.thresholds is not None:
            return self.thresholds.values[site][layer]
        return partial(keep_mask, rule="topp", value=self.value, power=self.power)

    def install(self) -> None:
        self.modules_by_layer = {}
        for layer in self.layers:
            path = f"{self.layer_list}.{layer}.{self.mlp_path}"
            original = self.model.get_submodule(path)
            sparse = self.packed(layer, (original,), lambda: SparseGLU(
                original, {site: self._rule(site, layer) for site in self.sites}, self.kernel, self.gather_tokens))
            self.swap(path, sparse)
            self.modules_by_layer[layer] = sparse

    # ---- counts (modules_by_layer stays after the block: its counts are read there) ----------
    def _products(self) -> dict:
        return {(site, layer): module.products[site] for site in self.sites
                for layer, module in self.modules_by_layer.items()}

    def reset_counts(self) -> None:
        for module in self.modules_by_layer.values():
            module.reset_counts()

    def sparsity(self) -> dict[str, dict]:
        """Per site: the pooled fraction of dropped entries (all finite token rows the block ran,
        padding included), the per-layer fractions, and the token rows passed through densely
        for a NaN or an infinity (``nonfinite_rows``)."""
        return sparsity_summary(self._products())

    def skipped_weight_bytes(self) -> int:
        """Bytes of weight rows the sparse products did not read, summed over every call so far."""
        return skipped_bytes(self._products().values())
