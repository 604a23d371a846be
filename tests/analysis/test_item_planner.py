"""Item planner: standard errors against a bootstrap, the crossing against critical_sparsity, and a
seeded simulation with a known crossing driven to the target half-width."""

import json

import numpy as np
import pytest

from common.analysis.critical import bootstrap_indices, critical_sparsity, task_average_curves
from common.analysis.item_planner import (DENSE, ItemRequest, band_interval, paired_ratio, plan_items,
                                          task_average_with_error)

# Grid of a synthetic model: rule value -> (measured sparsity, true normalized score of every task).
GRID = {0.99: (0.20, 1.0), 0.95: (0.35, 0.9995), 0.90: (0.45, 0.999), 0.85: (0.55, 0.996), 0.80: (0.62, 0.984),
        0.70: (0.72, 0.95), 0.50: (0.85, 0.85)}
TRUE_CROSSING = 0.55 + (0.996 - 0.99) / (0.996 - 0.984) * (0.62 - 0.55)
NEAR = {0.90, 0.85, 0.80, 0.70}  # the true bracket (0.85, 0.80) and its neighbours
ACCURACY = {"a": 0.45, "b": 0.6, "c": 0.35}
AVAILABLE = 20_000


class PairedTasks:
    """Per-item dense and sparse correctness with a known ratio: a correct item breaks with
    probability f, a wrong one is fixed with probability ``fix`` (f chosen so that
    E[sparse] / E[dense] is the grid's true score), so 2-6% of items change their answer."""

    def __init__(self, seed: int, fix: float = 0.015):
        rng = np.random.default_rng(seed)
        self.dense, self.sparse = {}, {v: {} for v in GRID}
        for task, acc in ACCURACY.items():
            d = (rng.random(AVAILABLE) < acc).astype(float)
            self.dense[task] = d
            for value, (_, ratio) in GRID.items():
                breaks = 1 - (ratio * acc - (1 - acc) * fix) / acc
                u = rng.random(AVAILABLE)
                self.sparse[value][task] = np.where(d == 1, u >= breaks, u < fix).astype(float)

    def scored(self, counts: dict) -> tuple[dict, dict]:
        dense = {t: self.dense[t][: counts[DENSE][t]] for t in ACCURACY}
        sparse = {v: {t: self.sparse[v][t][: counts[v][t]] for t in ACCURACY} for v in GRID}
        return dense, sparse


def _start(n: int) -> dict:
    return {key: {t: n for t in ACCURACY} for key in [DENSE, *GRID]}


def _drive(seed: int, start: int = 500, max_items: int = 400_000, target: float = 0.05):
    """Run the planner to a stop, scoring what it asks; return (final plan, thresholds that got items)."""
    tasks, counts, touched = PairedTasks(seed), _start(start), set()
    sparsity = {v: s for v, (s, _) in GRID.items()}
    for _ in range(50):
        dense, sparse = tasks.scored(counts)
        plan = plan_items(dense, sparse, sparsity, {t: AVAILABLE for t in ACCURACY}, target_halfwidth=target,
                          max_items=max_items)
        if plan.status != "continue":
            return plan, touched
        for request in plan.requests:
            assert request.start == counts[request.threshold][request.task]  # resumes, never rescores
            counts[request.threshold][request.task] = request.stop
            touched.add(request.threshold)
    raise AssertionError("the planner did not stop in 50 steps")


def test_planner_reaches_the_half_width_near_the_crossing_only():
    reached, covered, budget = 0, 0, 400_000
    runs = 60
    for seed in range(runs):
        plan, touched = _drive(seed, max_items=budget)
        assert touched - {DENSE} <= NEAR, (seed, touched)  # never at thresholds far from the crossing
        assert plan.total_items <= budget
        if plan.status == "target_reached" and plan.halfwidth <= 0.05:
            reached += 1
        low, high = plan.interval
        covered += low <= TRUE_CROSSING <= high
    assert reached >= 0.95 * runs
    assert covered >= 0.85 * runs  # nominal 95%; sequential stopping costs a little coverage


