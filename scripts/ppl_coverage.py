"""Coverage of the PPL-p% reading's 95% intervals (paired bootstrap over documents, and the band).

    python scripts/ppl_coverage.py                      # synthetic sweeps: the grid and the search, 50 and 189 documents
    python scripts/ppl_coverage.py --folder results/dense_sweep/smollm2-135m/small-grid   # + that sweep's documents

Synthetic sweeps (``common.analysis.perplexity_coverage.SyntheticPerplexitySweep``) know their true
crossing: per protocol and document count, how often each interval holds it. A finished sweep
folder adds its own fables as the population, per site: a double bootstrap (samples of documents
drawn with replacement, truth = the crossing of all of them) and split halves (one half's interval
against the other half's crossing: a calibrated 95% interval holds it in about 83% of splits; the
two crossings within their combined half-widths in about 95%). The JSON goes to --output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.analysis.perplexity_coverage import (coverage, resampled_coverage, split_half_agreement,
                                                 sweep_documents)
from common.evaluation.store import atomic_write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, nargs="+", default=[50, 189], help="documents per synthetic sweep")
    parser.add_argument("--protocols", nargs="+", default=["grid", "search"], choices=["grid", "search"])
    parser.add_argument("--sweeps", type=int, default=200, help="seeded synthetic sweeps per setting")
    parser.add_argument("--spread", type=float, nargs="+", default=[0.6],
                        help="log-spread of the documents' sensitivities (a real sweep's: about 0.5-0.9)")
    parser.add_argument("--noise", type=float, default=0.2, help="relative rounding noise per document and value")
    parser.add_argument("--folder", type=Path, nargs="*", default=[], help="finished sweep folders with fables cells")
    parser.add_argument("--sites", nargs="+", default=None, help="sites of --folder (default: every site with fables)")
    parser.add_argument("--draws", type=int, default=200, help="document samples per folder and site")
    parser.add_argument("--ppl-percent", type=float, default=1.0)
    parser.add_argument("--iterations", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--output", type=Path, default=Path("results/ppl_coverage/coverage.json"))
    args = parser.parse_args()
    for name in ("sweeps", "draws", "iterations"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be 1 or more")
    if args.ppl_percent <= 0 or any(d < 4 for d in args.documents):
        parser.error("--ppl-percent must be above 0 and --documents at least 4")
    results = {"synthetic": [], "sweeps": []}
    print("| protocol | documents | spread | values | bootstrap coverage | band coverage | median error | "
          "median widths (bootstrap, band) |\n|---|---|---|---|---|---|---|---|")
    for protocol in args.protocols:
        for documents in args.documents:
            for spread in args.spread:
                row = coverage(protocol, args.sweeps, documents, args.ppl_percent, args.iterations, spread=spread,
                               noise=args.noise)
                results["synthetic"].append(row)
                print(f"| {protocol} | {documents} | {spread:g} | {row['median_values']:.0f} | "
                      f"{row['bootstrap_coverage']:.2f} | {row['band_coverage']:.2f} | {row['median_error']:.3f} | "
                      f"{row['bootstrap_median_width']:.3f}, {row['band_median_width']:.3f} |")
                atomic_write_json(args.output, results)
    for folder in args.folder:
        import json

        spec = json.loads((folder / "critical.json").read_text())["spec"] if (folder / "critical.json").is_file() else {}
        sites = args.sites or [s for s in spec.get("sites", []) if s != "dense"]
        print(f"\n{folder}: the sweep's own fables as the population\n\n| site | documents | truth | bootstrap "
              "coverage | band coverage | split halves: holds other (bootstrap, band) | agree (bootstrap, band) |\n"
              "|---|---|---|---|---|---|---|")
        for site in sites:
            sparsity, sparse, dense, words = sweep_documents(folder, site)
            split = split_half_agreement(sparsity, sparse, dense, words, args.ppl_percent, args.draws // 2,
                                         args.iterations)
            for documents in sorted({min(d, dense.size) for d in args.documents}):
                row = resampled_coverage(sparsity, sparse, dense, words, args.ppl_percent, documents, args.draws,
                                         args.iterations)
                results["sweeps"].append({"folder": str(folder), "site": site, **row, "split_halves": split})
                print(f"| {site} | {documents} | {row['truth']:.3f} | {row['bootstrap_coverage']:.2f} | "
                      f"{row['band_coverage']:.2f} | {split['bootstrap_holds_other']:.2f}, {split['band_holds_other']:.2f} "
                      f"| {split['bootstrap_agree']:.2f}, {split['band_agree']:.2f} |")
                atomic_write_json(args.output, results)
    print(f"\nwritten: {args.output}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
