"""Tiny random-config models, one per row of the site table (no downloads)."""

from __future__ import annotations

import torch
import transformers as T

_COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)

_TEXT = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, {}),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, {}),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {}),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {"head_dim": 8}),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, {"head_dim": 8}),
    "gemma3_text": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, {"head_dim": 8}),
}
DENSE_ARCHITECTURES = list(_TEXT) + ["gemma3"]


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if name == "gemma3":  # multimodal checkpoint: the text decoder sits under language_model
        text = T.Gemma3TextConfig(**_COMMON, head_dim=8)
        vision = T.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=16, patch_size=8)
        model = T.Gemma3ForConditionalGeneration(T.Gemma3Config(text_config=text.to_dict(),
                                                                vision_config=vision.to_dict(), mm_tokens_per_image=4))
    else:
        config_cls, model_cls, extra = _TEXT[name]
        model = model_cls(config_cls(**_COMMON, **extra))
    return model.eval()


def mlp_modules(model):
    """The decoder-layer MLP modules, in layer order."""
    from common.core.sites import layer_list_path

    return [layer.mlp for layer in model.get_submodule(layer_list_path(model))]


def char_tokenizer():
    """A character-level fast tokenizer (vocab < 96 ids), built offline."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {token: i for i, token in enumerate(specials + chars)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def save_tiny_llama(path, seed: int = 0):
    """A tiny random Llama plus the char tokenizer, saved as an HF directory."""
    model = tiny_model("llama", seed)
    model.config.eos_token_id = 1
    model.save_pretrained(str(path))
    char_tokenizer().save_pretrained(str(path))
    return path


MOE_ARCHITECTURES = ["qwen3_moe", "olmoe", "mixtral"]


def tiny_moe(name: str, experts: int = 6, top_k: int = 2, seed: int = 0) -> torch.nn.Module:
    """Tiny fused-experts MoE models (transformers 5 layout)."""
    torch.manual_seed(seed)
    shared = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_experts_per_tok=top_k, pad_token_id=0, eos_token_id=1)
    if name == "qwen3_moe":
        config = T.Qwen3MoeConfig(**shared, intermediate_size=64, moe_intermediate_size=48, num_key_value_heads=2,
                                  num_experts=experts, head_dim=8, norm_topk_prob=True)
        return T.Qwen3MoeForCausalLM(config).eval()
    if name == "olmoe":
        config = T.OlmoeConfig(**shared, intermediate_size=48, num_key_value_heads=4, num_experts=experts)
        return T.OlmoeForCausalLM(config).eval()
    config = T.MixtralConfig(**shared, intermediate_size=48, num_key_value_heads=2, num_local_experts=experts)
    return T.MixtralForCausalLM(config).eval()


def tiny_official_llada():
    """LLaDA with its official module names (the hub's remote-code layout), from the golden checkpoint."""
    from pathlib import Path

    from official_llada import OfficialLLaDA

    return OfficialLLaDA.from_dir(Path(__file__).parent / "golden" / "tiny_llada").eval()


def tiny_model_for_row(row_name: str) -> torch.nn.Module:
    """A tiny model for every row of the site table: a row without one fails the site-table test."""
    if row_name in DENSE_ARCHITECTURES:
        return tiny_model(row_name)
    if row_name in MOE_ARCHITECTURES:
        return tiny_moe(row_name)
    if row_name == "llada":
        return tiny_official_llada()
    raise KeyError(f"no tiny model for the site-table row {row_name!r}: add one to tests/tiny_models.py")
