"""MoE model names: aliases of the paper's checkpoints and the embedded MoEfied default."""

from __future__ import annotations

from pathlib import Path

import torch

from common.models.loading import cache_dir, resolve_model_path
from common.core.sites import ARCHITECTURES

MOE_ALIASES = {
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "olmoe-1b-7b": "allenai/OLMoE-1B-7B-0125",
}
EMBEDDED_MOE = "moefied-smollm2-135m"
MOE_MODEL_TYPES = {t for row in ARCHITECTURES if row.is_moe for t in row.model_types}


def resolve_moe_path(name: str) -> str:
    if name == EMBEDDED_MOE:
        from .moefy import build_moefied

        return str(build_moefied(cache_dir() / EMBEDDED_MOE))
    if name not in MOE_ALIASES and "/" not in name and not Path(name).expanduser().is_dir():
        known = ", ".join([EMBEDDED_MOE] + sorted(MOE_ALIASES))
        raise ValueError(f"unknown MoE model {name!r}: give a local directory, a hub id or one of: {known}")
    return resolve_model_path(MOE_ALIASES.get(name, name))


def memory_estimate(config, dtype: torch.dtype) -> float:
    """GiB the weights need in ``dtype`` (counted on the meta device, nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size() / 2 ** 30


def load_moe(name: str, dtype: torch.dtype, device: str = "cpu", device_map=None,
             experts_implementation: str | None = None):
    """(model, tokenizer) for a fused-experts MoE; refuses dense models in one line."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_moe_path(name)
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in MOE_MODEL_TYPES:
        raise ValueError(f"{name} is a {config.model_type!r} model, not a mixture of experts "
                         f"({', '.join(sorted(MOE_MODEL_TYPES))}); use experiments/dense_sweep.py for dense models")
    print(f"{name}: the weights need about {memory_estimate(config, dtype):.2f} GiB in {str(dtype).replace('torch.', '')}")
    kwargs = {"experts_implementation": experts_implementation} if experts_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map, **kwargs)
    if device_map is None:
        model = model.to(device)
    return model.eval(), AutoTokenizer.from_pretrained(path)
