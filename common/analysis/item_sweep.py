"""Item-planned sweep: items spent where the crossing is.

Per site: score the first ``start_items`` items of every scoring task at every grid value (densest
first, with the grid's early stop when it is on), then ask the item planner
(``common.analysis.item_planner.plan_items``) which items to add at which thresholds, score exactly
those, and repeat until the 95% interval of the task-average crossing is at most ±target in
sparsity, the item budget is spent, or the tasks run out of items. Perplexity tasks are left to
the grid and the search (their criterion is smooth and needs no item planning).

Every step's items are one store cell per (site, value, task, item range) (``SweepSpec.key`` with
``items``): an interrupted run resumes and adding items to a threshold scores only the new ones.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from common.analysis.critical import mcnemar_exact
from common.analysis.item_planner import plan_items
from common.evaluation.sweep import DENSE, grid_values, stop_point
from common.evaluation.tasks import PERPLEXITY_TASKS, task_size

DEFAULT_START_ITEMS = 100


class ItemCells:
    """The scored items of one sweep in a store, per (site, value, task) as one contiguous prefix.

    Item-range cells (``SweepSpec.key`` with ``items``) and the grid's own cells (the first
    ``limit`` items, or all of them) both count, so planning on a folder that already holds a grid
    starts from every item the grid scored. ``evaluate`` (a ``SweepRunner.cell``) scores new
    items; without it the cells are read only."""

    def __init__(self, store, spec, evaluate=None):
        self.store, self.spec, self.evaluate = store, spec, evaluate
        self.ranges: dict[tuple, list[tuple[int, int, dict]]] = defaultdict(list)
        shared = {"model": spec.model, "dtype": spec.dtype, "device_type": spec.device_type}
        for key, result in store.records(**shared):
            if not self._same_sweep(key):
                continue
            start, stop = key["items"] if "items" in key else (0, len(result["items"]))
            self.ranges[(key["site"], key["value"], key["task"])].append((start, stop, key))

    def _same_sweep(self, key: dict) -> bool:
        if key["site"] == DENSE:
            return True
        return (key["rule"], key["power"], key["layers"]) == (self.spec.rule, float(self.spec.power), self.spec.layers)

    def _where(self, site: str, value: float, task: str) -> tuple:
        return site, 1.0 if site == DENSE else round(float(value), 6), task

    def _chain(self, site: str, value: float, task: str) -> list[tuple[int, int, dict]]:
        """The cells that make the longest prefix of items from item 0, in order."""
        chain, stop = [], 0
        while True:
            reaching = [r for r in self.ranges[self._where(site, value, task)] if r[0] <= stop < r[1]]
            if not reaching:
                return chain
            best = max(reaching, key=lambda r: r[1])
            chain.append((stop, best[1], best[2]))
            stop = best[1]

    def scored(self, site: str, value: float, task: str) -> int:
        """How many items (a prefix from item 0) are scored."""
        chain = self._chain(site, value, task)
        return chain[-1][1] if chain else 0

    def extend(self, site: str, value: float, task: str, stop: int) -> None:
        """Score items up to ``stop`` (only those not scored yet)."""
        start = self.scored(site, value, task)
        if stop > start:
            if self.evaluate is None:
                raise RuntimeError("these cells are read only: give ItemCells an evaluate function to score items")
            self.evaluate(site, value, task, (start, stop))
            self.ranges[self._where(site, value, task)].append(
                (start, stop, self.spec.key(site, value, task, (start, stop))))

    def cost(self, site: str, value: float, task: str) -> tuple[float, int]:
        """(seconds, items) of the cells holding the scored prefix, as their runs measured them."""
        seconds, items = 0.0, 0
        for _, _, key in self._chain(site, value, task):
            result = self.store.get(key)
            seconds += float(result.get("seconds") or 0.0)
            items += len(result["items"])
        return seconds, items

    def results(self, site: str, value: float, task: str) -> tuple[list[dict], float | None]:
        """(per-item records of the scored prefix, element-weighted measured sparsity over it)."""
        items, kept_weight, counted = [], 0.0, 0
        for start, stop, key in self._chain(site, value, task):
            result = self.store.get(key)
            items += [item for item in result["items"] if start <= item["doc_id"] < stop]
            summary = result["sparsity"].get(site)
            if summary and summary.get("counted"):
                share = (stop - start) / len(result["items"])  # the part of a longer cell this prefix uses
                counted += summary["counted"] * share
                kept_weight += summary["counted"] * share * summary["element_weighted"]
        return items, (kept_weight / counted if counted else None)


def run_item_planned(runner, target_halfwidth: float, max_items: int, start_items: int = DEFAULT_START_ITEMS,
                     threshold: float = 0.99, progress=None) -> list[dict]:
    """The item-planned sweep of this runner's shard of sites (site i goes to shard i mod N).

    ``progress(records)``, when given, receives after every planning step the records of the
    finished sites and the current one (its ``stopped`` is "continue" until it stops), so a run
    that is interrupted, or runs for days, leaves its latest crossing and interval on disk."""
    count, index = runner.shard[1], runner.shard[0]
    spec = runner.spec
    tasks = [t for t in spec.tasks if t not in PERPLEXITY_TASKS]
    if not tasks:
        raise ValueError("the item-planned sweep needs at least one multiple-choice task (perplexity tasks are "
                         "left to the grid and --search)")
    sizes = {task: task_size(task, runner.task_manager) for task in tasks}
    cells = ItemCells(runner.store, spec, runner.cell)
    sites = [site for position, site in enumerate(spec.sites) if position % count == index]
    done: list[dict] = []
    for site in sites:
        report = (lambda record: progress([*done, record])) if progress is not None else None
        done.append(plan_site(runner, cells, site, tasks, sizes, target_halfwidth, max_items, start_items,
                              threshold, report))
    return done


def plan_site(runner, cells: ItemCells, site: str, tasks: list[str], sizes: dict, target_halfwidth: float,
              max_items: int, start_items: int, threshold: float, report=None) -> dict:
    spec = runner.spec
    first = {task: min(start_items, sizes[task]) for task in tasks}
    for task in tasks:
        cells.extend(DENSE, 1.0, task, first[task])
    dense = {task: _scores(cells.results(DENSE, 1.0, task)[0], spec.metric_for(task)) for task in tasks}
    used = [t for t in tasks if dense[t][: first[t]].mean() > 0]
    if not used:
        raise ValueError(f"the dense model scores 0 on every scoring task's first {start_items} items "
                         f"({', '.join(tasks)}); use more items (--start-items) or other tasks")

    def average(value: float) -> float | None:
        ratios = []
        for task in used:
            sparse = _scores(cells.results(site, value, task)[0], spec.metric_for(task))
            ratios.append(sparse.mean() / dense[task][: sparse.size].mean())
        return float(np.mean(ratios))

    values, stop = [], None
    for value in grid_values(spec):  # the cheap pass: the first items at every value, densest first
        for task in used:
            cells.extend(site, value, task, first[task])
        values.append(value)
        if spec.stop_below is not None:
            stop = stop_point(values, average, spec.stop_below, spec.stop_after)
            if stop is not None:
                stop["skipped_values"] = grid_values(spec)[len(values):]
                break

    steps = []
    while True:
        dense_scores, sparse_scores, sparsity = _planner_inputs(cells, spec, site, used, values)
        plan = plan_items(dense_scores, sparse_scores, sparsity, {t: sizes[t] for t in used},
                          target_halfwidth=target_halfwidth, max_items=max_items, threshold=threshold,
                          min_items=min(start_items, max(sizes.values())))
        steps.append({"total_items": plan.total_items, "crossing": plan.crossing, "halfwidth": plan.halfwidth,
                      "bracket": plan.bracket, "status": plan.status})
        if runner.verbose:
            print(f"item plan {site}: crossing {plan.crossing:.3f} ± {plan.halfwidth:.3f} after {plan.total_items} "
                  f"evaluations; {plan.reason}")
        record = {"site": site, "tasks": used, "target_halfwidth": target_halfwidth, "max_items": max_items,
                  "start_items": start_items, "threshold": threshold, "plan": plan.as_dict(), "steps": steps,
                  "stopped": plan.status, "reason": plan.reason, "early_stop": stop}
        if plan.bracket is not None:
            record["mcnemar"] = _mcnemar(cells, spec, site, used, plan.bracket[0])
        if report is not None:
            report(record)
        if plan.status != "continue":
            return record
        for request in plan.requests:
            if request.threshold == DENSE:
                cells.extend(DENSE, 1.0, request.task, request.stop)
            else:
                cells.extend(site, request.threshold, request.task, request.stop)


def estimate_items(store, spec, target_halfwidth: float, threshold: float = 0.99) -> list[dict]:
    """What an item-planned sweep to ±``target_halfwidth`` would cost, read from a finished sweep's store.

    Per site, on the items the store holds at the spec's grid values: the planner's crossing and
    band, the items per task it would score at each threshold it plans (dense, the bracket and its
    open neighbours; tasks taken as unlimited: the question is how many items, not whether a suite
    holds them), the evaluations beyond those already scored (a range: dense and the bracket only,
    as once the open neighbours have settled, up to every value planned now), and their core-hours
    at the store's own cost per item and value at that site (its cells' ``seconds``, so as loaded as
    the machine that ran them). Nothing is evaluated.
    """
    cells = ItemCells(store, spec)
    tasks = [t for t in spec.tasks if t not in PERPLEXITY_TASKS]
    out = []
    for site in spec.sites:
        values = [v for v in grid_values(spec) if all(cells.scored(site, v, t) for t in tasks)]
        scored_dense = [t for t in tasks if cells.scored(DENSE, 1.0, t)]
        if len(values) < 2 or len(scored_dense) < len(tasks):
            out.append({"site": site, "status": "not_enough_cells",
                        "reason": f"{len(values)} grid values hold every task's items and dense holds "
                                  f"{len(scored_dense)} of {len(tasks)} tasks; an estimate needs dense and two values"})
            continue
        dense, sparse, sparsity = _planner_inputs(cells, spec, site, tasks, values)
        used = [t for t in tasks if dense[t].mean() > 0]
        sparse = {v: {t: by_task[t] for t in used} for v, by_task in sparse.items()}
        plan = plan_items({t: dense[t] for t in used}, sparse, sparsity, {t: _UNLIMITED for t in used},
                          target_halfwidth=target_halfwidth, max_items=_UNLIMITED, threshold=threshold)
        record = {"site": site, "status": plan.status, "reason": plan.reason, "tasks": used,
                  "values": len(values), "crossing": plan.crossing, "band": plan.band, "halfwidth": plan.halfwidth,
                  "bracket": plan.bracket, "planned": list(plan.planned), "scored": plan.items_used[DENSE],
                  "needed": plan.needed}
        if plan.needed:
            def evaluations(at) -> int:
                return sum(max(0, plan.needed[t] - plan.items_used[v][t]) for v in (DENSE, *at) for t in used)

            # from the bracket alone (the open neighbours settle as items come) to every value planned now
            record["evaluations"] = [evaluations(plan.bracket), evaluations(plan.planned)]
            costs = [cells.cost(site, value, task) for value in values for task in used]
            seconds, items = sum(c[0] for c in costs), sum(c[1] for c in costs)
            record["seconds_per_evaluation"] = seconds / items if items else None
            record["core_hours"] = [n * seconds / items / 3600 for n in record["evaluations"]] if items else None
        out.append(record)
    return out


_UNLIMITED = 10**12  # item count standing for "as many as the estimate asks for"


def _scores(items: list[dict], metric: str) -> np.ndarray:
    return np.array([item[metric] for item in items], dtype=float)


def _planner_inputs(cells: ItemCells, spec, site: str, tasks: list[str], values: list[float]):
    dense = {t: _scores(cells.results(DENSE, 1.0, t)[0], spec.metric_for(t)) for t in tasks}
    sparse, sparsity = {}, {}
    for value in values:
        per_task, measured = {}, []
        for task in tasks:
            items, task_sparsity = cells.results(site, value, task)
            per_task[task] = _scores(items, spec.metric_for(task))
            measured.append(task_sparsity)
        sparse[value], sparsity[value] = per_task, float(np.mean(measured))
    return dense, sparse, sparsity


def _mcnemar(cells: ItemCells, spec, site: str, tasks: list[str], value: float) -> dict:
    """Exact McNemar test of sparse vs dense correctness at ``value``, pooled over the tasks' scored items."""
    sparse, dense = [], []
    for task in tasks:
        scores = _scores(cells.results(site, value, task)[0], spec.metric_for(task))
        sparse.append(scores)
        dense.append(_scores(cells.results(DENSE, 1.0, task)[0], spec.metric_for(task))[: scores.size])
    return {"value": value, **mcnemar_exact(np.concatenate(sparse), np.concatenate(dense))}


def decided_orderings(plans: list[dict]) -> list[dict]:
    """For each pair of sites: which one is sparser at the crossing, decided when the two 95%
    intervals do not overlap, else undecided."""
    out = []
    for i, a in enumerate(plans):
        for b in plans[i + 1:]:
            intervals = {a["site"]: list(a["plan"]["interval"]), b["site"]: list(b["plan"]["interval"])}
            out.append({"sites": [a["site"], b["site"]], "intervals": intervals,
                        "verdict": sparser_verdict(a["site"], intervals[a["site"]], b["site"], intervals[b["site"]])})
    return out


def sparser_verdict(name_a: str, interval_a, name_b: str, interval_b) -> str:
    """"A sparser" / "B sparser" where the two critical-sparsity intervals are disjoint, else undecided."""
    if interval_a[0] > interval_b[1]:
        return f"{name_a} sparser"
    if interval_b[0] > interval_a[1]:
        return f"{name_b} sparser"
    return "undecided (intervals overlap)"
