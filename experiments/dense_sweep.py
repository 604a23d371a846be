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
from pathlib import Path

from common.cli import default_device, parse_dtype, run_main
from common.critical import PAPER_DENSE_GRID
from common.sites import SITES
from common.store import ResultStore, atomic_write_json, parse_shard
from common.tasks import OFFLINE_SUITE, PERPLEXITY_TASK, check_tasks, resolve_task_names


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias (smollm2-135m, gemma3-270m, gemma3-1b, "
                        "llama3.2-1b, qwen2.5-0.5b, ...), hub id or local directory")
    parser.add_argument("--sites", nargs="+", default=["intermediate"], help=f"any of {', '.join(SITES)}, or all")
    parser.add_argument("--rule", default="topp", choices=["topp", "maxp", "topk"])
    parser.add_argument("--power", type=float, default=1.0)
    parser.add_argument("--grid", type=float, nargs="+", default=None, help="rule values (default: the paper's grid)")
    parser.add_argument("--search", action="store_true", help="bisect for the critical value instead of the grid")
    parser.add_argument("--resolution", type=float, default=0.01, help="--search stops when the bracket is this narrow")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="lm-eval task names; 'offline' (default) = the shipped suite, 'paper' = the paper's nine")
    parser.add_argument("--metric", default=None,
                        help="score of every multiple-choice task (acc or acc_norm; default: each task's own)")
    parser.add_argument("--limit", type=int, default=50, help="first N items of every task (0 = all)")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="sparsify only these layers")
    parser.add_argument("--threshold", type=float, default=0.99, help="normalized score kept at critical sparsity")
    parser.add_argument("--ppl-percent", type=float, default=1.0, help="PPL-p%% criterion: allowed perplexity rise")
    parser.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples")
    parser.add_argument("--effective-rank", action="store_true", help="effective rank per layer and site (dense)")
    parser.add_argument("--batch-size", default="16")
    parser.add_argument("--mc-num", type=int, default=128, help="LLaDA: Monte Carlo samples per likelihood")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default bfloat16)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, or 'auto' (device_map=auto)")
    parser.add_argument("--output", default=None, help="results folder (default results/dense_sweep/<model>)")
    parser.add_argument("--shard", default=None, help="K/N: this process evaluates the K-th of N cell shards")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import torch

    from common.analysis import write_report
    from common.lm_eval_bridge import SparseHFLM
    from common.models import load_causal_lm
    from common.stats import EffectiveRank
    from common.sweep import SweepRunner, SweepSpec
    from common.tasks import task_manager

    sites = list(SITES) if args.sites == ["all"] else args.sites
    tasks = resolve_task_names(args.tasks)
    check_tasks(tasks)
    shard = parse_shard(args.shard)
    spec = SweepSpec(model=args.model, sites=sites, tasks=tasks, rule=args.rule, power=args.power,
                     grid=args.grid or list(PAPER_DENSE_GRID), limit=args.limit or None, layers=args.layers,
                     metric=args.metric)
    from common.rules import validate_rule

    for value in spec.grid:
        validate_rule(args.rule, value, args.power)
    device = default_device(None if args.device == "auto" else args.device)
    dtype = parse_dtype(args.dtype) or torch.bfloat16
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
                                          device_map="auto" if args.device == "auto" else None)
        lm = SparseHFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, softmax_dtype="float32",
                        device=str(model.device))
    manager = task_manager(include_defaults=any(t not in OFFLINE_SUITE + [PERPLEXITY_TASK] for t in tasks))
    name = Path(args.model).name if Path(args.model).is_dir() else args.model.replace("/", "--")
    output = Path(args.output or Path("results") / "dense_sweep" / name)
    store = ResultStore(output)
    runner = SweepRunner(lm, spec, store, manager, shard)
    extra = {}
    if args.search:
        searches = [runner.search_site(site, args.threshold, args.resolution)
                    for index, site in enumerate(sites) if index % shard[1] == shard[0]]
        extra["search"] = searches
        atomic_write_json(output / "search.json", searches)
    else:
        runner.run_grid()
    if args.effective_rank:
        from common.analysis import effective_rank_pass

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
        print(f"{search['site']:>12}: search found interpolated={search['critical']['interpolated']:.3f} with "
              f"{search['values_evaluated']} values ({search['cells_evaluated']} new cells)")
    print(f"results: {output}/tidy.csv, critical.json, figures/")


if __name__ == "__main__":
    run_main(main)
