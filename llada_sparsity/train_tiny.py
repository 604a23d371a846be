"""Train the embedded LLaDA-architecture model: a small character-level masked diffusion LM.

Data: the English text of Python's own documentation topics (``pydoc_data.topics``, shipped
with CPython, PSF licence), so the default run needs nothing from a hub. Objective: LLaDA's
pre-training loss (mask each token with probability t ~ U(eps, 1), cross-entropy on masked
tokens divided by t). The result is saved in the official LLaDA checkpoint format (config
fields and ``model.transformer.*`` names), so it loads through ``load_llada`` like the real one.

    python -m llada_sparsity.train_tiny --output llada_sparsity/data/tiny_llada_chars
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from .char_tokenizer import CharTokenizer
from .modeling import LLaDAModelLM, llama_config_from_llada, to_official_names


def corpus_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def official_config(vocab_size: int, mask_id: int, d_model: int, layers: int, heads: int, hidden: int,
                    max_length: int) -> dict:
    return {
        "model_type": "llada", "architectures": ["LLaDAModelLM"], "activation_type": "silu",
        "block_type": "llama", "d_model": d_model, "n_layers": layers, "n_heads": heads, "n_kv_heads": heads,
        "mlp_hidden_size": hidden, "embedding_size": vocab_size, "vocab_size": vocab_size,
        "mask_token_id": mask_id, "eos_token_id": 0, "pad_token_id": 0, "rms_norm_eps": 1e-5,
        "rope": True, "rope_theta": 10000.0, "alibi": False, "include_bias": False,
        "include_qkv_bias": False, "weight_tying": False, "layer_norm_type": "rms",
        "max_sequence_length": max_length, "torch_dtype": "float32",
    }


def masked_diffusion_loss(model, batch: torch.Tensor, mask_id: int, eps: float = 1e-3) -> tuple:
    t = (1 - eps) * torch.rand(batch.shape[0], 1) + eps
    masked = torch.rand(batch.shape) < t
    noisy = torch.where(masked, mask_id, batch)
    logits = model(noisy).logits
    loss = F.cross_entropy(logits[masked], batch[masked], reduction="none") / t.expand_as(masked)[masked]
    accuracy = (logits[masked].argmax(-1) == batch[masked]).float().mean()
    return loss.sum() / batch.numel(), accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(Path(__file__).parent / "data" / "tiny_llada_chars"))
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    tokenizer = CharTokenizer.default()
    data = torch.tensor(tokenizer.encode(corpus_text()), dtype=torch.long)
    split = int(0.95 * len(data))
    train, held_out = data[:split], data[split:]
    config = official_config(tokenizer.vocab_size, tokenizer.mask_token_id, args.d_model, args.layers, args.heads,
                             args.hidden, args.length)
    model = LLaDAModelLM(llama_config_from_llada(config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))

    def batch_from(source: torch.Tensor, size: int) -> torch.Tensor:
        starts = torch.randint(0, len(source) - args.length, (size,))
        return torch.stack([source[s: s + args.length] for s in starts])

    start = time.time()
    model.train()
    progress = tqdm(range(args.steps), desc="training")
    for step in progress:
        loss, accuracy = masked_diffusion_loss(model, batch_from(train, args.batch), tokenizer.mask_token_id)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy.item():.3f}")
    model.eval()
    with torch.no_grad():
        generator_state = torch.get_rng_state()
        torch.manual_seed(1234)
        accuracies = [masked_diffusion_loss(model, batch_from(held_out, 64), tokenizer.mask_token_id)[1]
                      for _ in range(10)]
        torch.set_rng_state(generator_state)
    counts = torch.bincount(held_out, minlength=tokenizer.vocab_size).float()
    chance = float(counts.max() / counts.sum())
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    save_file(to_official_names(model.state_dict()), str(output / "model.safetensors"))
    tokenizer.save(output)
    card = {
        "trained_on": "pydoc_data.topics (Python documentation text shipped with CPython, PSF licence)",
        "train_characters": len(train), "held_out_characters": len(held_out), "steps": args.steps,
        "batch": args.batch, "length": args.length, "seconds": round(time.time() - start, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "held_out_masked_token_accuracy": round(float(torch.stack(accuracies).mean()), 4),
        "chance_most_frequent_character": round(chance, 4),
    }
    (output / "training.json").write_text(json.dumps(card, indent=1) + "\n")
    print(json.dumps(card, indent=1))


if __name__ == "__main__":
    main()
