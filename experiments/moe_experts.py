"""MoE: one global rule value for every expert; critical sparsity, then per-expert sparsity.

Default: an MoE built offline from the real SmolLM2-135M (MoEfication, Mixtral layout, 16
experts, 14 active), the offline task suite, the intermediate site and the paper's MoE grid.

    python experiments/moe_experts.py
    python experiments/moe_experts.py --model qwen3-30b-a3b --device auto --tasks paper --sites intermediate input
"""

from __future__ import annotations

import argparse
import os

from common.cli import add_sweep_arguments, finite_float, output_folder, run_main, sweep_settings
from common.evaluation.sweep import PAPER_MOE_GRID
from common.core.rules import validate_rule


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="moefied-smollm2-135m",
                        help="qwen3-30b-a3b, olmoe-1b-7b, a hub id, a local directory, or moefied-smollm2-135m")
    add_sweep_arguments(parser, "moe_experts", default_limit=30, bootstrap=500, item_planning=False)
    parser.add_argument("--critical-value", type=finite_float, default=None,
                        help="report experts at this rule value instead of the measured critical one")
    parser.add_argument("--experts-implementation", default=None, choices=["grouped_mm", "batched_mm", "eager"])
    parser.add_argument("--rehearse", action="store_true", help="run the whole study on a small random-weight "
                        "replica of the model's structure (offline, CPU, about a minute); outputs say rehearsal")
    args = parser.parse_args()
    if args.rehearse:
        from common.cli.rehearsal import QUICK_SWEEP, rehearsal_defaults

        rehearsal_defaults(parser, args, search=args.grid is None, **QUICK_SWEEP)
    return args


def main() -> None:
    args = parse_args()
    from common.cli.sweep import open_store, run_sweep
    from common.evaluation.bridge import SparseHFLM
    from common.evaluation.sweep import SweepSpec
    from moe_sparsity.models import load_moe
    from moe_sparsity.study import write_expert_study

    sites, tasks, shard, grid, device, dtype, device_map = sweep_settings(args, PAPER_MOE_GRID)
    if args.critical_value is not None:
        validate_rule(args.rule, args.critical_value, args.power)
        grid = sorted(set(grid) | {args.critical_value}, reverse=True)  # its cells are needed for the expert tables
    from common.cli.flags import criterion_grids
    from moe_sparsity.experts import check_expert_criterion, expert_calibration

    grids = criterion_grids(args, grid)
    if len(grids) > 1:
        raise ValueError("the expert study reads one criterion per run; give --criterion once (e.g. weighted)")
    criterion, sites, grid = grids[0]
    check_expert_criterion(criterion, sites)  # before the model loads
    from common.models.loading import check_model_name
    from common.models.plan import print_plan
    from common.cli.rehearsal import mark_rehearsal
    from common.models.replica import rehearsal_model

    real_name = args.model
    if args.rehearse:  # random-weight replica of the real structure; outputs labelled as a rehearsal
        model, tokenizer, args.model = rehearsal_model(real_name, "moe", dtype, device,
                                                       experts_implementation=args.experts_implementation)
        dtype = model.dtype
    else:
        check_model_name(args.model, "moe")  # before the plan and the results folder
        print_plan(args.model, dtype, device_map or device, args.batch_size, family="moe")
    output = output_folder(args, "moe_experts")
    store = open_store(output, dtype, device_map or device, args.allow_mixed)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.rehearse:
        model, tokenizer = load_moe(args.model, dtype, device, device_map, args.experts_implementation)
    lm = SparseHFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, softmax_dtype="float32",
                    device=str(model.device))
    spec = SweepSpec(model=args.model, sites=sites, tasks=tasks, rule=args.rule, power=args.power, grid=grid,
                     limit=args.limit or None, metric=args.metric, dtype=str(dtype).replace("torch.", ""),
                     device_type=model.device.type, stop_below=args.stop_below, stop_after=args.stop_after)
    from common.cli.criteria import criterion_runs

    [(spec, calibrate)] = criterion_runs(spec, grids, model, tokenizer, args.model,
                                         calibration_for=lambda c: lambda site, value: expert_calibration(model, c))
    summary = run_sweep(args, lm, spec, store, shard,
                        extra={"experts_implementation": model.config._experts_implementation}, calibrate=calibrate)
    if summary is None:
        return
    experts = write_expert_study(store, spec, summary["critical"], output, args.critical_value)
    if args.rehearse:
        mark_rehearsal(output, real_name, model)
    for site, entry in experts.items():
        print(f"{site}: experts at p={entry['critical_value']} (critical sparsity of the task-average curve "
              f"{entry['critical_sparsity'].get('grid', 0):.3f}, {entry['critical_sparsity'].get('status')}); "
              "per layer min / mean / max expert sparsity:")
        for row in entry["per_layer_pooled"]:
            print(f"  layer {row['layer']:>2}: {row['min']:.3f} / {row['mean']:.3f} / {row['max']:.3f} "
                  f"(std {row['std']:.3f}, {row['experts_unrouted']} unrouted)")
    tables = ", ".join(f"expert_layers_{site}.csv" for site in experts)
    print(f"results: {output}/experts.json, {tables + ', ' if tables else ''}critical.json, figures/")


if __name__ == "__main__":
    run_main(main)
