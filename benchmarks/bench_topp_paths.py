"""Time the exact top-p threshold paths on the same bfloat16 rows, side by side in one process.

Reference (full sort) vs the bracketed search vs the radix select (the default for 16-bit
activations on CPU); checks that the three thresholds are identical.

    python benchmarks/bench_topp_paths.py [--rows 2048] [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch
from bench_rules import median_seconds  # the script's folder is on sys.path

from common.core.rules import (_in_row_chunks, _topp_threshold_bracketed, _topp_threshold_radix, magnitudes,
                          topp_threshold_reference)


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


if __name__ == "__main__":
    main()
