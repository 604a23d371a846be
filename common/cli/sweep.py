"""The sweep study both sweep scripts run (dense and MoE): one store, the cells (grid or search), the report.

The scripts only parse their flags, load their model and build the lm-eval model; everything
after that is here, once.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.analysis.critical import band_bounds
from common.analysis.item_sweep import decided_orderings, run_item_planned
from common.analysis.report import write_report
from common.analysis.search import run_search, searched_values
from common.cli.criteria import print_criteria
from common.cli.protocol import print_leading_lines
from common.evaluation.provenance import environment
from common.evaluation.store import ResultStore, atomic_write_json
from common.evaluation.sweep import DENSE, SweepRunner, SweepSpec
from common.evaluation.tasks import PERPLEXITY_TASKS, is_offline_task, task_manager


def open_store(output: Path, dtype, device, allow_mixed: bool = False, seed: int | None = None) -> ResultStore:
    """The result store of a run, with the run's provenance (refuses mixing library versions)."""
    return ResultStore(output, provenance=environment(dtype, device, seed), allow_mixed=allow_mixed)


def run_sweep(args, lm, spec: SweepSpec, store: ResultStore, shard: tuple[int, int], ppl_percent: float = 1.0,
              extra: dict | None = None, calibrate=None, others=()) -> dict | None:
    """Evaluate this shard's cells (grid or search), then write the report.

    ``calibrate``: the calibration step of ``spec``'s criterion (None for the magnitude rule);
    ``others``: (spec, calibrate) of further criteria swept on their grids into the same store
    (``common.cli.criteria.criterion_runs``).

    Returns the summary, or None when other shards still have cells to evaluate (the report is
    written by whichever shard finishes last, or by re-running any shard) and for the item-planned
    sweep (``--target-halfwidth``), which writes and prints its own summary.
    """
    output = store.root
    manager = task_manager(include_defaults=not all(is_offline_task(t) for t in spec.tasks))
    runner = SweepRunner(lm, spec, store, manager, shard, calibrate=calibrate)
    further = [SweepRunner(lm, other, store, manager, shard, calibrate=step) for other, step in others]
    extra = dict(extra or {})
    values = None  # the grid's values for every site
    if getattr(args, "target_halfwidth", None) is not None:
        run_item_planned_sweep(args, runner, output, shard)
        return None
    if args.search:
        lead = getattr(args, "lead", "accuracy")
        sites = [site for position, site in enumerate(spec.sites) if position % shard[1] == shard[0]]
        ppl_tasks = [t for t in spec.tasks if t in PERPLEXITY_TASKS]
        per_site = spec.tasks * args.budget + (ppl_tasks * args.budget if lead == "accuracy" else [])
        runner.expect([t for t in spec.tasks if not store.has(spec.key(DENSE, 1.0, t))] + per_site * len(sites),
                      at_most=True)
        searches = run_search(runner, args.threshold, args.resolution, args.budget, ppl_percent,
                              args.bootstrap or 1000, args.spread, getattr(args, "lead", "accuracy"))
        if shard[1] > 1:  # sites go to shards: each writes its own file, the report needs every shard's
            atomic_write_json(output / shard_file("search", shard), searches)
            order = {site: i for i, site in enumerate(spec.sites)}
            searches = sorted(searches + _other_shards(output, shard, "search", lambda data: data),
                              key=lambda r: order.get(r["site"], len(order)))
            waiting = [site for site in spec.sites if site not in {r["site"] for r in searches}]
            if waiting:
                print(f"this shard is done; the search of {', '.join(waiting)} (other shards) is not finished yet: "
                      "search.json, the tables and figures are written when every shard has finished (re-run any "
                      "shard then: its evaluated values are reused)")
                return None
        atomic_write_json(output / "search.json", searches)
        extra["search"] = searches
        values = searched_values(searches)  # the report reads exactly the evaluated values
    else:
        missing: dict[int, int] = {}
        for each in [runner, *further]:
            each.run_grid()
        for each in [runner, *further]:
            for index, count in each.missing_cells().items():
                missing[index] = missing.get(index, 0) + count
        if missing:
            shards = sorted({index + 1 for index in missing})
            print(f"this shard is done; {sum(missing.values())} cells of shard(s) "
                  f"{', '.join(f'{k}/{shard[1]}' for k in shards)} are not finished yet: the tables and figures are "
                  "written when every shard has finished (re-run any shard then)")
            return None
    summary = write_report(store, spec, output, args.threshold, ppl_percent, args.bootstrap,
                           {**extra, "provenance": store.provenance, "store_commits": store.commits(),
                            "store_versions": store.versions()}, values, [other for other, _ in others])
    if any(search.get("lead") == "ppl" for search in summary.get("search", [])):
        print_leading_lines(summary, ppl_percent, spec.limit)
    print_summary(summary, ppl_percent)
    print_criteria(summary)
    return summary


