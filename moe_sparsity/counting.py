"""Per-expert counting, written once: kept entries, counted entries and routed tokens per expert.

``expert_totals`` turns per-(token, slot) kept counts into per-expert vectors; the expert
sparsifier uses it for every call, and ``PerTokenExpertCounts`` (the lm-eval bridge's per-token
sink) uses it when it commits a row with lm-eval's real length.
"""

from __future__ import annotations

import torch

from common.core.recorder import SparsityRecorder


def expert_totals(kept_slots: torch.Tensor, weight: torch.Tensor, top_k_index: torch.Tensor,
                  num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept entries [E], routed tokens [E], routed rows passed through for a NaN or an infinity
    [E]) from kept counts per (token, slot) (``NONFINITE`` for such rows) and 0/1 slot weights."""
    experts = top_k_index.reshape(-1)
    weight = weight.reshape(-1).long()
    kept_slots = kept_slots.reshape(-1).long()
    zeros = torch.zeros(num_experts, dtype=torch.long, device=experts.device)
    kept = zeros.index_add(0, experts, kept_slots.clamp_min(0) * weight)
    nonfinite = zeros.index_add(0, experts, (kept_slots < 0).long() * weight)
    return kept, zeros.index_add(0, experts, weight), nonfinite


def add_expert_totals(recorder: SparsityRecorder, layer: int, site: str, kept_slots: torch.Tensor,
                      weight: torch.Tensor, top_k_index: torch.Tensor, num_experts: int, width: int,
                      context: dict | None = None) -> None:
    """Add one call's per-expert totals to ``recorder``: rows passed through for a NaN or an
    infinity count as routed and non-finite, not as counted entries."""
    kept, routed, nonfinite = expert_totals(kept_slots, weight, top_k_index, num_experts)
    recorder.add_expert_counts(layer, site, kept, (routed - nonfinite) * width, routed, nonfinite, context)


class PerTokenExpertCounts:
    """Kept counts per routed (token, slot) of one call, committed row by row later."""

    def __init__(self, sequence_length: int, num_experts: int):
        self.length, self.num_experts = sequence_length, num_experts
        self.calls: dict[tuple[int, str], list] = {}

    def __call__(self, layer, site, kept_slots, selected, top_k_index, width) -> None:
        if selected is None:
            selected = torch.ones_like(top_k_index, dtype=torch.bool)
        entry = self.calls.get((layer, site))
        if entry is None:  # eager reports one expert at a time: accumulate the slots
            self.calls[(layer, site)] = [kept_slots * selected, selected.clone(), top_k_index, width]
        else:
            entry[0] = entry[0] + kept_slots * selected
            entry[1] = entry[1] | selected

    def commit_row(self, row: int, length: int, recorder: SparsityRecorder) -> None:
        span = slice(row * self.length, row * self.length + length)
        for (layer, site), (kept, selected, top_k_index, width) in self.calls.items():
            add_expert_totals(recorder, layer, site, kept[span], selected[span], top_k_index[span], self.num_experts,
                              width, {})
