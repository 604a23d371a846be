"""How far to trust the noise-aware search and the grid reading, measured on synthetic sweeps
whose crossing is known (``common.analysis.synthetic``).

Per seeded sweep: the full paper grid read as the report reads it (isotonic crossing of the
task-average curve, paired-bootstrap interval), the noise-aware search (at most ``budget`` new
values, snapped to the grid where a gap holds a grid value, as in a real sweep), the item
planner's pointwise-band interval on the grid's points and on the search's
(``common.analysis.item_planner``: where the curve shifted down and up by 1.96 standard errors
crosses), a replicate grid (the same items, the chance guesses drawn afresh, as other rounding
gives a real sweep) and the true crossing of the expected curve. Per setting (break-point scale,
items per task, noise), the summary says how often the search lands within one grid step of the
grid (the study's target), how often the replicate does (what the target can ask of any
reading), how far each lands from the truth, and how often each 95% interval covers the truth:
an honest 95% interval covers it in about 95 of 100 sweeps, so coverage well below that means the
interval is too narrow for that item count.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np
from tqdm import tqdm

from common.analysis.critical import bootstrap_indices, isotonic_crossing, isotonic_interval, task_average_curves
from common.analysis.item_planner import task_average_band
from common.analysis.search import DEFAULT_BUDGET, DEFAULT_WIDTH, check_search_settings, noise_aware_search
from common.analysis.synthetic import SyntheticSweep, sparsity_of
from common.evaluation.sweep import PAPER_DENSE_GRID

CENTRES = (0.35, 0.8)  # each sweep's break-point centre is drawn uniformly from this range
SCALE = 0.06  # the break points' logistic scale (SyntheticSweep's default)
# the search's and the grid's bootstrap intervals, the planner's band on the grid, the band on the search's points
INTERVALS = ("search", "grid", "band", "search_band")


def grid_step_at(grid_sparsity: Sequence[float], at: float) -> float:
    """Width, in measured sparsity, of the grid interval holding ``at`` (the first or last
    interval outside the grid's range)."""
    s = np.sort(np.asarray(grid_sparsity, dtype=float))
    i = int(np.clip(np.searchsorted(s, at, side="right") - 1, 0, s.size - 2))
    return float(s[i + 1] - s[i])


def grid_curve(sweep: SyntheticSweep, grid: Sequence[float]) -> tuple[list[float], list[np.ndarray], np.ndarray]:
    """(measured sparsity, items stacked per task, task-average normalized score) at every grid value."""
    results = [sweep.items(v) for v in grid]
    stacked = [np.stack([r[t] for r in results]) for t in range(len(sweep.dense))]
    return [sparsity_of(v) for v in grid], stacked, task_average_curves(stacked, sweep.dense)


def calibrate_sweep(sweep: SyntheticSweep, grid: Sequence[float], threshold: float = 0.99,
                    width: float = DEFAULT_WIDTH, budget: int = DEFAULT_BUDGET, iterations: int = 1000,
                    seed: int = 0) -> dict | None:
    """Grid reading, its replicate, search and truth of one sweep; None where the grid's curve does
    not cross. ``grid_replicate`` is NaN where the replicate's curve does not cross."""
    truth = sweep.true_crossing(threshold)
    sparsity, stacked, curve = grid_curve(sweep, grid)
    grid_crossing, status = isotonic_crossing(sparsity, curve, threshold)
    if status != "crossed":
        return None
    indices = [bootstrap_indices(d.size, iterations, seed + t) for t, d in enumerate(sweep.dense)]
    grid_interval = isotonic_interval(sparsity, task_average_curves(stacked, sweep.dense, indices), threshold)
    band = list(task_average_band(sparsity, stacked, sweep.dense, threshold))
    replicate_sparsity, _, replicate_curve = grid_curve(sweep.replica(), grid)
    replicate, replicate_status = isotonic_crossing(replicate_sparsity, replicate_curve, threshold)
    search = noise_aware_search(sweep.evaluate, lambda items, ix: task_average_curves(items, sweep.dense, ix),
                                threshold, width, budget, candidates=grid, iterations=iterations, seed=seed,
                                band=lambda s, items: task_average_band(s, items, sweep.dense, threshold))
    return {"truth": truth, "grid": grid_crossing, "grid_interval": list(grid_interval),
            "grid_step": grid_step_at(sparsity, grid_crossing), "band_interval": band,
            "grid_replicate": replicate if replicate_status == "crossed" else math.nan, "search": search["crossing"],
            "search_interval": search["interval"], "search_band_interval": search["band"],
            "search_values": search["values_evaluated"], "search_new_values": search["new_values"],
            "stopped": search["stopped"]}


def calibrate(items: int, noise: float, sweeps: int = 100, tasks: int = 4, threshold: float = 0.99,
              width: float = DEFAULT_WIDTH, budget: int = DEFAULT_BUDGET, iterations: int = 1000,
              grid: Sequence[float] = PAPER_DENSE_GRID, scale: float = SCALE, verbose: bool = False) -> dict:
    """Summary (and per-sweep rows) of ``sweeps`` seeded synthetic sweeps of ``tasks`` tasks with
    ``items`` items each, ``noise`` and break-point ``scale`` (``SyntheticSweep``; a larger scale
    makes the curve fall more slowly, so more of it lies near the threshold)."""
    rows = []
    for seed in tqdm(range(sweeps), desc=f"{items} items, noise {noise:g}", unit="sweep", disable=not verbose):
        centre = float(np.random.default_rng(1000 + seed).uniform(*CENTRES))
        sweep = SyntheticSweep(tasks=tasks, items=items, noise=noise, centre=centre, scale=scale, seed=seed)
        row = calibrate_sweep(sweep, grid, threshold, width, budget, iterations, seed)
        if row is not None:
            rows.append({"seed": seed, "centre": centre, **row})
    return {"items": items, "noise": noise, "scale": scale, "tasks": tasks, "sweeps": sweeps, "budget": budget,
            "width": width, "iterations": iterations, **summarize(rows), "rows": rows}


def summarize(rows: list[dict]) -> dict:
    """Rates and medians over the sweeps whose grid curve crossed."""
    if not rows:
        return {"crossed": 0}

    def rate(flags) -> float:
        return float(np.mean(list(flags)))

    def covers(interval, truth) -> bool:
        return interval[0] <= truth <= interval[1]

    return {
        "crossed": len(rows),
        "search_within_one_grid_step": rate(abs(r["search"] - r["grid"]) <= r["grid_step"] for r in rows),
        # NaN (the replicate's curve did not cross) counts as not within
        "replicate_within_one_grid_step": rate(abs(r["grid_replicate"] - r["grid"]) <= r["grid_step"] for r in rows),
        "search_values_mean": float(np.mean([r["search_values"] for r in rows])),
        "search_new_values_max": int(max(r["search_new_values"] for r in rows)),
        "stopped": dict(Counter(r["stopped"] for r in rows)),
        "median_error": {"search": float(np.median([abs(r["search"] - r["truth"]) for r in rows])),
                         "grid": float(np.median([abs(r["grid"] - r["truth"]) for r in rows]))},
        "mean_signed_error": {"search": float(np.mean([r["search"] - r["truth"] for r in rows])),
                              "grid": float(np.mean([r["grid"] - r["truth"] for r in rows]))},
        "coverage": {k: rate(covers(r[f"{k}_interval"], r["truth"]) for r in rows) for k in INTERVALS},
        "truth_below_interval": {k: rate(r["truth"] < r[f"{k}_interval"][0] for r in rows) for k in INTERVALS},
        "median_interval_width": {k: float(np.median([r[f"{k}_interval"][1] - r[f"{k}_interval"][0] for r in rows]))
                                  for k in INTERVALS},
    }


def markdown_table(summaries: list[dict]) -> str:
    """One row per setting: the target rate beside the grid's own reproducibility, errors against
    the truth, interval coverage and width."""
    lines = ["| items per task | noise | scale | sweeps | search within one grid step of the grid | "
             "replicate grid within one grid step of the grid | values (mean) | median error: search / grid | "
             "95% interval covers the truth: search / grid / grid band / search band | "
             "truth below the interval: search / grid / grid band / search band | "
             "median interval width: search / grid / grid band / search band |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        setting = f"| {s['items']} | {s['noise']:g} | {s.get('scale', SCALE):g} |"
        if not s.get("crossed"):
            lines.append(f"{setting} 0 | - | - | - | - | - | - | - |")
            continue

        def pair(key, fmt="{:.3f}"):
            return " / ".join(fmt.format(s[key][k]) for k in INTERVALS if k in s[key])

        lines.append(f"{setting} {s['crossed']} | {s['search_within_one_grid_step']:.0%} | "
                     f"{s['replicate_within_one_grid_step']:.0%} | {s['search_values_mean']:.1f} | "
                     f"{pair('median_error')} | {pair('coverage', '{:.0%}')} | "
                     f"{pair('truth_below_interval', '{:.0%}')} | {pair('median_interval_width')} |")
    return "\n".join(lines)


def check_calibration_settings(items: Sequence[int], noise: Sequence[float], sweeps: int,
                               budget: int = DEFAULT_BUDGET, iterations: int = 1000,
                               scales: Sequence[float] = (SCALE,)) -> None:
    """One-line errors before any sweep runs."""
    if not scales or any(not (isinstance(x, (int, float)) and math.isfinite(x) and x > 0) for x in scales):
        raise ValueError(f"--scale must be positive numbers (the break points' logistic scale), got {list(scales)}")
    check_search_settings(0.99, DEFAULT_WIDTH, budget)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 100:
        raise ValueError(f"--iterations (bootstrap resamples) must be a whole number >= 100, got {iterations}")
    if not items or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in items):
        raise ValueError(f"--items must be whole numbers >= 2 (items per task), got {list(items)}")
    if not noise or any(not (isinstance(x, (int, float)) and math.isfinite(x) and 0 <= x <= 1) for x in noise):
        raise ValueError(f"--noise must be numbers in [0, 1] (chance-guess rate per unit sparsity), got {list(noise)}")
    if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 1:
        raise ValueError(f"--sweeps must be a whole number >= 1, got {sweeps}")
