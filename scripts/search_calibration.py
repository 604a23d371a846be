"""Calibrate the noise-aware search and the grid reading on synthetic sweeps with a known crossing.

    python scripts/search_calibration.py                         # the report's table (a few minutes)
    python scripts/search_calibration.py --items 30 300 --noise 0.1 --sweeps 20
    python scripts/search_calibration.py --items 200 --scale 0.06 0.15   # slower-falling curves
    python scripts/search_calibration.py --spread 0.5   # half the placement over the band's range
    python scripts/search_calibration.py --items 200 --noise 0.2 --chance 0.5 --persistence 0.8 --scale 0.1
                                                                 # flips like a real sweep's

Per setting (break-point scale x items per task x noise): how often the search lands within one
paper-grid step of the full grid's isotonic crossing, how often plain bisection (9 values) and a
replicate grid (the same items, fresh chance guesses) do, median errors against the true
crossing, and how often the search's and the grid's 95% bootstrap intervals and the band
intervals (on the grid's points and on the search's) cover the truth. The JSON (summaries and
every sweep) is written atomically to --output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.analysis.calibration import CHANCE, SCALE, calibrate, check_calibration_settings, markdown_table
from common.analysis.search import DEFAULT_BUDGET
from common.evaluation.store import atomic_write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[30, 100, 300, 1000], help="items per task (4 tasks)")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.02, 0.1],
                        help="chance-guess rate per unit of sparsity (what makes sample curves non-monotone)")
    parser.add_argument("--scale", type=float, nargs="+", default=[SCALE],
                        help="the break points' logistic scale: larger falls more slowly through the threshold")
    parser.add_argument("--chance", type=float, default=CHANCE,
                        help="a guess's chance of being right (0.5 with the dense accuracy 0.5: guesses that lose "
                             "and gain items alike, churn without a net decline)")
    parser.add_argument("--persistence", type=float, default=0.0,
                        help="share of the guesses that are the item's own, the same at every rule value (real "
                             "sweeps: flips persist over neighbouring values)")
    parser.add_argument("--fragile", type=float, default=0.0,
                        help="share of the items that break at a sparsity uniform on [0, 1] (real curves' slow "
                             "decline before their cliff)")
    parser.add_argument("--sweeps", type=int, default=100, help="seeded sweeps per setting")
    parser.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help="the search's new values per sweep")
    parser.add_argument("--spread", type=float, default=0.0,
                        help="share of the search's placement spread evenly over the range of its bootstrap interval "
                             "and band (0: placed by the bootstrap crossings alone, the search's default)")
    parser.add_argument("--iterations", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--output", type=Path, default=Path("results/search_calibration/calibration.json"))
    args = parser.parse_args()
    try:
        check_calibration_settings(args.items, args.noise, args.sweeps, args.budget, args.iterations, args.scale,
                                   args.spread, args.chance, args.persistence, args.fragile)
    except ValueError as error:
        parser.error(str(error))
    summaries = []
    for scale in args.scale:
        for items in args.items:
            for noise in args.noise:
                summaries.append(calibrate(items, noise, args.sweeps, budget=args.budget, iterations=args.iterations,
                                           scale=scale, verbose=True, spread=args.spread, chance=args.chance,
                                           persistence=args.persistence, fragile=args.fragile))
                atomic_write_json(args.output, summaries)
    print(markdown_table(summaries))
    print(f"\nwritten: {args.output}")


if __name__ == "__main__":
    sys.exit(main())