def test_planner_stops_on_the_budget_and_reports_why():
    plan, _ = _drive(0, max_items=30_000)
    assert plan.status == "budget_spent" and plan.total_items <= 30_000
    assert "max_items=30000" in plan.reason and plan.halfwidth > 0.05
    assert plan.requests == []
    assert plan.total_items == sum(sum(by_task.values()) for by_task in plan.items_used.values())
    record = json.loads(json.dumps(plan.as_dict()))  # a plan is stored as JSON
    assert record["status"] == "budget_spent" and record["interval"] == list(plan.interval)


def test_planner_reports_exhausted_items():
    tasks, counts = PairedTasks(1), _start(300)
    dense, sparse = tasks.scored(counts)
    plan = plan_items(dense, sparse, {v: s for v, (s, _) in GRID.items()}, {t: 300 for t in ACCURACY})
    assert plan.status == "items_exhausted" and plan.requests == []
    assert plan.needed and all(n == 300 for n in plan.needed.values())


def test_first_plan_asks_for_the_bracket_and_dense_from_the_scored_prefix():
    tasks, counts = PairedTasks(3), _start(500)
    counts[0.85]["b"] = 700  # unequal counts: b's bracket point starts further along
    counts[DENSE]["b"] = 700
    dense, sparse = tasks.scored(counts)
    plan = plan_items(dense, sparse, {v: s for v, (s, _) in GRID.items()}, {t: AVAILABLE for t in ACCURACY})
    assert plan.status == "continue" and plan.bracket == (0.85, 0.80)
    by_key = {(r.task, r.threshold): r for r in plan.requests}
    assert {threshold for _, threshold in by_key} == {DENSE, 0.85, 0.80}
    for (task, threshold), request in by_key.items():  # each request continues where scoring stopped
        assert request.start == counts[threshold][task] < request.stop
    for task in ("a", "c"):  # the bracket and dense end on the same item
        assert by_key[(task, 0.85)].stop == by_key[(task, 0.80)].stop == by_key[(task, DENSE)].stop
    assert by_key[("b", 0.80)].stop >= 700  # b's sparser bracket point catches up with its 700 items
    assert all(r.stop <= 2 * counts[r.threshold][r.task] for r in plan.requests)  # grows at most twofold a step
    assert str(ItemRequest("b", 0.8, 500, 1000)) == "score items [500, 1000) of task b at threshold 0.8"


def test_a_denser_point_within_the_target_of_the_crossing_gets_items_while_its_lower_band_misses():
    """The interval's lower end is the last point whose lower band clears 0.99: a denser point within
    the target half-width of the crossing gets items with the bracket; one further away does not."""
    tasks = PairedTasks(3)
    dense, sparse = tasks.scored(_start(500))
    grid = {v: s for v, (s, _) in GRID.items()}
    near = {**grid, 0.90: 0.54}  # just denser than a = 0.85 (0.55); crossing about 0.62 on these items
    plan = plan_items(dense, sparse, near, {t: AVAILABLE for t in ACCURACY}, target_halfwidth=0.1)
    assert plan.bracket == (0.85, 0.80) and plan.crossing - 0.1 <= 0.54 < plan.crossing
    for value in (0.90, 0.85):  # 500 items cannot lift either lower band over 0.99
        assert plan.normalized[value][0] - 1.96 * plan.normalized[value][1] < 0.99
    assert {r.threshold for r in plan.requests} == {DENSE, 0.90, 0.85, 0.80}
    far = plan_items(dense, sparse, grid, {t: AVAILABLE for t in ACCURACY}, target_halfwidth=0.1)  # 0.90 at 0.45
    assert {r.threshold for r in far.requests} == {DENSE, 0.85, 0.80}


