"""Item planner: where to score more items so the critical-sparsity crossing is pinned to ±h.

A few hundred items per task cannot tell a 1% drop from noise: only a few percent of items
change their answer between dense and sparse. The planner reads the paired per-item results
scored so far and says which items to score next, at which thresholds, until the 95% interval
of the crossing (the interpolated critical sparsity of the task-average curve) is at most
``target_halfwidth`` wide on each side, or ``max_items`` evaluations are spent.

Model (items independent within a task, tasks independent):

* per task t and threshold p, on the first n items: R = mean(sparse) / mean(dense), with item
  influence psi_i = (sparse_i - R dense_i) / mean(dense) and var(R) = var(psi) / n (delta
  method; the covariance of two thresholds comes from their common items);
* the task average A_p = mean_t R_tp (the report's task-average curve), with its standard error;
* the crossing x: the linear crossing of c = 0.99 between the last point a with A >= c and the
  next sparser one b (``critical_sparsity``'s interpolated reading);
* its interval: the crossings of the curve shifted down and up by 1.96 standard errors at every
  point. The crossing only rises when any point rises, so this holds the crossing's uncertainty
  including a wrong bracket (a noisy point beyond b that is really below c), which the delta
  method within the bracket (``crossing_se``) ignores.

More items go only to a, b, the sparser points whose upper band still reaches c, the denser
points within ``target_halfwidth`` of the crossing whose lower band falls below c (the lower end
of the interval is the last point whose lower band clears c: where a itself sits too close to c
for that, such a neighbour can pin it), and dense (every ratio needs it on the same items). Each
task gets n_t ∝ sqrt(V_t) items (V_t its per-item variance of the crossing, delta method: the
allocation with the fewest items for a given variance), growing at most ``max_growth``-fold per
step since the variances are estimated. Items are a prefix of each task's (shuffled) order, so a plan is a list of "score
items [start, stop) of task T at threshold p" and never rescores an item.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping

import numpy as np

from common.analysis.critical import Z95, band_crossings, fitted_crossing, pointwise_band_interval
from common.evaluation.sweep import DENSE  # the dense baseline, named as in the store's cells


@dataclass(frozen=True)
class ItemRequest:
    """Score items [start, stop) of ``task`` at ``threshold`` (a rule value, or ``DENSE``)."""

    task: str
    threshold: float | str
    start: int
    stop: int

    def __str__(self) -> str:
        return f"score items [{self.start}, {self.stop}) of task {self.task} at threshold {self.threshold}"


@dataclass
class ItemPlan:
    status: str  # "continue", "target_reached", "budget_spent", "items_exhausted", "no_crossing"
    reason: str  # one line: why the planner stopped, or what the next step buys
    crossing: float  # interpolated critical sparsity of the task-average curve (nan without a crossing)
    halfwidth: float  # achieved 95% half-width of the crossing, in sparsity (pointwise-band interval)
    bracket: tuple | None  # (threshold a, threshold b) around the crossing
    normalized: dict  # threshold -> (task-average normalized score, its standard error)
    items_used: dict  # DENSE or threshold -> {task: items scored}
    total_items: int  # evaluations scored so far, dense included
    crossing_se: float = math.nan  # delta-method standard error of the crossing within its bracket
    band: tuple | None = None  # (low, high): crossings of the curve shifted down / up; high is inf while open
    needed: dict = field(default_factory=dict)  # task -> items per bracketing threshold the target needs
    planned: tuple = ()  # the thresholds that get items (besides dense): the bracket and its open neighbours
    requests: list = field(default_factory=list)  # ItemRequest, the next step (empty once stopped)

    @property
    def interval(self) -> tuple[float, float]:
        return self.crossing - self.halfwidth, self.crossing + self.halfwidth

    def as_dict(self) -> dict:
        out = asdict(self)
        out["requests"] = [str(r) for r in self.requests]
        out["interval"] = list(self.interval)
        return out


def paired_ratio(sparse, dense) -> tuple[float, np.ndarray]:
    """(mean(sparse) / mean(dense) on the sparse items, per-item influence psi) of one task and threshold.

    ``sparse`` holds the first len(sparse) items of ``dense``'s order.
    """
    sparse = np.asarray(sparse, dtype=float)
    dense = np.asarray(dense, dtype=float)[: sparse.size]
    dense_mean = dense.mean()
    ratio = sparse.mean() / dense_mean
    return float(ratio), (sparse - ratio * dense) / dense_mean


def _variance(psi: np.ndarray, dense_mean: float) -> float:
    """var(psi) / n, floored at the rule-of-three bound (3 / n discordant items) so a threshold
    where no item has changed yet is not read as exact."""
    n = psi.size
    observed = float(psi.var(ddof=1)) if n > 1 else math.inf
    return max(observed, 3.0 / n / dense_mean**2) / n


def _covariance(psi_a: np.ndarray, psi_b: np.ndarray) -> float:
    """cov(R_a, R_b) from the common prefix: cov(psi) * m / (n_a n_b)."""
    m = min(psi_a.size, psi_b.size)
    if m < 2:
        return 0.0
    return float(np.cov(psi_a[:m], psi_b[:m])[0, 1]) * m / (psi_a.size * psi_b.size)


def _validate(dense, sparse, sparsity, available) -> list[str]:
    tasks = sorted(dense)
    if not tasks or not sparse:
        raise ValueError("the item planner needs dense results for at least one task and sparse results for at least "
                         "two thresholds")
    if set(sparsity) != set(sparse):
        raise ValueError(f"measured sparsity is needed for exactly the thresholds with results; got sparsity for "
                         f"{sorted(sparsity)} and results for {sorted(sparse)}")
    for task in tasks:
        n_dense = len(dense[task])
        if task not in available or available[task] < n_dense:
            raise ValueError(f"task {task}: give its item count in `available` (at least the {n_dense} scored dense)")
        if n_dense == 0 or float(np.mean(dense[task])) == 0:
            raise ValueError(f"task {task}: the dense score is 0 on the scored items, so no normalized score exists; "
                             "score more dense items or leave the task out")
    for value, by_task in sparse.items():
        if sorted(by_task) != tasks:
            raise ValueError(f"threshold {value}: results for tasks {sorted(by_task)}, but dense has {tasks}; "
                             "every threshold needs every task")
        for task, scores in by_task.items():
            if not 0 < len(scores) <= len(dense[task]):
                raise ValueError(f"threshold {value}, task {task}: {len(scores)} items scored sparse but "
                                 f"{len(dense[task])} dense; score dense on every item first (and at least one item)")
    return tasks


def task_average_with_error(dense, sparse) -> dict:
    """threshold -> (task-average normalized score, standard error, {task: psi}) from paired items."""
    out = {}
    for value, by_task in sparse.items():
        ratios, variance, psis = [], 0.0, {}
        for task, scores in by_task.items():
            ratio, psi = paired_ratio(scores, dense[task])
            ratios.append(ratio)
            variance += _variance(psi, float(np.mean(np.asarray(dense[task], dtype=float)[: len(scores)])))
            psis[task] = psi
        t = len(ratios)
        out[value] = (float(np.mean(ratios)), math.sqrt(variance) / t, psis)
    return out


def band_interval(dense: Mapping[str, object], sparse: Mapping[float, Mapping[str, object]],
                  sparsity: Mapping[float, float], threshold: float = 0.99) -> tuple[float, float]:
    """The planner's 95% interval of the crossing from paired items (same arguments as
    ``plan_items``, every item scored): (low, high), where the task-average curve shifted down and
    up by 1.96 standard errors at every point crosses the threshold; high is inf while the upper
    band stays above the threshold at the sparsest point. Conservative where the bootstrap
    interval of the isotonic crossing is too narrow (few items; ``scripts/search_calibration.py``)."""
    curve = task_average_with_error(dense, sparse)
    values = sorted(sparse, key=lambda v: (sparsity[v], -float(v)))
    return pointwise_band_interval([sparsity[v] for v in values], [curve[v][0] for v in values],
                                   [curve[v][1] for v in values], threshold)


def task_average_band(sparsity, sparse_items, dense_items, threshold: float = 0.99) -> tuple[float, float]:
    """``band_interval`` of points given as the search and the report hold them: ``sparse_items[t]``
    is [points, items_t] in the order of ``sparsity``, ``dense_items[t]`` is [items_t]; every
    task's dense score must be above 0."""
    points = range(len(sparsity))
    return band_interval(dict(enumerate(dense_items)),
                         {p: {t: np.asarray(items)[p] for t, items in enumerate(sparse_items)} for p in points},
                         {p: float(sparsity[p]) for p in points}, threshold)


