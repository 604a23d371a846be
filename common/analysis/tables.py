"""Markdown tables read from finished result folders (dense sweeps, MoE expert studies); nothing is
evaluated. ``python -m common.cli.report`` prints them (one subcommand per reading)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from common.analysis.critical import band_bounds
from common.evaluation.tasks import PERPLEXITY_TASKS


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _site_label(entry: dict, summary: dict) -> str:
    """The site, with the criterion where the folder holds several."""
    return f"{entry['site']} ({entry['criterion']})" if summary.get("criteria_specs") else entry["site"]


def dense_tables(folder: Path) -> None:
    summary = json.loads((folder / "critical.json").read_text())
    tasks = sorted({t for entry in summary["critical"] for t in entry["tasks"]})
    limit = summary["spec"]["limit"]
    items = "every item of each task" if not limit else f"the first {limit} items of each task"
    print(f"### {summary['spec']['model']}: critical sparsity ({items})\n")
    print("Interpolated crossing of 99% (grid point in brackets); last columns: task-average curve, PPL-1%.\n")
    print("| site | " + " | ".join(tasks) + " | average curve | PPL-1% |")
    print("|---|" + "---|" * (len(tasks) + 2))
    for entry in summary["critical"]:
        cells = []
        for task in tasks:
            c = entry["tasks"].get(task)
            cells.append("-" if c is None else f"{c['interpolated']:.3f} ({c['grid']:.3f}) "
                                               f"[{_fmt(c['interpolated_ci'][0])}, {_fmt(c['interpolated_ci'][1])}]")
        average = entry.get("task_average_curve", {})
        ppl = next((v for k, v in entry.items() if k.startswith("ppl_")), None)
        cells.append(f"{average.get('interpolated', 0):.3f} ({average.get('grid', 0):.3f}) {average.get('status', '')}")
        cells.append("-" if ppl is None else f"{ppl['interpolated']:.3f} ({ppl['grid']:.3f})")
        print(f"| {_site_label(entry, summary)} | " + " | ".join(cells) + " |")
    print("\nTask-average curve: isotonic crossing with its 95% paired-bootstrap interval, the band interval "
          "(curve shifted by 1.96 paired standard errors), exact McNemar test against dense at the grid reading's "
          "value, the grid values evaluated, and the PPL-1% criterion read the same way.\n")
    print("| site | isotonic crossing [95% interval] | band | McNemar at p (lost / gained, p-value) | values evaluated "
          "| PPL-1%: isotonic [95% interval], band |")
    print("|---|---|---|---|---|---|")
    for entry in summary["critical"]:
        isotonic = entry.get("task_average_curve", {}).get("isotonic") or {}
        mcnemar = entry.get("mcnemar", {})
        pooled = mcnemar.get("pooled")
        stop = entry.get("early_stop")
        evaluated = len(summary["spec"]["grid"]) - (len(stop["skipped_values"]) if stop else 0)
        values = f"{evaluated}" + (f", ended after p={stop['last_value']:g} (skipped {stop['skipped_values'][0]:g} "
                                   f"to {stop['skipped_values'][-1]:g})" if stop and stop["skipped_values"] else "")
        crossing = "-" if "crossing" not in isotonic else (
            f"{isotonic['crossing']:.3f} [{_fmt(isotonic['interval'][0])}, {_fmt(isotonic['interval'][1])}]")
        band = "-" if "band" not in isotonic else band_bounds(isotonic["band"])
        test = "-" if not pooled else (f"p={mcnemar['value']:g}: {pooled['dense_only_correct']} / "
                                       f"{pooled['sparse_only_correct']}, {pooled['p_value']:.3g}")
        ppl = next((v.get("isotonic") for k, v in entry.items() if k.startswith("ppl_")), None) or {}
        ppl_reading = "-" if "crossing" not in ppl else (
            f"{ppl['crossing']:.3f} [{_fmt(ppl['interval'][0])}, {_fmt(ppl['interval'][1])}]"
            + (f", band {band_bounds(ppl['band'])}" if "band" in ppl else ""))
        print(f"| {_site_label(entry, summary)} | {crossing} | {band} | {test} | {values} | {ppl_reading} |")
    overhead = summary.get("overhead", {})
    if overhead:
        print(f"\nSparse / dense evaluation time (median over cells): {overhead['median_time_ratio_sparse_over_dense']:.2f}x; "
              + ", ".join(f"{k} {v:.2f}x" for k, v in overhead["per_site"].items()))
    orderings_table(summary.get("orderings", []))
    for search in summary.get("search", []):
        print(f"\nSearch ({search['site']}): {search['values_evaluated']} values, interpolated "
              f"{search['critical']['interpolated']:.3f}, bracket {search['bracket']}")
    print()


def orderings_table(rows: list[dict]) -> None:
    """Sites compared at the same measured sparsity: a - b [95% interval] per level; the better
    site named where the interval excludes 0."""
    if not rows:
        return
    print("\nSites at the same measured sparsity (columns): difference a - b [95% paired-bootstrap interval]; "
          "where the interval excludes 0, the better site after the arrow (accuracy and perplexity: higher is "
          "better; answer KL: lower).\n")
    levels_table(rows, "a vs b", lambda r: f"{r['sites'][0]} vs {r['sites'][1]}")


def levels_table(rows: list[dict], first_column: str, label) -> None:
    """One row per (label(row), measure), one column per measured-sparsity level."""
    levels = sorted({r["level"] for r in rows})
    print(f"| {first_column} | measure | " + " | ".join(f"{level:g}" for level in levels) + " |")
    print("|---|---|" + "---|" * len(levels))
    groups: dict = {}
    for r in rows:
        groups.setdefault((label(r), r["measure"] + (f" ({r['task']})" if "task" in r else "")), {})[r["level"]] = r
    for (name, measure), by_level in groups.items():
        cells = []
        for level in levels:
            r = by_level.get(level)
            cells.append("-" if r is None else f"{r['difference']:+.3f} [{r['interval'][0]:+.3f}, {r['interval'][1]:+.3f}]"
                         + (f" → {r['better']}" if r["decided"] else ""))
        print(f"| {name} | {measure} | " + " | ".join(cells) + " |")


def moe_tables(folder: Path) -> None:
    experts = json.loads((folder / "experts.json").read_text())
    for site, entry in experts["sites"].items():
        print(f"### {folder.name}: expert sparsity at p={entry['critical_value']} ({site})\n")
        print("| layer | min | mean | max | std | unrouted |")
        print("|---|---|---|---|---|---|")
        for row in entry["per_layer_pooled"]:
            print(f"| {row['layer']} | {row['min']:.3f} | {row['mean']:.3f} | {row['max']:.3f} | {row['std']:.3f} "
                  f"| {row['experts_unrouted']} |")
        print(f"\nMean over layers of the inter-task std of layer-mean expert sparsity: "
              f"{entry['inter_task_std_of_layer_mean']:.4f}\n")


def search_vs_grid(search_folder: Path, grid_folder: Path) -> None:
    """Per site: the search's critical sparsity (accuracy and PPL-1%) and values against the full grid's,
    and whether the accuracy reading lies within one of the grid's steps of the grid's (as ``--replicates``)."""
    from common.analysis.replicates import grid_sparsity, replicate_agreement

    searches = json.loads((search_folder / "search.json").read_text())
    frame = _tidy(grid_folder)
    summary = json.loads((grid_folder / "critical.json").read_text())
    grid = {c["site"]: c for c in summary["critical"]}
    scoring = [t for t in summary["spec"]["tasks"] if t not in PERPLEXITY_TASKS]
    print("Task-average accuracy criterion: isotonic crossing [95% interval], band, of the grid and of the search, "
          "their difference, the grid's step (in measured sparsity) at its crossing and whether the difference is "
          "at most one step, and the values each evaluated (the grid's up to its early stop); PPL-1% on the "
          "perplexity task likewise.\n")
    print("| site | grid | search | difference | step | within one step | values (grid / search) | PPL-1% grid "
          "| PPL-1% search | difference | PPL values (search) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    within = readings = 0
    for search in searches:
        full = grid.get(search["site"], {})
        isotonic = full.get("task_average_curve", {}).get("isotonic")
        if not isotonic:
            continue
        stop = full.get("early_stop")
        grid_values = len(summary["spec"]["grid"]) - (len(stop["skipped_values"]) if stop else 0)
        ppl_grid = next((v["isotonic"] for k, v in full.items() if k.startswith("ppl_")), None)
        ppl_search = next(iter(search.get("ppl", {}).values()), None)

        def reading(part):
            band = f", band {band_bounds(part['band'])}" if part.get("band") else ""
            return f"{part['crossing']:.3f} [{_fmt(part['interval'][0])}, {_fmt(part['interval'][1])}]{band}"

        ppl_cells = "- | - | -"
        if ppl_grid and ppl_search:
            ppl_cells = (f"{reading(ppl_grid)} | {reading(ppl_search)} | "
                         f"{ppl_search['crossing'] - ppl_grid['crossing']:+.3f}")
        agreement = replicate_agreement([isotonic["crossing"], search["crossing"]],
                                        grid_sparsity(frame, search["site"]))[0]
        within, readings = within + agreement["within_one_step"], readings + 1
        print(f"| {search['site']} | {reading(isotonic)} "
              f"| {reading(search)} | {agreement['difference']:+.3f} | {agreement['step']:.3f} "
              f"| {'yes' if agreement['within_one_step'] else 'no'} "
              f"| {grid_values} / {search['values_evaluated']} | {ppl_cells} "
              f"| {ppl_search['values_evaluated'] if ppl_search else '-'} |")
    perplexity = [t for t in summary["spec"]["tasks"] if t in PERPLEXITY_TASKS]
    print(f"\nWithin one grid step of the grid: {within} of {readings} sites.")
    print(f"An accuracy value costs {len(scoring)} scoring task cells"
          + (f" + {len(perplexity)} perplexity task cell(s); a PPL-only value one cell.\n" if perplexity else ".\n"))


def item_estimate(folder: Path, target_halfwidth: float) -> None:
    """Per site of a finished sweep: what an item-planned sweep to +-target_halfwidth would cost (the
    planner's estimate from the folder's items; nothing is evaluated)."""
    from common.analysis.item_sweep import estimate_items
    from common.evaluation.store import ResultStore

    spec = _spec(folder)
    rows = estimate_items(ResultStore(folder), spec, target_halfwidth)
    print(f"Item planner's estimate for +-{target_halfwidth:g} in sparsity, from {folder.name} "
          f"({spec.model}, {spec.dtype}): items per task at dense and at each planned value, and the evaluations "
          "beyond those scored (dense and the bracket only, to every value planned now), at this store's measured "
          "cost per item and value (seconds in brackets).\n")
    print("| site | crossing (band) on the scored items | planned values | items per task needed (scored) "
          "| more evaluations | core-hours |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if "evaluations" not in row:
            print(f"| {row['site']} | {row['status']}: {row['reason']} | | | | |")
            continue
        band = row["band"] or (math.nan, math.nan)
        needed = ", ".join(f"{task} {n:,} ({row['scored'][task]})" for task, n in row["needed"].items())
        low, high = row["evaluations"]
        hours = "-" if row["core_hours"] is None else (f"{row['core_hours'][0]:.1f} to {row['core_hours'][1]:.1f} "
                                                       f"({row['seconds_per_evaluation']:.3f} s)")
        print(f"| {row['site']} | {row['crossing']:.3f} ({band[0]:.3f} to {band[1]:.3f}) "
              f"| {', '.join(f'{v:g}' for v in row['planned'])} | {needed} | {low:,} to {high:,} | {hours} |")
    print()


def _spec(folder: Path):
    from common.evaluation.sweep import SweepSpec

    return SweepSpec(**json.loads((folder / "critical.json").read_text())["spec"])


def _tidy(folder: Path, criterion: str | None = None):
    """A finished sweep folder's per-cell table (``tidy.csv``): the rows of ``criterion`` (default the
    folder's first criterion; tables written before criteria had one criterion and no such column)."""
    import pandas as pd

    frame = pd.read_csv(folder / "tidy.csv")
    if "criterion" not in frame:
        return frame
    name = criterion or _spec(folder).criterion_name
    return frame[frame.criterion == name].reset_index(drop=True)