def test_crossing_and_errors_match_critical_sparsity_and_a_bootstrap():
    tasks = PairedTasks(7)
    n = 8000
    dense, sparse = tasks.scored(_start(n))
    sparsity = {v: s for v, (s, _) in GRID.items()}
    plan = plan_items(dense, sparse, sparsity, {t: AVAILABLE for t in ACCURACY}, target_halfwidth=1e-6)
    values = list(GRID)
    curve = task_average_curves([np.stack([sparse[v][t] for v in values]) for t in ACCURACY],
                                [dense[t] for t in ACCURACY])
    assert plan.crossing == pytest.approx(critical_sparsity([sparsity[v] for v in values], curve).interpolated)
    for v, score in zip(values, curve):
        assert plan.normalized[v][0] == pytest.approx(score)
    # a second, independent estimate: the paired item bootstrap of the same task-average curve
    indices = [bootstrap_indices(n, 600, seed) for seed in range(len(ACCURACY))]
    curves = task_average_curves([np.stack([sparse[v][t] for v in values]) for t in ACCURACY],
                                 [dense[t] for t in ACCURACY], indices)
    for i, v in enumerate(values[2:6], start=2):
        assert plan.normalized[v][1] == pytest.approx(curves[:, i].std(), rel=0.12)
    crossings = [critical_sparsity([sparsity[v] for v in values], row).interpolated for row in curves]
    assert plan.crossing_se == pytest.approx(np.std(crossings), rel=0.2)
    # the reported interval (the curve shifted by its pointwise bands) holds the bootstrap's 95% interval
    low, high = np.percentile(crossings, [2.5, 97.5])
    assert plan.interval[0] <= low < high <= plan.interval[1]
    assert plan.halfwidth <= 0.75 * (high - low)
    # its ends: the crossings of the curve shifted down and up by 1.96 standard errors, read again here
    errors = np.array([plan.normalized[v][1] for v in values])
    shifted = [critical_sparsity([sparsity[v] for v in values], curve + sign * 1.959964 * errors).interpolated
               for sign in (-1, 1)]
    assert plan.band == pytest.approx(tuple(shifted)) and plan.band[0] < plan.crossing < plan.band[1]
    assert plan.halfwidth == pytest.approx(max(plan.crossing - plan.band[0], plan.band[1] - plan.crossing))


def test_paired_ratio_influence_reproduces_the_delta_variance():
    dense = np.tile([1, 1, 1, 0, 1, 0, 1, 1], 10).astype(float)
    sparse = np.tile([1, 0, 1, 0, 1, 1, 1, 0], 10).astype(float)
    ratio, psi = paired_ratio(sparse, dense)
    assert ratio == pytest.approx(50 / 60)
    assert psi.sum() == pytest.approx(0.0)  # influences of a ratio estimator sum to zero
    np.testing.assert_allclose(psi, (sparse - ratio * dense) / 0.75)
    # var(S/D) by the delta method written out: (var S - 2 R cov(S, D) + R^2 var D) / (n D^2)
    cov = np.cov(sparse, dense)
    expected = (cov[0, 0] - 2 * ratio * cov[0, 1] + ratio**2 * cov[1, 1]) / (80 * 0.75**2)
    (score, se, _), = task_average_with_error({"t": dense}, {0.9: {"t": sparse}}).values()
    assert score == pytest.approx(50 / 60) and se**2 == pytest.approx(expected)
    # no item changed yet: the rule-of-three floor (3 of n items discordant), not a zero error
    (_, se, _), = task_average_with_error({"t": dense}, {0.9: {"t": dense}}).values()
    assert se == pytest.approx(np.sqrt(3 / 80 / 0.75**2 / 80))


def test_no_crossing_and_bad_input():
    tasks = PairedTasks(2)
    dense, sparse = tasks.scored(_start(300))
    easy = {v: sparse[v] for v in (0.99, 0.95)}
    plan = plan_items(dense, easy, {0.99: 0.2, 0.95: 0.35}, {t: AVAILABLE for t in ACCURACY})
    assert plan.status == "no_crossing" and "add sparser thresholds" in plan.reason and plan.requests == []
    sparsity = {v: s for v, (s, _) in GRID.items()}
    with pytest.raises(ValueError, match="score dense on every item first"):
        longer = {v: dict(by_task) for v, by_task in sparse.items()}
        longer[0.85]["a"] = tasks.sparse[0.85]["a"][:400]
        plan_items(dense, longer, sparsity, {t: AVAILABLE for t in ACCURACY})
    with pytest.raises(ValueError, match="every threshold needs every task"):
        plan_items(dense, {**sparse, 0.85: {"a": sparse[0.85]["a"]}}, sparsity, {t: AVAILABLE for t in ACCURACY})
    with pytest.raises(ValueError, match="dense score is 0"):
        plan_items({**dense, "a": np.zeros(300)}, sparse, sparsity, {t: AVAILABLE for t in ACCURACY})
    with pytest.raises(ValueError, match="measured sparsity is needed"):
        plan_items(dense, sparse, {0.99: 0.2}, {t: AVAILABLE for t in ACCURACY})
    with pytest.raises(ValueError, match="item count in `available`"):
        plan_items(dense, sparse, sparsity, {"a": AVAILABLE})