def plan_items(dense: Mapping[str, object], sparse: Mapping[float, Mapping[str, object]],
               sparsity: Mapping[float, float], available: Mapping[str, int], *, target_halfwidth: float = 0.05,
               max_items: int = 200_000, threshold: float = 0.99, min_items: int = 100, min_step: int = 100,
               max_growth: float = 2.0) -> ItemPlan:
    """The next items to score, or why to stop.

    ``dense[task]``: per-item dense scores (0/1, or any score in [0, 1]) of the task's first items;
    ``sparse[p][task]``: the same at rule value p, a prefix of the dense items; ``sparsity[p]``:
    measured sparsity at p; ``available[task]``: the task's item count. ``max_items`` counts every
    scored (item, threshold) evaluation, dense included. A crossing is "reached" once its 95%
    half-width is <= ``target_halfwidth`` with at least ``min_items`` items per task at a and b.
    """
    if not target_halfwidth > 0 or max_items <= 0 or min_step < 1 or max_growth <= 1:
        raise ValueError("target_halfwidth and max_items must be positive, min_step >= 1 and max_growth > 1")
    tasks = _validate(dense, sparse, sparsity, available)
    curve = task_average_with_error(dense, sparse)
    values = sorted(sparse, key=lambda v: (sparsity[v], -float(v)))
    s = np.array([sparsity[v] for v in values], dtype=float)
    a_scores = np.array([curve[v][0] for v in values])
    used = {DENSE: {t: len(dense[t]) for t in tasks}}
    used.update({v: {t: len(sparse[v][t]) for t in tasks} for v in values})
    total = sum(sum(n.values()) for n in used.values())
    normalized = {v: (curve[v][0], curve[v][1]) for v in values}
    crossing, status, k = fitted_crossing(s, a_scores, threshold)
    base = dict(normalized=normalized, items_used=used, total_items=total)
    if status != "crossed":
        where = ("every threshold keeps >= {:.0%}: the crossing lies beyond the sparsest point; add sparser thresholds"
                 if status == "all_above" else
                 "no threshold keeps {:.0%}: the crossing lies below the densest point; add denser thresholds")
        return ItemPlan("no_crossing", where.format(threshold), math.nan, math.nan, None, **base)

    standard_errors = np.array([curve[v][1] for v in values])
    (x_low, k_low), (x_high, high_status, k_high) = band_crossings(s, a_scores, standard_errors, threshold)
    # an upper band above c at the sparsest point leaves the interval open beyond the grid
    halfwidth = math.inf if high_status == "all_above" else max(crossing - x_low, x_high - crossing)
    va, vb = values[k], values[k + 1]
    # sparser points whose upper bound still reaches the threshold may hold the crossing: they get items too
    open_beyond = [values[j] for j in range(k + 2, min(k_high + 1, len(values)))]
    # denser points near enough to end the interval within the target, whose lower band misses c
    open_below = [values[j] for j in range(k_low + 1, k) if s[j] >= crossing - target_halfwidth]
    width = s[k + 1] - s[k]
    gap = a_scores[k] - a_scores[k + 1]
    grad_a = width * (threshold - a_scores[k + 1]) / gap**2
    grad_b = width * (a_scores[k] - threshold) / gap**2
    per_task, variance = {}, 0.0
    for t in tasks:
        psi_a, psi_b = curve[va][2][t], curve[vb][2][t]
        d = np.asarray(dense[t], dtype=float)
        var_a = _variance(psi_a, float(d[: psi_a.size].mean()))
        var_b = _variance(psi_b, float(d[: psi_b.size].mean()))
        cov = _covariance(psi_a, psi_b)
        variance += grad_a**2 * var_a + grad_b**2 * var_b + 2 * grad_a * grad_b * cov
        # per-item variance at equal items n at a and b: V_t / n
        per_task[t] = max(grad_a**2 * var_a * psi_a.size + grad_b**2 * var_b * psi_b.size
                          + 2 * grad_a * grad_b * cov * max(psi_a.size, psi_b.size), 0.0)
    delta_halfwidth = Z95 * math.sqrt(max(variance, 0.0)) / len(tasks)
    base.update(crossing=crossing, halfwidth=halfwidth, bracket=(va, vb), crossing_se=delta_halfwidth / Z95,
                band=(x_low, math.inf if high_status == "all_above" else x_high))
    # the delta method sizes the allocation; scaled to the band interval the stopping rule reads
    scale = delta_halfwidth / halfwidth if 0 < halfwidth < math.inf else 1.0
    needed = _allocation(per_task, available, (target_halfwidth * scale / Z95 * len(tasks)) ** 2)
    planned = (*open_below, va, vb, *open_beyond)
    base.update(needed=needed, planned=planned)
    enough_items = all(used[v][t] >= min(min_items, available[t]) for v in (va, vb) for t in tasks)
    if halfwidth <= target_halfwidth and enough_items:
        return ItemPlan("target_reached", f"95% half-width {halfwidth:.4f} <= {target_halfwidth}", **base)

    goal = {}
    for t in tasks:
        current = max(used[v][t] for v in planned)
        step = max(min_step, math.ceil((max_growth - 1) * current))
        wanted = max(needed[t], min(min_items, available[t]))
        goal[t] = min(available[t], max(current, min(wanted, current + step)))
    if not _requests(goal, used, planned):  # rounding left nothing to do: move every open task by one step
        goal = {t: min(available[t], max(used[v][t] for v in planned) + min_step) for t in tasks}
    requests = _requests(goal, used, planned)
    if not requests:
        return ItemPlan("items_exhausted", f"every item of every task is scored at thresholds "
                        f"{', '.join(map(str, planned))} and dense; 95% half-width {halfwidth:.4f} > "
                        f"{target_halfwidth}", **base)
    left = max_items - total
    requests = _fit_budget(goal, used, planned, left)
    if not requests:
        return ItemPlan("budget_spent", f"{total} of max_items={max_items} evaluations used; 95% half-width "
                        f"{halfwidth:.4f} > {target_halfwidth}", **base)
    cost = sum(r.stop - r.start for r in requests)
    return ItemPlan("continue", f"95% half-width {halfwidth:.4f} > {target_halfwidth}: {cost} more evaluations at "
                    f"thresholds {', '.join(map(str, planned))}", requests=requests, **base)


