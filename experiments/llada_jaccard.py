"""LLaDA: per-step sparsity and consecutive / drift Jaccard of FFN masks while denoising.

Default: the embedded character-level LLaDA-architecture model (trained on real text, runs
offline in minutes). Real checkpoints: --model llada-8b-base | llada-8b-instruct | hub id | dir.

    python experiments/llada_jaccard.py
    python experiments/llada_jaccard.py --paper-compat    # + the released code's flattened computation
    python experiments/llada_jaccard.py --model llada-8b-instruct --dtype bfloat16 --steps 256 \
        --gen-length 256 --block-length 32 --value 0.9 --chat
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common.cli import check_device, choose_dtype, output_folder, run_main
from common.cli.flags import check_thread_environment
from common.core.sites import SITES
from common.models.aliases import lookup
from llada_sparsity.modeling import load_llada
from llada_sparsity.study import JaccardStudy, apply_chat_template, read_prompts, run_study


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llada-chars",
                        help="llada-8b-base, llada-8b-instruct, a hub id, a checkpoint directory, or tiny-llada-chars")
    parser.add_argument("--site", default="intermediate", choices=SITES)
    parser.add_argument("--rule", default="topp", choices=["topp", "maxp", "topk"])
    parser.add_argument("--criterion", default="magnitude",
                        help="magnitude (default: the magnitude score with --rule), teal, cats, scap, wina, larosa, a "
                             "score with --rule, or score-selection (common.core.criteria); a calibrated one reads "
                             "--value as its target sparsity")
    parser.add_argument("--value", type=float, default=0.9, help="rule threshold p (the paper fixes it at the critical "
                        "value), or a calibrated criterion's target sparsity")
    parser.add_argument("--power", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--cfg-scale", type=float, default=0.0)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--remasking", default="low_confidence", choices=["low_confidence", "random"])
    parser.add_argument("--prompts", default=None, help="a .txt (one prompt per line) or .jsonl file")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts (0 = all)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts denoised together (left-padded)")
    parser.add_argument("--paper-compat", action="store_true",
                        help="also run the released code's computation (top-p over the flattened sequence, "
                             "flattened Jaccard) and compare it with the per-token one")
    parser.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template (instruct)")
    parser.add_argument("--reuse", type=int, nargs="*", default=None,
                        help="mask-reuse experiment: reuse masks for r steps (default 1 2 4 8 for the magnitude "
                             "criterion, none for the others; give no value to skip it)")
    parser.add_argument("--dump-every", type=int, default=0, help="save bit-packed masks every k steps")
    parser.add_argument("--dtype", default="auto", help="auto (default: bfloat16 on GPUs and CPUs with native "
                        "bfloat16, else float32), float32, bfloat16 or float16")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, or 'auto' for device_map=auto")
    parser.add_argument("--output", default=None, help="results folder (default results/llada_jaccard/<model>)")
    parser.add_argument("--allow-mixed", action="store_true",
                        help="resume a results folder written with other torch / transformers / lm-eval versions")
    parser.add_argument("--rehearse", action="store_true", help="run the whole study on a small random-weight "
                        "replica of the model's structure (offline, CPU); outputs say rehearsal")
    args = parser.parse_args()
    if args.rehearse:
        from common.cli.rehearsal import rehearsal_defaults

        from common.core.criteria import parse_criterion

        reuse = [1, 2] if parse_criterion(args.criterion, args.rule).is_rule else []
        rehearsal_defaults(parser, args, limit=4, steps=16, gen_length=32, block_length=16, reuse=reuse)
    return args


def main() -> None:
    args = parse_args()
    from common.models.plan import print_plan
    from common.cli.rehearsal import mark_rehearsal
    from common.models.replica import rehearsal_label, rehearsal_model

    real_name = args.model
    if args.rehearse:  # outputs (folder, summary, figure titles) carry the rehearsal label
        args.model = rehearsal_label(real_name)
    from common.core.criteria import parse_criterion

    criterion = parse_criterion(args.criterion, args.rule)
    if args.reuse is None:
        args.reuse = [1, 2, 4, 8] if criterion.is_rule else []
    study = JaccardStudy(model=args.model, site=args.site, rule=criterion.selection, score=criterion.score,
                         value=args.value, power=args.power,
                         steps=args.steps, gen_length=args.gen_length, block_length=args.block_length,
                         cfg_scale=args.cfg_scale, temperature=args.temperature, remasking=args.remasking,
                         reuse=args.reuse, dump_every=args.dump_every, batch_size=args.batch_size,
                         paper_compat=args.paper_compat)
    study.validate()
    check_thread_environment()
    study.check_length(_max_positions_on_disk(real_name))
    prompts = read_prompts(args.prompts, args.limit)
    device = check_device(None if args.device == "auto" else args.device)
    dtype, why = choose_dtype(args.dtype, device)
    print(f"dtype {str(dtype).replace('torch.', '')} ({why}); device {args.device or device}")
    device_map = "auto" if args.device == "auto" else None
    if args.rehearse:  # random-weight replica of the real structure
        model, tokenizer, _ = rehearsal_model(real_name, "llada", dtype, device)
    else:
        print_plan(args.model, dtype, args.device or device, batch=args.batch_size * (2 if args.cfg_scale > 0 else 1),
                   sequence=args.gen_length + 256, family="llada")  # prompts assumed under 256 tokens
        model, tokenizer = load_llada(args.model, dtype=dtype, device=None if device_map else device,
                                      device_map=device_map)
    if tokenizer is None:
        raise FileNotFoundError(f"{args.model} has no tokenizer files; add them to the checkpoint directory")
    if args.chat:
        prompts = apply_chat_template(tokenizer, prompts)
    output = output_folder(args, "llada_jaccard")
    summary = run_study(model, tokenizer, study, prompts, output, allow_mixed=args.allow_mixed)
    if args.rehearse:
        mark_rehearsal(output, real_name, model)
    print(f"sparsity ({args.site}, element-weighted): "
          + ", ".join(f"{s}={v['element_weighted']:.3f}" for s, v in summary["sparsity_per_site"].items()))
    print(f"consecutive Jaccard (generated, mean over steps>0 and layers): "
          f"{summary['mean_consecutive_jaccard_generated']:.3f}; drift Jaccard at the last step: "
          f"{summary['final_drift_jaccard_generated']:.3f}")
    for row in summary.get("mask_reuse", []):
        print(f"  reuse r={row['reuse']}: generated tokens changed {row['generated_tokens_changed']:.3f}, "
              f"mean KL {row['kl_recomputed_vs_reused']:.2e}, top-1 agreement {row['top1_agreement']:.3f}")
    for name, row in summary.get("computations", {}).items():
        print(f"  {name}: sparsity {row['sparsity_per_site'][args.site]['element_weighted']:.3f}, consecutive "
              f"Jaccard per token (generated) {row['mean_consecutive_jaccard_generated']:.3f}, flattened (all) "
              f"{row['mean_consecutive_jaccard_flat_all']:.3f}; last-step drift per token (generated) "
              f"{row['final_drift_jaccard_generated']:.3f}, flattened (all) {row['final_drift_jaccard_flat_all']:.3f}")
    print(f"results: {output}/summary.json, per_step_layer.csv, figures/")


def _max_positions_on_disk(model: str) -> int | None:
    """The checkpoint's max_sequence_length when its config is at hand (checked before loading)."""
    alias = lookup(model, "llada")
    if alias is not None and alias.shipped_config() is not None:
        return alias.shipped_config().get("max_sequence_length")
    folder = alias.local() if alias is not None and alias.local is not None else Path(model).expanduser()
    config = Path(folder) / "config.json"
    try:
        return json.loads(config.read_text()).get("max_sequence_length") if config.is_file() else None
    except (OSError, ValueError):
        return None

if __name__ == "__main__":
    run_main(main)
