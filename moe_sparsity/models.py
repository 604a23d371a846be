"""MoE model names (rows of the shared alias registry) and the MoE loader."""

from __future__ import annotations

from pathlib import Path

import torch

from common.core.sites import ARCHITECTURES
from common.models.aliases import ModelAlias, register
from common.models.loading import cache_dir, load_pretrained, resolve_model_path

EMBEDDED_MOE = "moefied-smollm2-135m"
MOE_MODEL_TYPES = {t for row in ARCHITECTURES if row.is_moe for t in row.model_types}


def embedded_moe_dir() -> Path:
    """The MoEfied SmolLM2-135M (built once from the real dense model, then cached)."""
    from .moefy import build_moefied

    return build_moefied(cache_dir() / EMBEDDED_MOE)


register(
    ModelAlias("qwen3-30b-a3b", "moe", hub_id="Qwen/Qwen3-30B-A3B", config="qwen3-30b-a3b"),
    # The shipped config is OLMoE-1B-7B-0924's; the 0125 release has the same layout.
    ModelAlias("olmoe-1b-7b", "moe", hub_id="allenai/OLMoE-1B-7B-0125", config="olmoe-1b-7b"),
    ModelAlias(EMBEDDED_MOE, "moe", local=embedded_moe_dir),
)


def resolve_moe_path(name: str) -> str:
    return resolve_model_path(name, family="moe")


def load_moe(name: str, dtype: torch.dtype, device: str = "cpu", device_map=None,
             experts_implementation: str | None = None):
    """(model, tokenizer) for a fused-experts MoE; refuses dense models in one line."""

    def must_be_moe(config) -> None:
        if config.model_type not in MOE_MODEL_TYPES:
            raise ValueError(f"{name} is a {config.model_type!r} model, not a mixture of experts "
                             f"({', '.join(sorted(MOE_MODEL_TYPES))}); use experiments/dense_sweep.py for dense models")

    kwargs = {"experts_implementation": experts_implementation} if experts_implementation else {}
    return load_pretrained(name, resolve_moe_path(name), dtype, device, device_map, must_be_moe, **kwargs)