def print_summary(summary: dict, ppl_percent: float) -> None:
    nonfinite = summary.get("nonfinite_rows") or {}
    if any(nonfinite.values()):
        print("warning: token rows holding a NaN or an infinity were passed through unsparsified and left out of the "
              "sparsity (tidy.csv, nonfinite_rows): " + ", ".join(f"{site} {rows}" for site, rows in nonfinite.items()
                                                                  if rows))
    for entry in summary["critical"]:
        curve = entry.get("task_average_curve", {})
        site = entry["site"] if entry.get("criterion") == summary["critical"][0].get("criterion") \
            else f"{entry['site']} ({entry['criterion']})"
        line = (f"{site:>12}: critical sparsity (task-average curve) grid={curve.get('grid', 0):.3f} "
                f"interpolated={curve.get('interpolated', 0):.3f} [{curve.get('status')}]")
        isotonic, mcnemar = curve.get("isotonic"), entry.get("mcnemar", {}).get("pooled")
        if isotonic:
            line += (f" isotonic={isotonic['crossing']:.3f} [{isotonic['interval'][0]:.3f}, "
                     f"{isotonic['interval'][1]:.3f}]")
            if "band" in isotonic:
                line += f" band {band_bounds(isotonic['band'])}"
        if mcnemar:
            line += (f"; vs dense at p={entry['mcnemar']['value']:g}: McNemar p={mcnemar['p_value']:.3g} "
                     f"({mcnemar['dense_only_correct']} items lost, {mcnemar['sparse_only_correct']} gained)")
        ppl = [v for k, v in entry.items() if k.startswith("ppl_")]
        if ppl:
            line += f"; PPL-{ppl_percent:g}% criterion grid={ppl[0]['grid']:.3f}"
        print(line)
        stop = entry.get("early_stop")
        if stop:
            print(f"{'':>12}  grid ended after value {stop['last_value']:g} ({stop['rule']}); not evaluated: "
                  f"{', '.join(f'{v:g}' for v in stop['skipped_values'])}")
    for search in summary.get("search", []):
        found = [] if search.get("lead") == "ppl" else [(f"{search['site']:>12}: search", search)]
        found += [(f"{'':>12}  PPL-{ppl_percent:g}% on {task}", part) for task, part in search.get("ppl", {}).items()]
        for label, part in found:
            low, high = part["interval"]
            band = f" band {band_bounds(part['band'])}" if part.get("band") else ""
            print(f"{label}: crossing={part['crossing']:.3f} [{low:.3f}, {high:.3f}]{band} ({part['status']}), "
                  f"stopped: {part['stopped']} after {part['values_evaluated']} values "
                  f"({', '.join(f'{v:g}' for v in part['order'])})")
        print(f"{'':>12}  {search['cells_evaluated']} new cells")


def shard_file(stem: str, shard: tuple[int, int]) -> str:
    """``stem_shardKofN.json``: one shard's records of a sweep whose sites go to shards one by one."""
    return f"{stem}_shard{shard[0] + 1}of{shard[1]}.json"


def _other_shards(output: Path, shard: tuple[int, int], stem: str, records) -> list[dict]:
    """The site records (``records(parsed file)``) the other shards have written so far."""
    found = []
    for k in range(shard[1]):
        path = output / shard_file(stem, (k, shard[1]))
        if k != shard[0] and path.is_file():
            try:
                found += records(json.loads(path.read_text()))
            except (OSError, ValueError, KeyError, TypeError):  # being replaced, or not such a file: read next time
                continue
    return found


def other_shards_sites(output: Path, shard: tuple[int, int]) -> list[dict]:
    """The site records the other shards of this item-planned sweep have written so far (sites go to
    shards one by one, so orderings between sites need every shard's file)."""
    return _other_shards(output, shard, "item_plan", lambda data: data["sites"])


def run_item_planned_sweep(args, runner: SweepRunner, output: Path, shard: tuple[int, int]) -> dict:
    """The item-planned sweep of this shard's sites; writes item_plan[_shard K of N].json after every
    planning step (a site still running reads "continue"; the orderings read every shard's sites)
    and prints per site the crossing, its interval, why it stopped and the items used."""
    name = "item_plan.json" if shard[1] == 1 else shard_file("item_plan", shard)

    def write(plans: list[dict]) -> dict:
        order = {site: i for i, site in enumerate(runner.spec.sites)}  # the same pairs in every shard's file
        everyone = sorted(plans + other_shards_sites(output, shard), key=lambda r: order.get(r["site"], len(order)))
        summary = {"spec": runner.spec.as_dict(), "sites": plans, "orderings": decided_orderings(everyone),
                   "provenance": runner.store.provenance}
        atomic_write_json(output / name, summary)
        return summary

    plans = run_item_planned(runner, args.target_halfwidth, args.max_items, args.start_items, args.threshold,
                             progress=write)
    summary = write(plans)
    for plan in plans:
        low, high = plan["plan"]["interval"]
        used = plan["plan"]["items_used"]
        band = plan["plan"].get("band") or (low, high)
        print(f"{plan['site']:>12}: crossing={plan['plan']['crossing']:.3f} [{low:.3f}, {high:.3f}] "
              f"(band {band[0]:.3f} to {band[1]:.3f}) "
              f"({plan['stopped']}: {plan['reason']}); {plan['plan']['total_items']} evaluations; items per "
              "threshold: " + ", ".join(f"{value}: {sum(tasks.values())}" for value, tasks in used.items()))
    for ordering in summary["orderings"]:
        print(f"{' vs '.join(ordering['sites'])}: {ordering['verdict']}")
    print(f"results: {output / name}")
    return summary
