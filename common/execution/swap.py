"""Swapping model modules for sparse stand-ins inside a ``with`` block, and what the sparse
products counted.

``ModuleSwaps`` is the lifecycle both sparse executions share: ``install`` swaps modules with
``swap`` (the originals are put back on exit, also when the body raises, by
``common.core.hooks.ModelHooks``), and ``packed`` keeps each stand-in's re-laid-out weights across
entries while the original modules and their parameters are unchanged (a decode loop may enter
once per step). The original weights are never written: the sparse layouts are copies.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from common.core.hooks import ModelHooks


class ModuleSwaps(ModelHooks):
    """A ``ModelHooks`` whose ``install`` replaces modules; ``uninstall`` puts them back."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._swapped: list[tuple[nn.Module, str, nn.Module]] = []
        # key -> (the original modules, their parameters' versions, the packed stand-in)
        self._packed: dict = {}

    def packed(self, key, originals: tuple[nn.Module, ...], build: Callable[[], object]):
        """``build()``'s result for ``originals``, reused while they are the same modules with the
        same parameter versions (an in-place weight change bumps a version and repacks)."""
        versions = tuple(p._version for module in originals for p in module.parameters())
        entry = self._packed.get(key)
        if entry is not None and len(entry[0]) == len(originals) \
                and all(a is b for a, b in zip(entry[0], originals)) and entry[1] == versions:
            return entry[2]
        value = build()
        self._packed[key] = (originals, versions, value)
        return value

    def swap(self, path: str, replacement: nn.Module) -> nn.Module:
        """Put ``replacement`` at the module path ``path`` of the model; the original is returned
        and restored on exit."""
        parent_path, _, attribute = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        original = getattr(parent, attribute)
        setattr(parent, attribute, replacement)
        self._swapped.append((parent, attribute, original))
        return original

    def uninstall(self) -> None:
        for parent, attribute, original in reversed(self._swapped):
            setattr(parent, attribute, original)
        self._swapped.clear()


def sparsity_summary(products: dict[tuple[str, int], object]) -> dict[str, dict]:
    """Per site or group, from products keyed (name, layer) with ``kept`` / ``seen`` /
    ``nonfinite`` counts: the pooled fraction of dropped entries over the finite token rows, the
    per-layer fractions, and the token rows passed through densely for a NaN or an infinity."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(key[0] for key in products):
        of_name = {layer: p for (n, layer), p in products.items() if n == name}
        seen = sum(p.seen for p in of_name.values())
        kept = sum(p.kept for p in of_name.values())
        out[name] = {"pooled": 1.0 - kept / seen if seen else None,
                     "per_layer": {layer: 1.0 - p.kept / p.seen for layer, p in of_name.items() if p.seen},
                     "nonfinite_rows": sum(p.nonfinite for p in of_name.values())}
    return out


def skipped_bytes(products) -> int:
    """Weight bytes the products did not read: dropped entries times the bytes of their rows."""
    return sum((p.seen - p.kept) * p.row_bytes for p in products)
