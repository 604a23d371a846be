"""The grid's early stop: a site ends once its task-average normalized score has stayed below the
stop level for N grid values in a row; shards agree on where; the report says which values were skipped."""

import threading
import time

import pytest

from common.analysis.report import critical_table, tidy_table
from common.evaluation.store import ResultStore
from common.evaluation.sweep import DENSE, SweepRunner, SweepSpec, early_stop, task_average

TASKS = ["bb_general_knowledge", "bb_social_iqa"]
GRID = [1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5]


class CurveRunner(SweepRunner):
    """Evaluates cells from a known curve instead of a model: normalized score = curve[value] on
    every task (dense accuracy 0.5 on 10 items), measured sparsity 1 - value."""

    def __init__(self, spec, store, curve, shard=(0, 1), patience=0.05, delay=0.0):
        super().__init__(lm=None, spec=spec, store=store, task_manager=None, shard=shard, verbose=False,
                         patience=patience, poll=0.005)
        self.curve, self.evaluated, self.delay = curve, [], delay

    def _evaluate(self, site, value, task, items=None):
        time.sleep(self.delay)
        self.evaluated.append((site, value, task))
        metric = self.spec.metric_for(task)
        correct = 5 if site == DENSE else round(5 * self.curve[value])
        items = [{"doc_id": i, metric: float(i < correct), "choice_logliks": [0.0, -1.0], "gold": 0} for i in range(10)]
        sparsity = 0.0 if site == DENSE else 1.0 - value
        return {"metrics": {metric: correct / 10}, "items": items, "seconds": 1.0,
                "sparsity": {} if site == DENSE else {site: {"element_weighted": sparsity, "mean_over_layers": sparsity}}}


def _spec(**kwargs):
    return SweepSpec(model="synthetic", sites=["intermediate"], tasks=TASKS, grid=list(GRID), limit=10, **kwargs)


# normalized score per value: one dip below 0.9 that recovers (0.9: 0.8), then two in a row (0.8, 0.7)
CURVE = {1.0: 1.0, 0.95: 1.0, 0.9: 0.8, 0.85: 1.0, 0.8: 0.8, 0.7: 0.6, 0.6: 0.4, 0.5: 0.2}


def test_a_site_stops_after_two_values_in_a_row_below_the_level(tmp_path):
    store = ResultStore(tmp_path / "store")
    runner = CurveRunner(_spec(stop_below=0.9, stop_after=2), store, CURVE)
    runner.run_grid()
    evaluated = sorted({v for s, v, _ in runner.evaluated if s != DENSE}, reverse=True)
    assert evaluated == [1.0, 0.95, 0.9, 0.85, 0.8, 0.7]  # the single dip at 0.9 did not stop it
    stop = early_stop(store, runner.spec, "intermediate")
    assert stop["last_value"] == 0.7 and stop["skipped_values"] == [0.6, 0.5]
    assert [b["value"] for b in stop["below"]] == [0.8, 0.7]
    assert [b["task_average"] for b in stop["below"]] == pytest.approx([0.8, 0.6])
    assert task_average(store, runner.spec, "intermediate", 0.6) is None  # never evaluated
    assert runner.missing_cells() == {}


def test_stop_after_three_and_no_stop_evaluate_more(tmp_path):
    three = CurveRunner(_spec(stop_below=0.9, stop_after=3), ResultStore(tmp_path / "three"), CURVE)
    three.run_grid()
    assert early_stop(three.store, three.spec, "intermediate")["skipped_values"] == [0.5]
    full = CurveRunner(_spec(), ResultStore(tmp_path / "full"), CURVE)
    full.run_grid()
    assert early_stop(full.store, full.spec, "intermediate") is None
    assert len({v for s, v, _ in full.evaluated if s != DENSE}) == len(GRID)


def test_shards_together_evaluate_exactly_the_unsharded_cells(tmp_path):
    alone = CurveRunner(_spec(stop_below=0.9), ResultStore(tmp_path / "alone"), CURVE)
    alone.run_grid()
    store = ResultStore(tmp_path / "sharded")
    shards = [CurveRunner(_spec(stop_below=0.9), store, CURVE, shard=(k, 2)) for k in range(2)]
    for shard in shards:  # one after the other: the second sees the first's cells in the store
        shard.run_grid()
    for shard in reversed(shards):  # re-running a shard evaluates nothing new
        before = len(shard.evaluated)
        shard.run_grid()
        assert len(shard.evaluated) == before
    sharded = sorted(c for shard in shards for c in shard.evaluated)
    # the first shard cannot see the second's cells while it runs, so it may evaluate past the stop;
    # every cell the unsharded sweep needs is there, each evaluated once
    assert set(alone.evaluated) <= set(sharded) and len(sharded) == len(set(sharded))
    assert shards[0].missing_cells() == {}
    assert early_stop(store, shards[0].spec, "intermediate") == early_stop(alone.store, alone.spec, "intermediate")


def test_the_report_names_the_skipped_values(tmp_path):
    runner = CurveRunner(_spec(stop_below=0.9), ResultStore(tmp_path / "store"), CURVE)
    runner.run_grid()
    frame = tidy_table(runner.store, runner.spec, iterations=20)
    [entry] = critical_table(runner.store, runner.spec, frame, iterations=20)
    assert entry["early_stop"]["skipped_values"] == [0.6, 0.5]
    assert sorted(frame.value.unique(), reverse=True) == [1.0, 0.95, 0.9, 0.85, 0.8, 0.7]