def _allocation(per_task: dict, available: Mapping[str, int], limit: float) -> dict:
    """Fewest items n_t (capped at the task's size) with sum_t V_t / n_t <= limit: n_t ∝ sqrt(V_t)."""
    needed = {t: 1 for t, v in per_task.items() if v == 0}  # nothing to gain from more items
    open_tasks, budget = set(per_task) - set(needed), limit
    while open_tasks:
        root_sum = sum(math.sqrt(per_task[t]) for t in open_tasks)
        scale = root_sum / budget if budget > 0 else math.inf
        capped = {t for t in open_tasks if scale * math.sqrt(per_task[t]) >= available[t]}
        if not capped:
            needed.update({t: max(1, math.ceil(scale * math.sqrt(per_task[t]))) for t in open_tasks})
            break
        for t in capped:
            needed[t] = available[t]
            budget -= per_task[t] / available[t]
        open_tasks -= capped
    return needed


def _requests(goal: dict, used: dict, planned: tuple) -> list[ItemRequest]:
    out = []
    for t, stop in goal.items():
        for value in (DENSE, *planned):
            if stop > used[value][t]:
                out.append(ItemRequest(t, value, used[value][t], stop))
    return out


def _fit_budget(goal: dict, used: dict, planned: tuple, left: int) -> list[ItemRequest]:
    """The requests for ``goal``, every task's step shrunk by one common fraction to cost <= ``left``."""
    def scaled(fraction: float) -> dict:
        out = {}
        for t, stop in goal.items():
            start = min(used[v][t] for v in planned)
            out[t] = max(start, start + int(fraction * (stop - start)))
        return out

    def cost(requests) -> int:
        return sum(r.stop - r.start for r in requests)

    full = _requests(goal, used, planned)
    if cost(full) <= left:
        return full
    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        if cost(_requests(scaled(middle), used, planned)) <= left:
            low = middle
        else:
            high = middle
    return _requests(scaled(low), used, planned)
