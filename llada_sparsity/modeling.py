"""LLaDA as a stock transformers Llama decoder with bidirectional attention.

LLaDA's blocks are LLaMA blocks; only the attention is bidirectional. ``LLaDAModelLM``
subclasses ``LlamaForCausalLM`` and turns the caller's 2D padding mask (or none) into a 4D
boolean mask that lets every query see every real key, so the model runs under the
transformers 5 the rest of the toolkit uses: sdpa, ``device_map="auto"``, bf16, and the
``llama`` row of the site table. ``load_llada`` reads official checkpoints (``model_type:
llada``, ``model.transformer.*`` weight names) without remote code by mapping the key names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from common.models.aliases import ModelAlias, lookup, register, register_config_converter
from common.models.loading import first_line, resolve_model_path

from .char_tokenizer import VOCAB_FILE, CharTokenizer

EMBEDDED_LLADA = Path(__file__).parent / "data" / "tiny_llada_chars"  # the embedded default (train_tiny.py)
# Official LLaDA special ids (8B tokenizer); small checkpoints carry their own in config.json.
LLADA_8B_MASK_ID = 126336
LLADA_8B_EOS_ID = 126081
LLADA_8B_EOT_ID = 126348

# Official LLaDA module names -> Llama module names: per block, and at the model level.
OFFICIAL_BLOCK_NAMES = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj", "attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm",
    "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj",
}
OFFICIAL_TOP_NAMES = {"wte": "model.embed_tokens", "ln_f": "model.norm", "ff_out": "lm_head"}
# As regexes for from_pretrained(key_mapping=...).
OFFICIAL_TO_LLAMA_KEYS = {
    **{rf"^model\.transformer\.{old}\.": f"{new}." for old, new in OFFICIAL_TOP_NAMES.items()},
    **{rf"^model\.transformer\.blocks\.(\d+)\.{old}\.": rf"model.layers.\1.{new}."
       for old, new in OFFICIAL_BLOCK_NAMES.items()},
}


def official_to_llama_name(name: str) -> str | None:
    """The Llama parameter name an official checkpoint key loads into (first matching rule), or None."""
    for pattern, replacement in OFFICIAL_TO_LLAMA_KEYS.items():
        renamed, count = re.subn(pattern, replacement, name)
        if count:
            return renamed
    return None


def to_official_names(state: dict) -> dict:
    """Llama parameter names -> official LLaDA names (the inverse of the loader's mapping)."""
    block = {new: old for old, new in OFFICIAL_BLOCK_NAMES.items()}
    top = {new: old for old, new in OFFICIAL_TOP_NAMES.items()}
    out = {}
    for name, tensor in state.items():
        module, param = name.rsplit(".", 1)
        if module.startswith("model.layers."):
            _, _, index, rest = module.split(".", 3)
            out[f"model.transformer.blocks.{index}.{block[rest]}.{param}"] = tensor.contiguous()
        else:
            out[f"model.transformer.{top[module]}.{param}"] = tensor.contiguous()
    return out


def bidirectional_attention_mask(padding_mask: torch.Tensor | None, batch: int, length: int,
                                 device) -> torch.Tensor:
    """[B, 1, L, L] boolean mask: every query attends to every real key."""
    if padding_mask is None:
        return torch.ones(batch, 1, length, length, dtype=torch.bool, device=device)
    keys = padding_mask.bool()[:, None, None, :]
    return keys.expand(batch, 1, length, padding_mask.shape[-1])


class LLaDAModelLM(LlamaForCausalLM):
    """A Llama decoder with bidirectional attention: LLaDA's architecture.

    ``config.mask_token_id`` holds the diffusion mask id.
    """

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        if attention_mask is None or attention_mask.dim() == 2:
            source = input_ids if input_ids is not None else inputs_embeds
            attention_mask = bidirectional_attention_mask(attention_mask, source.shape[0], source.shape[1],
                                                          source.device)
        kwargs.setdefault("use_cache", False)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               **kwargs)


