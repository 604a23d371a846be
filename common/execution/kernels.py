"""Gather-GEMV: a product that reads only the weight rows of the kept inputs.

Every sparse FFN product is one call of the same interface::

    gather_gemv(kept_values [K], kept_index [K], offsets [T], weight_rows [D, O]) -> [T, O]

where token ``t`` owns the entries ``offsets[t]:offsets[t + 1]`` of ``kept_values`` /
``kept_index`` and the result is ``out[t] = sum_j kept_values[j] * weight_rows[kept_index[j]]``.
``weight_rows`` is the weight transposed so that one input feature's weights are one contiguous
row ([I, H] for the down projection, [H, 2I] for gate and up together). A token with no kept
entry gets zeros.

These are the pure-torch paths. On CPU the sparse products take the fused kernel
(``common.execution.sparse_gemv``) by default (``kernel="auto"``), which compares, selects and
streams in one pass; these run where it does not apply (GPU, float16, switched off, not built).
Implementations are chosen by name (``GATHER_GEMV``); a fused GPU kernel (Triton, CUDA) plugs in
by passing a function with this signature as ``kernel`` to ``SparseFFNExecution`` or
``SparseLinearExecution``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

GatherGemv = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def gather_gemv_embedding_bag(kept_values: torch.Tensor, kept_index: torch.Tensor, offsets: torch.Tensor,
                              weight_rows: torch.Tensor) -> torch.Tensor:
    """Fused on CPU and GPU: ``embedding_bag(mode="sum")`` with the kept values as per-sample
    weights reads each kept row once and never materializes the gathered rows."""
    return F.embedding_bag(kept_index, weight_rows, offsets, mode="sum", per_sample_weights=kept_values)


def gather_gemv_index_select(kept_values: torch.Tensor, kept_index: torch.Tensor, offsets: torch.Tensor,
                             weight_rows: torch.Tensor) -> torch.Tensor:
    """Unfused: copy the kept rows out (``index_select``), then multiply; the copy is written and
    read again, so this moves about three times the kept bytes."""
    rows = weight_rows.index_select(0, kept_index)
    if offsets.numel() == 1:
        return (kept_values.unsqueeze(0) @ rows).reshape(1, -1)
    lengths = torch.diff(offsets, append=offsets.new_tensor([kept_index.numel()]))
    token = torch.repeat_interleave(torch.arange(offsets.numel(), device=offsets.device), lengths)
    out = torch.zeros(offsets.numel(), weight_rows.shape[1], dtype=weight_rows.dtype, device=weight_rows.device)
    return out.index_add_(0, token, kept_values.unsqueeze(-1) * rows)


GATHER_GEMV: dict[str, GatherGemv] = {
    "embedding_bag": gather_gemv_embedding_bag,
    "index_select": gather_gemv_index_select,
}


def resolve_kernel(kernel: str | GatherGemv) -> GatherGemv:
    """A gather-GEMV implementation by name, or the callable itself."""
    if callable(kernel):
        return kernel
    if kernel not in GATHER_GEMV:
        raise ValueError(f"unknown gather-GEMV kernel {kernel!r}; choose auto (the fused CPU kernel where it "
                         f"applies), one of {', '.join(GATHER_GEMV)} or pass a function "
                         "(kept_values, kept_index, offsets, weight_rows) -> [tokens, out]")
    return GATHER_GEMV[kernel]


def kept_entries(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept_values, kept_index, offsets) of the True entries of ``mask`` [T, D], token-major.

    ``nonzero`` makes the host wait for the device once per call (the count sets the shapes).
    """
    width = mask.shape[-1]
    flat = mask.reshape(-1).nonzero().view(-1)
    kept_values = x.reshape(-1).index_select(0, flat)
    if mask.shape[0] == 1:
        return kept_values, flat, flat.new_zeros(1)
    counts = mask.sum(dim=-1)
    return kept_values, flat % width, counts.cumsum(0) - counts