def _criterion_sweeps(folder: Path) -> list[tuple]:
    """(store, spec, tidy rows) per criterion of a finished sweep folder, its first criterion first."""
    from common.evaluation.store import ResultStore
    from common.evaluation.sweep import SweepSpec

    summary = json.loads((folder / "critical.json").read_text())
    store = ResultStore(folder)
    specs = [SweepSpec(**summary["spec"])] + [SweepSpec(**spec) for spec in summary.get("criteria_specs", [])]
    return [(store, spec, _tidy(folder, spec.criterion_name)) for spec in specs]


def criteria_comparison(folders: list[Path]) -> dict:
    """Every criterion of the folders against magnitude top-p at the same site and measured sparsity,
    paired over the items (``compare_criteria``): the baseline of the criterion's own folder, else the
    first folder's holding one (the same model, dtype and items); each criterion's PPL-p% and
    accuracy crossings; the cost per cell. Needs the folders' cells."""
    from common.analysis.orderings import CRITERIA_LEVELS, compare_criteria
    from common.analysis.report import BASELINE_CRITERION, criteria_cost, criteria_crossings

    import pandas as pd

    sweeps = {folder: _criterion_sweeps(folder) for folder in folders}
    baselines = {folder: next((s for s in found if s[1].criterion_name == BASELINE_CRITERION), None)
                 for folder, found in sweeps.items()}
    comparisons, crossings, frames, missing, thresholds = [], [], [], [], set()
    for folder, found in sweeps.items():
        summary = json.loads((folder / "critical.json").read_text())
        thresholds.add(summary["threshold"])
        crossings += [{**row, "folder": str(folder)} for row in criteria_crossings(summary["critical"])]
        frames += [frame for _, _, frame in found if not frame.empty]
        for sweep in found:
            name = sweep[1].criterion_name
            if name == BASELINE_CRITERION:
                continue
            baseline = baselines[folder] or next(
                (b for b in baselines.values() if b is not None and b[1].model == sweep[1].model
                 and b[1].dtype == sweep[1].dtype), None)
            if baseline is None:
                missing.append(f"{name} ({folder})")
                continue
            comparisons += [{**row, "folders": [str(folder), str(baseline[0].root)]}
                            for row in compare_criteria(sweep, baseline)]
    if missing and not comparisons:
        raise ValueError(f"no {BASELINE_CRITERION} sweep of the same model and dtype to compare "
                         f"{', '.join(missing)} with; add a folder that holds one (--criterion magnitude)")
    return {"baseline": BASELINE_CRITERION, "levels": list(CRITERIA_LEVELS), "folders": [str(f) for f in folders],
            "comparisons": comparisons, "rivals": _rival_comparisons(sweeps), "critical": crossings,
            "threshold": thresholds.pop() if len(thresholds) == 1 else None,
            "cost": criteria_cost(pd.concat(frames, ignore_index=True)) if frames else [],
            "without_baseline": missing}


