"""How far to trust the noise-aware search and the grid reading, measured on synthetic sweeps
whose crossing is known (``common.analysis.synthetic``).

Per seeded sweep: the full paper grid read as the report reads it (isotonic crossing of the
task-average curve, paired-bootstrap interval), the noise-aware search (at most ``budget`` new
values, snapped to the grid where a gap holds a grid value, as in a real sweep), plain bisection
on the rule value (the baseline the search replaces: 9 values), the item
planner's pointwise-band interval on the grid's points and on the search's
(``common.analysis.item_planner``: where the curve shifted down and up by 1.96 standard errors
crosses), a replicate grid (the same items, the chance guesses drawn afresh, as other rounding
gives a real sweep) and the true crossing of the expected curve. Per setting (break-point scale,
items per task, noise), the summary says how often the search lands within one grid step of the
grid (the study's target), how often bisection and the replicate do (what the target can ask of
any reading), how far each lands from the truth, and how often each 95% interval covers the truth:
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
from common.analysis.synthetic import CHANCE, SyntheticSweep, sparsity_of
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


BISECTION_RESOLUTION = 0.01  # in the rule value: the ends, then 7 halvings, 9 values in all


def bisection_crossing(sweep: SyntheticSweep, threshold: float = 0.99,
                       resolution: float = BISECTION_RESOLUTION) -> tuple[float, int]:
    """(crossing, values evaluated) of plain bisection, the baseline the noise-aware search
    replaces: the dense end (1.0) and the sparsest value (0.0), then halvings of the bracket of
    rule values (a value whose task-average score is at least ``threshold`` becomes the bracket's
    upper end) until it is ``resolution`` wide. Its points are read like the grid's (isotonic
    crossing); NaN where the ends do not bracket the threshold. Reads ``sweep.items`` directly, so
    the search's call count is untouched."""
    scores: dict[float, float] = {}

    def score(value: float) -> float:
        if value not in scores:
            items = sweep.items(value)
            scores[value] = float(task_average_curves([i[None, :] for i in items], sweep.dense)[0])
        return scores[value]

    high, low = 1.0, 0.0
    if score(high) < threshold or score(low) >= threshold:
        return math.nan, len(scores)
    while high - low > resolution + 1e-12:
        middle = round((high + low) / 2, 6)
        high, low = (middle, low) if score(middle) >= threshold else (high, middle)
    crossing, _ = isotonic_crossing([sparsity_of(v) for v in scores], list(scores.values()), threshold)
    return crossing, len(scores)


def calibrate_sweep(sweep: SyntheticSweep, grid: Sequence[float], threshold: float = 0.99,
                    width: float = DEFAULT_WIDTH, budget: int = DEFAULT_BUDGET, iterations: int = 1000,
                    seed: int = 0, spread: float = 0.0) -> dict | None:
    """Grid reading, its replicate, search, bisection and truth of one sweep; None where the grid's
    curve does not cross. ``grid_replicate`` is NaN where the replicate's curve does not cross."""
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
                                band=lambda s, items, *_: task_average_band(s, items, sweep.dense, threshold),
                                spread=spread)
    bisection, bisection_values = bisection_crossing(sweep, threshold)
    return {"truth": truth, "grid": grid_crossing, "grid_interval": list(grid_interval),
            "grid_step": grid_step_at(sparsity, grid_crossing), "band_interval": band,
            "grid_replicate": replicate if replicate_status == "crossed" else math.nan, "search": search["crossing"],
            "search_interval": search["interval"], "search_band_interval": search["band"],
            "search_values": search["values_evaluated"], "search_new_values": search["new_values"],
            "stopped": search["stopped"], "bisection": bisection, "bisection_values": bisection_values}


