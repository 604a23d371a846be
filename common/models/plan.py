"""Full-size plan of a model before any download: parameters, memory, and whether it fits here.

The model is built from its configuration on the meta device (no weights allocated), so the
parameter count is the real one. The configuration comes from the package (real-model aliases
ship their published config.json), a local directory, or the hub cache; a hub id with none of
these is reported as needing its config from the hub. Memory needed = the weights in the chosen
dtype + the largest single activation a study holds (see ``largest_activation``); it is compared
with the free memory of the visible CUDA devices (device_map=auto spreads the weights over them)
or, on CPU, with the available host RAM (free plus the page cache the kernel gives back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.models.aliases import hf_config, lookup, lookup_hub_id, read_config_json
from common.models.hub import cached_file

GIB = 2 ** 30
DEFAULT_BATCH, DEFAULT_SEQUENCE = 16, 512  # the paper's task items are shorter than 512 tokens


@dataclass(frozen=True)
class DeviceMemory:
    name: str
    free: int  # bytes
    total: int


@dataclass
class ModelPlan:
    name: str
    config_source: str
    model_type: str
    parameters: int
    dtype: torch.dtype
    activation_bytes: int
    activation_note: str
    devices: list[DeviceMemory] = field(default_factory=list)
    structure: str = ""

    @property
    def weight_bytes(self) -> int:
        return self.parameters * torch.empty((), dtype=self.dtype).element_size()

    @property
    def need_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes

    def devices_needed(self) -> int | None:
        """How many of the visible devices (largest free memory first) hold weights + activation; None: too few."""
        total = 0
        for count, device in enumerate(sorted(self.devices, key=lambda d: -d.free), start=1):
            total += device.free
            if total >= self.need_bytes:
                return count
        return None

    def fits(self) -> bool:
        return self.devices_needed() is not None

    def lines(self) -> list[str]:
        dtype = str(self.dtype).replace("torch.", "")
        free = sum(d.free for d in self.devices)
        names = ", ".join(f"{d.name} {d.free / GIB:.1f} of {d.total / GIB:.1f} GiB free" for d in self.devices)
        needed = self.devices_needed()
        verdict = (f"fits on {needed} of {len(self.devices)} visible device(s)" if needed else
                   f"does NOT fit ({free / GIB:.1f} GiB free)")
        return [
            f"plan for {self.name} ({self.model_type}, {self.config_source}): {_count(self.parameters)} parameters; "
            f"the weights need about {self.weight_bytes / GIB:.2f} GiB in {dtype}",
            f"  structure: {self.structure}",
            f"  largest activation: {self.activation_bytes / GIB:.2f} GiB ({self.activation_note})",
            f"  needs {self.need_bytes / GIB:.2f} GiB; visible: {names} -> {verdict}",
        ]


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def describe_structure(config) -> str:
    """Layers, FFN or experts (count, width, top-k, routing normalization), heads: what the hooks will see."""
    text = config.get_text_config()
    parts = [f"{text.num_hidden_layers} layers", f"hidden {text.hidden_size}"]
    experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None)
    if experts:
        width = getattr(text, "moe_intermediate_size", None) or text.intermediate_size
        parts.append(f"{experts} experts of width {width} per layer ({text.num_hidden_layers * experts} in all), "
                     f"top-{text.num_experts_per_tok}, norm_topk_prob {getattr(text, 'norm_topk_prob', None)}")
    else:
        parts.append(f"FFN width {text.intermediate_size}")
    parts.append(f"{text.num_attention_heads} query / {text.num_key_value_heads} key-value heads, "
                 f"vocabulary {text.vocab_size}")
    return ", ".join(parts)


def plan_config(name: str, family: str | None = None):
    """(transformers config, where it came from), or (None, why there is none) -- never downloads."""
    row = lookup(name, family) or lookup_hub_id(name, family)
    if row is not None and row.config is not None:
        return hf_config(row.shipped_config()), f"config shipped with the package ({row.config})"
    if row is not None and row.gguf is not None:
        from common.models.loading import cache_dir

        local = cache_dir() / name / "config.json"
        if not local.is_file():
            return None, "its config is read from the GGUF wheel on the first load (a small model)"
        return hf_config(read_config_json(local)), f"cached {local}"
    if row is not None and row.local is not None:
        local = Path(row.local()) / "config.json"
        return hf_config(read_config_json(local)), f"local {local}"
    target = row.hub_id if row is not None else name
    local = Path(target).expanduser() / "config.json"
    if local.is_file():
        return hf_config(read_config_json(local)), f"local {local}"
    if "/" in target and not Path(target).expanduser().exists():
        cached = cached_file(target, "config.json")
        if cached is not None:
            return hf_config(read_config_json(cached)), "config from the hub cache"
        return None, f"no config shipped or cached: the plan needs {target}'s config.json from the hub or the cache"
    return None, "no config.json found"


def check_supported(config, name: str) -> None:
    """A one-line error, before any weight loads, for a model that has no row in the site table
    (no GLU FFN this toolkit knows how to hook, e.g. GPT-2)."""
    from common.core.sites import supported_model_types

    model_type = getattr(config, "model_type", None)
    if model_type not in supported_model_types():
        raise ValueError(f"{name} is a {model_type!r} model, which the site table does not know (supported: "
                         f"{', '.join(supported_model_types())}); to add a GLU architecture, add a row to "
                         "common.core.sites.ARCHITECTURES (docs/architecture.md)")


def count_parameters_on_meta(config) -> int:
    """Parameters of the model built from ``config`` on the meta device (tied weights counted once)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def largest_activation(config, dtype: torch.dtype, batch: int, sequence: int) -> tuple[int, str]:
    """Bytes and description of the largest single activation tensor of a study's forward pass.

    Assumption: ``batch`` sequences of ``sequence`` tokens at once; candidates are the logits
    (batch x sequence x vocabulary, in float32 because the likelihood's softmax runs in float32),
    a dense FFN's intermediate (batch x sequence x intermediate) and, for fused experts, the
    gate_up output of the routed rows (batch x sequence x top_k x 2 x expert width), both in dtype.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = torch.empty((), dtype=dtype).element_size()
    tokens = batch * sequence
    candidates = [(tokens * text.vocab_size * 4, f"logits {batch} x {sequence} x {text.vocab_size} in float32")]
    experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None)
    if experts:
        width = getattr(text, "moe_intermediate_size", None) or text.intermediate_size
        top_k = text.num_experts_per_tok
        candidates.append((tokens * top_k * 2 * width * size,
                           f"experts gate_up {batch} x {sequence} x {top_k} x {2 * width}"))
    if getattr(text, "intermediate_size", None) and not (experts and not hasattr(text, "moe_intermediate_size")):
        candidates.append((tokens * text.intermediate_size * size,
                           f"FFN intermediate {batch} x {sequence} x {text.intermediate_size}"))
    largest, what = max(candidates)
    return largest, f"{what}; assumes batch {batch}, sequence {sequence}"


def visible_memory(device: str) -> list[DeviceMemory]:
    """Free/total memory of the devices a load on ``device`` uses ('auto': every CUDA device, else host RAM)."""
    if device != "cpu" and torch.cuda.is_available():
        if device in ("auto", "cuda"):
            indices = range(torch.cuda.device_count()) if device == "auto" else [torch.cuda.current_device()]
        else:
            indices = [torch.device(device).index or 0]
        out = []
        for index in indices:
            free, total = torch.cuda.mem_get_info(index)
            out.append(DeviceMemory(f"cuda:{index} ({torch.cuda.get_device_name(index)})", free, total))
        return out
    import psutil  # installed with accelerate

    memory = psutil.virtual_memory()  # available, not free: the page cache is given back on demand
    return [DeviceMemory("cpu RAM", memory.available, memory.total)]


def model_plan(name: str, dtype: torch.dtype, device: str = "cpu", batch: int = DEFAULT_BATCH,
               sequence: int = DEFAULT_SEQUENCE, family: str | None = None) -> ModelPlan | str:
    """The full-size plan, or a one-line reason why there is none (no config available offline)."""
    config, source = plan_config(name, family)
    if config is None:
        return source
    check_supported(config, name)
    max_positions = getattr(config.get_text_config(), "max_position_embeddings", None) or sequence
    sequence = min(sequence, max_positions)
    activation, note = largest_activation(config, dtype, batch, sequence)
    return ModelPlan(name, source, config.model_type, count_parameters_on_meta(config), dtype, activation, note,
                     visible_memory(device), describe_structure(config))


def print_plan(name: str, dtype: torch.dtype | None, device: str | None = "cpu", batch: int | str = DEFAULT_BATCH,
               sequence: int = DEFAULT_SEQUENCE, family: str | None = None, check: bool = True) -> ModelPlan | None:
    """Print the plan before anything is loaded; with ``check``, refuse in one line when it cannot fit."""
    dtype = dtype or torch.bfloat16
    batch = int(batch) if str(batch).isdigit() else DEFAULT_BATCH  # lm-eval's "auto" batch size: assume the default
    plan = model_plan(name, dtype, device or "cpu", max(1, batch), sequence, family)
    if isinstance(plan, str):
        print(f"plan for {name}: {plan}")
        return None
    print("\n".join(plan.lines()))
    if check and not plan.fits():
        free = sum(d.free for d in plan.devices)
        raise ValueError(
            f"{name} does not fit here: it needs about {math.ceil(plan.need_bytes / GIB)} GiB (weights "
            f"{plan.weight_bytes / GIB:.1f} GiB + largest activation {plan.activation_bytes / GIB:.1f} GiB) but the "
            f"visible devices have {free / GIB:.1f} GiB free; use more or larger GPUs (--device auto)"
            + (", bfloat16" if plan.dtype == torch.float32 else "") + " or a smaller --batch-size, or run the "
            "study on a small replica of its structure here with --rehearse")
    return plan
