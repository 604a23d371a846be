"""Dense GLU models: sweep rule thresholds per FFN site through lm-eval, find critical sparsity.

Default: the real SmolLM2-135M (offline, from a PyPI wheel) on the offline BIG-bench suite,
intermediate site, the paper's 26-point grid, 50 items per task. Resumable: run the same
command again after an interruption. Examples:

    python experiments/dense_sweep.py
    python experiments/dense_sweep.py --model gemma3-270m --sites all --search --limit 100
    python experiments/dense_sweep.py --model google/gemma-3-1b-pt --tasks paper --device cuda --shard 1/4
"""

from __future__ import annotations

import argparse
import os

from common.cli import add_sweep_arguments, output_folder, run_main, sweep_settings
from common.analysis.critical import PAPER_DENSE_GRID
from common.evaluation.store import ResultStore, atomic_write_json
from common.evaluation.tasks import OFFLINE_SUITE, PERPLEXITY_TASK


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias (smollm2-135m, gemma3-270m, gemma3-1b, "
                        "llama3.2-1b, qwen2.5-0.5b, ...), hub id or local directory")
    add_sweep_arguments(parser, "dense_sweep", default_limit=50)
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="sparsify only these layers")
    parser.add_argument("--ppl-percent", type=float, default=1.0, help="PPL-p%% criterion: allowed perplexity rise")
    parser.add_argument("--effective-rank", action="store_true", help="effective rank per layer and site (dense)")
    parser.add_argument("--mc-num", type=int, default=128, help="LLaDA: Monte Carlo samples per likelihood")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from common.analysis.report import write_report
    from common.evaluation.bridge import SparseHFLM
    from common.models.loading import load_causal_lm
    from common.evaluation.sweep import SweepRunner, SweepSpec
    from common.evaluation.tasks import task_manager

    sites, tasks, shard, grid, device, dtype, device_map = sweep_settings(args, PAPER_DENSE_GRID)
    spec = SweepSpec(model=args.model, sites=sites, tasks=tasks, rule=args.rule, power=args.power, grid=grid,
                     limit=args.limit or None, layers=args.layers, metric=args.metric)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from llada_sparsity.modeling import is_llada_name

    if is_llada_name(args.model):  # scored with LLaDA's Monte Carlo likelihood (perplexity tasks unsupported)
        from llada_sparsity.lm_eval_llada import LLaDALM

        lm = LLaDALM(args.model, dtype=dtype, device=device, mc_num=args.mc_num, batch_size=int(args.batch_size))
        model, tokenizer = lm.model, lm.tokenizer
        tasks = [t for t in tasks if t != PERPLEXITY_TASK]
        spec.tasks = tasks
    else:
        model, tokenizer = load_causal_lm(args.model, dtype=dtype, device=device,
                                          device_map=device_map)
        lm = SparseHFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, softmax_dtype="float32",
                        device=str(model.device))
    manager = task_manager(include_defaults=any(t not in OFFLINE_SUITE + [PERPLEXITY_TASK] for t in tasks))
    output = output_folder(args, "dense_sweep")
    store = ResultStore(output)
    runner = SweepRunner(lm, spec, store, manager, shard)
    extra = {}
    if args.search:
        extra["search"] = runner.run_search(args.threshold, args.resolution, args.ppl_percent)
        atomic_write_json(output / "search.json", extra["search"])
    else:
        runner.run_grid()
    if args.effective_rank:
        from common.analysis.report import effective_rank_pass

        extra["effective_rank"] = effective_rank_pass(model, tokenizer, sites, output)
    summary = write_report(store, spec, output, args.threshold, args.ppl_percent, args.bootstrap, extra)
    for entry in summary["critical"]:
        curve = entry.get("task_average_curve", {})
        line = (f"{entry['site']:>12}: critical sparsity (task-average curve) grid={curve.get('grid', 0):.3f} "
                f"interpolated={curve.get('interpolated', 0):.3f} [{curve.get('status')}]")
        ppl = [v for k, v in entry.items() if k.startswith("ppl_")]
        if ppl:
            line += f"; PPL-{args.ppl_percent:g}% criterion grid={ppl[0]['grid']:.3f}"
        print(line)
    for search in extra.get("search", []):
        ppl = "".join(f"; PPL-{args.ppl_percent:g}% on {task}: interpolated={found['critical']['interpolated']:.3f} "
                      f"with {found['values_evaluated']} values" for task, found in search["ppl"].items())
        print(f"{search['site']:>12}: search found interpolated={search['critical']['interpolated']:.3f} with "
              f"{search['values_evaluated']} values{ppl} ({search['cells_evaluated']} new cells)")
    print(f"results: {output}/tidy.csv, critical.json, figures/")


if __name__ == "__main__":
    run_main(main)
