"""Summaries of recorded sparsity, and the effective rank of site activations.

Sparsity of a key = 1 - kept / counted, over real tokens. Summaries per site:
``per_layer`` (layer -> sparsity), ``mean_over_layers`` (each layer weighs the same) and
``element_weighted`` (every counted entry weighs the same), and ``nonfinite_rows``: token rows
left out because they held a NaN or an infinity (passed through unsparsified). The group
``all_inputs`` combines its input and intermediate counts.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from common.core.recorder import SparsityRecorder
from common.core.sites import SITE_GROUPS


def summarize(recorder: SparsityRecorder | list[dict], **context_filter) -> dict[str, dict]:
    """Per-site summary of the recorder's rows whose context matches ``context_filter``.

    Rows with other context fields (steps, phases, experts) are pooled unless filtered.
    """
    rows = recorder.rows() if isinstance(recorder, SparsityRecorder) else recorder
    kept: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    counted: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    nonfinite: dict[str, int] = defaultdict(int)
    for row in rows:
        if any(row.get(k) != v for k, v in context_filter.items()):
            continue
        kept[row["site"]][row["layer"]] += row["kept"]
        counted[row["site"]][row["layer"]] += row["counted"]
        nonfinite[row["site"]] += row.get("nonfinite_rows", 0)
    for group, members in SITE_GROUPS.items():
        if all(m in kept for m in members):
            for member in members:
                nonfinite[group] += nonfinite[member]
                for layer in kept[member]:
                    kept[group][layer] += kept[member][layer]
                    counted[group][layer] += counted[member][layer]
    out = {}
    for site in kept:
        layers = sorted(l for l in counted[site] if counted[site][l])
        per_layer = {l: 1.0 - kept[site][l] / counted[site][l] for l in layers}
        total_kept = sum(kept[site][l] for l in layers)
        total_counted = sum(counted[site][l] for l in layers)
        out[site] = {
            "per_layer": per_layer,
            "mean_over_layers": sum(per_layer.values()) / len(per_layer) if per_layer else None,
            "element_weighted": 1.0 - total_kept / total_counted if total_counted else None,
            "counted": total_counted,
            "nonfinite_rows": nonfinite[site],
        }
    return out


def effective_rank(matrix: torch.Tensor) -> float:
    """Roy & Vetterli effective rank of a [tokens, features] matrix: exp of the entropy of s/sum(s)."""
    if matrix.dim() != 2 or min(matrix.shape) == 0:
        raise ValueError(f"effective rank needs a non-empty [tokens, features] matrix, got {tuple(matrix.shape)}")
    singular = torch.linalg.svdvals(matrix.float())
    total = singular.sum()
    if total <= 0:
        return 0.0
    p = singular / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


class EffectiveRank:
    """Observer: effective rank per (layer, site) of each forward's real-token activations (rows
    holding a NaN or an infinity left out, as the sparsity counts leave them out).

    Averaged over forwards (batches), and normalized by the feature dimension in ``summary``.
    """

    def __init__(self, min_tokens: int = 2):
        self.min_tokens = min_tokens
        self.sums: dict[tuple[int, str], float] = defaultdict(float)
        self.batches: dict[tuple[int, str], int] = defaultdict(int)
        self.width: dict[tuple[int, str], int] = {}

    def observe(self, layer, site, context, tensor, mask, valid) -> None:
        rows = tensor.detach().reshape(-1, tensor.shape[-1])
        if valid is not None:
            rows = rows[valid.reshape(-1)]
        rows = rows[torch.isfinite(rows).all(dim=-1)]  # a NaN row has no singular values to speak of
        if rows.shape[0] < self.min_tokens:
            return
        self.sums[(layer, site)] += effective_rank(rows)
        self.batches[(layer, site)] += 1
        self.width[(layer, site)] = rows.shape[-1]

    def summary(self) -> list[dict]:
        out = []
        for key in sorted(self.sums):
            mean = self.sums[key] / self.batches[key]
            out.append({"layer": key[0], "site": key[1], "effective_rank": mean,
                        "normalized_effective_rank": mean / self.width[key], "batches": self.batches[key],
                        "features": self.width[key]})
        return out

