"""Where the FFN sparsification sites live, per architecture (one row per architecture).

Sites of a GLU FFN ``W_d((W_u x) * act(W_g x))``:

* ``input``: x, the FFN input that feeds both W_g and W_u;
* ``up``: u = W_u x;
* ``gate``: g = act(W_g x), after the activation;
* ``intermediate``: i = u * g, the input of W_d;
* ``all_inputs``: ``input`` and ``intermediate`` together, with the same rule and value.

Each site is a module (relative to one decoder layer) and whether its *output* (forward hook)
or its first *input* (forward pre-hook) is the site tensor. Adding an architecture is adding
a row to ``ARCHITECTURES``.

Each dense row also names the linear layers of a decoder layer by the input they share
(``LINEAR_INPUTS``): ``attention`` (q, k, v read the attention input), ``attention_output`` (o),
``input`` (gate and up read the FFN input) and ``intermediate`` (down). The weight-aware
criteria read the matrices that consume a site from it, and sparse execution of every linear
layer reads where they are.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch.nn as nn

BASE_SITES = ("input", "up", "gate", "intermediate")
SITES = BASE_SITES + ("all_inputs",)
SITE_GROUPS = {"all_inputs": ("input", "intermediate")}
LINEAR_INPUTS = ("attention", "attention_output", "input", "intermediate")


@dataclass(frozen=True)
class SiteLocation:
    """A module relative to a decoder layer, and which of its tensors is the site."""

    module: str
    tensor: str  # "output": the module's output; "input": its first positional input


@dataclass(frozen=True)
class Architecture:
    """One row of the site table."""

    name: str
    model_types: tuple[str, ...]
    layer_lists: tuple[str, ...]  # candidate paths of the decoder-layer list; the first present wins
    sites: dict[str, SiteLocation] = field(default_factory=dict)
    experts: str | None = None  # fused-experts module (MoE rows); the moe_sparsity package hooks it
    router: str | None = None
    # input group (LINEAR_INPUTS) -> the nn.Linear modules, relative to a decoder layer, that read it
    linears: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def is_moe(self) -> bool:
        return self.experts is not None


_HF_GLU_SITES = {
    "input": SiteLocation("mlp", "input"),
    "up": SiteLocation("mlp.up_proj", "output"),
    "gate": SiteLocation("mlp.act_fn", "output"),
    "intermediate": SiteLocation("mlp.down_proj", "input"),
}
_HF_GLU_LINEARS = {
    "attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention_output": ("self_attn.o_proj",),
    "input": ("mlp.gate_proj", "mlp.up_proj"),
    "intermediate": ("mlp.down_proj",),
}
_HF_DECODER = ("model.layers",)
# Multimodal Gemma 3 checkpoints keep the text decoder under a language_model prefix.
_HF_MULTIMODAL_DECODER = ("model.language_model.layers", "language_model.model.layers", "model.layers")

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", ("llama",), _HF_DECODER, _HF_GLU_SITES, linears=_HF_GLU_LINEARS),
    Architecture("mistral", ("mistral",), _HF_DECODER, _HF_GLU_SITES, linears=_HF_GLU_LINEARS),
    Architecture("qwen2", ("qwen2",), _HF_DECODER, _HF_GLU_SITES, linears=_HF_GLU_LINEARS),
    Architecture("qwen3", ("qwen3",), _HF_DECODER, _HF_GLU_SITES, linears=_HF_GLU_LINEARS),
    Architecture("gemma2", ("gemma2",), _HF_DECODER, _HF_GLU_SITES, linears=_HF_GLU_LINEARS),
    Architecture("gemma3_text", ("gemma3_text",), _HF_DECODER, _HF_GLU_SITES, linears=_HF_GLU_LINEARS),
    Architecture("gemma3", ("gemma3",), _HF_MULTIMODAL_DECODER, _HF_GLU_SITES, linears=_HF_GLU_LINEARS),
    # LLaDA with its official module names (the hub's remote code). The model-level head is
    # also called ff_out: sites are addressed per block, so it never matches.
    Architecture(
        "llada",
        ("llada",),
        ("model.transformer.blocks", "transformer.blocks"),
        {
            "input": SiteLocation("ff_norm", "output"),
            "up": SiteLocation("up_proj", "output"),
            "gate": SiteLocation("act", "output"),
            "intermediate": SiteLocation("ff_out", "input"),
        },
        linears={"attention": ("q_proj", "k_proj", "v_proj"), "attention_output": ("attn_out",),
                 "input": ("ff_proj", "up_proj"), "intermediate": ("ff_out",)},
    ),
    # Fused-experts MoE blocks (transformers 5): experts are 3D parameters, not modules.
    Architecture("qwen3_moe", ("qwen3_moe",), _HF_DECODER, experts="mlp.experts", router="mlp.gate"),
    Architecture("olmoe", ("olmoe",), _HF_DECODER, experts="mlp.experts", router="mlp.gate"),
    Architecture("mixtral", ("mixtral",), _HF_DECODER, experts="mlp.experts", router="mlp.gate"),
)

_BY_MODEL_TYPE = {t: row for row in ARCHITECTURES for t in row.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def detect_architecture(model: nn.Module) -> Architecture:
    """The table row for ``model``, from ``model.config.model_type``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    row = _BY_MODEL_TYPE.get(model_type)
    if row is None:
        raise ValueError(
            f"unsupported architecture {model_type or type(model).__name__!r}; supported model types: "
            f"{', '.join(supported_model_types())} (add a row to common.core.sites.ARCHITECTURES)"
        )
    return row


