"""MoEfication: turn a real dense GLU model into a fused-experts MoE with real weights.

The embedded default of the MoE study (no MoE checkpoint can be downloaded here, and random
experts make routing and sparsity meaningless). Following MoEfication (Zhang et al. 2022):

1. Run the dense model on calibration text (CPython's documentation, shipped with Python) and
   collect, per layer, the FFN input x and the magnitude of every intermediate neuron |g * u|.
2. Cluster the neurons into E equal-size experts by co-activation (balanced spherical k-means
   on the neurons' activation-magnitude profiles).
3. Router: a least-squares fit from x to each expert's standardized activation mass.

Measured on SmolLM2-135M (16 experts of 96 neurons, perplexity on 512 tokens of Aesop's
fables; dense 20.1): all 16 active 20.2 (the construction is exact up to the routing weights),
14 active 31.1, 8 active 1813. A SwiGLU FFN is not sparse at the level of neuron clusters, so
the default keeps 14 of 16 experts active.

The result is saved as a stock ``MixtralForCausalLM``: Mixtral's attention is Llama's, so
attention, norms and embeddings are copied exactly. (Qwen3-MoE and OLMoE apply QK-norm in
attention, which a Llama checkpoint cannot be mapped onto without changing the model; their
experts layout is the same fused one, tested on tiny configs.) Mixtral renormalizes the top-k
routing weights to sum to 1, while the dense FFN is the *sum* of its clusters: router logits
are scaled down so the selected weights are all close to 1/k, and each expert's down
projection is multiplied by k, making the MoE output the sum of the selected clusters.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.core.hooks import ActivationCapture


def calibration_text(characters: int = 60000) -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))[:characters]


def balanced_kmeans(profiles: torch.Tensor, clusters: int, iterations: int = 15, seed: int = 0) -> torch.Tensor:
    """Assign each row of ``profiles`` [N, F] to one of ``clusters`` equal-size groups; [N] labels."""
    rows = profiles.shape[0]
    if rows % clusters:
        raise ValueError(f"{rows} neurons cannot be split into {clusters} equal experts")
    size = rows // clusters
    unit = F.normalize(profiles.float(), dim=-1)
    generator = torch.Generator().manual_seed(seed)
    centroids = unit[torch.randperm(rows, generator=generator)[:clusters]]
    labels = torch.zeros(rows, dtype=torch.long)
    for _ in range(iterations):
        labels = _balanced_assignment(unit @ centroids.T, size)
        centroids = F.normalize(torch.stack([unit[labels == e].mean(0) for e in range(clusters)]), dim=-1)
    return labels


def _balanced_assignment(similarity: torch.Tensor, size: int) -> torch.Tensor:
    """Each row to its most similar column with room left (columns take ``size`` rows each).

    Rounds: every unassigned row proposes to its best open column; a column keeps its most
    similar proposers up to its remaining room and closes when full. At most one round per column.
    """
    rows, clusters = similarity.shape
    labels = torch.full((rows,), -1, dtype=torch.long)
    room = torch.full((clusters,), size)
    while bool((labels < 0).any()):
        open_columns = room > 0
        free = torch.nonzero(labels < 0).squeeze(-1)
        scores = similarity[free].masked_fill(~open_columns, float("-inf"))
        choice = scores.argmax(-1)
        best = scores.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
        for column in torch.unique(choice).tolist():
            proposers = free[choice == column]
            ranked = proposers[torch.argsort(best[choice == column], descending=True)]
            taken = ranked[: int(room[column])]
            labels[taken] = column
            room[column] -= len(taken)
    return labels


@torch.no_grad()
def moefy(model, tokenizer, experts: int = 16, top_k: int = 8, router_scale: float = 0.02,
          calibration_tokens: int = 2048, seed: int = 0):
    """A MixtralForCausalLM built from a dense Llama-style model; returns (moe_model, report)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    dense = model.config
    if dense.model_type not in ("llama", "mistral"):
        raise ValueError(f"MoEfication needs a Llama-style dense model, got {dense.model_type!r}")
    ids = tokenizer(calibration_text(), return_tensors="pt")["input_ids"][:, :calibration_tokens]
    chunks = ids.split(512, dim=1)
    with ActivationCapture(model.float(), ["input", "intermediate"]) as capture:
        for chunk in tqdm(chunks, desc="calibration"):
            model(chunk)
    layers = dense.num_hidden_layers
    config = MixtralConfig(
        vocab_size=dense.vocab_size, hidden_size=dense.hidden_size,
        intermediate_size=dense.intermediate_size // experts, num_hidden_layers=layers,
        num_attention_heads=dense.num_attention_heads, num_key_value_heads=dense.num_key_value_heads,
        head_dim=getattr(dense, "head_dim", None), hidden_act=dense.hidden_act,
        max_position_embeddings=dense.max_position_embeddings, rms_norm_eps=dense.rms_norm_eps,
        rope_parameters=getattr(dense, "rope_parameters", None), tie_word_embeddings=dense.tie_word_embeddings,
        num_local_experts=experts, num_experts_per_tok=top_k, bos_token_id=dense.bos_token_id,
        eos_token_id=dense.eos_token_id, pad_token_id=dense.pad_token_id, router_jitter_noise=0.0,
    )
    moe = MixtralForCausalLM(config).eval()
    source = model.state_dict()
    target = moe.state_dict()
    for name in target:
        if ".mlp." not in name:
            target[name] = source[name].float().clone()
    report = {"experts": experts, "top_k": top_k, "router_fit_r2": []}
    for layer in tqdm(range(layers), desc="moefying"):
        x = torch.cat(capture.activations[(layer, "input")])  # [N, H]
        magnitude = torch.cat(capture.activations[(layer, "intermediate")]).abs()  # [N, I]
        labels = balanced_kmeans(magnitude.T, experts, seed=seed)
        prefix = f"model.layers.{layer}.mlp"
        gate, up = source[f"{prefix}.gate_proj.weight"].float(), source[f"{prefix}.up_proj.weight"].float()
        down = source[f"{prefix}.down_proj.weight"].float()
        mass = torch.stack([magnitude[:, labels == e].sum(-1) for e in range(experts)], dim=-1)  # [N, E]
        mass = mass / mass.std()  # one scale for all experts: the router ranks absolute contributions
        # No intercept: the router has no bias, and an intercept would shift experts' rankings.
        solution = torch.linalg.lstsq(x, mass).solution  # [H, E]
        residual = ((x @ solution - mass) ** 2).sum()
        centered = ((mass - mass.mean(0)) ** 2).sum()
        report["router_fit_r2"].append(float(1 - residual / centered))
        target[f"{prefix}.gate.weight"] = router_scale * solution.T.contiguous()
        target[f"{prefix}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([gate[labels == e], up[labels == e]]) for e in range(experts)])
        target[f"{prefix}.experts.down_proj"] = torch.stack([down[:, labels == e] * top_k for e in range(experts)])
    moe.load_state_dict(target)
    report["mean_router_fit_r2"] = sum(report["router_fit_r2"]) / layers
    return moe, report


def build_moefied(alias_dir: Path, dense_name: str = "smollm2-135m", experts: int = 16, top_k: int = 14) -> Path:
    """Build (once) and cache the MoEfied model directory."""
    from common.models.loading import cache_lock

    if (alias_dir / "config.json").is_file():
        return alias_dir
    with cache_lock(alias_dir.name):  # shards started together build it once
        if not (alias_dir / "config.json").is_file():  # another process may have built it meanwhile
            _build_moefied(alias_dir, dense_name, experts, top_k)
    return alias_dir


def _build_moefied(alias_dir: Path, dense_name: str, experts: int, top_k: int) -> None:
    from common.models.loading import load_causal_lm

    dense, tokenizer = load_causal_lm(dense_name, dtype=torch.float32)
    moe, report = moefy(dense, tokenizer, experts, top_k)
    partial = alias_dir.with_name(alias_dir.name + ".partial")
    moe.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    (partial / "moefication.json").write_text(json.dumps({"source": dense_name, **report}, indent=1) + "\n")
    partial.rename(alias_dir)
