"""The fixed cost of one sweep cell: ``lm_eval.simple_evaluate`` against the sweep's own
``evaluate_task`` (the same evaluation without lm-eval's environment report), side by side.

Alternates the two on the same cells (every task of the suite at each item count, dense model),
after one warm-up each, and reports medians of wall-clock time and of CPU time including child
processes (the environment report runs subprocesses, which the process's own CPU time misses).

    python benchmarks/bench_cell_overhead.py --model smollm2-135m --limits 1 30 --repeats 5
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", nargs="+", default=["small"])
    parser.add_argument("--limits", nargs="+", type=int, default=[1, 30])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args()
    import lm_eval

    from common.evaluation.bridge import SparseHFLM
    from common.evaluation.sweep import evaluate_task
    from common.evaluation.tasks import resolve_task_names, task_manager
    from common.models.loading import load_causal_lm

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    tasks = resolve_task_names(args.tasks)
    model, tokenizer = load_causal_lm(args.model, dtype=DTYPES[args.dtype])
    lm = SparseHFLM(pretrained=model, tokenizer=tokenizer, batch_size=16, softmax_dtype="float32")
    manager = task_manager()

    def through_simple_evaluate(task, limit):
        lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit, log_samples=True,
                                bootstrap_iters=0, verbosity="ERROR")

    def through_evaluate_task(task, limit):
        evaluate_task(lm, task, manager, limit=limit)

    def timed(run, limit) -> tuple[float, float]:
        """(wall-clock s, CPU s) of one cell per task, summed over the suite."""
        start, start_cpu = time.perf_counter(), _cpu_seconds()
        for task in tasks:
            run(task, limit)
        return time.perf_counter() - start, _cpu_seconds() - start_cpu

    print(f"{args.model}, {args.dtype}, {len(tasks)} tasks ({', '.join(tasks)}), dense, "
          f"{torch.get_num_threads()} threads; times per cell (suite total / tasks), medians of {args.repeats}")
    print("| items per cell | simple_evaluate s | evaluate_task s | saved per cell s | ratio | CPU s (with children) before / after |")
    print("|---|---|---|---|---|---|")
    for limit in args.limits:
        timed(through_simple_evaluate, limit), timed(through_evaluate_task, limit)  # warm-up
        before, after = [], []
        for _ in range(args.repeats):
            before.append(timed(through_simple_evaluate, limit))
            after.append(timed(through_evaluate_task, limit))
        b, a = (statistics.median(t[0] for t in runs) / len(tasks) for runs in (before, after))
        bc, ac = (statistics.median(t[1] for t in runs) / len(tasks) for runs in (before, after))
        print(f"| {limit} | {b:.2f} | {a:.2f} | {b - a:.2f} | {a / b:.2f}x | {bc:.2f} / {ac:.2f} |", flush=True)


if __name__ == "__main__":
    main()
