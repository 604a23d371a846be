"""The sweep study both sweep scripts run (dense and MoE): one store, the cells (grid or search), the report.

The scripts only parse their flags, load their model and build the lm-eval model; everything
after that is here, once.
"""

from __future__ import annotations

from pathlib import Path

from common.analysis.report import write_report
from common.evaluation.provenance import environment
from common.evaluation.store import ResultStore, atomic_write_json
from common.evaluation.sweep import SweepRunner, SweepSpec
from common.evaluation.tasks import OFFLINE_SUITE, PERPLEXITY_TASK, task_manager


def open_store(output: Path, dtype, device, allow_mixed: bool = False, seed: int | None = None) -> ResultStore:
    """The result store of a run, with the run's provenance (refuses mixing library versions)."""
    return ResultStore(output, provenance=environment(dtype, device, seed), allow_mixed=allow_mixed)


def run_sweep(args, lm, spec: SweepSpec, store: ResultStore, shard: tuple[int, int], ppl_percent: float = 1.0,
              extra: dict | None = None) -> dict | None:
    """Evaluate this shard's cells (grid or search), then write the report.

    Returns the summary, or None when other shards still have cells to evaluate (the report is
    written by whichever shard finishes last, or by re-running any shard).
    """
    output = store.root
    manager = task_manager(include_defaults=any(t not in OFFLINE_SUITE + [PERPLEXITY_TASK] for t in spec.tasks))
    runner = SweepRunner(lm, spec, store, manager, shard)
    extra = dict(extra or {})
    searched_values = None
    if args.search:
        extra["search"] = runner.run_search(args.threshold, args.resolution, ppl_percent)
        atomic_write_json(output / "search.json", extra["search"])
        searched_values = sorted({point["value"] for search in extra["search"]
                                  for part in [search, *search.get("ppl", {}).values()]
                                  for point in part["points"]}, reverse=True)
    else:
        runner.run_grid()
        missing = runner.missing_cells()
        if missing:
            shards = sorted({index + 1 for index in missing})
            print(f"this shard is done; {sum(missing.values())} cells of shard(s) "
                  f"{', '.join(f'{k}/{shard[1]}' for k in shards)} are not finished yet: the tables and figures are "
                  "written when every shard has finished (re-run any shard then)")
            return None
    if searched_values is not None:
        spec.grid = searched_values  # the report reads exactly the evaluated values
    summary = write_report(store, spec, output, args.threshold, ppl_percent, args.bootstrap,
                           {**extra, "store_commits": store.commits()})
    print_summary(summary, ppl_percent)
    return summary


def print_summary(summary: dict, ppl_percent: float) -> None:
    for entry in summary["critical"]:
        curve = entry.get("task_average_curve", {})
        line = (f"{entry['site']:>12}: critical sparsity (task-average curve) grid={curve.get('grid', 0):.3f} "
                f"interpolated={curve.get('interpolated', 0):.3f} [{curve.get('status')}]")
        ppl = [v for k, v in entry.items() if k.startswith("ppl_")]
        if ppl:
            line += f"; PPL-{ppl_percent:g}% criterion grid={ppl[0]['grid']:.3f}"
        print(line)
    for search in summary.get("search", []):
        ppl = "".join(f"; PPL-{ppl_percent:g}% on {task}: interpolated={found['critical']['interpolated']:.3f} "
                      f"with {found['values_evaluated']} values" for task, found in search.get("ppl", {}).items())
        print(f"{search['site']:>12}: search found interpolated={search['critical']['interpolated']:.3f} with "
              f"{search['values_evaluated']} values{ppl} ({search['cells_evaluated']} new cells)")
