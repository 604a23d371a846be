"""Which site tolerates more sparsity: sites compared at the same measured sparsity, paired over items.

Two sites' critical sparsities are each read where a noisy curve crosses a threshold, so their
intervals can overlap even when one curve lies below the other all along. Comparing the curves
themselves at a shared measured sparsity uses every evaluated point and pairs the items (every
site is scored on the same items): in each bootstrap resample of the items, the same resample for
both sites, each site's curve is interpolated linearly in measured sparsity at the level, and the
95% interval of the difference decides the ordering when it excludes zero.

Criteria (``common.core.criteria``) are compared with magnitude top-p the same way
(``compare_criteria``), site by site.

Three measures, each a task average over the multiple-choice tasks except the last:
``accuracy`` (normalized score, the critical-sparsity curve; higher is better), ``choice_kl``
(mean KL(dense || sparse) over the answer choices, a continuous measure of damage that moves
before answers flip; lower is better) and ``perplexity`` (dense / sparse perplexity on each
perplexity task, documents resampled; higher is better). Measured sparsity is each point's value
on all items (it is not resampled).
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd

from common.analysis.critical import bootstrap_indices, draw_counts, perplexity_curves, task_average_curves
from common.evaluation.store import ResultStore
from common.evaluation.sweep import DENSE, SweepSpec
from common.evaluation.tasks import PERPLEXITY_TASKS

MEASURES = {"accuracy": "higher", "choice_kl": "lower", "perplexity": "higher"}
DEFAULT_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5)
CRITERIA_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)  # criteria are read further out: calibrated ones reach 0.7


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def choice_kl_items(sparse_items: list[dict], dense_items: list[dict]) -> np.ndarray:
    """KL(dense || sparse) of the softmax over each item's answer log-likelihoods, per item (NaN
    for items without answer choices)."""
    out = np.full(len(dense_items), np.nan)
    for position, (sparse, dense) in enumerate(zip(sparse_items, dense_items)):
        if "choice_logliks" not in sparse or "choice_logliks" not in dense:
            continue
        log_p = _log_softmax(np.asarray(dense["choice_logliks"], dtype=float))
        log_q = _log_softmax(np.asarray(sparse["choice_logliks"], dtype=float))
        out[position] = float((np.exp(log_p) * (log_p - log_q)).sum())
    return out


def values_every_task_has(frame: pd.DataFrame, site: str, tasks) -> list[float]:
    """The rule values at which ``site`` has a row for every one of ``tasks`` (a task average
    needs them all; a value another shard is still filling in is left out)."""
    tasks = list(tasks)
    rows = frame[(frame.site == site) & frame.task.isin(tasks)]
    present = rows.groupby("value").task.nunique()
    return sorted(present[present == len(tasks)].index)


def task_average_points(frame: pd.DataFrame, site: str, tasks) -> pd.DataFrame:
    """``site``'s task-average curve from per-cell rows: at each rule value every one of ``tasks``
    has (``values_every_task_has``), the mean over the tasks of the measured sparsity and of the
    normalized score; indexed by value, ascending."""
    tasks = list(tasks)
    values = values_every_task_has(frame, site, tasks)
    rows = frame[(frame.site == site) & frame.task.isin(tasks) & frame.value.isin(values)]
    return rows.groupby("value")[["measured_sparsity", "normalized"]].mean()


def task_average_sparsity(frame: pd.DataFrame, site: str, tasks) -> pd.Series:
    """Measured sparsity of ``site``'s task-average curve (``task_average_points``), indexed by value."""
    return task_average_points(frame, site, tasks).measured_sparsity