def test_interval_stays_open_while_the_sparsest_point_may_still_pass():
    tasks = PairedTasks(4)
    dense, sparse = tasks.scored(_start(300))
    two = {v: sparse[v] for v in (0.85, 0.80)}
    plan = plan_items(dense, two, {0.85: 0.55, 0.80: 0.62}, {t: AVAILABLE for t in ACCURACY})
    assert plan.normalized[0.80][0] + 1.96 * plan.normalized[0.80][1] >= 0.99  # 300 items cannot exclude it
    assert plan.halfwidth == float("inf") and plan.band[1] == float("inf") and plan.status == "continue"
    assert {r.threshold for r in plan.requests} == {DENSE, 0.85, 0.80}


def test_allocation_is_proportional_to_the_root_variance_and_meets_the_limit():
    from common.analysis.item_planner import _allocation

    needed = _allocation({"a": 0.0, "b": 4.0, "c": 1.0}, {"a": 10, "b": 100, "c": 100}, 0.09)
    assert needed == {"a": 1, "b": 67, "c": 34}  # (2 + 1) / 0.09 * sqrt(V), rounded up
    assert 4.0 / needed["b"] + 1.0 / needed["c"] <= 0.09
    # a task capped at its size leaves the rest of the variance to the others
    capped = _allocation({"b": 4.0, "c": 1.0}, {"b": 50, "c": 1000}, 0.09)
    assert capped["b"] == 50 and 4.0 / 50 + 1.0 / capped["c"] <= 0.09 <= 4.0 / 50 + 1.0 / (capped["c"] - 1) + 1e-9


def test_band_interval_matches_a_hand_computation_and_the_plan():
    """Two tasks, three thresholds: the band's ends are where the task average shifted by -1.96
    and +1.96 standard errors crosses 0.99, computed here directly from the items."""
    rng = np.random.default_rng(5)
    dense = {"a": (rng.random(4000) < 0.6).astype(float), "b": (rng.random(3000) < 0.5).astype(float)}
    flip = {0.95: 0.0, 0.9: 0.03, 0.8: 0.1}  # share of correct items each threshold breaks
    sparse = {v: {t: np.where(rng.random(d.size) < f, 0.0, d) for t, d in dense.items()} for v, f in flip.items()}
    sparsity = {0.95: 0.2, 0.9: 0.4, 0.8: 0.6}

    def shifted(sign):
        points = []
        for v in sorted(flip, reverse=True):
            ratios, variance = [], 0.0
            for t, d in dense.items():
                s, m = sparse[v][t], d.mean()
                r = s.mean() / m
                psi = (s - r * d) / m
                variance += max(psi.var(ddof=1), 3 / d.size / m**2) / d.size
                ratios.append(r)
            points.append((sparsity[v], np.mean(ratios) + sign * 1.959963984540054 * np.sqrt(variance) / 2))
        (s_a, n_a), (s_b, n_b) = next((a, b) for a, b in zip(points, points[1:]) if a[1] >= 0.99 > b[1])
        return s_a + (n_a - 0.99) / (n_a - n_b) * (s_b - s_a)

    low, high = band_interval(dense, sparse, sparsity)
    assert (low, high) == (pytest.approx(shifted(-1)), pytest.approx(shifted(+1)))
    assert low < critical_sparsity(list(sparsity.values()),
                                   [task_average_with_error(dense, sparse)[v][0] for v in sparsity]).interpolated < high
    plan = plan_items(dense, sparse, sparsity, {"a": 4000, "b": 3000})
    assert plan.band == (pytest.approx(low), pytest.approx(high))
    # an upper band still above 0.99 at the sparsest point leaves the interval open
    assert band_interval(dense, {0.95: sparse[0.95]}, {0.95: 0.2})[1] == float("inf")
