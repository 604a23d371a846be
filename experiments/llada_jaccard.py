"""LLaDA: per-step sparsity and consecutive / drift Jaccard of FFN masks while denoising.

Default: the embedded character-level LLaDA-architecture model (trained on real text, runs
offline in minutes). Real checkpoints: --model llada-8b-base | llada-8b-instruct | hub id | dir.

    python experiments/llada_jaccard.py
    python experiments/llada_jaccard.py --model llada-8b-instruct --dtype bfloat16 --steps 256 \
        --gen-length 256 --block-length 32 --value 0.9 --chat
"""

from __future__ import annotations

import argparse

import torch

from common.cli import default_device, output_folder, parse_dtype, run_main
from common.core.sites import SITES
from llada_sparsity.modeling import load_llada
from llada_sparsity.study import JaccardStudy, read_prompts, run_study


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llada-chars",
                        help="llada-8b-base, llada-8b-instruct, a hub id, a checkpoint directory, or tiny-llada-chars")
    parser.add_argument("--site", default="intermediate", choices=SITES)
    parser.add_argument("--rule", default="topp", choices=["topp", "maxp", "topk"])
    parser.add_argument("--value", type=float, default=0.9, help="rule threshold p (the paper fixes it at the critical value)")
    parser.add_argument("--power", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--cfg-scale", type=float, default=0.0)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--remasking", default="low_confidence", choices=["low_confidence", "random"])
    parser.add_argument("--prompts", default=None, help="a .txt (one prompt per line) or .jsonl file")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template (instruct)")
    parser.add_argument("--reuse", type=int, nargs="*", default=[1, 2, 4, 8],
                        help="mask-reuse experiment: reuse masks for r steps (give no value to skip it)")
    parser.add_argument("--dump-every", type=int, default=0, help="save bit-packed masks every k steps")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, "
                                                      "bfloat16 on GPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, or 'auto' for device_map=auto")
    parser.add_argument("--output", default=None, help="results folder (default results/llada_jaccard/<model>)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    study = JaccardStudy(model=args.model, site=args.site, rule=args.rule, value=args.value, power=args.power,
                         steps=args.steps, gen_length=args.gen_length, block_length=args.block_length,
                         cfg_scale=args.cfg_scale, temperature=args.temperature, remasking=args.remasking,
                         reuse=args.reuse, dump_every=args.dump_every)
    study.validate()
    prompts = read_prompts(args.prompts, args.limit)
    device = default_device(None if args.device == "auto" else args.device)
    dtype = parse_dtype(args.dtype) or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    device_map = "auto" if args.device == "auto" else None
    model, tokenizer = load_llada(args.model, dtype=dtype, device=None if device_map else device,
                                  device_map=device_map)
    if tokenizer is None:
        raise FileNotFoundError(f"{args.model} has no tokenizer files; add them to the checkpoint directory")
    if args.chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                 tokenize=False) for p in prompts]
    output = output_folder(args, "llada_jaccard")
    summary = run_study(model, tokenizer, study, prompts, output)
    print(f"sparsity ({args.site}, element-weighted): "
          + ", ".join(f"{s}={v['element_weighted']:.3f}" for s, v in summary["sparsity_per_site"].items()))
    print(f"consecutive Jaccard (generated, mean over steps>0 and layers): "
          f"{summary['mean_consecutive_jaccard_generated']:.3f}; drift Jaccard at the last step: "
          f"{summary['final_drift_jaccard_generated']:.3f}")
    for row in summary.get("mask_reuse", []):
        print(f"  reuse r={row['reuse']}: generated tokens changed {row['generated_tokens_changed']:.3f}, "
              f"mean KL {row['kl_recomputed_vs_reused']:.2e}, top-1 agreement {row['top1_agreement']:.3f}")
    print(f"results: {output}/summary.json, per_step_layer.csv, figures/")


if __name__ == "__main__":
    run_main(main)
