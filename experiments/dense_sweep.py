"""Dense GLU models: sweep rule thresholds per FFN site through lm-eval, find critical sparsity.

Default (``--protocol quick``, minutes on two CPU cores): the real SmolLM2-135M (offline, from a
PyPI wheel) on the offline BIG-bench suite, sites intermediate and input, 50 items per task, a
noise-aware search led by PPL-1%; it leads with PPL-1% per site, the sites compared by answer KL
and the accuracy crossing with its band. ``--protocol paper``: every site, the paper's 26-point
grid, every item. Resumable: run the same command again after an interruption. Examples:

    python experiments/dense_sweep.py
    python experiments/dense_sweep.py --protocol paper --stop-below 0.9 --shard 1/2
    python experiments/dense_sweep.py --model gemma3-270m --sites all --search --limit 100
    python experiments/dense_sweep.py --model google/gemma-3-1b-pt --tasks paper --device cuda --shard 1/4
"""

from __future__ import annotations

import argparse
import os
import sys

from common.cli import add_sweep_arguments, output_folder, positive_float, positive_int, run_main, sweep_settings
from common.cli.protocol import DEFAULT_PROTOCOL, PROTOCOLS, announce, apply_protocol, explicit_flags
from common.evaluation.sweep import PAPER_DENSE_GRID
from common.evaluation.tasks import PERPLEXITY_TASK


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias (smollm2-135m, gemma3-270m, gemma3-1b, "
                        "llama3.2-1b, qwen2.5-0.5b, ...), hub id or local directory")
    add_sweep_arguments(parser, "dense_sweep", default_limit=50)
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="sparsify only these layers")
    parser.add_argument("--ppl-percent", type=positive_float, default=1.0,
                        help="PPL-p%% criterion: allowed perplexity rise in percent (above 0)")
    parser.add_argument("--effective-rank", action="store_true", help="effective rank per layer and site (dense)")
    parser.add_argument("--mc-num", type=positive_int, default=128, help="LLaDA: Monte Carlo samples per likelihood")
    parser.add_argument("--rehearse", action="store_true", help="run the whole study on a small random-weight "
                        "replica of the model's structure (offline, CPU); outputs say rehearsal")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default=DEFAULT_PROTOCOL,
                        help="quick (default: sites intermediate and input, 50 items per task, a search led by "
                             "PPL-1%%: minutes on two CPU cores) or paper (every site, every grid value, every item); "
                             "flags given explicitly win")
    argv = sys.argv[1:]
    args = parser.parse_args(argv)
    apply_protocol(args, explicit_flags(parser, argv))
    if args.rehearse:
        from common.cli.rehearsal import QUICK_SWEEP, rehearsal_defaults

        rehearsal_defaults(parser, args, search=args.grid is None, mc_num=2, **QUICK_SWEEP)
    return args


def main() -> None:
    args = parse_args()
    from common.cli.sweep import open_store, run_sweep
    from common.evaluation.bridge import SparseHFLM
    from common.evaluation.sweep import SweepSpec
    from common.models.loading import load_causal_lm

    sites, tasks, shard, grid, device, dtype, device_map = sweep_settings(args, PAPER_DENSE_GRID)
    announce(args, tasks)
    from common.models.loading import check_model_name
    from common.models.plan import print_plan
    from common.cli.rehearsal import mark_rehearsal
    from common.models.replica import rehearsal_model
    from llada_sparsity.modeling import is_llada_name

    real_name, replica, replica_tokenizer = args.model, None, None
    if args.rehearse:  # random-weight replica of the real structure; outputs labelled as a rehearsal
        replica, replica_tokenizer, args.model = rehearsal_model(real_name, None, dtype, device)
        dtype = replica.dtype
    else:
        check_model_name(args.model)  # before the plan and the results folder
        print_plan(args.model, dtype, device_map or device, args.batch_size)
    output = output_folder(args, "dense_sweep")
    store = open_store(output, dtype, device_map or device, args.allow_mixed)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if is_llada_name(real_name):  # scored with LLaDA's Monte Carlo likelihood (perplexity tasks unsupported)
        from llada_sparsity.lm_eval_llada import LLaDALM

        lm = LLaDALM(args.model if replica is None else replica, tokenizer=replica_tokenizer, dtype=dtype,
                     device=device, mc_num=args.mc_num,
                     batch_size=args.batch_size if isinstance(args.batch_size, int) else 16)
        model, tokenizer = lm.model, lm.tokenizer
        tasks = [t for t in tasks if t != PERPLEXITY_TASK]
    else:
        model, tokenizer = (replica, replica_tokenizer) if args.rehearse else \
            load_causal_lm(args.model, dtype=dtype, device=device, device_map=device_map)
        lm = SparseHFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, softmax_dtype="float32",
                        device=str(model.device))
    spec = SweepSpec(model=args.model, sites=sites, tasks=tasks, rule=args.rule, power=args.power, grid=grid,
                     limit=args.limit or None, layers=args.layers, metric=args.metric,
                     dtype=str(dtype).replace("torch.", ""), device_type=model.device.type,
                     stop_below=args.stop_below, stop_after=args.stop_after)
    extra = {}
    if args.effective_rank:
        from common.analysis.report import effective_rank_pass

        extra["effective_rank"] = effective_rank_pass(model, tokenizer, sites, output)
    from common.cli.criteria import criterion_runs
    from common.cli.flags import criterion_grids

    (spec, calibrate), *others = criterion_runs(spec, criterion_grids(args, grid), model, tokenizer, args.model)
    if run_sweep(args, lm, spec, store, shard, args.ppl_percent, extra, calibrate, others) is not None:
        if args.rehearse:
            mark_rehearsal(output, real_name, model)
        print(f"results: {output}/tidy.csv, critical.json, figures/")


if __name__ == "__main__":
    run_main(main)