def _rival_comparisons(sweeps: dict[Path, list[tuple]]) -> list[dict]:
    """Each criterion against the criteria its paper claims to beat (``claims.RIVALS``), paired over
    the items where both were swept in one folder: the published claims read on the same items."""
    from common.analysis.claims import RIVALS
    from common.analysis.orderings import compare_criteria

    out = []
    for folder, found in sweeps.items():
        by_name = {sweep[1].criterion_name: sweep for sweep in found}
        for name, rivals in RIVALS.items():
            for rival in rivals:
                if name in by_name and rival in by_name:
                    out += [{**row, "folders": [str(folder)]} for row in compare_criteria(by_name[name], by_name[rival])]
    return out


def criteria_models(folders: list[Path]) -> set[str]:
    """The models of the folders' sweeps (read from their critical.json)."""
    models = set()
    for folder in folders:
        summary = json.loads((folder / "critical.json").read_text())
        models |= {spec["model"] for spec in [summary["spec"], *summary.get("criteria_specs", [])]}
    return models


def criteria_figure(folders: list[Path], path: Path, iterations: int = 1000) -> list[Path]:
    """Answer KL against measured sparsity of every criterion in the folders of one model, the
    baseline included where it was swept in another folder (``report.criteria_figure``)."""
    from common.analysis.report import criteria_figure as draw

    return draw([sweep for folder in folders for sweep in _criterion_sweeps(folder)], path, iterations)


