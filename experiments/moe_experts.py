"""MoE: one global rule value for every expert; critical sparsity, then per-expert sparsity.

Default: an MoE built offline from the real SmolLM2-135M (MoEfication, Mixtral layout, 16
experts, 14 active), the offline task suite, the intermediate site and the paper's MoE grid.

    python experiments/moe_experts.py
    python experiments/moe_experts.py --model qwen3-30b-a3b --device auto --tasks paper --sites intermediate input
"""

from __future__ import annotations

import argparse
import os

from common.cli import add_sweep_arguments, output_folder, run_main, sweep_settings
from common.analysis.critical import PAPER_MOE_GRID
from common.evaluation.store import ResultStore, atomic_write_json
from common.evaluation.tasks import OFFLINE_SUITE, PERPLEXITY_TASK


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="moefied-smollm2-135m",
                        help="qwen3-30b-a3b, olmoe-1b-7b, a hub id, a local directory, or moefied-smollm2-135m")
    add_sweep_arguments(parser, "moe_experts", default_limit=30, bootstrap=500)
    parser.add_argument("--critical-value", type=float, default=None,
                        help="report experts at this rule value instead of the measured critical one")
    parser.add_argument("--experts-implementation", default=None, choices=["grouped_mm", "batched_mm", "eager"])
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from common.analysis.report import write_report
    from common.evaluation.bridge import SparseHFLM
    from common.evaluation.sweep import SweepRunner, SweepSpec
    from common.evaluation.tasks import task_manager
    from moe_sparsity.models import load_moe
    from moe_sparsity.study import write_expert_study

    sites, tasks, shard, grid, device, dtype, device_map = sweep_settings(args, PAPER_MOE_GRID)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model, tokenizer = load_moe(args.model, dtype, device, device_map, args.experts_implementation)
    lm = SparseHFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, softmax_dtype="float32",
                    device=str(model.device))
    spec = SweepSpec(model=args.model, sites=sites, tasks=tasks, rule=args.rule, power=args.power, grid=grid,
                     limit=args.limit or None, metric=args.metric)
    output = output_folder(args, "moe_experts")
    store = ResultStore(output)
    manager = task_manager(include_defaults=any(t not in OFFLINE_SUITE + [PERPLEXITY_TASK] for t in tasks))
    runner = SweepRunner(lm, spec, store, manager, shard)
    extra = {"experts_implementation": model.config._experts_implementation}
    if args.search:
        extra["search"] = runner.run_search(args.threshold, args.resolution)
        atomic_write_json(output / "search.json", extra["search"])
    else:
        runner.run_grid()
    summary = write_report(store, spec, output, args.threshold, 1.0, args.bootstrap, extra)
    experts = write_expert_study(store, spec, summary["critical"], output, args.critical_value)
    for site, entry in experts.items():
        print(f"{site}: experts at p={entry['critical_value']} (critical sparsity of the task-average curve "
              f"{entry['critical_sparsity'].get('grid', 0):.3f}, {entry['critical_sparsity'].get('status')}); "
              "per layer min / mean / max expert sparsity:")
        for row in entry["per_layer_pooled"]:
            print(f"  layer {row['layer']:>2}: {row['min']:.3f} / {row['mean']:.3f} / {row['max']:.3f} "
                  f"(std {row['std']:.3f}, {row['experts_unrouted']} unrouted)")
    print(f"results: {output}/experts.json, expert_layers_*.csv, critical.json, figures/")


if __name__ == "__main__":
    run_main(main)
