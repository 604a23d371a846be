"""The item-planned sweep wired to store cells: item-range cells, resume, budget, where items go."""

import json
import zlib

from common.analysis.item_sweep import ItemCells, decided_orderings, estimate_items, run_item_planned
from common.evaluation.store import ResultStore
from common.evaluation.sweep import DENSE, SweepRunner, SweepSpec

TASKS = {"bb_social_iqa": 300, "bb_movie_recommendation": 300}
GRID = [1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.5, 0.3]
DROP = {1.0: 0.0, 0.95: 0.0, 0.9: 0.005, 0.85: 0.01, 0.8: 0.03, 0.7: 0.2, 0.5: 0.35, 0.3: 0.5}


def _uniform(*parts) -> float:
    return zlib.crc32(repr(parts).encode()) / 2**32


class ItemRunner(SweepRunner):
    """Per-item results from a known model: an item is right dense with probability 0.6; at value p a
    right item turns wrong with probability DROP[p]; measured sparsity 1 - p."""

    def __init__(self, spec, store, shard=(0, 1)):
        super().__init__(lm=None, spec=spec, store=store, task_manager=None, shard=shard, verbose=False)
        self.evaluated = []

    def _evaluate(self, site, value, task, items=None):
        assert items is not None, "the item-planned sweep scores item ranges only"
        self.evaluated.append((site, value, task, tuple(items)))
        metric = self.spec.metric_for(task)
        records = []
        for doc in range(*items):
            right = _uniform(task, doc) < 0.6
            if site != DENSE and right and _uniform(task, doc, value) < DROP[value]:
                right = False
            records.append({"doc_id": doc, metric: float(right)})
        sparsity = 0.0 if site == DENSE else 1.0 - value
        counted = 100 * len(records)
        return {"metrics": {metric: sum(r[metric] for r in records) / len(records)}, "items": records,
                "seconds": 0.0, "sparsity": {} if site == DENSE else
                {site: {"element_weighted": sparsity, "mean_over_layers": sparsity, "counted": counted}}}


def _run(monkeypatch, store, max_items, sites=("intermediate",), stop_below=None, progress=None):
    monkeypatch.setattr("common.analysis.item_sweep.task_size", lambda task, manager: TASKS[task])
    spec = SweepSpec(model="synthetic", sites=list(sites), tasks=list(TASKS) + ["fables_ppl"], grid=list(GRID),
                     stop_below=stop_below)
    runner = ItemRunner(spec, store)
    return runner, run_item_planned(runner, target_halfwidth=0.02, max_items=max_items, start_items=50,
                                    progress=progress)


def _ranges(evaluated):
    by_cell = {}
    for site, value, task, items in evaluated:
        by_cell.setdefault((site, value, task), []).append(items)
    return by_cell


def test_items_go_around_the_crossing_within_the_budget_and_never_twice(monkeypatch, tmp_path):
    store = ResultStore(tmp_path / "store")
    runner, [plan] = _run(monkeypatch, store, max_items=3000)
    assert plan["stopped"] in {"target_reached", "budget_spent", "items_exhausted"}
    assert plan["plan"]["total_items"] <= 3000 and plan["tasks"] == list(TASKS)  # the perplexity task is left out
    assert all(task != "fables_ppl" for _, _, task, _ in runner.evaluated)
    for cell, ranges in _ranges(runner.evaluated).items():  # contiguous ranges from 0, each item scored once
        assert sorted(ranges)[0][0] == 0 and all(a[1] == b[0] for a, b in zip(sorted(ranges), sorted(ranges)[1:]))
    used = plan["plan"]["items_used"]
    low, high = plan["plan"]["bracket"]
    # the true crossing (99% of dense) lies at p = 0.85; the bracket sits next to it
    assert low in (0.95, 0.9, 0.85) and high in (0.9, 0.85, 0.8, 0.7) and low > high
    for value in (1.0, 0.3):  # far from the crossing: only the first 50 items
        assert all(n == 50 for n in used[value].values()), (value, used[value])
    assert sum(used[low].values()) > 100 and sum(used[high].values()) > 100
    assert plan["mcnemar"]["value"] == low and plan["mcnemar"]["items"] == sum(used[low].values())


def test_every_planning_step_is_reported_and_the_last_report_is_the_result(monkeypatch, tmp_path):
    reports = []  # copies as written at the time (a long run's item_plan file after each step)
    _, plans = _run(monkeypatch, ResultStore(tmp_path / "store"), max_items=3000, sites=("intermediate", "input"),
                    progress=lambda records: reports.append(json.loads(json.dumps(records))))
    assert reports[-1] == json.loads(json.dumps(plans)) and len(plans) == 2
    first_done = next(i for i, records in enumerate(reports) if records[-1]["stopped"] != "continue")
    first_site = reports[: first_done + 1]
    assert len(first_site) > 1 and all(len(records) == 1 for records in first_site)
    totals = [records[0]["plan"]["total_items"] for records in first_site]  # the interval as it narrows
    assert totals == sorted(totals) and [r[0]["stopped"] for r in first_site[:-1]] == ["continue"] * first_done
    for records in reports[first_done + 1:]:  # the second site's reports carry the first site's result
        assert len(records) == 2 and records[0] == reports[first_done][0] and records[1]["site"] == "input"