def criteria_tables(comparison: dict) -> None:
    """Print ``criteria_comparison``: each criterion's crossings, its cost, and its curves against
    magnitude top-p at the same measured sparsity."""
    print("Critical sparsity per site and criterion: PPL-1% and task-average accuracy, isotonic crossing "
          "[95% interval] and band.\n")
    print("| site | criterion | PPL-1% | band | accuracy | band |")
    print("|---|---|---|---|---|---|")

    def reading(part):
        if not part or "crossing" not in part:
            return "- | -"
        interval = part.get("interval") or [None, None]
        band = band_bounds(part["band"]) if part.get("band") else "-"
        return f"{part['crossing']:.3f} [{_fmt(interval[0])}, {_fmt(interval[1])}] | {band}"

    for row in sorted(comparison["critical"], key=lambda r: (r["site"], r["criterion"] or "")):
        print(f"| {row['site']} | {row['criterion']} | {reading(row['ppl'])} | {reading(row['accuracy'])} |")
    if comparison["cost"]:
        print("\nCost per cell: median seconds, median sparse / dense cell time, and that ratio over "
              f"{comparison['baseline']}'s at the same site (the same run and machine).\n")
        print("| criterion | site | cells | median s | sparse / dense | over baseline |")
        print("|---|---|---|---|---|---|")
        for row in sorted(comparison["cost"], key=lambda r: (r["site"], r["criterion"])):
            print(f"| {row['criterion']} | {row['site']} | {row['cells']} | {row['median_seconds']:.1f} "
                  f"| {row['sparse_over_dense']:.2f}x | {_fmt(row['over_baseline'])} |")
    if comparison["comparisons"]:
        print(f"\nEach criterion against {comparison['baseline']} at the same site and measured sparsity (columns): "
              "difference a - b [95% paired-bootstrap interval]; where the interval excludes 0, the better one after "
              "the arrow (accuracy and perplexity ratio dense / sparse: higher is better; answer KL: lower).\n")
        levels_table(comparison["comparisons"], "site: criterion", lambda r: f"{r['site']}: {r['criteria'][0]}")
    if comparison["without_baseline"]:
        print(f"\nNo {comparison['baseline']} sweep to compare with: {', '.join(comparison['without_baseline'])}.")
    print()


