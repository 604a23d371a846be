"""Per-expert sparsity of fused-experts MoE models (Qwen3-MoE, OLMoE, Mixtral) under transformers 5."""

from .experts import SUPPORTED_BACKENDS, ExpertSparsifier, experts_modules

__all__ = ["SUPPORTED_BACKENDS", "ExpertSparsifier", "experts_modules"]
