"""LLaDA: checkpoint loading, denoising loop, per-step masks and Jaccard, Monte Carlo likelihood."""

from .generation import DenoisingStep, generate, guided_logits
from .jaccard import StepJaccard, jaccard_from_dump, jaccard_per_token, pack_mask, read_mask_dump, unpack_mask
from .likelihood import log_likelihood
from .modeling import LLaDAModelLM, load_llada
from .paper_compat import FlattenedSparsifier, flattened_keep_mask
from .reuse import ReusedMaskSparsifier, ReuseProbe, mask_reuse_experiment

__all__ = ["DenoisingStep", "FlattenedSparsifier", "LLaDAModelLM", "ReuseProbe", "ReusedMaskSparsifier", "StepJaccard",
           "flattened_keep_mask", "generate", "guided_logits", "jaccard_from_dump", "jaccard_per_token", "load_llada",
           "log_likelihood", "mask_reuse_experiment", "pack_mask", "read_mask_dump", "unpack_mask"]