def test_a_shard_ahead_of_the_others_turns_to_another_site_first(tmp_path):
    spec = SweepSpec(model="synthetic", sites=["intermediate", "input"], tasks=TASKS, grid=list(GRID), limit=10,
                     stop_below=0.9, stop_after=2)
    store = ResultStore(tmp_path / "store")
    alone = CurveRunner(spec, store, CURVE, shard=(0, 2))  # the other shard has not started
    alone.run_grid()
    positions = [GRID.index(value) for site, value, _ in alone.evaluated if site != DENSE]
    sites = [site for site, _, _ in alone.evaluated if site != DENSE]
    # no value of either site is finished by both shards, so each site may run two values ahead
    # (positions 0 to 2) before the shard turns to the other site; then it goes on without waiting
    early = [i for i, position in enumerate(positions) if position <= 2]
    assert early == list(range(len(early))) and {sites[i] for i in early} == {"intermediate", "input"}
    assert len(positions) > len(early)  # and then it went on alone


def test_cells_a_racing_shard_evaluated_past_the_stop_leave_the_report_unchanged(tmp_path):
    runner = CurveRunner(_spec(stop_below=0.9), ResultStore(tmp_path / "store"), CURVE)
    runner.run_grid()
    frame = tidy_table(runner.store, runner.spec, iterations=20)
    [before] = critical_table(runner.store, runner.spec, frame, iterations=20)
    # what a shard racing ahead leaves behind: a whole skipped value and one task of another
    for task in TASKS:
        runner.cell("intermediate", 0.6, task)
    runner.cell("intermediate", 0.5, TASKS[0])
    assert early_stop(runner.store, runner.spec, "intermediate")["skipped_values"] == [0.6, 0.5]
    frame_after = tidy_table(runner.store, runner.spec, iterations=20)
    [after] = critical_table(runner.store, runner.spec, frame_after, iterations=20)
    assert sorted(frame_after.value.unique(), reverse=True) == [1.0, 0.95, 0.9, 0.85, 0.8, 0.7]
    assert after == before


def test_the_task_average_uses_only_values_every_task_has(tmp_path):
    curve = {1.0: 1.0, 0.95: 1.0, 0.9: 1.0, 0.85: 1.0, 0.8: 0.6, 0.7: 0.6, 0.6: 0.4, 0.5: 0.2}
    runner = CurveRunner(_spec(), ResultStore(tmp_path / "store"), curve)
    for site, value in [(DENSE, 1.0)] + [("intermediate", v) for v in (1.0, 0.95, 0.9, 0.85)]:
        for task in TASKS:
            runner.cell(site, value, task)
    runner.cell("intermediate", 0.8, TASKS[0])  # an unfinished value: one task of two
    frame = tidy_table(runner.store, runner.spec, iterations=20)
    [entry] = critical_table(runner.store, runner.spec, frame, iterations=20)
    assert 0.8 in set(frame.value)  # the task's own curve has it
    assert entry["task_average_curve"]["status"] == "all_above"  # the average does not
    assert entry["task_average_curve"]["grid"] == pytest.approx(0.15)


LONG_GRID = [1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
LONG_CURVE = {v: 1.0 if v >= 0.9 else 0.5 for v in LONG_GRID}  # stops after 0.85 and 0.8


def _two_shards(tmp_path, patience):
    spec = SweepSpec(model="synthetic", sites=["intermediate"], tasks=TASKS + ["bb_emoji_movie"], grid=list(LONG_GRID),
                     limit=10, stop_below=0.9, stop_after=2)
    store = ResultStore(tmp_path / f"store{patience}")
    fast = CurveRunner(spec, store, LONG_CURVE, shard=(0, 2), patience=patience)
    slow = CurveRunner(spec, store, LONG_CURVE, shard=(1, 2), patience=patience, delay=0.2)
    threads = [threading.Thread(target=runner.run_grid) for runner in (fast, slow)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    deepest = max(LONG_GRID.index(v) for s, v, _ in fast.evaluated + slow.evaluated if s != DENSE)
    return early_stop(store, spec, "intermediate"), deepest


def test_a_shard_ahead_waits_for_the_others_instead_of_running_past_the_stop(tmp_path):
    stop, deepest = _two_shards(tmp_path, patience=5.0)
    assert stop["last_value"] == 0.8
    assert deepest <= LONG_GRID.index(0.8) + 2  # at most the stop_after values it may run ahead
    _, raced = _two_shards(tmp_path, patience=0.0)  # never waiting: the fast shard sweeps on alone
    assert raced > LONG_GRID.index(0.8) + 2


def test_a_shard_started_alone_waits_once_not_at_every_step(tmp_path):
    spec = SweepSpec(model="synthetic", sites=["intermediate", "input"], tasks=TASKS, grid=list(LONG_GRID), limit=10,
                     stop_below=0.9, stop_after=2)
    alone = CurveRunner(spec, ResultStore(tmp_path / "store"), {v: 1.0 for v in LONG_GRID}, shard=(0, 2), patience=1.0)
    start = time.monotonic()
    alone.run_grid()  # the other shard never starts: after one wait this one goes on without waiting
    assert time.monotonic() - start < 2.5
    assert len({(s, v) for s, v, _ in alone.evaluated if s != DENSE}) > 2 * 2 * 2  # well past the ahead-limit
