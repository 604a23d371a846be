"""Rehearsal replicas: random-weight models with a real checkpoint's structure, small enough for a CPU.

A replica keeps what the studies' code paths depend on -- layer count, number of experts, top-k,
routing normalization (``norm_topk_prob``), QK-norm (the architecture class), attention and
key/value head counts (the GQA ratio), vocabulary size and special token ids (LLaDA's mask and
eos ids) -- and shrinks only widths: head dimension, hidden size, FFN and expert widths. Running
a study on it exercises every hook (every expert of every layer) end to end before renting GPUs.
Its numbers say nothing about the real model: every output is labelled a rehearsal.

The tokenizer is a small byte-pair tokenizer trained here on Python's own documentation text
(offline, deterministic); its ids are a subset of the replica's vocabulary.
"""

from __future__ import annotations

import torch

from common.models.aliases import hf_config, lookup, model_class_for, real_model_aliases

REPLICA_HEAD_DIM = 4  # hidden size = attention heads x this (OLMoE's QK-norm spans all heads)
REPLICA_EXPERT_WIDTH = 16
REPLICA_TOKENIZER_VOCAB = 2048
REHEARSAL_SUFFIX = "-rehearsal"


def replica_config(name: str, family: str | None = None, layers: int | None = None):
    """The shipped config of ``name`` with widths shrunk (and optionally fewer ``layers``, for tests)."""
    row = lookup(name, family)
    if row is None or row.config is None:
        known = ", ".join(f"{r.name} ({r.family})" for r in real_model_aliases())
        raise ValueError(f"no shipped config for {name!r}, so no rehearsal replica; configs ship for: {known}")
    config = hf_config(row.shipped_config())
    heads = config.num_attention_heads
    config.head_dim = REPLICA_HEAD_DIM
    config.hidden_size = heads * REPLICA_HEAD_DIM
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if experts and hasattr(config, "moe_intermediate_size"):  # Qwen3-MoE: experts and (unused) dense MLP widths
        config.moe_intermediate_size = REPLICA_EXPERT_WIDTH
        config.intermediate_size = 2 * config.hidden_size
    elif experts:  # OLMoE, Mixtral: intermediate_size is the expert width
        config.intermediate_size = REPLICA_EXPERT_WIDTH
    else:
        config.intermediate_size = 2 * config.hidden_size
    if layers is not None:
        config.num_hidden_layers = layers
        if hasattr(config, "max_window_layers"):
            config.max_window_layers = min(config.max_window_layers, layers)
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
    return config


def replica_tokenizer(vocab_size: int = REPLICA_TOKENIZER_VOCAB):
    """A byte-level BPE tokenizer trained on Python's documentation (offline, deterministic)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|pad|>", "<|eos|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [topics[key] for key in sorted(topics)]
    tokenizer.train_from_iterator(text, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|pad|>", eos_token="<|eos|>")
    fast.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")  # so --chat can be rehearsed
    return fast


def build_replica(name: str, family: str | None = None, layers: int | None = None, seed: int = 0,
                  dtype: torch.dtype = torch.float32, device: str = "cpu", experts_implementation: str | None = None):
    """(model, tokenizer) of the random-weight replica of ``name`` (see the module docstring)."""
    config = replica_config(name, family, layers)
    tokenizer = replica_tokenizer()
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the replica tokenizer has {len(tokenizer)} ids, more than {name}'s vocabulary")
    torch.manual_seed(seed)
    model_class = model_class_for(lookup(name, family).shipped_config())
    build = model_class.from_config if hasattr(model_class, "from_config") else model_class._from_config
    model = build(config, dtype=dtype)
    model.config.rehearsal_of = name
    if experts_implementation:
        model.set_experts_implementation(experts_implementation)
    return model.to(device).eval(), tokenizer


def rehearsal_label(name: str) -> str:
    """The model label of a rehearsal (output folders and figure titles carry it)."""
    return f"{name.replace('/', '--')}{REHEARSAL_SUFFIX}"


def rehearsal_model(name: str, family: str | None, dtype: torch.dtype | None, device: str = "cpu",
                    layers: int | None = None, experts_implementation: str | None = None):
    """(replica, tokenizer, label) for a ``--rehearse`` run: prints the real model's full-size plan
    (informational, nothing refused), then builds the replica (float32 on CPU)."""
    from common.models.plan import print_plan

    print_plan(name, dtype, device, family=family, check=False)
    dtype = torch.float32 if device == "cpu" or dtype is None else dtype
    model, tokenizer = build_replica(name, family, layers=layers, dtype=dtype, device=device,
                                     experts_implementation=experts_implementation)
    label = rehearsal_label(name)
    print(f"REHEARSAL: random-weight replica of {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters, {model.config.num_hidden_layers} layers, widths shrunk); outputs are labelled {label!r} "
          "and say nothing about the real model")
    return model, tokenizer, label