def _sweep(folder: Path):
    """(store, spec, tidy frame) of a finished sweep folder."""
    from common.evaluation.store import ResultStore

    return ResultStore(folder), _spec(folder), _tidy(folder)


def model_comparison(folder_a: Path, folder_b: Path) -> dict:
    """Two models' sweeps on the same items: per site the isotonic crossings of the task-average
    accuracy curve and of PPL-1% side by side (decided where the intervals are disjoint), and the
    curves compared at the same measured sparsity, paired over the items (``compare_models`` rows).
    Needs both folders' cells; the result is small enough to commit (``report models --json``)."""
    from common.analysis.item_sweep import sparser_verdict
    from common.analysis.orderings import compare_models

    first, second = _sweep(folder_a), _sweep(folder_b)
    names = [first[1].model, second[1].model]
    summaries = [json.loads((f / "critical.json").read_text()) for f in (folder_a, folder_b)]
    critical = [{c["site"]: c for c in s["critical"]} for s in summaries]
    sites = []
    for site in [s for s in first[1].sites if s in critical[0] and s in critical[1]]:
        row = {"site": site}
        for kind in ("accuracy", "ppl"):
            pair = [entry.get("task_average_curve", {}).get("isotonic") if kind == "accuracy" else
                    next((v.get("isotonic") for k, v in entry.items() if k.startswith("ppl_")), None)
                    for entry in (by_site[site] for by_site in critical)]
            pair = [r if r and "crossing" in r else None for r in pair]
            verdict = None if None in pair else sparser_verdict(names[0], pair[0]["interval"], names[1],
                                                               pair[1]["interval"])
            row[kind] = {"readings": pair, "verdict": verdict}
        sites.append(row)
    return {"models": names, "folders": [str(folder_a), str(folder_b)], "critical": sites,
            "curves": compare_models(first, second),
            "readings": {"critical": "isotonic crossing [95% paired-bootstrap interval] per model; decided where the "
                                     "intervals are disjoint",
                         "curves": "model a - model b at the same measured sparsity (linear interpolation), 95% "
                                   "paired-bootstrap interval over the items both scored; decided when it excludes 0"},
            "provenance": [s.get("provenance") for s in summaries]}


