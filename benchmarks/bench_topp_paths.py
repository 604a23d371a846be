"""Time the exact top-p threshold paths on the same bfloat16 rows, side by side in one process.

Reference (full sort) vs the bracketed search vs the radix select (the pure-torch path for 16-bit
activations on CPU); checks that the three thresholds are identical. A second table times what a
hook does per call (threshold, zeroing, kept counts) with the fused CPU kernel against the
pure-torch radix select plus ``zero_below``, alternating, in bfloat16 and float32, and checks that
both give the same tensor and counts.

    python benchmarks/bench_topp_paths.py [--rows 2048] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from bench_rules import median_seconds  # the script's folder is on sys.path

from common.core import fused_topp
from common.core.rules import (_in_row_chunks, _topp_threshold_bracketed, _topp_threshold_radix, magnitudes,
                               sparsify_and_count, topp_threshold_reference)


def fused_against_torch_path(x: torch.Tensor, p: float, repeats: int) -> tuple[float, float, bool]:
    """Median seconds of ``sparsify_and_count`` with the fused kernel and without it (alternating
    after one warm-up each), and whether both give the same tensor bits and counts."""
    def run(fused: bool):
        os.environ[fused_topp.SWITCH] = "1" if fused else "0"
        start = time.perf_counter()
        out = sparsify_and_count(x, "topp", p)
        return time.perf_counter() - start, out

    (_, fused_out), (_, plain_out) = run(True), run(False)
    fused_times, plain_times = [], []
    for _ in range(repeats):
        fused_times.append(run(True)[0])
        plain_times.append(run(False)[0])
    os.environ[fused_topp.SWITCH] = "1"
    ints = torch.int16 if x.element_size() == 2 else torch.int32
    identical = (torch.equal(fused_out[0].view(ints), plain_out[0].view(ints))
                 and torch.equal(fused_out[1], plain_out[1]))
    return statistics.median(fused_times), statistics.median(plain_times), identical


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--widths", type=int, nargs="+", default=[576, 1536, 2048, 8192, 14336])
    parser.add_argument("--value", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, rows={args.rows}, bfloat16, "
          f"p={args.value}, median of {args.repeats}")
    print("| D | reference s | bracketed s | radix s | radix vs reference | radix vs bracketed | identical |")
    print("|---|---|---|---|---|---|---|")
    for width in args.widths:
        x = (torch.randn(args.rows, width) * torch.randn(args.rows, width).exp()).to(torch.bfloat16)
        a = magnitudes(x)
        ref_s, ref = median_seconds(lambda: topp_threshold_reference(a, args.value), args.repeats)
        brk_s, brk = median_seconds(lambda: _in_row_chunks(_topp_threshold_bracketed, a, args.value), args.repeats)
        rad_s, rad = median_seconds(lambda: _in_row_chunks(_topp_threshold_radix, a, args.value), args.repeats)
        identical = torch.equal(ref, brk) and torch.equal(ref, rad)
        print(f"| {width} | {ref_s:.3f} | {brk_s:.3f} | {rad_s:.3f} | {ref_s / rad_s:.2f}x | {brk_s / rad_s:.2f}x "
              f"| {identical} |")
        if not identical:
            raise SystemExit("thresholds differ from the reference: this is a bug")
    if fused_topp.kernel() is None:
        print("the fused top-p kernel is not available here: no second table")
        return
    print("\nPer hook call (threshold, zeroing, kept counts): fused kernel against radix select + zero_below")
    print("| D | dtype | pure-torch s | fused s | speed-up | identical |")
    print("|---|---|---|---|---|---|")
    for width in args.widths:
        for dtype in (torch.bfloat16, torch.float32):
            x = (torch.randn(args.rows, width) * torch.randn(args.rows, width).exp()).to(dtype)
            fused_s, plain_s, identical = fused_against_torch_path(x, args.value, args.repeats)
            print(f"| {width} | {str(dtype).replace('torch.', '')} | {plain_s:.4f} | {fused_s:.4f} "
                  f"| {plain_s / fused_s:.2f}x | {identical} |")
            if not identical:
                raise SystemExit("the fused kernel differs from the pure-torch path: this is a bug")


if __name__ == "__main__":
    main()
