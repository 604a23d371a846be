"""Shard processes on one CPU machine: N processes running the same sparsified forwards at once,
each with torch's default thread pool (one thread per core) against the cores divided among them
(what the sweeps' ``--threads auto`` sets for ``--shard K/N``); the two settings alternated in
rounds after a warm-up, medians of the rounds' wall times.

Weights are random (the model's real config, full size): the timings need shapes, not trained values.

    python benchmarks/bench_shard_threads.py --shards 2 --repeats 5
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

from common.cli.flags import usable_cores
from common.core.sites import SITES

DTYPES = ("float32", "bfloat16")


def worker(threads: int, args: argparse.Namespace, start, done) -> None:
    """Build the model, warm up, then run ``--forwards`` sparsified forwards each time it is told to."""
    import torch
    from transformers import AutoModelForCausalLM

    from common.core.hooks import Sparsifier
    from common.models.plan import plan_config

    torch.set_num_threads(threads)
    config, _ = plan_config(args.model)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).eval()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.sequence))

    def forwards():
        with Sparsifier(model, args.site, rule="topp", value=args.value), torch.no_grad():
            for _ in range(args.forwards):
                model(ids, logits_to_keep=1)

    forwards()  # warm-up
    done.put(0.0)
    while start.get():
        began = time.perf_counter()
        forwards()
        done.put(time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias or hub id with a config the toolkit knows")
    parser.add_argument("--shards", type=int, default=2, help="processes running at once")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--site", choices=SITES, default="intermediate")
    parser.add_argument("--value", type=float, default=0.9)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sequence", type=int, default=128)
    parser.add_argument("--forwards", type=int, default=3, help="forwards per process and round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per setting")
    args = parser.parse_args()
    cores = usable_cores()
    if args.shards < 2 or cores < 2:
        raise SystemExit(f"error: needs --shards 2 or more on a machine with 2 or more cores ({cores} here)")
    settings = {f"{cores} threads each (torch's default)": cores,
                f"{max(1, cores // args.shards)} thread(s) each (--threads auto)": max(1, cores // args.shards)}
    context = mp.get_context("spawn")
    pools = {}
    for name, threads in settings.items():
        start, done = context.Queue(), context.Queue()
        processes = [context.Process(target=worker, args=(threads, args, start, done)) for _ in range(args.shards)]
        for process in processes:
            process.start()
        for _ in processes:
            done.get()  # built and warmed up
        pools[name] = (start, done, processes)
    times = {name: [] for name in settings}
    for _ in range(args.repeats):
        for name, (start, done, processes) in pools.items():
            time.sleep(1.0)  # the other pool's idle threads stop spinning
            began = time.perf_counter()
            for _ in processes:
                start.put(True)
            for _ in processes:
                done.get()
            times[name].append(time.perf_counter() - began)
    for start, _, processes in pools.values():
        for process in processes:
            start.put(False)
        for process in processes:
            process.join()
    default, auto = (statistics.median(t) for t in times.values())
    print(f"{args.model} (random weights), {args.dtype}, {args.shards} processes on {cores} cores, "
          f"{args.site} top-p {args.value}, {args.forwards} forwards of {args.batch} x {args.sequence} tokens per "
          f"process and round, medians of {args.repeats} alternated rounds")
    print("| threads per process | wall time of a round, s | / divided |")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {statistics.median(values) / auto:.2f} |")


if __name__ == "__main__":
    main()