def models_tables(folder_a: Path, folder_b: Path, comparison: dict | None = None) -> None:
    """Print ``model_comparison``: critical sparsities side by side, then the curves at the same
    measured sparsity."""
    comparison = comparison or model_comparison(folder_a, folder_b)
    name_a, name_b = comparison["models"]
    print(f"Critical sparsity, {name_a} against {name_b}: isotonic crossing [95% interval] of the task-average "
          "accuracy curve and of PPL-1%; decided where the intervals are disjoint.\n")
    print(f"| site | accuracy: {name_a} | {name_b} | verdict | PPL-1%: {name_a} | {name_b} | verdict |")
    print("|---|---|---|---|---|---|---|")
    for row in comparison["critical"]:
        readings = []
        for kind in ("accuracy", "ppl"):
            pair, verdict = row[kind]["readings"], row[kind]["verdict"]
            cells = ["-" if r is None else f"{r['crossing']:.3f} [{_fmt(r['interval'][0])}, {_fmt(r['interval'][1])}]"
                     for r in pair]
            readings.append(" | ".join([*cells, verdict or "-"]))
        print(f"| {row['site']} | " + " | ".join(readings) + " |")
    print(f"\nThe curves at the same measured sparsity (columns): {name_a} - {name_b} [95% paired-bootstrap "
          "interval]; where the interval excludes 0, the better model after the arrow (accuracy and perplexity: "
          "higher is better; answer KL: lower).\n")
    levels_table(comparison["curves"], "site", lambda r: r["site"])
    print()


def cell_time_tables(folder_a: Path, folder_b: Path) -> None:
    """Summed cell time per site of two stores of one sweep, and how far their scores differ."""
    from common.analysis.report import cell_time_comparison
    from common.evaluation.store import ResultStore

    summary = cell_time_comparison(ResultStore(folder_a), ResultStore(folder_b))
    print(f"Summed cell time on the cells both stores hold (s): {folder_a.name} against {folder_b.name}.\n")
    print(f"| site | cells | {folder_a.name} | {folder_b.name} | ratio |")
    print("|---|---|---|---|---|")
    totals = [0, 0.0, 0.0]
    for row in summary["sites"]:
        first, second = row["seconds"]
        totals = [totals[0] + row["cells"], totals[1] + first, totals[2] + second]
        print(f"| {row['site']} | {row['cells']} | {first:.0f} | {second:.0f} | {second / first:.2f}x |")
    if totals[0]:
        print(f"| all | {totals[0]} | {totals[1]:.0f} | {totals[2]:.0f} | {totals[2] / totals[1]:.2f}x |")
    print(f"\nCells in one store only: {summary['only_first']} / {summary['only_second']}.")
    largest = summary["largest_item_change"]
    if largest:
        print(f"Multiple-choice cells with the same score: {summary['same_score']} of {summary['scored_cells']}; "
              f"largest change {largest['items']} item(s) ({largest['task']}, {largest['site']}, p={largest['value']:g}); "
              "cells by items changed: " + ", ".join(f"{n}: {count}" for n, count in summary["cells_by_item_change"].items())
              + ".")
    largest = summary["largest_perplexity_change"]
    if largest:
        print(f"Perplexity cells: {summary['perplexity_cells']}; largest relative change {largest['relative']:.2e} "
              f"({largest['task']}, {largest['site']}, p={largest['value']:g}).")


def flips_table(folder: Path, max_sparsity: float) -> None:
    """Per site of a finished sweep: how many items differ from dense along the grid, and how many
    of those still differ at the next grid value (``common.analysis.flips``)."""
    from common.analysis.flips import site_flips

    store, spec, frame = _sweep(folder)
    print(f"Items whose answer differs from dense (lost or gained), {spec.model} ({folder.name}), grid values up to "
          f"measured sparsity {max_sparsity:g}: the share at each value, and the share of them that still differ at "
          "the next sparser value (independent draws would keep about the flip rate).\n")
    print("| site | values | flip rate | kept at the next value: median (range) |")
    print("|---|---|---|---|")
    for site in spec.sites:
        row = site_flips(store, spec, frame, site, max_sparsity)
        rates = [r for r in row["flip_rate"] if r > 0]
        kept = [k for k in row["persistence"] if not math.isnan(k)]
        if not kept:
            print(f"| {site} | {len(row['sparsity'])} | - | - |")
            continue
        print(f"| {site} | {len(row['sparsity'])} | {min(rates):.3f} to {max(rates):.3f} | "
              f"{statistics.median(kept):.2f} ({min(kept):.2f} to {max(kept):.2f}) |")
    print()


