"""From sweep cells to the tidy table, critical sparsity, intervals, fidelity and figures.

Accuracy: normalized score = sparse score / dense score on the same items, with a paired
bootstrap interval. Continuous fidelity (stable on small suites): the mean change of the gold
answer's log-likelihood against dense, and the mean KL divergence of the sparse model's answer
distribution (softmax over the choices' log-likelihoods) from the dense one. Perplexity
criterion (Luo et al. 2024, "PPL-p% sparsity"): the highest sparsity whose perplexity stays
within p% of dense.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from common.analysis import figures as plots
from common.analysis.critical import (bootstrap_critical, bootstrap_indices, critical_sparsity,
                                      isotonic_crossing, isotonic_interval, mcnemar_exact, paired_bootstrap_ratio,
                                      perplexity_curves, resampled_band, task_average_curves)
from common.analysis.item_planner import task_average_band
from common.analysis.orderings import (CRITERIA_LEVELS, choice_kl_items, compare_criteria, site_curve,
                                      site_orderings, task_average_points, task_average_sparsity,
                                      values_every_task_has)
from common.analysis.palette import criterion_colors, criterion_order
from common.evaluation.store import ResultStore, atomic_write_json, write_csv
from common.evaluation.sweep import DENSE, SweepSpec, early_stop, measured_sparsity, perplexity
from common.evaluation.tasks import PERPLEXITY_TASKS, primary_metric


def fidelity(sparse_items: list[dict], dense_items: list[dict]) -> dict:
    """Mean gold log-likelihood change and mean KL(dense || sparse) over the answer choices."""
    pairs = [(s, d) for s, d in zip(sparse_items, dense_items) if "choice_logliks" in s and s.get("gold") is not None]
    if not pairs:
        return {}
    deltas = [s["choice_logliks"][s["gold"]] - d["choice_logliks"][d["gold"]] for s, d in pairs]
    kls = choice_kl_items([s for s, _ in pairs], [d for _, d in pairs])
    return {"gold_loglik_delta": float(np.mean(deltas)), "choice_kl": float(np.mean(kls))}


def tidy_table(store: ResultStore, spec: SweepSpec, iterations: int = 1000,
               values: dict | None = None) -> pd.DataFrame:
    """One row per finished (site, value, task) cell of the sweep, with normalized scores.

    ``values``: the rule values to report per site (a list, or a search's ``{"scoring": [...],
    "perplexity": [...]}`` from ``searched_values``); by default the spec's grid for every site,
    so cells of a search in the same store stay out of a grid report. With the early stop, the
    grid values a site's stop skips stay out too, also where a shard racing ahead evaluated some
    of their cells: the report does not depend on how many shards ran.
    """
    rows = []
    dense = {t: store.get(spec.key(DENSE, 1.0, t)) for t in spec.tasks}
    def allowed(site: str, kind: str) -> set[float]:
        chosen = spec.grid if values is None else values.get(site, [])
        if isinstance(chosen, dict):  # a search: its own points per criterion
            chosen = chosen[kind]
        skipped = set()
        if values is None and (stop := early_stop(store, spec, site)) is not None:
            skipped = {round(float(v), 6) for v in stop["skipped_values"]}
        return {round(float(v), 6) for v in chosen} - skipped

    grids = {(site, kind): allowed(site, kind) for site in spec.sites for kind in ("scoring", "perplexity")}
    for key, result in store.records(**spec.matches()):
        task, site = key["task"], key["site"]
        if task not in spec.tasks or site not in spec.sites or dense.get(task) is None:
            continue
        if key["value"] not in grids[(site, "perplexity" if task in PERPLEXITY_TASKS else "scoring")]:
            continue
        base = dense[task]
        metric = spec.metric_for(task)
        row = {"model": spec.model, "task": task, "site": site, "criterion": spec.criterion_name, "rule": spec.rule,
               "power": spec.power,
               "value": key["value"], "measured_sparsity": measured_sparsity(result, site),
               "mean_layer_sparsity": result["sparsity"][site]["mean_over_layers"], "metric": metric,
               "score": result["metrics"][metric], "dense_score": base["metrics"][metric],
               "seconds": result["seconds"], "dense_seconds": base["seconds"], "items": len(result["items"]),
               # token rows passed through unsparsified for a NaN or an infinity (left out of the sparsity)
               "nonfinite_rows": result["sparsity"][site].get("nonfinite_rows", 0)}
        if task in PERPLEXITY_TASKS:
            row["perplexity_ratio"] = perplexity(result["items"]) / perplexity(base["items"])
            row["normalized"] = 1.0 / row["perplexity_ratio"]
        else:
            row["normalized"] = row["score"] / row["dense_score"] if row["dense_score"] else np.nan
            sparse_scores = [i[metric] for i in result["items"]]
            dense_scores = [i[metric] for i in base["items"]]
            row["normalized_ci_low"], row["normalized_ci_high"] = paired_bootstrap_ratio(
                sparse_scores, dense_scores, iterations, indices=bootstrap_indices(len(dense_scores), iterations))
            row.update(fidelity(result["items"], base["items"]))
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.sort_values(["task", "site", "measured_sparsity"]).reset_index(drop=True) if rows else frame


def critical_table(store: ResultStore, spec: SweepSpec, frame: pd.DataFrame, threshold: float = 0.99,
                   ppl_percent: float = 1.0, iterations: int = 1000) -> list[dict]:
    """Per site: critical sparsity per task (grid, interpolated, bootstrap interval), task average,
    and the perplexity criterion."""
    out = []
    scoring = [t for t in spec.tasks if t not in PERPLEXITY_TASKS]
    for site in spec.sites:
        site_rows = frame[frame.site == site]
        if site_rows.empty:
            continue
        entry = {"site": site, "criterion": spec.criterion_name, "tasks": {}}
        stop = early_stop(store, spec, site)
        if stop is not None:  # the grid values below were never evaluated: far from any crossing
            entry["early_stop"] = stop
        for task in scoring:
            rows = site_rows[site_rows.task == task].sort_values("measured_sparsity")
            if rows.empty:
                continue
            crit = critical_sparsity(rows.measured_sparsity, rows.normalized, threshold, rows.value)
            metric = spec.metric_for(task)
            dense_items = [i[metric] for i in store.get(spec.key(DENSE, 1.0, task))["items"]]
            item_scores = [[i[metric] for i in store.get(spec.key(site, v, task))["items"]] for v in rows.value]
            low, high = bootstrap_critical(rows.measured_sparsity.to_numpy(), item_scores, dense_items, threshold,
                                           iterations)
            entry["tasks"][task] = {**crit.as_dict(), "interpolated_ci": [low, high], "points": len(rows),
                                    "isotonic": _isotonic_reading(rows.measured_sparsity.to_numpy(), [item_scores],
                                                                  [dense_items], threshold, iterations)}
        average = task_average_points(site_rows, site, site_rows[site_rows.task.isin(scoring)].task.unique())
        if not average.empty:
            average_crit = critical_sparsity(average.measured_sparsity, average.normalized, threshold,
                                             average.index.to_numpy())
            entry["task_average_curve"] = {**average_crit.as_dict(),
                                           **_task_average_isotonic(store, spec, site, site_rows, threshold,
                                                                    iterations)}
            if average_crit.grid_value is not None:
                entry["mcnemar"] = _mcnemar_at(store, spec, site, average_crit.grid_value, scoring)
            per_task = [v["interpolated"] for v in entry["tasks"].values()]
            entry["mean_of_task_critical_interpolated"] = float(np.mean(per_task)) if per_task else None
        for task in PERPLEXITY_TASKS:
            rows = site_rows[site_rows.task == task].sort_values("measured_sparsity")
            if not rows.empty:
                crit = critical_sparsity(rows.measured_sparsity, 1.0 / rows.perplexity_ratio,
                                         1.0 / (1.0 + ppl_percent / 100.0), rows.value)
                entry[f"ppl_{ppl_percent:g}pct_{task}"] = {**crit.as_dict(), "isotonic": _perplexity_isotonic(
                    store, spec, site, task, rows, 1.0 / (1.0 + ppl_percent / 100.0), iterations)}
        out.append(entry)
    return out


def _isotonic_reading(sparsity, sparse_items, dense_items, threshold: float, iterations: int) -> dict:
    """Isotonic crossing of the (task-average) curve and its paired-bootstrap interval (items of
    every task resampled together across points, the curve refitted on every resample)."""
    normalized = task_average_curves(sparse_items, dense_items)
    if np.isnan(normalized).any():
        return {}
    crossing, status = isotonic_crossing(sparsity, normalized, threshold)
    indices = [bootstrap_indices(len(d), iterations, seed) for seed, d in enumerate(dense_items)]
    low, high = isotonic_interval(sparsity, task_average_curves(sparse_items, dense_items, indices), threshold)
    reading = {"crossing": crossing, "status": status, "interval": [low, high]}
    if all(np.mean(d) > 0 for d in dense_items):  # the band needs every task's dense score above 0
        reading["band"] = list(task_average_band(sparsity, sparse_items, dense_items, threshold))
    return reading


def _perplexity_isotonic(store: ResultStore, spec: SweepSpec, site: str, task: str, rows: pd.DataFrame,
                         threshold: float, iterations: int) -> dict:
    """The isotonic reading of the PPL-p% criterion, documents resampled in pairs."""
    dense = store.get(spec.key(DENSE, 1.0, task))["items"]
    dense_logliks, words = [i["loglikelihood"] for i in dense], [i["words"] for i in dense]
    sparse = [[i["loglikelihood"] for i in store.get(spec.key(site, v, task))["items"]] for v in rows.value]
    sparsity = rows.measured_sparsity.to_numpy()
    curve = perplexity_curves(sparse, dense_logliks, words)
    crossing, status = isotonic_crossing(sparsity, curve, threshold)
    resampled = perplexity_curves(sparse, dense_logliks, words, bootstrap_indices(len(dense), iterations))
    low, high = isotonic_interval(sparsity, resampled, threshold)
    band = resampled_band(sparsity, curve, resampled, threshold)
    return {"crossing": crossing, "status": status, "interval": [low, high], "band": list(band)}


def _task_average_isotonic(store: ResultStore, spec: SweepSpec, site: str, site_rows: pd.DataFrame,
                           threshold: float, iterations: int) -> dict:
    """The isotonic reading of the task-average curve, over the values every scoring task with a
    non-zero dense score has (measured sparsity averaged over those tasks, as in the search)."""
    rows = site_rows[~site_rows.task.isin(list(PERPLEXITY_TASKS)) & site_rows.normalized.notna()]
    tasks = sorted(rows.task.unique())
    values = values_every_task_has(rows, site, tasks)
    if not values:
        return {}
    sparse_items, dense_items = [], []
    for task in tasks:
        metric = spec.metric_for(task)
        dense_items.append([i[metric] for i in store.get(spec.key(DENSE, 1.0, task))["items"]])
        sparse_items.append([[i[metric] for i in store.get(spec.key(site, v, task))["items"]] for v in values])
    sparsity = task_average_sparsity(rows, site, tasks).loc[values].to_numpy()
    return {"isotonic": _isotonic_reading(sparsity, sparse_items, dense_items, threshold, iterations)}


def _mcnemar_at(store: ResultStore, spec: SweepSpec, site: str, value: float, scoring: list[str]) -> dict:
    """Exact McNemar test of sparse vs dense correctness at one rule value, per multiple-choice
    task and pooled over their items."""
    out, pooled_sparse, pooled_dense = {"value": value, "tasks": {}}, [], []
    for task in scoring:
        result, dense = store.get(spec.key(site, value, task)), store.get(spec.key(DENSE, 1.0, task))
        if result is None or dense is None:
            continue
        metric = spec.metric_for(task)
        sparse_items, dense_items = [i[metric] for i in result["items"]], [i[metric] for i in dense["items"]]
        if not set(sparse_items + dense_items) <= {0.0, 1.0}:
            continue  # graded scores: no paired correctness
        out["tasks"][task] = mcnemar_exact(sparse_items, dense_items)
        pooled_sparse += sparse_items
        pooled_dense += dense_items
    if pooled_dense:
        out["pooled"] = mcnemar_exact(pooled_sparse, pooled_dense)
    return out


def overhead(frame: pd.DataFrame) -> dict:
    """Time of sparsified cells over dense cells of the same task (measured in the same runs)."""
    if frame.empty:
        return {}
    ratios = frame.seconds / frame.dense_seconds
    return {"median_time_ratio_sparse_over_dense": float(ratios.median()),
            "per_site": frame.assign(ratio=ratios).groupby("site").ratio.median().to_dict()}


def cell_time_comparison(first: ResultStore, second: ResultStore) -> dict:
    """Two stores of the same sweep (say, before and after a change): summed cell time per site
    and the score change on the cells both hold, matched by (site, value, task, limit) whatever
    else their keys record (dtype, device). Scores: the task's primary metric, as a number of
    items for multiple-choice tasks (|change| x items) and relative for perplexity."""
    def cells(store):
        return {(k["site"], k["value"], k["task"], k["limit"]): r for k, r in store.records()}

    a, b = cells(first), cells(second)
    shared = sorted(set(a) & set(b), key=str)
    sites = {}
    for key in shared:
        row = sites.setdefault(key[0], {"site": key[0], "cells": 0, "seconds": [0.0, 0.0]})
        row["cells"] += 1
        row["seconds"][0] += float(a[key]["seconds"])
        row["seconds"][1] += float(b[key]["seconds"])
    changes = []
    for key in shared:
        site, value, task, _ = key
        metric = primary_metric(task)
        before, after = a[key]["metrics"].get(metric), b[key]["metrics"].get(metric)
        if before is None or after is None:
            continue
        if task in PERPLEXITY_TASKS:
            change = {"relative": abs(after / before - 1.0) if before else float("inf")}
        else:
            change = {"items": round(abs(after - before) * len(a[key]["items"]))}
        changes.append({"site": site, "value": value, "task": task, "metric": metric, **change})
    choice = [c for c in changes if "items" in c]
    ppl = [c for c in changes if "relative" in c]
    return {"sites": list(sites.values()), "only_first": len(set(a) - set(b)), "only_second": len(set(b) - set(a)),
            "scored_cells": len(choice), "same_score": sum(c["items"] == 0 for c in choice),
            "cells_by_item_change": {n: sum(c["items"] == n for c in choice)
                                     for n in sorted({c["items"] for c in choice})},
            "largest_item_change": max(choice, key=lambda c: c["items"], default=None),
            "perplexity_cells": len(ppl), "largest_perplexity_change": max(ppl, key=lambda c: c["relative"], default=None)}


def figures(store: ResultStore, spec: SweepSpec, frame: pd.DataFrame, critical: list[dict],
            folder: Path, threshold: float = 0.99) -> list[Path]:
    paths = []
    if frame.empty:
        return paths
    scoring = frame[~frame.task.isin(list(PERPLEXITY_TASKS))]
    for task, rows in frame.groupby("task"):
        paths += plots.lines(rows, "measured_sparsity", "normalized", "site",
                             f"{spec.model}: {task} ({rows.metric.iloc[0]})", folder / f"curve_{task}",
                             xlabel="measured sparsity", ylabel="normalized score", hline=threshold)
    if not scoring.empty:
        average = scoring.groupby(["site", "value"], as_index=False)[["measured_sparsity", "normalized"]].mean()
        paths += plots.lines(average, "measured_sparsity", "normalized", "site",
                             f"{spec.model}: average over {scoring.task.nunique()} tasks", folder / "curve_average",
                             xlabel="measured sparsity", ylabel="normalized score", hline=threshold)
    if "choice_kl" in scoring.columns and scoring.choice_kl.notna().any():
        # continuous fidelity: smooth where accuracy on a few hundred items is noisy
        sparse = scoring[scoring.value < 1.0]
        fidelity_average = sparse.groupby(["site", "value"], as_index=False)[
            ["measured_sparsity", "choice_kl", "gold_loglik_delta"]].mean()
        paths += plots.lines(fidelity_average, "measured_sparsity", "choice_kl", "site",
                             f"{spec.model}: answer KL(dense || sparse), average over tasks",
                             folder / "fidelity_choice_kl", xlabel="measured sparsity", ylabel="mean KL (nats)",
                             logy=bool((fidelity_average.choice_kl > 0).all()))
        paths += plots.lines(fidelity_average, "measured_sparsity", "gold_loglik_delta", "site",
                             f"{spec.model}: gold answer log-likelihood change, average over tasks",
                             folder / "fidelity_gold_loglik", xlabel="measured sparsity",
                             ylabel="mean change of log p(gold) vs dense")
    layer_rows = []
    for key, result in store.records(**spec.matches()):
        if key["site"] in spec.sites and key["task"] in spec.tasks:
            for layer, value in result["sparsity"][key["site"]]["per_layer"].items():
                layer_rows.append({"site": key["site"], "value": key["value"], "layer": int(layer), "sparsity": value})
    if layer_rows:
        layers = pd.DataFrame(layer_rows)
        for site, rows in layers.groupby("site"):
            paths += plots.heatmap(rows, "layer", "value", "sparsity", f"{spec.model}: per-layer sparsity, {site}",
                                   folder / f"layer_sparsity_{site}", vmin=0, vmax=1)
    bars = [{"site": c["site"], "reading": reading, "critical_sparsity": c["task_average_curve"][reading]}
            for c in critical if "task_average_curve" in c for reading in ("grid", "interpolated")]
    if bars:
        paths += plots.bars(pd.DataFrame(bars), "site", "critical_sparsity", "reading",
                            f"{spec.model}: critical sparsity (task-average curve)", folder / "critical_sparsity")
    return paths


def write_report(store: ResultStore, spec: SweepSpec, output: Path, threshold: float = 0.99,
                 ppl_percent: float = 1.0, iterations: int = 1000, extra: dict | None = None,
                 values: dict | None = None, others: list[SweepSpec] = ()) -> dict:
    """tidy.csv, critical.json (and the figures) from whatever cells are finished; ``values``: the
    rule values per site to report (``common.analysis.search.searched_values``), default the grid.
    ``others``: the specs of further criteria in the same store (one critical reading per site and
    criterion, each compared with magnitude top-p in ``criteria``)."""
    frame = tidy_table(store, spec, iterations, values)
    critical = critical_table(store, spec, frame, threshold, ppl_percent, iterations) if not frame.empty else []
    frames = {spec.criterion_name: frame}
    for other in others:
        frames[other.criterion_name] = tidy_table(store, other, iterations)
        if not frames[other.criterion_name].empty:
            critical += critical_table(store, other, frames[other.criterion_name], threshold, ppl_percent, iterations)
    every = pd.concat([f for f in frames.values() if not f.empty], ignore_index=True) \
        if any(not f.empty for f in frames.values()) else frame
    if not every.empty:
        write_csv(output / "tidy.csv", every.to_dict("records"))
    summary = {"spec": spec.as_dict(), "threshold": threshold, "ppl_percent": ppl_percent,
               "readings": {"grid": "highest evaluated sparsity with normalized score >= threshold",
                            "interpolated": "linear crossing between that point and the next sparser one",
                            "isotonic": "crossing of the non-increasing least-squares fit through every point, "
                                        "95% paired-bootstrap interval (items resampled, curve refitted); band: "
                                        "where the curve shifted down and up by 1.96 standard errors at every point "
                                        "crosses (accuracy: paired items, delta method, at least three changed "
                                        "answers per task; perplexity: the ratio's standard deviation over document "
                                        "resamples), the conservative interval where few items make the bootstrap's "
                                        "too narrow",
                            "mcnemar": "exact McNemar test of sparse vs dense correctness on the same items at the "
                                       "grid reading's rule value of the task-average curve"},
               "critical": critical, "overhead": overhead(frame), **(extra or {})}
    if not every.empty:  # per site: token rows passed through for a NaN or an infinity, over every cell
        summary["nonfinite_rows"] = {site: int(rows) for site, rows in every.groupby("site").nonfinite_rows.sum().items()}
    if not frame.empty and frame.site.nunique() > 1:
        summary["readings"]["orderings"] = ("two sites' curves at the same measured sparsity (linear interpolation), "
                                            "difference a - b with a 95% paired-bootstrap interval (the same item "
                                            "resamples for both sites); decided when the interval excludes 0")
        summary["orderings"] = site_orderings(store, spec, frame, iterations=iterations)
    if others:
        summary["criteria_specs"] = [other.as_dict() for other in others]
        summary["criteria"] = criteria_summary(store, [spec, *others], frames, critical, every, iterations)
    paths = figures(store, spec, frame, [c for c in critical if c["criterion"] == spec.criterion_name],
                    output / "figures", threshold)
    if others:
        paths += criteria_figure([(store, s, frames[s.criterion_name]) for s in [spec, *others]],
                                 output / "figures" / "criteria_choice_kl", iterations)
    summary["figures"] = [str(p.relative_to(output)) for p in paths if p.suffix == ".png"]
    atomic_write_json(output / "critical.json", summary)
    return summary


BASELINE_CRITERION = "magnitude-topp"


def criteria_summary(store: ResultStore, specs: list[SweepSpec], frames: dict[str, pd.DataFrame],
                     critical: list[dict], every: pd.DataFrame, iterations: int = 1000) -> dict:
    """Every criterion against magnitude top-p at the same site and measured sparsity (paired over
    the items: ``compare_criteria``), each criterion's PPL-p% and accuracy crossings with their
    intervals, and its cost per cell."""
    baseline = next((s for s in specs if s.criterion_name == BASELINE_CRITERION), None)
    comparisons = []
    if baseline is not None:
        for spec in specs:
            if spec is not baseline and not frames[spec.criterion_name].empty:
                comparisons += compare_criteria((store, spec, frames[spec.criterion_name]),
                                                (store, baseline, frames[baseline.criterion_name]),
                                                iterations=iterations)
    return {"baseline": BASELINE_CRITERION if baseline is not None else None, "levels": list(CRITERIA_LEVELS),
            "comparisons": comparisons, "critical": criteria_crossings(critical), "cost": criteria_cost(every),
            "readings": {"comparisons": "criterion a - magnitude top-p b at the same site and measured sparsity "
                                        "(linear interpolation), 95% paired-bootstrap interval over the items; decided "
                                        "when it excludes 0, better names the winner (accuracy and perplexity: "
                                        "higher is better; answer KL: lower)",
                         "cost": "median seconds per cell and median sparse / dense cell time per criterion and "
                                 "site; relative: over magnitude top-p's median at the same site"}}


def criteria_crossings(critical: list[dict]) -> list[dict]:
    """Per (site, criterion): the isotonic crossings of the task-average accuracy curve and of PPL-p%
    with their 95% intervals and bands."""
    out = []
    for entry in critical:
        accuracy = entry.get("task_average_curve", {}).get("isotonic") or None
        ppl = next((v.get("isotonic") for k, v in entry.items() if k.startswith("ppl_")), None)
        out.append({"site": entry["site"], "criterion": entry.get("criterion"), "accuracy": accuracy, "ppl": ppl})
    return out


def criteria_cost(frame: pd.DataFrame) -> list[dict]:
    """Per (criterion, site): median seconds per cell, median sparse / dense time of a cell, and
    that ratio over magnitude top-p's at the same site (the cost of the criterion's hooks)."""
    if frame.empty or "criterion" not in frame:
        return []
    ratios = frame.assign(ratio=frame.seconds / frame.dense_seconds)
    table = ratios.groupby(["criterion", "site"]).agg(cells=("seconds", "size"), median_seconds=("seconds", "median"),
                                                     sparse_over_dense=("ratio", "median")).reset_index()
    base = table[table.criterion == BASELINE_CRITERION].set_index("site").sparse_over_dense
    rows = table.to_dict("records")
    for row in rows:
        row["over_baseline"] = float(row["sparse_over_dense"] / base[row["site"]]) if row["site"] in base else None
    return rows


def criteria_figure(sweeps: list[tuple[ResultStore, SweepSpec, pd.DataFrame]], path: Path,
                    iterations: int = 1000) -> list[Path]:
    """Answer KL against measured sparsity, one panel per site, one line per criterion with its 95%
    paired-bootstrap band (task average over the multiple-choice tasks). ``sweeps``: (store, spec,
    tidy rows) per criterion, from one folder or several (a baseline swept elsewhere); each
    criterion keeps its colour in every panel and figure (``palette``)."""
    sites = list(dict.fromkeys(site for _, spec, _ in sweeps for site in spec.sites))
    curves = {}
    for store, spec, frame in sweeps:
        for site in spec.sites:
            if not frame.empty and (frame.site == site).any():
                curve = site_curve(store, spec, frame, site, "choice_kl", iterations)
                if curve is not None:
                    curves[(site, spec.criterion_name)] = curve
    if not curves:
        return []
    colors = criterion_colors(name for _, name in curves)
    sites = [site for site in sites if any(key[0] == site for key in curves)]
    fig, axes = plots.plt.subplots(1, len(sites), figsize=(4.5 * len(sites), 4), squeeze=False)
    model = sweeps[0][1].model
    for ax, site in zip(axes[0], sites):
        for name in criterion_order(dict.fromkeys(spec.criterion_name for _, spec, _ in sweeps)):
            if (site, name) not in curves:
                continue
            sparsity, kl = curves[(site, name)]
            order = np.argsort(sparsity)
            order = order[kl[0][order] > 0]  # a point that changed no answer distribution has no place on a log axis
            low, high = np.percentile(kl[1:], [2.5, 97.5], axis=0)
            ax.plot(sparsity[order], kl[0][order], marker="o", markersize=3, color=colors[name], label=name)
            ax.fill_between(sparsity[order], low[order], high[order], color=colors[name], alpha=0.2)
        ax.set_yscale("log")
        ax.set_title(f"{model}, {site}")
        ax.set_xlabel("measured sparsity")
        ax.set_ylabel("answer KL(dense || sparse), nats")
        ax.legend(fontsize=7)
    fig.suptitle("answer KL by criterion, 95% paired-bootstrap bands", fontsize=9)
    return plots.save_figure(fig, path)


def effective_rank_pass(model, tokenizer, sites, output: Path, documents: int = 32, max_tokens: int = 256) -> list[dict]:
    """Dense pass over the perplexity task's texts, one document per forward (no padding):
    effective rank per layer and site, averaged over documents, normalized by the width."""
    import json

    import torch

    from common.core.hooks import ActivationCapture
    from common.core.recorder import SparsityRecorder
    from common.core.sites import expand_sites
    from common.core.stats import EffectiveRank
    from common.evaluation.tasks import DATA, PERPLEXITY_TASKS

    texts = [json.loads(line)["text"] for line in
             (DATA / PERPLEXITY_TASKS["fables_ppl"]).read_text().splitlines()[:documents]]
    rank = EffectiveRank()
    base_sites = list(dict.fromkeys(s for site in sites for s in expand_sites(site)))
    with ActivationCapture(model, base_sites, recorder=SparsityRecorder([rank]), keep=False), torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_tokens)["input_ids"]
            model(ids.to(model.device))
    rows = rank.summary()
    write_csv(output / "effective_rank.csv", rows)
    plots.lines(pd.DataFrame(rows), "layer", "normalized_effective_rank", "site",
                "Effective rank / feature dimension (dense)", output / "figures" / "effective_rank")
    return rows