def site_curve(store: ResultStore, spec: SweepSpec, frame: pd.DataFrame, site: str, measure: str,
               iterations: int = 1000, task: str | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """(measured sparsity [points], curve [1 + resamples, points]) of one site: row 0 on all items,
    then one row per bootstrap resample (seeded per task, so two sites see the same resamples).
    ``task``: the perplexity task for ``measure="perplexity"``. None where the site has no points."""
    if measure == "perplexity":
        values = sorted(frame[(frame.site == site) & (frame.task == task)].value)
        if not values:
            return None
        dense = store.get(spec.key(DENSE, 1.0, task))["items"]
        dense_logliks, words = [i["loglikelihood"] for i in dense], [i["words"] for i in dense]
        sparse = [[i["loglikelihood"] for i in store.get(spec.key(site, v, task))["items"]] for v in values]
        indices = bootstrap_indices(len(dense), iterations)
        curves = np.vstack([perplexity_curves(sparse, dense_logliks, words)[None, :],
                            perplexity_curves(sparse, dense_logliks, words, indices)])
        rows = frame[(frame.site == site) & (frame.task == task)].set_index("value")
        return rows.loc[values, "measured_sparsity"].to_numpy(), curves
    tasks = [t for t in spec.tasks if t not in PERPLEXITY_TASKS
             and store.get(spec.key(DENSE, 1.0, t)) is not None
             and store.get(spec.key(DENSE, 1.0, t))["metrics"][spec.metric_for(t)]]
    values = values_every_task_has(frame, site, tasks)
    if not tasks or not values:
        return None
    dense = {t: store.get(spec.key(DENSE, 1.0, t))["items"] for t in tasks}
    sparse = {t: [store.get(spec.key(site, v, t))["items"] for v in values] for t in tasks}
    indices = [bootstrap_indices(len(dense[t]), iterations, seed) for seed, t in enumerate(tasks)]
    if measure == "accuracy":
        metric = {t: spec.metric_for(t) for t in tasks}
        sparse_items = [[[i[metric[t]] for i in items] for items in sparse[t]] for t in tasks]
        dense_items = [[i[metric[t]] for i in dense[t]] for t in tasks]
        curves = np.vstack([task_average_curves(sparse_items, dense_items)[None, :],
                            task_average_curves(sparse_items, dense_items, indices)])
    elif measure == "choice_kl":
        per_task = []
        for t, drawn in zip(tasks, indices):
            kl = np.nan_to_num(np.stack([choice_kl_items(items, dense[t]) for items in sparse[t]]))  # [points, n]
            counts = np.vstack([np.ones((1, kl.shape[1])), draw_counts(drawn)])
            per_task.append(counts @ kl.T / kl.shape[1])
        curves = np.mean(per_task, axis=0)
    else:
        raise ValueError(f"unknown measure {measure!r}: one of {', '.join(MEASURES)}")
    return task_average_sparsity(frame, site, tasks).loc[values].to_numpy(), curves


def _at_level(sparsity: np.ndarray, curves: np.ndarray, level: float) -> np.ndarray:
    order = np.argsort(sparsity)
    s, c = sparsity[order], curves[:, order]
    return np.array([np.interp(level, s, row) for row in c])


def compare_sites(store: ResultStore, spec: SweepSpec, frame: pd.DataFrame, site_a: str, site_b: str,
                  levels=DEFAULT_LEVELS, iterations: int = 1000) -> list[dict]:
    """Site a against site b at each measured-sparsity level both curves reach, for every measure."""
    out = []
    for measure, task in _criteria(spec):
        a = site_curve(store, spec, frame, site_a, measure, iterations, task)
        b = site_curve(store, spec, frame, site_b, measure, iterations, task)
        out += [{"sites": [site_a, site_b], **row} for row in _compare(a, b, site_a, site_b, measure, task, levels)]
    return out


def compare_models(first: tuple[ResultStore, SweepSpec, pd.DataFrame],
                   second: tuple[ResultStore, SweepSpec, pd.DataFrame], levels=DEFAULT_LEVELS,
                   iterations: int = 1000) -> list[dict]:
    """Two models' sweeps, site by site, at each measured-sparsity level both curves reach: the
    same comparison as between two sites, paired over the items (both sweeps must hold the same
    items of the same tasks, so the seeded resamples pick the same items for both models)."""
    (store_a, spec_a, frame_a), (store_b, spec_b, frame_b) = first, second
    _check_same_items(store_a, spec_a, store_b, spec_b)
    out = []
    for site in [s for s in spec_a.sites if s in spec_b.sites]:
        for measure, task in _criteria(spec_a):
            a = site_curve(store_a, spec_a, frame_a, site, measure, iterations, task)
            b = site_curve(store_b, spec_b, frame_b, site, measure, iterations, task)
            out += [{"models": [spec_a.model, spec_b.model], "site": site, **row}
                    for row in _compare(a, b, spec_a.model, spec_b.model, measure, task, levels)]
    return out


def compare_criteria(candidate: tuple[ResultStore, SweepSpec, pd.DataFrame],
                     baseline: tuple[ResultStore, SweepSpec, pd.DataFrame], levels=CRITERIA_LEVELS,
                     iterations: int = 1000) -> list[dict]:
    """A criterion against a baseline criterion (magnitude top-p), site by site, at each measured
    sparsity both curves reach: the comparison between sites, paired over the items (the same
    store, or two stores that scored the same items). Each frame holds its criterion's rows."""
    (store_a, spec_a, frame_a), (store_b, spec_b, frame_b) = candidate, baseline
    if store_a is not store_b:
        _check_same_items(store_a, spec_a, store_b, spec_b)
    names = [spec_a.criterion_name, spec_b.criterion_name]
    out = []
    for site in [s for s in spec_a.sites if s in spec_b.sites]:
        for measure, task in _criteria(spec_a):
            a = site_curve(store_a, spec_a, frame_a, site, measure, iterations, task)
            b = site_curve(store_b, spec_b, frame_b, site, measure, iterations, task)
            out += [{"criteria": names, "site": site, **row} for row in _compare(a, b, *names, measure, task, levels)]
    return out


def _criteria(spec: SweepSpec) -> list[tuple[str, str | None]]:
    return [("accuracy", None), ("choice_kl", None)] + [("perplexity", t) for t in spec.tasks if t in PERPLEXITY_TASKS]


def _check_same_items(store_a: ResultStore, spec_a: SweepSpec, store_b: ResultStore, spec_b: SweepSpec) -> None:
    """Pairing needs the same items and the same resamples: the same tasks in the same order (the
    resamples are seeded by a task's position) and the same scored items per task."""
    if spec_a.tasks != spec_b.tasks:
        raise ValueError(f"the two sweeps score different tasks or orders ({', '.join(spec_a.tasks)} against "
                         f"{', '.join(spec_b.tasks)}); compare sweeps of the same suite")
    scoring = []
    for task in spec_a.tasks:
        a, b = store_a.get(spec_a.key(DENSE, 1.0, task)), store_b.get(spec_b.key(DENSE, 1.0, task))
        if a is None or b is None:
            continue
        if [i["doc_id"] for i in a["items"]] != [i["doc_id"] for i in b["items"]]:
            raise ValueError(f"task {task}: the two sweeps scored different items ({len(a['items'])} against "
                             f"{len(b['items'])}); run both with the same --limit")
        if task not in PERPLEXITY_TASKS:
            scoring.append((bool(a["metrics"][spec_a.metric_for(task)]), bool(b["metrics"][spec_b.metric_for(task)])))
    if any(x != y for x, y in scoring):
        raise ValueError("a task scores 0 dense in one model only, so the two task averages are over different "
                         "tasks; leave that task out of both sweeps")


def _compare(a, b, name_a: str, name_b: str, measure: str, task: str | None, levels) -> list[dict]:
    """Curve a against curve b (``site_curve`` outputs) at each level both reach: difference a - b on
    all items and its 95% interval over the paired resamples."""
    if a is None or b is None:
        return []
    out = []
    for level in levels:
        if not (max(a[0].min(), b[0].min()) <= level <= min(a[0].max(), b[0].max())):
            continue
        value_a, value_b = _at_level(*a, level), _at_level(*b, level)
        difference = value_a - value_b
        low, high = np.percentile(difference[1:], [2.5, 97.5])
        decided = bool(low > 0 or high < 0)
        a_better = (difference[0] > 0) == (MEASURES[measure] == "higher")
        out.append({"measure": measure, **({"task": task} if task else {}), "level": level,
                    "a": float(value_a[0]), "b": float(value_b[0]), "difference": float(difference[0]),
                    "interval": [float(low), float(high)], "decided": decided,
                    "better": (name_a if a_better else name_b) if decided else None})
    return out


def site_orderings(store: ResultStore, spec: SweepSpec, frame: pd.DataFrame, levels=DEFAULT_LEVELS,
                   iterations: int = 1000) -> list[dict]:
    """``compare_sites`` for every pair of the spec's sites that have points."""
    sites = [s for s in spec.sites if (frame.site == s).any()]
    return [row for a, b in combinations(sites, 2) for row in compare_sites(store, spec, frame, a, b, levels,
                                                                            iterations)]