def llama_config_from_llada(official: dict) -> LlamaConfig:
    """The Llama config equivalent to an official LLaDA config.json."""
    unsupported = [name for name, bad in (
        ("alibi", official.get("alibi")), ("include_bias", official.get("include_bias")),
        ("include_qkv_bias", official.get("include_qkv_bias")), ("weight_tying", official.get("weight_tying")),
        ("rope", not official.get("rope", True)),
    ) if bad]
    if unsupported or official.get("activation_type", "silu") not in ("silu", "swiglu"):
        raise ValueError(f"LLaDA config uses options this loader does not support: {unsupported or 'activation'}")
    d_model, heads = official["d_model"], official["n_heads"]
    config = LlamaConfig(
        vocab_size=official.get("embedding_size") or official["vocab_size"],
        hidden_size=d_model,
        intermediate_size=official["mlp_hidden_size"],
        num_hidden_layers=official["n_layers"],
        num_attention_heads=heads,
        num_key_value_heads=official.get("n_kv_heads") or heads,
        rms_norm_eps=official.get("rms_norm_eps", 1e-5),
        rope_theta=official.get("rope_theta", 10000.0),
        max_position_embeddings=official.get("max_sequence_length", 4096),
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        pad_token_id=official.get("pad_token_id"),
        eos_token_id=official.get("eos_token_id"),
    )
    config.rope_parameters = {"rope_type": "default", "rope_theta": official.get("rope_theta", 10000.0)}
    config.mask_token_id = official.get("mask_token_id", LLADA_8B_MASK_ID)
    config.architectures = ["LLaDAModelLM"]
    return config


def embedded_llada_dir() -> Path:
    return EMBEDDED_LLADA


# Base and Instruct share one layout: the shipped config is Instruct's.
register_config_converter("llada", llama_config_from_llada, LLaDAModelLM)
register(
    ModelAlias("llada-8b-base", "llada", hub_id="GSAI-ML/LLaDA-8B-Base", config="llada-8b-instruct"),
    ModelAlias("llada-8b-instruct", "llada", hub_id="GSAI-ML/LLaDA-8B-Instruct", config="llada-8b-instruct"),
    ModelAlias("tiny-llada-chars", "llada", local=embedded_llada_dir),
)


def resolve_llada_path(path_or_id: str) -> Path:
    """A local checkpoint directory for an alias, hub id or path (downloads from the hub if reachable)."""
    try:
        target = resolve_model_path(path_or_id, family="llada")
    except (FileNotFoundError, ValueError) as error:
        raise FileNotFoundError(f"cannot find LLaDA checkpoint {path_or_id!r}: {first_line(error)}") from None
    if Path(target).is_dir():
        return Path(target)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(target, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                              "tokenizer*"]))
    except Exception as error:  # unknown repo, no token, connection lost
        raise FileNotFoundError(
            f"cannot find LLaDA checkpoint {path_or_id!r}: the hub download failed ({type(error).__name__}: "
            f"{first_line(error)}); download {target} with `hf download {target}` and pass its path"
        ) from None


def _check_checkpoint(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a LLaDA checkpoint directory")
    official = json.loads(config_file.read_text())
    if official.get("model_type") != "llada":
        raise ValueError(f"{path} is not an official LLaDA checkpoint (model_type is "
                         f"{official.get('model_type')!r}, expected 'llada')")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise FileNotFoundError(f"{path} misses weight shards {', '.join(missing)}; re-download the checkpoint")
    elif not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors (or index): the checkpoint weights are missing")
    return official


def load_llada(path_or_id: str, dtype: torch.dtype | str | None = None, device: str | None = None,
               device_map=None, with_tokenizer: bool = True):
    """Load an official LLaDA checkpoint without remote code. Returns (model, tokenizer or None)."""
    path = resolve_llada_path(str(path_or_id))
    official = _check_checkpoint(path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    config = llama_config_from_llada(official)
    model = LLaDAModelLM.from_pretrained(
        str(path), config=config, key_mapping=OFFICIAL_TO_LLAMA_KEYS, dtype=dtype or torch.float32,
        device_map=device_map, attn_implementation="sdpa",
    )
    expected_vocab = config.vocab_size
    if model.lm_head.weight.shape[0] != expected_vocab:
        raise ValueError(f"{path}: head has {model.lm_head.weight.shape[0]} rows, config says {expected_vocab}")
    if device is not None and device_map is None:
        model = model.to(device)
    model.eval()
    tokenizer = None
    if with_tokenizer and (path / VOCAB_FILE).is_file():
        tokenizer = CharTokenizer.from_dir(path)
    elif with_tokenizer and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def is_llada_name(name: str) -> bool:
    """True for a LLaDA alias, or a local directory holding an official LLaDA config."""
    if lookup(name, "llada") is not None or name.startswith("GSAI-ML/LLaDA"):
        return True
    config = Path(name).expanduser() / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "llada"
