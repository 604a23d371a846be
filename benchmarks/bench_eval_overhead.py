"""Time a sparsified lm-eval evaluation against the dense one, side by side in one process.

Alternates dense and sparse runs (after one warm-up each) on the same items, each through the
sweep's own ``evaluate_task`` (as a sweep cell runs), and reports the median time ratio per site, in the chosen dtype: of wall-clock time, and of the process's CPU
time, which a machine shared with other jobs disturbs much less (time spent waiting for a core
is not counted).

    python benchmarks/bench_eval_overhead.py --model smollm2-135m --task bb_social_iqa --limit 100 --dtype float32
    python benchmarks/bench_eval_overhead.py --threads 1   # as one sweep shard runs
    python benchmarks/bench_eval_overhead.py --compare-torch-path   # fused top-p kernel on and off
    python benchmarks/bench_eval_overhead.py --threads 1 --compare-torch-path --output results/eval_overhead/smollm2-135m/cpu
    python benchmarks/bench_eval_overhead.py --criteria teal cats scap wina larosa --target 0.5   # criteria

``--criteria`` also times each named criterion (at ``--target`` sparsity: a calibrated threshold's
target, top-k keeping 1 - target) at every site where it applies, alternating with the dense and the
magnitude top-p runs; its calibration is computed (or read from the cache) before the timing.

``--output DIR`` also writes ``DIR/summary.json`` (setup, and per site the dense and sparse seconds
of every repeat), which the findings page reads.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path

import torch

from common.cli.flags import positive_int

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="bb_social_iqa")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--sites", nargs="+", default=["intermediate", "input", "all_inputs"])
    parser.add_argument("--value", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--per-request", action="store_true",
                        help="score every choice with its full context (lm-eval's own path)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads (torch.set_num_threads; a sweep shard runs with 1); default: torch's")
    parser.add_argument("--compare-torch-path", action="store_true",
                        help="also time each sparse run with the fused top-p CPU kernel off (the pure-torch "
                             "path), alternating with the others")
    parser.add_argument("--criteria", nargs="+", default=[],
                        help="also time these criteria (e.g. teal cats scap wina larosa) against magnitude top-p")
    parser.add_argument("--target", type=float, default=0.5,
                        help="the target sparsity of the --criteria runs (default 0.5)")
    parser.add_argument("--output", type=Path, default=None, help="a folder for summary.json (per-repeat times)")
    args = parser.parse_args()
    load_at_start = os.getloadavg()  # 1, 5, 15 minutes, before the model loads
    criteria = _criteria(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    from common.core import fused_topp
    from common.evaluation.bridge import SparseHFLM
    from common.evaluation.sweep import evaluate_task
    from common.models.loading import load_causal_lm
    from common.evaluation.calibration import Calibrator
    from common.evaluation.tasks import task_manager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    model, tokenizer = load_causal_lm(args.model, dtype=DTYPES[args.dtype])
    lm = SparseHFLM(pretrained=model, tokenizer=tokenizer, batch_size=16, softmax_dtype="float32",
                    shared_context=not args.per_request)
    manager = task_manager()

    calibrations, values = {}, {}
    for criterion, sites, (value,) in criteria:
        calibrate = Calibrator(model, tokenizer, args.model, criterion, (args.target,) if criterion.calibrated else ())
        calibrations.update({(criterion.name, site): calibrate(site, value) for site in sites})
        values[criterion.name] = value

    def applying(site) -> list:
        return [criterion for criterion, sites, _ in criteria if site in sites]

    def timed(site, fused: bool = True, criterion=None) -> tuple[float, float]:
        """(wall-clock s, CPU s) of one evaluation."""
        os.environ[fused_topp.SWITCH] = "1" if fused else "0"
        if criterion is None:
            lm.set_sparsification(site, "topp", args.value)
        else:
            lm.set_sparsification(site, criterion.selection, values[criterion.name], criterion=criterion,
                                  calibration=calibrations[criterion.name, site])
        start, start_cpu = time.perf_counter(), time.process_time()
        evaluate_task(lm, args.task, manager, limit=args.limit)
        return time.perf_counter() - start, time.process_time() - start_cpu

    compare = args.compare_torch_path
    kernel = "fused top-p kernel" if fused_topp.kernel() is not None else "pure-torch top-p"
    if kernel == "pure-torch top-p" and compare:
        raise SystemExit("the fused top-p kernel is not available here (see the warning): nothing to compare")
    for site in [None] + args.sites:
        timed(site)  # warm-up
        if compare and site:
            timed(site, fused=False)
        for criterion in applying(site):
            timed(site, criterion=criterion)
    print(f"{args.model}, {args.dtype}, {args.task}, {args.limit} items, top-p {args.value}, "
          f"{'per-request' if args.per_request else 'shared-context'} scoring, {kernel}, "
          f"{torch.get_num_threads()} threads")
    header = "| site | dense s | sparse s | ratio | dense CPU s | sparse CPU s | CPU ratio |"
    if compare:
        header += " pure-torch sparse s | ratio | CPU ratio |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    rows = []
    for site in args.sites:
        dense, sparse, plain = [], [], []
        by_criterion = {criterion.name: [] for criterion in applying(site)}
        for _ in range(args.repeats):
            dense.append(timed(None))
            sparse.append(timed(site))
            if compare:
                plain.append(timed(site, fused=False))
            for criterion in applying(site):
                by_criterion[criterion.name].append(timed(site, criterion=criterion))
        d, s = (statistics.median(t[0] for t in runs) for runs in (dense, sparse))
        dc, sc = (statistics.median(t[1] for t in runs) for runs in (dense, sparse))
        row = f"| {site} | {d:.2f} | {s:.2f} | {s / d:.2f}x | {dc:.2f} | {sc:.2f} | {sc / dc:.2f}x |"
        if compare:
            t, tc = statistics.median(t[0] for t in plain), statistics.median(t[1] for t in plain)
            row += f" {t:.2f} | {t / d:.2f}x | {tc / dc:.2f}x |"
        print(row, flush=True)
        for name, runs in by_criterion.items():
            c = statistics.median(t[0] for t in runs)
            print(f"|   {name} at {args.target:g} | | {c:.2f} | {c / d:.2f}x dense, {c / s:.2f}x top-p | | | |")
        rows.append({"site": site, "dense_seconds": [t[0] for t in dense], "sparse_seconds": [t[0] for t in sparse],
                     "dense_cpu_seconds": [t[1] for t in dense], "sparse_cpu_seconds": [t[1] for t in sparse],
                     **({"pure_torch_seconds": [t[0] for t in plain]} if compare else {}),
                     **({"criteria_seconds": {name: [t[0] for t in runs] for name, runs in by_criterion.items()}}
                        if by_criterion else {})})
    if args.output is not None:
        from common.evaluation.provenance import environment
        from common.evaluation.store import atomic_write_json

        setup = {"model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(), "task": args.task,
                 "limit": args.limit, "value": args.value, "kernel": kernel, "repeats": args.repeats,
                 **({"criteria": [c.name for c, _, _ in criteria], "target": args.target} if criteria else {}),
                 "load_average_at_start": load_at_start, "load_average": os.getloadavg()}
        atomic_write_json(args.output / "summary.json", {"setup": setup, "rows": rows,
                                                         "provenance": environment(args.dtype, "cpu")})
        print(f"written: {args.output / 'summary.json'}")


def _criteria(args) -> list[tuple]:
    """(criterion, its sites among --sites, its values) of --criteria, checked before the model loads."""
    if not args.criteria:
        return []
    from argparse import Namespace

    from common.cli.flags import criterion_grids

    try:
        return criterion_grids(Namespace(criterion=args.criteria, rule="topp", sites=args.sites,
                                         targets=[args.target], power=1.0, search=False), [args.value])
    except ValueError as error:
        raise SystemExit(str(error)) from None


if __name__ == "__main__":
    main()