def expand_sites(sites: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Validate site names and expand groups (``all_inputs`` -> input, intermediate)."""
    if not isinstance(sites, (str, list, tuple)) or not all(isinstance(name, str) for name in sites):
        raise ValueError(f"sites must be a site name or a list of them (from {', '.join(SITES)}), got {sites!r}")
    names = [sites] if isinstance(sites, str) else list(sites)
    if not names:
        raise ValueError(f"no FFN site given; name at least one of {', '.join(SITES)}")
    expanded: list[str] = []
    for name in names:
        if name not in SITES:
            raise ValueError(f"unknown FFN site {name!r}; choose from {', '.join(SITES)}")
        for base in SITE_GROUPS.get(name, (name,)):
            if base not in expanded:
                expanded.append(base)
    return tuple(expanded)


def layer_list_path(model: nn.Module, arch: Architecture | None = None) -> str:
    """Dotted path of the decoder-layer ModuleList in ``model``."""
    arch = arch or detect_architecture(model)
    names = dict(model.named_modules())
    for path in arch.layer_lists:
        if isinstance(names.get(path), nn.ModuleList):
            return path
    raise ValueError(
        f"model of type {arch.name!r} has none of the expected layer lists {', '.join(arch.layer_lists)}; "
        "is it a wrapped or modified model?"
    )


def num_layers(model: nn.Module, arch: Architecture | None = None) -> int:
    return len(model.get_submodule(layer_list_path(model, arch)))


def resolve_layers(model: nn.Module, layers, arch: Architecture | None = None) -> list[int]:
    """Validate layer indices (None = all layers; negative indices count from the end)."""
    total = num_layers(model, arch)
    if layers is None:
        return list(range(total))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, (list, tuple, range)) or not layers:
        raise ValueError(f"layers must be None (every layer) or a non-empty list of layer indices, got {layers!r}")
    resolved = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not -total <= layer < total:
            raise ValueError(f"layer index {layer!r} is out of range: the model has {total} layers (0..{total - 1})")
        resolved.append(int(layer) % total)
    return sorted(set(resolved))


def site_module_names(model: nn.Module, sites, layers=None) -> dict[tuple[int, str], tuple[str, str]]:
    """Map (layer, base site) -> (full module name, "input" | "output") for a dense GLU model."""
    arch = detect_architecture(model)
    if arch.is_moe:
        raise ValueError(
            f"{arch.name} keeps its FFN in fused experts; use moe_sparsity.ExpertSparsifier for it"
        )
    prefix = layer_list_path(model, arch)
    out = {}
    for layer in resolve_layers(model, layers, arch):
        for site in expand_sites(sites):
            loc = arch.sites[site]
            out[(layer, site)] = (f"{prefix}.{layer}.{loc.module}", loc.tensor)
    return out


def linear_module_names(model: nn.Module, group: str, layers=None) -> dict[int, tuple[str, ...]]:
    """Map layer -> the full names of the nn.Linear modules that read input ``group`` (one of
    ``LINEAR_INPUTS``; the FFN sites ``input`` and ``intermediate`` are groups too)."""
    if group not in LINEAR_INPUTS:
        raise ValueError(f"unknown linear input group {group!r}; choose from {', '.join(LINEAR_INPUTS)}")
    arch = detect_architecture(model)
    if group not in arch.linears:
        raise ValueError(f"the site table row {arch.name!r} names no linear layers for {group!r} "
                         "(add them to its linears in common.core.sites.ARCHITECTURES)")
    prefix = layer_list_path(model, arch)
    return {layer: tuple(f"{prefix}.{layer}.{name}" for name in arch.linears[group])
            for layer in resolve_layers(model, layers, arch)}
