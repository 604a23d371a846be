"""A small, independent port of the official LLaDA modeling, with the official module names.

Used as a test oracle: it loads an official checkpoint by its own key names (no renaming), so
it checks both the ``llada`` row of the site table (official names) and the project's
Llama-based loader. Bidirectional attention, RMSNorm, RoPE, SwiGLU; no cache, no dropout.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x32).to(x.dtype)


def _rope(x, theta):
    _, _, length, head_dim = x.shape
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * emb.cos() + rotated.float() * emb.sin()).to(x.dtype)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        d, h = c.d_model, c.mlp_hidden_size
        self.attn_norm, self.ff_norm = RMSNorm(d, c.rms_norm_eps), RMSNorm(d, c.rms_norm_eps)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj, self.up_proj = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.ff_out = nn.Linear(h, d, bias=False)
        self.act = nn.SiLU()

    def forward(self, x):
        b, length, d = x.shape
        heads = self.c.n_heads
        z = self.attn_norm(x)
        q, k, v = (proj(z).view(b, length, heads, d // heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = _rope(q, self.c.rope_theta), _rope(k, self.c.rope_theta)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=False)
        x = x + self.attn_out(att.transpose(1, 2).reshape(b, length, d))
        z = self.ff_norm(x)
        return x + self.ff_out(self.act(self.ff_proj(z)) * self.up_proj(z))


class Transformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.wte = nn.Embedding(c.embedding_size, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.ln_f = RMSNorm(c.d_model, c.rms_norm_eps)
        self.ff_out = nn.Linear(c.d_model, c.embedding_size, bias=False)


class Inner(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.transformer = Transformer(c)


class OfficialLLaDA(nn.Module):
    """``model.transformer.*`` names exactly as the official checkpoint."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = SimpleNamespace(**config)
        self.model = Inner(self.config)

    def forward(self, input_ids):
        t = self.model.transformer
        x = t.wte(input_ids)
        for block in t.blocks:
            x = block(x)
        return SimpleNamespace(logits=t.ff_out(t.ln_f(x)))

    @classmethod
    def from_dir(cls, path: Path) -> "OfficialLLaDA":
        config = json.loads((Path(path) / "config.json").read_text())
        model = cls(config)
        missing, unexpected = model.load_state_dict(load_file(str(Path(path) / "model.safetensors")), strict=False)
        assert not unexpected and all(k.endswith("act.inplace") for k in missing), (missing, unexpected)
        return model.eval()

