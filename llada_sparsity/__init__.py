"""LLaDA: checkpoint loading, denoising loop, per-step masks and Jaccard, Monte Carlo likelihood."""

from .generation import DenoisingStep, generate
from .jaccard import StepJaccard, jaccard_per_token, pack_mask, unpack_mask
from .likelihood import log_likelihood
from .modeling import LLaDAModelLM, load_llada
from .reuse import ReusedMaskSparsifier, mask_reuse_experiment

__all__ = ["DenoisingStep", "LLaDAModelLM", "ReusedMaskSparsifier", "StepJaccard", "generate", "jaccard_per_token",
           "load_llada", "log_likelihood", "mask_reuse_experiment", "pack_mask", "unpack_mask"]
