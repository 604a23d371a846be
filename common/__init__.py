"""Shared masking and hooking core: rules, FFN site table, hooks, recorder, statistics."""

from common.core.hooks import ActivationCapture, SiteHooks, Sparsifier
from common.core.recorder import SparsityRecorder, lengths_to_valid
from common.core.rules import RULES, keep_mask, sparsify, validate_rule
from common.core.sites import ARCHITECTURES, SITES, detect_architecture, expand_sites, resolve_layers
from common.core.stats import EffectiveRank, effective_rank, summarize

__all__ = [
    "ARCHITECTURES", "ActivationCapture", "EffectiveRank", "RULES", "SITES", "SiteHooks", "Sparsifier",
    "SparsityRecorder", "detect_architecture", "effective_rank", "expand_sites", "keep_mask",
    "lengths_to_valid", "resolve_layers", "sparsify", "summarize", "validate_rule",
]
