"""Noise-aware search for a site's critical sparsity: few evaluations and an honest interval.

At a few dozen items per task the normalized score is not monotone in the rule value (one item
moves a task by several points), so bisection can bracket a noise crossing far from the curve's.
This search uses every evaluation made so far:

1. a coarse pass over a few rule values (``COARSE_VALUES``);
2. the isotonic (non-increasing) fit of the paired normalized score against measured sparsity,
   its threshold crossing, and a paired-bootstrap interval (items resampled, curve refitted);
3. one new rule value where it shrinks that interval most: in the gap between evaluated
   sparsities whose share of the bootstrap crossings times its width is largest, at the median
   of those crossings (mapped to a rule value linearly within the gap), moved to the nearest
   value of the sweep's grid inside the gap if there is one (a search then sees the grid's
   points and reuses a grid's cells; finer values only where the grid has none);

until the interval, the gap around the crossing and, where the caller gives one, the band
interval (the curve shifted down and up by 1.96 standard errors at every point,
``common.analysis.critical.band_crossings``) are all narrower than ``width`` (in measured
sparsity), or ``budget`` new values are spent. The band is the honest reading where few items
have changed: there the bootstrap interval is too narrow (``scripts/search_calibration.py``),
and a search that stopped on it alone would call a noisy crossing converged. The PPL-p%
criterion runs the same search on the perplexity ratio (documents resampled), starting from the
values the accuracy search evaluated (their perplexity cells exist already).

With ``spread`` > 0 that share of the placement weight in step 3 is spread evenly over the range
the bootstrap interval and the band cover together (an exploring placement: it reaches bumps of
the curve the bootstrap crossings do not point at). The calibration measures what it buys (more
honest bootstrap intervals) and costs (less agreement with the full grid), so the default is 0.

``stopped`` says why a search ended: ``converged`` (interval, gap and band narrower than the width),
``budget`` (the interval is the honest answer at this item count), ``never_reached`` (below the
threshold even at value 1.0), ``all_above`` (above it even at value 0.0), ``no_room`` (the gaps
holding the bootstrap crossings are narrower than the rule-value step ``VALUE_STEP``).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from common.analysis.critical import (bootstrap_indices, critical_sparsity, fitted_crossing, isotonic_crossings,
                                      isotonic_fit, perplexity_curves, resampled_band, task_average_curves)
from common.analysis.item_planner import task_average_band
from common.evaluation.sweep import DENSE, measured_sparsity
from common.evaluation.tasks import PERPLEXITY_TASKS

COARSE_VALUES = (1.0, 0.95, 0.85, 0.6)  # top-p values spread over measured sparsity ~0 to ~0.7
DEFAULT_WIDTH = 0.05  # about one paper-grid step in measured sparsity near typical crossings
DEFAULT_BUDGET = 8  # new rule values per site and criterion (the paper grid has 26)
VALUE_STEP = 1e-4  # rule values are rounded to this; a gap narrower than two steps cannot be split
QUICK_BUDGET = 7  # values of the quick protocol's PPL-led search per site, its coarse pass included
SEARCH_LEADS = ("accuracy", "ppl")  # which criterion places the values (the other reads the same points)

Evaluate = Callable[[float], tuple[float, Sequence[np.ndarray]]]
Curves = Callable[[list[np.ndarray], list[np.ndarray] | None], np.ndarray]
Band = Callable[[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray], tuple[float, float]]


def check_search_settings(threshold: float, width: float, budget: int, ppl_percent: float = 1.0,
                          spread: float = 0.0) -> None:
    """One-line errors for settings under which the search cannot end or means nothing."""
    if not (isinstance(spread, (int, float)) and 0 <= spread <= 1):
        raise ValueError(f"--spread (the share of the placement spread over the band's range) must be in [0, 1], "
                         f"got {spread}")
    if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise ValueError(f"--threshold must be in (0, 1], got {threshold}")
    if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
        raise ValueError(f"--resolution (the search's interval width in measured sparsity) must be a positive "
                         f"number, got {width}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 2:
        raise ValueError(f"--budget (new rule values per search) must be a whole number >= 2, got {budget}")
    if not (isinstance(ppl_percent, (int, float)) and math.isfinite(ppl_percent) and ppl_percent > 0):
        raise ValueError(f"--ppl-percent must be a number above 0, got {ppl_percent}")


def noise_aware_search(evaluate: Evaluate, curves: Curves, threshold: float = 0.99, width: float = DEFAULT_WIDTH,
                       budget: int = DEFAULT_BUDGET, coarse: Sequence[float] = COARSE_VALUES,
                       known: Sequence[float] = (), candidates: Sequence[float] = (), iterations: int = 1000,
                       seed: int = 0, label: str = "search", verbose: bool = False, band: Band | None = None,
                       spread: float = 0.0) -> dict:
    """Critical sparsity of one criterion with at most ``budget`` new rule values.

    ``evaluate(value)`` returns (measured sparsity, per-task item arrays at that value), the
    items in the same order at every value; ``curves(items, indices)`` turns the stacked items
    (per task, [points, items]) into the normalized score per point, or per resample and point
    when ``indices`` (per task, [resamples, items], ``bootstrap_indices``) is given. ``known``
    values are evaluated first and cost nothing against the budget (their cells exist). A new value is the
    ``candidates`` value (a sweep's grid) nearest to the chosen one when the gap holds any, so a
    search shares its points, and their noise, with the grid. ``band(sparsity, items, curve,
    resampled)`` gives the band interval (low, high) from the points sorted by sparsity: their items
    stacked as for ``curves``, the normalized score and its bootstrap curves (as ``curves`` returns
    them, already computed for the interval). ``spread`` is the share of the placement weight
    spread evenly over the range of the interval and the band (the module's docstring).
    """
    check_search_settings(threshold, width, budget, spread=spread)
    points: dict[float, tuple[float, list[np.ndarray]]] = {}
    order: list[float] = []
    history: list[dict] = []
    indices: list[np.ndarray] | None = None
    progress = tqdm(total=len(known) + budget, desc=label, unit="value", disable=not verbose)

    def measure(value: float) -> None:
        nonlocal indices
        value = round(float(value), 6)
        if value in points:
            return
        sparsity, items = evaluate(value)
        items = [np.asarray(i, dtype=float) for i in items]
        if indices is None:
            indices = [bootstrap_indices(i.size, iterations, seed + t) for t, i in enumerate(items)]
        points[value] = (float(sparsity), items)
        order.append(value)
        progress.update(1)

    for value in known:
        measure(value)
    new = 0
    for value in coarse:
        if new < budget and round(float(value), 6) not in points:
            measure(value)
            new += 1
    while True:
        fit = _fit(points, curves, indices, threshold, band)
        history.append({"values": len(points), "crossing": fit["crossing"], "interval": fit["interval"],
                        "band": fit["band"]})
        progress.set_postfix(crossing=f"{fit['crossing']:.3f}", interval=f"{fit['interval'][0]:.3f}-"
                                                                           f"{fit['interval'][1]:.3f}")
        stopped, value = _next_value(fit, width, candidates, spread)
        if stopped is None and new >= budget:
            stopped = "budget"
        if stopped is not None:
            break
        measure(value)
        new += 1
    progress.close()
    values = fit["values"]
    return {"label": label, "threshold": threshold, "width": width, "budget": budget, "spread": spread,
            "status": fit["status"], "crossing": fit["crossing"], "interval": fit["interval"], "band": fit["band"],
            "bracket": fit["bracket"], "stopped": stopped,
            "values_evaluated": len(values), "new_values": new, "order": order, "history": history,
            "critical": critical_sparsity(fit["sparsity"], fit["normalized"], threshold, values).as_dict(),
            "points": [{"value": v, "sparsity": s, "normalized": n, "fitted": f} for v, s, n, f in
                       zip(values, fit["sparsity"].tolist(), fit["normalized"].tolist(), fit["fitted"].tolist())]}


def _fit(points: dict, curves: Curves, indices: list[np.ndarray], threshold: float, band: Band | None = None) -> dict:
    """Isotonic crossing of the evaluated points, its bootstrap crossings and the band interval."""
    values = sorted(points, key=lambda v: (points[v][0], -v))  # by measured sparsity
    sparsity = np.array([points[v][0] for v in values])
    stacked = [np.stack([points[v][1][t] for v in values]) for t in range(len(points[values[0]][1]))]
    normalized = np.asarray(curves(stacked, None), dtype=float)
    if np.isnan(normalized).any():
        raise ValueError("the normalized score is undefined (dense score 0 on every task); use more items (--limit)")
    _, fitted = isotonic_fit(sparsity, normalized)
    crossing, status, k = fitted_crossing(sparsity, fitted, threshold)
    resampled = curves(stacked, indices)
    crossings = isotonic_crossings(sparsity, resampled, threshold)
    interval = [float(x) for x in np.percentile(crossings, [2.5, 97.5])] if crossings.size else [math.nan] * 2
    bracket = [float(sparsity[k]), float(sparsity[k + 1])] if status == "crossed" else [crossing, crossing]
    return {"values": values, "sparsity": sparsity, "normalized": normalized, "fitted": fitted, "status": status,
            "crossing": crossing, "interval": interval, "bracket": bracket, "crossings": crossings,
            "band": None if band is None else [float(x) for x in band(sparsity, stacked, normalized, resampled)]}


def placement_crossings(fit: dict, spread: float = 0.0) -> np.ndarray:
    """The crossings the placement weighs gaps by: the bootstrap crossings, joined by evenly spaced
    points over the range of the bootstrap interval and the band (where the band's upper end is not
    reached, up to the sparsest point evaluated) so that they carry ``spread`` of the weight."""
    crossings = fit["crossings"]
    if spread <= 0 or fit["band"] is None or fit["status"] != "crossed" or crossings.size == 0:
        return crossings
    ends = [x for x in (*fit["interval"], *fit["band"]) if math.isfinite(x)]
    low, high = min(ends), max(ends) if math.isfinite(fit["band"][1]) else float(fit["sparsity"][-1])
    count = crossings.size if spread >= 1 else int(round(crossings.size * spread / (1 - spread)))
    even = np.linspace(low, high, count + 2)[1:-1]
    return even if spread >= 1 else np.concatenate([crossings, even])


def _next_value(fit: dict, width: float, candidates: Sequence[float] = (),
                spread: float = 0.0) -> tuple[str | None, float | None]:
    """(why to stop, None) or (None, the next rule value to evaluate)."""
    values, sparsity = fit["values"], fit["sparsity"]
    if fit["status"] == "never_reached":
        return ("never_reached", None) if max(values) >= 1.0 else (None, 1.0)
    if fit["status"] == "all_above":
        return ("all_above", None) if min(values) <= 0.0 else (None, 0.0)
    low, high = fit["interval"]
    band_width = 0.0 if fit["band"] is None else fit["band"][1] - fit["band"][0]
    if high - low <= width and fit["bracket"][1] - fit["bracket"][0] <= width and band_width <= width:
        return "converged", None
    crossings, best, target = placement_crossings(fit, spread), 0.0, None
    for i in range(len(values) - 1):
        s_a, s_b, v_a, v_b = sparsity[i], sparsity[i + 1], values[i], values[i + 1]
        inside = crossings[(crossings > s_a) & (crossings <= s_b)]
        if s_b <= s_a or abs(v_b - v_a) < 2 * VALUE_STEP or inside.size == 0:
            continue
        score = inside.size / crossings.size * (s_b - s_a)
        if score > best:
            at = np.clip(np.median(inside), s_a + 0.1 * (s_b - s_a), s_b - 0.1 * (s_b - s_a))
            value = round((v_a + (at - s_a) / (s_b - s_a) * (v_b - v_a)) / VALUE_STEP) * VALUE_STEP
            value = min(max(value, min(v_a, v_b) + VALUE_STEP), max(v_a, v_b) - VALUE_STEP)
            inside = [c for c in candidates if min(v_a, v_b) < c < max(v_a, v_b)]
            if inside:
                value = min(inside, key=lambda c: abs(c - value))
            best, target = score, round(value, 6)
    return ("no_room", None) if target is None else (None, target)


# ---- the sweep's search: every site of a shard, accuracy then PPL-p% -------------------------

def run_search(runner, threshold: float = 0.99, width: float = DEFAULT_WIDTH, budget: int = DEFAULT_BUDGET,
               ppl_percent: float = 1.0, iterations: int = 1000, spread: float = 0.0,
               lead: str = "accuracy") -> list[dict]:
    """Search every site of the runner's shard (sites are split across shards, cells are not).

    ``runner`` is a ``common.evaluation.sweep.SweepRunner``; the spec is left as it is: pass
    ``searched_values(searches)`` to ``write_report`` to report exactly the evaluated points.
    """
    check_search_settings(threshold, width, budget, ppl_percent, spread)
    count, index = runner.shard[1], runner.shard[0]
    sites = [site for position, site in enumerate(runner.spec.sites) if position % count == index]
    return [search_site(runner, site, threshold, width, budget, ppl_percent, iterations, spread, lead)
            for site in sites]


def searched_values(searches: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Per site, the rule values its searches evaluated, highest first: ``scoring`` (the accuracy
    search, read by the multiple-choice tasks) and ``perplexity`` (the PPL search, which starts
    from the accuracy values). The report reads each criterion on exactly its search's points."""
    def ordered(parts):
        return sorted({point["value"] for part in parts for point in part["points"]}, reverse=True)

    return {search["site"]: {"scoring": ordered([search]), "perplexity": ordered([search, *search["ppl"].values()])}
            for search in searches}  # a PPL-led search's points are its PPL values: both criteria read them


def search_site(runner, site: str, threshold: float = 0.99, width: float = DEFAULT_WIDTH,
                budget: int = DEFAULT_BUDGET, ppl_percent: float = 1.0, iterations: int = 1000,
                spread: float = 0.0, lead: str = "accuracy") -> dict:
    """The task-average accuracy criterion, then PPL-p% on each perplexity task, for one site.

    ``lead="ppl"`` (the quick protocol) searches the PPL-p% criterion alone, from the coarse
    values on, and scores every task at each value it evaluates: the accuracy reading and the
    comparisons at equal sparsity are then read off the same points, with no values of their own.
    """
    if lead not in SEARCH_LEADS:
        raise ValueError(f"the search leads with one of {', '.join(SEARCH_LEADS)}, not {lead!r}")
    spec = runner.spec
    before = runner.evaluations
    dense = {task: runner.cell(DENSE, 1.0, task) for task in spec.tasks}
    if lead == "ppl":
        return _ppl_led_search(runner, site, dense, threshold, width, budget, ppl_percent, iterations, spread, before)
    scoring = [t for t in spec.tasks if t not in PERPLEXITY_TASKS]
    used = [t for t in scoring if dense[t]["metrics"][spec.metric_for(t)]]
    if not used:
        raise ValueError(f"the dense model scores 0 on every scoring task ({', '.join(scoring)}), so normalized "
                         "scores are undefined; use more items (--limit) or other tasks")
    dense_items = [_item_scores(dense[t], spec.metric_for(t)) for t in used]

    def accuracy(value: float) -> tuple[float, list[np.ndarray]]:
        results = {task: runner.cell(site, value, task) for task in spec.tasks}  # perplexity cells: reused below
        items = [_item_scores(results[t], spec.metric_for(t), len(d)) for t, d in zip(used, dense_items)]
        return float(np.mean([measured_sparsity(results[t], site) for t in used])), items

    out = {"site": site, "tasks": used,
           **noise_aware_search(accuracy, lambda items, indices: task_average_curves(items, dense_items, indices),
                                threshold, width, budget, candidates=spec.grid, iterations=iterations,
                                label=f"search {site}", verbose=runner.verbose,
                                band=lambda points, items, *_: task_average_band(points, items, dense_items,
                                                                                 threshold),
                                spread=spread),
           "ppl": {}}
    searched = [point["value"] for point in out["points"]]
    for task in [t for t in spec.tasks if t in PERPLEXITY_TASKS]:
        out["ppl"][task] = _perplexity_search(runner, site, task, dense[task], searched, ppl_percent, width,
                                              budget, iterations, spread)
    out["cells_evaluated"] = runner.evaluations - before
    return out


def _ppl_led_search(runner, site: str, dense: dict, threshold: float, width: float, budget: int, ppl_percent: float,
                    iterations: int, spread: float, before: int) -> dict:
    """The quick protocol's search of one site: PPL-p% on the (first) perplexity task, every task
    scored at each value; ``points`` are its values, which the report reads for every criterion."""
    tasks = [t for t in runner.spec.tasks if t in PERPLEXITY_TASKS]
    if not tasks:
        raise ValueError("a search led by PPL-p% needs a perplexity task (fables_ppl) among --tasks")
    task = tasks[0]
    found = _perplexity_search(runner, site, task, dense[task], [], ppl_percent, width, budget, iterations, spread,
                               coarse=COARSE_VALUES, every_task=True)
    return {"site": site, "lead": "ppl", "tasks": [t for t in runner.spec.tasks if t not in PERPLEXITY_TASKS],
            "points": found["points"], "order": found["order"], "ppl": {task: found},
            "cells_evaluated": runner.evaluations - before}


def _perplexity_search(runner, site: str, task: str, dense: dict, known: list[float], ppl_percent: float,
                       width: float, budget: int, iterations: int, spread: float = 0.0, coarse=(),
                       every_task: bool = False) -> dict:
    """The PPL-p% search on ``task`` from the ``known`` values; ``every_task``: each new value is
    scored on every task of the sweep, not only on ``task``."""
    dense_logliks = np.array([i["loglikelihood"] for i in dense["items"]])
    words = np.array([i["words"] for i in dense["items"]], dtype=float)

    def evaluate(value: float) -> tuple[float, list[np.ndarray]]:
        if every_task:
            for other in runner.spec.tasks:
                runner.cell(site, value, other)
        result = runner.cell(site, value, task)
        return measured_sparsity(result, site), [_item_scores(result, "loglikelihood", len(words))]

    def curves(items, indices):
        return perplexity_curves(items[0], dense_logliks, words, None if indices is None else indices[0])

    threshold = 1.0 / (1.0 + ppl_percent / 100.0)

    def band(sparsity, items, curve, resampled):
        return resampled_band(sparsity, curve, resampled, threshold)

    return noise_aware_search(evaluate, curves, threshold, width, budget, coarse=coarse, known=known,
                              candidates=runner.spec.grid, iterations=iterations,
                              label=f"PPL-{ppl_percent:g}% {site}", verbose=runner.verbose, band=band,
                              spread=spread)


def _item_scores(result: dict, field: str, expected: int | None = None) -> np.ndarray:
    scores = np.array([item[field] for item in result["items"]], dtype=float)
    if expected is not None and scores.size != expected:
        raise ValueError(f"a cell has {scores.size} items and its dense cell {expected}; both must use the same "
                         "items (same --limit)")
    return scores