def replicates_table(folders: list[Path]) -> None:
    """Grids of one model on the same items with other rounding: each site's task-average isotonic
    crossing against the first grid's, within one of the first grid's steps or not."""
    from common.analysis.replicates import grid_sparsity, replicate_agreement

    summaries = [json.loads((f / "critical.json").read_text()) for f in folders]
    by_site = [{c["site"]: (c.get("task_average_curve", {}).get("isotonic") or {}) for c in s["critical"]}
               for s in summaries]
    frame = _tidy(folders[0])
    print(f"Task-average isotonic crossing [95% interval] of each grid on the same items, against the first "
          f"({folders[0].name}): the difference, the first grid's step (in measured sparsity) at its crossing, "
          "and whether the difference is at most one step.\n")
    print("| site | " + " | ".join(f.name for f in folders) + " | step | within one step |")
    print("|---|" + "---|" * (len(folders) + 2))
    within = readings = 0
    for site in summaries[0]["spec"]["sites"]:
        readings_here = [by_site[k].get(site, {}) for k in range(len(folders))]
        crossings = [r.get("crossing") for r in readings_here]
        rows = replicate_agreement(crossings, grid_sparsity(frame, site))
        cells = ["-" if c is None else f"{c:.3f} [{_fmt(r['interval'][0])}, {_fmt(r['interval'][1])}]"
                 for c, r in zip(crossings, readings_here)]
        cells[1:] = [cell if row["difference"] is None else f"{cell} ({row['difference']:+.3f})"
                     for cell, row in zip(cells[1:], rows)]
        verdicts = ["-" if row["within_one_step"] is None else ("yes" if row["within_one_step"] else "no")
                    for row in rows]
        within += sum(row["within_one_step"] is True for row in rows)
        readings += sum(row["within_one_step"] is not None for row in rows)
        step = rows[0]["step"] if rows else None
        print(f"| {site} | " + " | ".join(cells) + f" | {_fmt(step)} | {', '.join(verdicts)} |")
    print(f"\nWithin one grid step of the first grid: {within} of {readings} site readings.\n")


def leave_out_table(count: int, folders: list[Path]) -> None:
    """Each grid's task-average isotonic crossing per site, read again with every set of ``count``
    grid values left out: the range of those readings and the sets whose absence moves it more than
    one step."""
    from common.analysis.replicates import grid_curve, leave_values_out

    print(f"Task-average isotonic crossing of each grid, and again with every set of {count} of its values "
          "(dense kept) left out: the range of those readings, the grid's step (in measured sparsity) at its "
          "crossing, and the sets of values (p) whose absence moves the crossing more than one step.\n")
    print("| grid | site | crossing | sets left out | range without them | step | moved more than one step |")
    print("|---|---|---|---|---|---|---|")
    moved_sites = readings = 0
    for folder in folders:
        frame = _tidy(folder)
        for site in json.loads((folder / "critical.json").read_text())["spec"]["sites"]:
            curve = grid_curve(frame, site)
            if len(curve) < count + 2:
                continue
            reading = leave_values_out(curve.index, curve.measured_sparsity, curve.normalized, count)
            others = [row["crossing"] for row in reading["left_out"]]
            moved = [row for row in reading["left_out"] if not row["within_one_step"]]
            moved_sites += bool(moved)
            readings += 1
            named = ", ".join("p = " + " and ".join(f"{v:g}" for v in row["values"]) + f" ({row['difference']:+.3f})"
                              for row in moved[:4])
            print(f"| {folder.name} | {site} | {reading['crossing']:.3f} | {len(others)} | "
                  f"{min(others):.3f} to {max(others):.3f} | {reading['step']:.3f} | "
                  + (f"{len(moved)}: {named}{', ...' if len(moved) > 4 else ''}" if moved else "none") + " |")
    print(f"\nLeaving out {count} value{'s' if count > 1 else ''} moves the crossing more than one grid step on "
          f"{moved_sites} of {readings} site readings.\n")
