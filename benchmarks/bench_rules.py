"""Time the toolkit's top-p keep-mask against the straightforward reference, side by side.

Reference = sort descending, float64 cumsum, gather the threshold, compare (the paper's code).
Both run in the same process on the same inputs; the script reports the median time ratio
and whether the masks are identical.

    python benchmarks/bench_rules.py [--rows 2048] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common.core.rules import keep_mask, magnitudes, topp_threshold_reference


def reference_topp_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    a = magnitudes(x.reshape(-1, x.shape[-1]))
    return (a >= topp_threshold_reference(a, p)).reshape(x.shape)


def median_seconds(fn, repeats: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--widths", type=int, nargs="+", default=[576, 1536, 2048, 8192, 14336])
    parser.add_argument("--values", type=float, nargs="+", default=[0.5, 0.9, 0.99])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, rows={args.rows}, "
          f"median of {args.repeats}")
    print("| D | dtype | p | reference s | toolkit s | speed-up | identical masks |")
    print("|---|---|---|---|---|---|---|")
    ratios = []
    for width in args.widths:
        for dtype in (torch.float32, torch.bfloat16):
            # SwiGLU-like activations: heavy tailed, with a few massive entries.
            x = (torch.randn(args.rows, width) * torch.randn(args.rows, width).exp()).to(dtype)
            for p in args.values:
                ref_s, ref_mask = median_seconds(lambda: reference_topp_mask(x, p), args.repeats)
                new_s, new_mask = median_seconds(lambda: keep_mask(x, "topp", p), args.repeats)
                identical = torch.equal(ref_mask, new_mask)
                ratios.append(ref_s / new_s)
                print(f"| {width} | {str(dtype).replace('torch.', '')} | {p} | {ref_s:.3f} | {new_s:.3f} "
                      f"| {ref_s / new_s:.2f}x | {identical} |")
                if not identical:
                    raise SystemExit("masks differ from the reference: this is a bug")
    print(f"median speed-up over all cells: {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