def test_the_plan_file_is_rewritten_after_every_step(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import common.cli.sweep as cli

    monkeypatch.setattr("common.analysis.item_sweep.task_size", lambda task, manager: TASKS[task])
    store = ResultStore(tmp_path / "store")
    runner = ItemRunner(SweepSpec(model="synthetic", sites=["intermediate"], tasks=list(TASKS), grid=list(GRID)), store)
    written, write = [], cli.atomic_write_json
    monkeypatch.setattr(cli, "atomic_write_json", lambda path, data: (written.append(json.loads(json.dumps(data))),
                                                                       write(path, data)))
    args = SimpleNamespace(target_halfwidth=0.02, max_items=3000, start_items=50, threshold=0.99)
    summary = cli.run_item_planned_sweep(args, runner, store.root, (0, 1))
    on_disk = json.loads((store.root / "item_plan.json").read_text())
    assert on_disk == written[-1] == json.loads(json.dumps(summary))
    assert written[0]["sites"][0]["stopped"] == "continue" and on_disk["sites"][0]["stopped"] != "continue"


def test_shards_order_sites_across_their_plan_files(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import common.cli.sweep as cli

    monkeypatch.setattr("common.analysis.item_sweep.task_size", lambda task, manager: TASKS[task])
    store = ResultStore(tmp_path / "store")
    spec = SweepSpec(model="synthetic", sites=["intermediate", "input"], tasks=list(TASKS), grid=list(GRID))
    args = SimpleNamespace(target_halfwidth=0.02, max_items=3000, start_items=50, threshold=0.99)
    first = cli.run_item_planned_sweep(args, ItemRunner(spec, store, shard=(0, 2)), store.root, (0, 2))
    second = cli.run_item_planned_sweep(args, ItemRunner(spec, store, shard=(1, 2)), store.root, (1, 2))
    assert [s["site"] for s in first["sites"]] == ["intermediate"] and first["orderings"] == []  # alone so far
    assert [s["site"] for s in second["sites"]] == ["input"]
    [ordering] = second["orderings"]
    assert ordering == decided_orderings(first["sites"] + second["sites"])[0]
    assert json.loads((store.root / "item_plan_shard2of2.json").read_text())["orderings"] == [ordering]


def test_resuming_scores_nothing_and_a_larger_budget_only_new_items(monkeypatch, tmp_path):
    store = ResultStore(tmp_path / "store")
    first, [plan] = _run(monkeypatch, store, max_items=2000)
    again, [same] = _run(monkeypatch, store, max_items=2000)
    assert again.evaluated == [] and same["plan"]["crossing"] == plan["plan"]["crossing"]
    more, [bigger] = _run(monkeypatch, store, max_items=4000)
    assert more.evaluated and bigger["plan"]["total_items"] > plan["plan"]["total_items"]
    old = _ranges(first.evaluated)
    for site, value, task, (start, stop) in more.evaluated:  # new cells start where the old ones ended
        assert start == max((r[1] for r in old.get((site, value, task), [])), default=0)
    cells = ItemCells(store, more.spec)
    assert cells.scored(DENSE, 1.0, "bb_social_iqa") == bigger["plan"]["items_used"]["dense"]["bb_social_iqa"]


def test_early_stop_ends_the_cheap_pass_and_orderings_read_the_intervals(monkeypatch, tmp_path):
    runner, [plan] = _run(monkeypatch, ResultStore(tmp_path / "store"), max_items=1500, stop_below=0.9)
    assert plan["early_stop"]["last_value"] == 0.5 and plan["early_stop"]["skipped_values"] == [0.3]  # 0.7 and 0.5 below 0.9
    assert all(value != 0.3 for _, value, _, _ in runner.evaluated)
    fake = [{"site": "a", "plan": {"interval": [0.6, 0.7]}}, {"site": "b", "plan": {"interval": [0.4, 0.5]}},
            {"site": "c", "plan": {"interval": [0.45, 0.65]}}]
    verdicts = [o["verdict"] for o in decided_orderings(fake)]
    assert verdicts == ["a sparser", "undecided (intervals overlap)", "undecided (intervals overlap)"]


def test_planning_on_a_grid_folder_starts_from_the_grid_items(monkeypatch, tmp_path):
    store = ResultStore(tmp_path / "store")
    monkeypatch.setattr("common.analysis.item_sweep.task_size", lambda task, manager: TASKS[task])
    spec = SweepSpec(model="synthetic", sites=["intermediate"], tasks=list(TASKS), grid=list(GRID), limit=120)
    grid = ItemRunner(spec, store)
    grid._evaluate = lambda site, value, task, items=None: ItemRunner._evaluate(grid, site, value, task, (0, 120))
    grid.run_grid()  # the grid's cells: the first 120 items, keys without an item range
    planner = ItemRunner(spec, store)
    [plan] = run_item_planned(planner, target_halfwidth=0.02, max_items=10 ** 6, start_items=50)
    cells = ItemCells(store, spec)
    assert all(start >= 120 for _, _, _, (start, _) in planner.evaluated)  # nothing the grid scored is redone
    assert cells.scored("intermediate", 1.0, "bb_social_iqa") == 120
    assert all(n >= 120 for by_task in plan["plan"]["items_used"].values() for n in by_task.values())
    items, sparsity = cells.results("intermediate", 0.85, "bb_social_iqa")
    assert [i["doc_id"] for i in items] == list(range(len(items))) and abs(sparsity - 0.15) < 1e-12


def test_the_estimate_from_a_grid_counts_what_the_planned_sweep_then_scores(monkeypatch, tmp_path):
    monkeypatch.setitem(DROP, 0.85, 0.02)  # the true crossing inside a grid gap (0.9: 0.995, 0.85: 0.98), not on a point
    store, N = ResultStore(tmp_path / "store"), 600
    spec = SweepSpec(model="synthetic", sites=["intermediate"], tasks=list(TASKS), grid=list(GRID), limit=N)
    grid = ItemRunner(spec, store)

    def timed(site, value, task, items=None):  # a known cost: 0.25 s per item
        result = ItemRunner._evaluate(grid, site, value, task, (0, N))
        return {**result, "seconds": 0.25 * len(result["items"])}

    grid._evaluate = timed
    grid.run_grid()
    [estimate] = estimate_items(store, spec, target_halfwidth=0.02)
    needed, (a, b) = estimate["needed"], estimate["bracket"]
    assert estimate["status"] == "continue" and set(needed) == set(TASKS) and min(needed.values()) > N
    assert estimate["scored"] == {t: N for t in TASKS} and a in estimate["planned"] and b in estimate["planned"]
    by_hand = 3 * sum(n - N for n in needed.values())  # dense, a and b: every task from N items to n
    assert estimate["evaluations"][0] == by_hand <= estimate["evaluations"][1]
    assert estimate["evaluations"][1] == (1 + len(estimate["planned"])) * sum(n - N for n in needed.values())
    assert abs(estimate["core_hours"][0] - by_hand * 0.25 / 3600) < 1e-12 and estimate["seconds_per_evaluation"] == 0.25

    # the item-planned sweep from the same grid, with items to spare: it scores about what was estimated
    monkeypatch.setattr("common.analysis.item_sweep.task_size", lambda task, manager: 50_000)
    [plan] = run_item_planned(ItemRunner(spec, store), target_halfwidth=0.02, max_items=10**7, start_items=50)
    assert plan["stopped"] == "target_reached"
    used = plan["plan"]["items_used"]
    for task, n in needed.items():  # 0.76 and 0.86 here; from 120 items the estimate was 2-3x too high
        assert 0.6 < used[DENSE][task] / n < 1.7, (task, used[DENSE][task], n)

    empty = ResultStore(tmp_path / "empty")
    assert estimate_items(empty, spec, 0.02)[0]["status"] == "not_enough_cells"


def test_report_tables_print_the_item_estimate_of_a_grid_folder(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    store = ResultStore(tmp_path / "store")
    spec = SweepSpec(model="synthetic", sites=["intermediate"], tasks=list(TASKS), grid=list(GRID), limit=300)
    grid = ItemRunner(spec, store)
    grid._evaluate = lambda site, value, task, items=None: ItemRunner._evaluate(grid, site, value, task, (0, 300))
    grid.run_grid()
    (store.root / "critical.json").write_text(json.dumps({"spec": spec.as_dict()}))
    [estimate] = estimate_items(store, spec, 0.03)
    script = Path(__file__).resolve().parents[2] / "scripts" / "report_tables.py"
    run = subprocess.run([sys.executable, str(script), "--item-estimate", str(store.root), "0.03"],
                         capture_output=True, text=True, check=True)
    row = next(line for line in run.stdout.splitlines() if line.startswith("| intermediate |"))
    low, high = estimate["evaluations"]
    assert f"{low:,} to {high:,}" in row and f"{estimate['crossing']:.3f}" in row
    assert all(f"{task} {n:,} (300)" in row for task, n in estimate["needed"].items())
    missing = subprocess.run([sys.executable, str(script), "--item-estimate", str(tmp_path)], capture_output=True,
                             text=True)
    assert missing.returncode != 0 and missing.stderr.strip().startswith("error: --item-estimate needs a finished")
    for halfwidth in ("abc", "-0.05"):
        refused = subprocess.run([sys.executable, str(script), "--item-estimate", str(store.root), halfwidth],
                                 capture_output=True, text=True)
        assert refused.returncode == 1 and "target half-width must be a number in (0, 1)" in refused.stderr
