"""The paper's released LLaDA computation, kept as a labelled second mode next to the per-token one.

The released code took the LLaDA top-p over the whole flattened sequence: one threshold per
forward over the [tokens x D] activations of a sequence, not one per token (see the reference
notes, "Defects in the released code"). Its Jaccard compared the flattened active sets; that
measure is ``jaccard_flattened`` in ``jaccard.py``. This module gives the flattened rule, so the
gap between the paper's step-to-step similarities and the per-token ones can be split into the
model and the computation.

Padding is excluded: padded positions enter the flattened row as zeros (which a top-p never
keeps and which add nothing to its sums) and are never kept, so a padded batch selects what
each sequence alone would.

A sequence whose real activations hold a NaN or an infinity is the flattened rule's row: it
passes through unsparsified, as a non-finite row does under the per-token rule, and all its
tokens are counted as non-finite rows, not as sparsity.
"""

from __future__ import annotations

import torch

from common.core.hooks import Sparsifier, call_arguments, call_attention_mask
from common.core.rules import NONFINITE, keep_mask

PAPER_COMPAT_RULES = ("topp",)


def flattened_keep_mask(x: torch.Tensor, rule: str, value: float, power: float = 1.0,
                        real: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask of [B, L, D] activations with one rule threshold per sequence over its [L x D] entries.

    ``real`` [B, L] marks the real positions (None: all).
    """
    if rule not in PAPER_COMPAT_RULES:
        raise ValueError(f"the paper-compatible computation is the released top-p; use rule 'topp', not {rule!r}")
    if x.dim() != 3:
        raise ValueError(f"the flattened rule expects [batch, length, D] activations, got {tuple(x.shape)}")
    batch, length, width = x.shape
    if real is not None:
        x = x.masked_fill(~real.bool().unsqueeze(-1), 0)
    mask = keep_mask(x.reshape(batch, 1, length * width), rule, value, power).reshape(batch, length, width)
    return mask if real is None else mask & real.bool().unsqueeze(-1)


class FlattenedSparsifier(Sparsifier):
    """A Sparsifier applying ``flattened_keep_mask`` per sequence (the released code's LLaDA rule)."""

    def __init__(self, model, sites="intermediate", rule: str = "topp", value: float = 1.0, power: float = 1.0,
                 layers=None, recorder=None):
        if rule not in PAPER_COMPAT_RULES:
            raise ValueError(f"the paper-compatible computation is the released top-p; use rule 'topp', not {rule!r}")
        super().__init__(model, sites, rule, value, power, layers, recorder)
        self._real: torch.Tensor | None = None

    def _root_pre_hook(self, module, args, kwargs):
        super()._root_pre_hook(module, args, kwargs)
        mask = call_attention_mask(call_arguments(module, args, kwargs))
        self._real = mask if mask is not None and mask.dim() == 2 else None

    def transform(self, layer: int, site: str, tensor: torch.Tensor) -> torch.Tensor:
        mask = flattened_keep_mask(tensor, self.rule, self.value, self.power, self._real)
        real = tensor if self._real is None else tensor.masked_fill(~self._real.bool().unsqueeze(-1), 0)
        passed = ~torch.isfinite(real).flatten(1).all(dim=-1)  # [B]: sequences the rule passes through
        kept = mask.sum(dim=-1, dtype=torch.int32).masked_fill_(passed.unsqueeze(-1), NONFINITE)
        self.recorder.record(layer, site, tensor, mask, kept=kept)
        return tensor.masked_fill(~mask, 0)
