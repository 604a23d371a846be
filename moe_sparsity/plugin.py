"""Plug-in (entry point ``activation_sparsity.plugins``): fused-experts models in the lm-eval bridge."""

from __future__ import annotations

from common.evaluation.plugins import register_backend

from .counting import PerTokenExpertCounts
from .experts import ExpertSparsifier, experts_modules


class FusedExpertsBackend:
    """Sparsify fused-experts MoE models per routed row; counts per (layer, expert, site)."""

    def sparsifier(self, model, sites, rule, value, power, layers, recorder, per_token=None, criterion=None,
                   calibration=None):
        return ExpertSparsifier(model, sites, rule, value, power, layers, recorder, per_token_sink=per_token,
                                criterion=criterion, calibration=calibration)

    def per_token_counts(self, model, sequence_length: int) -> PerTokenExpertCounts:
        num_experts = next(iter(experts_modules(model).values())).num_experts
        return PerTokenExpertCounts(sequence_length, num_experts)


register_backend("fused_experts", FusedExpertsBackend())