def calibrate(items: int, noise: float, sweeps: int = 100, tasks: int = 4, threshold: float = 0.99,
              width: float = DEFAULT_WIDTH, budget: int = DEFAULT_BUDGET, iterations: int = 1000,
              grid: Sequence[float] = PAPER_DENSE_GRID, scale: float = SCALE, verbose: bool = False,
              spread: float = 0.0, chance: float = CHANCE, persistence: float = 0.0, fragile: float = 0.0) -> dict:
    """Summary (and per-sweep rows) of ``sweeps`` seeded synthetic sweeps of ``tasks`` tasks with
    ``items`` items each, ``noise`` and break-point ``scale`` (``SyntheticSweep``; a larger scale
    makes the curve fall more slowly, so more of it lies near the threshold), the ``fragile`` share
    of items, the guesses' ``chance`` and ``persistence``, and the search's ``spread``
    (``common.analysis.search``)."""
    rows = []
    for seed in tqdm(range(sweeps), desc=f"{items} items, noise {noise:g}", unit="sweep", disable=not verbose):
        centre = float(np.random.default_rng(1000 + seed).uniform(*CENTRES))
        sweep = SyntheticSweep(tasks=tasks, items=items, noise=noise, centre=centre, scale=scale, seed=seed,
                               chance=chance, persistence=persistence, fragile=fragile)
        row = calibrate_sweep(sweep, grid, threshold, width, budget, iterations, seed, spread)
        if row is not None:
            rows.append({"seed": seed, "centre": centre, **row})
    return {"items": items, "noise": noise, "chance": chance, "persistence": persistence, "fragile": fragile,
            "scale": scale, "spread": spread, "tasks": tasks, "sweeps": sweeps, "budget": budget, "width": width,
            "iterations": iterations, **summarize(rows), "rows": rows}


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
        # NaN (the bisection's ends did not bracket the threshold) counts as not within
        "bisection_within_one_grid_step": rate(abs(r["bisection"] - r["grid"]) <= r["grid_step"] for r in rows),
        # NaN (the replicate's curve did not cross) counts as not within
        "replicate_within_one_grid_step": rate(abs(r["grid_replicate"] - r["grid"]) <= r["grid_step"] for r in rows),
        "search_values_mean": float(np.mean([r["search_values"] for r in rows])),
        "search_new_values_max": int(max(r["search_new_values"] for r in rows)),
        "stopped": dict(Counter(r["stopped"] for r in rows)),
        "median_error": {"search": float(np.median([abs(r["search"] - r["truth"]) for r in rows])),
                         "bisection": float(np.nanmedian([abs(r["bisection"] - r["truth"]) for r in rows])),
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
             "bisection within one grid step of the grid | replicate grid within one grid step of the grid | "
             "values (mean) | median error: search / bisection / grid | "
             "95% interval covers the truth: search / grid / grid band / search band | "
             "truth below the interval: search / grid / grid band / search band | "
             "median interval width: search / grid / grid band / search band |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        guesses = (s.get("chance", CHANCE), s.get("persistence", 0.0))
        noise = f"{s['noise']:g}" + ("" if guesses == (CHANCE, 0.0) else
                                     f" (chance {guesses[0]:g}, persistence {guesses[1]:g})")
        scale = f"{s.get('scale', SCALE):g}" + (f", {s['fragile']:g} fragile" if s.get("fragile") else "")
        setting = f"| {s['items']} | {noise} | {scale} |"
        if not s.get("crossed"):
            lines.append(f"{setting} 0 | - | - | - | - | - | - | - | - |")
            continue

        def pair(key, fmt="{:.3f}", order=INTERVALS):
            return " / ".join(fmt.format(s[key][k]) for k in order if k in s[key])

        lines.append(f"{setting} {s['crossed']} | {s['search_within_one_grid_step']:.0%} | "
                     f"{s['bisection_within_one_grid_step']:.0%} | {s['replicate_within_one_grid_step']:.0%} | "
                     f"{s['search_values_mean']:.1f} | {pair('median_error', order=('search', 'bisection', 'grid'))} | "
                     f"{pair('coverage', '{:.0%}')} | "
                     f"{pair('truth_below_interval', '{:.0%}')} | {pair('median_interval_width')} |")
    return "\n".join(lines)


def check_calibration_settings(items: Sequence[int], noise: Sequence[float], sweeps: int,
                               budget: int = DEFAULT_BUDGET, iterations: int = 1000,
                               scales: Sequence[float] = (SCALE,), spread: float = 0.0, chance: float = CHANCE,
                               persistence: float = 0.0, fragile: float = 0.0) -> None:
    """One-line errors before any sweep runs."""
    if not (isinstance(chance, (int, float)) and 0 < chance <= 1):
        raise ValueError(f"--chance (a guess's chance of being right) must be in (0, 1], got {chance}")
    if not (isinstance(persistence, (int, float)) and 0 <= persistence <= 1):
        raise ValueError(f"--persistence (the share of guesses that are the item's own at every value) must be in "
                         f"[0, 1], got {persistence}")
    if not (isinstance(fragile, (int, float)) and 0 <= fragile <= 1):
        raise ValueError(f"--fragile (the share of items that break at a uniform sparsity) must be in [0, 1], "
                         f"got {fragile}")
    if not scales or any(not (isinstance(x, (int, float)) and math.isfinite(x) and x > 0) for x in scales):
        raise ValueError(f"--scale must be positive numbers (the break points' logistic scale), got {list(scales)}")
    check_search_settings(0.99, DEFAULT_WIDTH, budget, spread=spread)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 100:
        raise ValueError(f"--iterations (bootstrap resamples) must be a whole number >= 100, got {iterations}")
    if not items or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in items):
        raise ValueError(f"--items must be whole numbers >= 2 (items per task), got {list(items)}")
    if not noise or any(not (isinstance(x, (int, float)) and math.isfinite(x) and 0 <= x <= 1) for x in noise):
        raise ValueError(f"--noise must be numbers in [0, 1] (chance-guess rate per unit sparsity), got {list(noise)}")
    if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 1:
        raise ValueError(f"--sweeps must be a whole number >= 1, got {sweeps}")
