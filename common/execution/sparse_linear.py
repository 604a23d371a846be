"""Every linear layer sparsified, TEAL style: the inputs of q/k/v, o, gate/up and down.

``SparseLinearExecution`` swaps, inside a ``with`` block, each ``nn.Linear`` of the chosen linear
input groups (``common.execution.groups``; the site table names the modules,
``common.core.sites.linear_module_names``) for a ``SparseLinear`` stand-in. The layers of one
group share one ``SparseProduct``: their weights fused input-major ([I, O_q + O_k + O_v] for
attention, [I, 2 I_ffn] for gate and up), so one kept input is one contiguous row for the whole
group. The first member called with an input computes the fused product; the others are handed
their slice of it (the model calls q, k and v on the same tensor object). The LM head and the
embeddings stay dense.

Outputs equal the masked dense model (each group's input zeroed outside its keep-mask) up to
float summation order; token rows holding a NaN or an infinity are computed densely by the
original layers and counted apart.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from common.core.rules import keep_mask, validate_rule
from common.core.sites import detect_architecture, linear_module_names, resolve_layers
from common.execution.groups import ALL_LINEAR, expand_groups
from common.execution.products import AUTO, GATHER_TOKENS, SparseProduct, check_kernel
from common.execution.swap import ModuleSwaps, skipped_bytes, sparsity_summary
from common.execution.thresholds import LayerThresholds


class SharedProduct:
    """One group's fused product for the last input it saw, handed out slice by slice."""

    def __init__(self, product: SparseProduct):
        self.product = product
        self.bounds = [0]
        for width in product.splits:
            self.bounds.append(self.bounds[-1] + width)
        self.clear()

    def clear(self) -> None:
        self._input, self._version, self._output, self._served = None, None, None, 0

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Member ``index``'s output for ``x``: computed once per input tensor (and version)."""
        if self._input is not x or self._version != x._version:
            self._output, self._input, self._version, self._served = self.product(x), x, x._version, 0
        out = self._output
        if len(self.bounds) > 2:
            out = out[..., self.bounds[index]:self.bounds[index + 1]].contiguous()
        self._served += 1
        if self._served >= len(self.bounds) - 1:
            self.clear()  # every member has its slice: hold no tensors between calls
        return out


class SparseLinear(nn.Module):
    """Stands in for one ``nn.Linear`` of a group inside the block; ``weight`` and ``bias`` are
    the original layer's (for code that reads them), its output comes from the group's product."""

    def __init__(self, shared: SharedProduct, index: int, original: nn.Linear):
        super().__init__()
        self.shared, self.index = shared, index
        self.in_features, self.out_features = original.in_features, original.out_features
        self._original = (original,)  # a tuple: not registered as a submodule

    @property
    def weight(self) -> torch.Tensor:
        return self._original[0].weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self._original[0].bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.part(x, self.index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, member={self.index}"


class SparseLinearExecution(ModuleSwaps):
    """Sparsify the inputs of the linear layers of ``groups`` (default every decoder linear) in
    ``layers`` inside a ``with`` block.

    Exactly one rule: ``thresholds`` (a ``LayerThresholds`` with one threshold per (group, layer),
    e.g. ``calibrate_thresholds(model, docs, "all_linear", 0.5)``) or ``value`` (per-token top-p).
    ``kernel`` and ``gather_tokens`` as in ``SparseFFNExecution``.

    >>> with SparseLinearExecution(model, thresholds=calibrated) as sparse:
    ...     model.generate(input_ids, max_new_tokens=32)
    >>> sparse.sparsity()["attention"]["pooled"]
    """

    def __init__(self, model: nn.Module, groups=ALL_LINEAR, *, thresholds: LayerThresholds | None = None,
                 value: float | None = None, power: float = 1.0, layers=None, kernel=AUTO,
                 gather_tokens: int = GATHER_TOKENS):
        super().__init__(model)
        if (value is None) == (thresholds is None):
            raise ValueError("give exactly one rule: thresholds= (calibrated per layer) or value=p (per-token top-p)")
        arch = detect_architecture(model)
        if arch.is_moe:
            raise ValueError(f"{arch.name} keeps its FFN in fused experts; sparse execution supports dense models")
        self.groups = expand_groups(groups)
        self.layers = resolve_layers(model, layers)
        self.names = {group: linear_module_names(model, group, self.layers) for group in self.groups}
        if value is not None:
            validate_rule("topp", value, power)
        else:
            thresholds.check_covers(self.groups, self.layers)
        self.value, self.power, self.thresholds = value, power, thresholds
        check_kernel(kernel)
        self.kernel, self.gather_tokens = kernel, gather_tokens
        self.products: dict[tuple[str, int], SparseProduct] = {}

    def _rule(self, group: str, layer: int):
        if self.thresholds is not None:
            return self.thresholds.values[group][layer]
        return partial(keep_mask, rule="topp", value=self.value, power=self.power)

    def _build(self, group: str, layer: int, originals: tuple[nn.Linear, ...]):
        product = SparseProduct(originals, self._rule(group, layer), self.kernel, self.gather_tokens)
        shared = SharedProduct(product)
        return product, shared, [SparseLinear(shared, i, original) for i, original in enumerate(originals)]

    def install(self) -> None:
        self.products = {}
        for group in self.groups:
            for layer, names in self.names[group].items():
                originals = tuple(self.model.get_submodule(name) for name in names)
                for name, module in zip(names, originals):
                    if not isinstance(module, nn.Linear):
                        raise ValueError(f"{name} is a {type(module).__name__}, not an nn.Linear: sparse execution "
                                         "reads the weights of plain linear layers (is the model quantized?)")
                product, shared, members = self.packed((group, layer), originals,
                                                       partial(self._build, group, layer, originals))
                shared.clear()
                for name, member in zip(names, members):
                    self.swap(name, member)
                self.products[(group, layer)] = product

    def uninstall(self) -> None:
        for entry in self._packed.values():
            entry[2][1].clear()  # drop a cached output a partial group call may have left
        super().uninstall()

    # ---- counts (products stays after the block: its counts are read there) ------------------
    def reset_counts(self) -> None:
        for product in self.products.values():
            product.reset_counts()

    def sparsity(self) -> dict[str, dict]:
        """Per group: the pooled fraction of dropped input entries over the finite token rows, the
        per-layer fractions, and the token rows passed through densely (``nonfinite_rows``)."""
        return sparsity_summary(self.products)

    def skipped_weight_bytes(self) -> int:
        """Bytes of weight rows the sparse products did not read, summed over every call so far."""
        return skipped_bytes(self.products.values())

    def weight_bytes(self) -> int:
        """Bytes of the sparsified groups' weights (what a dense call of every group reads)."""
        return sum(product.weight_bytes for product in self.products.values())
