"""Score the offline suite per request and with shared contexts, side by side in one process.

For the dense model and one sparsified site: wall time of the whole evaluation and of the
model's log-likelihood scoring alone (medians of alternating runs after a warm-up), token
positions run through the model (padding included), the task scores (asserted identical in
float32, within one item in bfloat16) and the measured sparsity (which moves: the shared path
counts each context token once per item, the per-request path once per choice).

    python benchmarks/bench_shared_context.py --model smollm2-135m --limit 20 --dtype float32
    python benchmarks/bench_shared_context.py --limit 40 --threads 1 --repeats 3 --output results/shared_context/smollm2-135m/cpu

``--output DIR`` also writes ``DIR/summary.json`` (setup, and per site and path the wall and scoring
seconds of every repeat), which the findings page reads.
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
    parser.add_argument("--tasks", nargs="+", default=None, help="default: the offline multiple-choice suite")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--site", default="intermediate")
    parser.add_argument("--value", type=float, default=0.9)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads (torch.set_num_threads; a sweep shard runs with 1); default: torch's")
    parser.add_argument("--output", type=Path, default=None, help="a folder for summary.json (per-repeat times)")
    args = parser.parse_args()
    load_at_start = os.getloadavg()  # 1, 5, 15 minutes, before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    import lm_eval

    from common.evaluation.bridge import SparseHFLM
    from common.evaluation.tasks import OFFLINE_SUITE, primary_metric, task_manager
    from common.models.loading import load_causal_lm

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    tasks = args.tasks or OFFLINE_SUITE
    model, tokenizer = load_causal_lm(args.model, dtype=DTYPES[args.dtype])
    class TimedLM(SparseHFLM):
        """Adds up the time spent scoring log-likelihood requests (lm-eval's task setup excluded)."""

        scoring_seconds = 0.0

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            start = time.perf_counter()
            try:
                return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
            finally:
                self.scoring_seconds += time.perf_counter() - start

    lm = TimedLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, softmax_dtype="float32")
    manager = task_manager()
    processed = [0]

    def count_positions(module, args, kwargs):
        processed[0] += (kwargs["input_ids"] if "input_ids" in kwargs else args[0]).numel()

    model.register_forward_pre_hook(count_positions, with_kwargs=True)

    def run(site, shared, limit):
        lm.shared_context = shared
        lm.set_sparsification(site, "topp", args.value)
        processed[0], lm.scoring_seconds = 0, 0.0
        start = time.perf_counter()
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, bootstrap_iters=0,
                                      verbosity="ERROR")
        seconds = time.perf_counter() - start
        scores = {task: out["results"][task][f"{primary_metric(task)},none"] for task in tasks}
        sparsity = lm.sparsity_statistics()["summary"].get(site, {}).get("element_weighted") if site else None
        return seconds, lm.scoring_seconds, processed[0], scores, sparsity

    configurations = [(site, shared) for site in (None, args.site) for shared in (False, True)]
    for site, shared in configurations:
        run(site, shared, 2)  # warm-up
    times = {c: [] for c in configurations}
    scoring = {c: [] for c in configurations}
    results = {}
    for _ in range(args.repeats):
        for configuration in configurations:
            seconds, scoring_seconds, tokens, scores, sparsity = run(*configuration, args.limit)
            times[configuration].append(seconds)
            scoring[configuration].append(scoring_seconds)
            results[configuration] = (tokens, scores, sparsity)

    print(f"{args.model}, {args.dtype}, {', '.join(tasks)}; {args.limit} items each, batch size {args.batch_size}, "
          f"top-p {args.value}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| site | path | wall s | speed-up | scoring s | speed-up | token positions | sparsity | "
          + " | ".join(tasks) + " |")
    print("|---|---|---|---|---|---|---|---|" + "---|" * len(tasks))
    tolerance = 0.0 if args.dtype == "float32" else 1.0 / args.limit + 1e-9
    for site in (None, args.site):
        base = statistics.median(times[(site, False)])
        base_scoring = statistics.median(scoring[(site, False)])
        for shared in (False, True):
            tokens, scores, sparsity = results[(site, shared)]
            seconds = statistics.median(times[(site, shared)])
            scoring_seconds = statistics.median(scoring[(site, shared)])
            shown = "-" if sparsity is None else f"{sparsity:.4f}"
            print(f"| {site or 'dense'} | {'shared' if shared else 'per-request'} | {seconds:.2f} | "
                  f"{base / seconds:.2f}x | {scoring_seconds:.2f} | {base_scoring / scoring_seconds:.2f}x | {tokens} | "
                  f"{shown} | " + " | ".join(f"{scores[t]:.3f}" for t in tasks) + " |")
        reference = results[(site, False)][1]
        for task, score in results[(site, True)][1].items():
            assert abs(score - reference[task]) <= tolerance, (site, task, score, reference[task])
    print(f"scores identical between the paths (tolerance {tolerance:.3f})")
    if args.output is not None:
        from common.evaluation.provenance import environment
        from common.evaluation.store import atomic_write_json

        rows = [{"site": site or "dense", "path": "shared" if shared else "per-request",
                 "wall_seconds": times[(site, shared)], "scoring_seconds": scoring[(site, shared)],
                 "token_positions": results[(site, shared)][0], "sparsity": results[(site, shared)][2],
                 "scores": results[(site, shared)][1]} for site, shared in configurations]
        setup = {"model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(), "limit": args.limit,
                 "tasks": tasks, "batch_size": args.batch_size, "repeats": args.repeats, "value": args.value,
                 "site": args.site, "load_average_at_start": load_at_start, "load_average": os.getloadavg()}
        atomic_write_json(args.output / "summary.json", {"setup": setup, "rows": rows,
                                                         "provenance": environment(args.dtype, "cpu")})
        print(f"written: {args.output / 'summary.json'}")


if __name__ == "__main__":
    main()
