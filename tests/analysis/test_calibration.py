"""The search's calibration on synthetic sweeps: the readings it compares and the rates it reports."""

import math

import numpy as np
import pytest

from common.analysis.calibration import (bisection_crossing, calibrate, calibrate_sweep, check_calibration_settings,
                                         grid_step_at, markdown_table, summarize)
from common.analysis.critical import isotonic_crossing, task_average_curves
from common.analysis.synthetic import SyntheticSweep, sparsity_of
from common.evaluation.sweep import PAPER_DENSE_GRID


def test_grid_step_is_the_width_of_the_interval_holding_the_point():
    grid = [0.0, 0.1, 0.15, 0.4]
    assert grid_step_at(grid, 0.12) == pytest.approx(0.05)
    assert grid_step_at(grid, 0.1) == pytest.approx(0.05)  # a grid point starts the interval above it
    assert grid_step_at(grid, 0.0) == pytest.approx(0.1)
    assert grid_step_at(grid, 0.9) == pytest.approx(0.25)  # beyond the grid: its last interval
    assert grid_step_at(list(reversed(grid)), 0.3) == pytest.approx(0.25)


def test_one_sweep_compares_the_grid_reading_the_search_and_the_truth():
    sweep = SyntheticSweep(items=200, noise=0.05, centre=0.5, seed=3)
    row = calibrate_sweep(sweep, PAPER_DENSE_GRID, iterations=200, seed=3)
    results = [sweep.items(v) for v in PAPER_DENSE_GRID]
    curve = task_average_curves([np.stack([r[t] for r in results]) for t in range(4)], sweep.dense)
    expected, status = isotonic_crossing([sparsity_of(v) for v in PAPER_DENSE_GRID], curve)
    assert status == "crossed" and row["grid"] == pytest.approx(expected)
    assert row["truth"] == pytest.approx(sweep.true_crossing())
    assert row["grid_interval"][0] <= row["grid"] <= row["grid_interval"][1]
    assert row["search_interval"][0] <= row["search"] <= row["search_interval"][1]
    assert row["search_new_values"] == len(sweep.calls) <= 8  # the grid was read without calling evaluate
    assert row["bisection_values"] == 9 and row["bisection"] == pytest.approx(bisection_crossing(sweep)[0])


class Step:
    """A sweep whose task-average score is 1 at rule values from 0.3 up and 0.5 below."""

    def __init__(self, edge: float = 0.3):
        self.dense, self.edge = [np.ones(10)], edge

    def items(self, value):
        return [np.ones(10) if value >= self.edge else np.r_[np.ones(5), np.zeros(5)]]


def test_bisection_halves_the_bracket_to_a_hundredth_and_reads_its_points():
    crossing, values = bisection_crossing(Step())
    # 1.0 and 0.0 bracket; 0.5 passes, 0.25 fails, 0.375 and 0.3125 pass, 0.28125 and 0.296875
    # fail, 0.304688 passes: the bracket is 0.0078 wide after 9 values
    assert values == 9
    s_pass, s_fail = sparsity_of(0.304688), sparsity_of(0.296875)
    assert crossing == pytest.approx(s_pass + (1 - 0.99) / (1 - 0.5) * (s_fail - s_pass))
    never, values = bisection_crossing(Step(edge=-1.0))  # 0.0 already scores 1: the ends do not bracket
    assert math.isnan(never) and values == 2


@pytest.mark.parametrize("chance, persistence, fragile", [(0.25, 0.0, 0.0), (0.5, 0.8, 0.0), (0.25, 0.0, 0.3)])
def test_the_expected_curve_is_the_mean_of_a_large_sample(chance, persistence, fragile):
    """The truth every rate is measured against: the closed-form expected curve against the
    normalized score of 400,000 items, near sparsity 0 as well, where half the break points of
    this wide distribution would lie below 0 without the fold; persistent guesses leave it as it
    is, fragile items (uniform break points) add their straight decline."""
    sweep = SyntheticSweep(tasks=1, items=400_000, accuracy=0.5, centre=0.05, scale=0.1, noise=0.1, seed=7,
                           chance=chance, persistence=persistence, fragile=fragile)
    assert sweep.expected(0.0) == 1.0 and all((b > 0).all() for b in sweep.breaks)
    for target in (0.005, 0.05, 0.2, 0.5):
        value = 1.0 - (target / 0.95) ** (1 / 0.35)
        s, (items,) = sweep.evaluate(value)
        assert s == pytest.approx(target)
        assert items.sum() / sweep.dense[0].sum() == pytest.approx(sweep.expected(s), abs=0.005)
    truth = sweep.true_crossing()
    assert 0 < truth < 0.05 and sweep.expected(truth) == pytest.approx(0.99)


def test_fragile_items_break_uniformly_and_slow_the_decline_before_the_cliff():
    """A 0.3 fragile share: about 30% of break points replaced by uniform draws (the rest stay the
    folded logistic draws of the same seed), and the expected curve at 0.2, before a cliff at 0.8,
    is 0.7 x 0.9999547 + 0.3 x (1 - 0.2) (the logistic part, by hand: 1 / (1 + e^-10) + 1 / (1 + e^(50/3)))."""
    plain = SyntheticSweep(tasks=1, items=100_000, centre=0.8, scale=0.06, noise=0.0, seed=3)
    fragile = SyntheticSweep(tasks=1, items=100_000, centre=0.8, scale=0.06, noise=0.0, seed=3, fragile=0.3)
    changed = plain.breaks[0] != fragile.breaks[0]
    assert changed.mean() == pytest.approx(0.3, abs=0.01)
    assert fragile.breaks[0][changed].mean() == pytest.approx(0.5, abs=0.01)  # uniform on [0, 1]
    assert (plain.dense[0] == fragile.dense[0]).all()
    assert plain.expected(0.2) == pytest.approx(0.9999547, abs=1e-7)
    assert fragile.expected(0.2) == pytest.approx(0.7 * 0.9999547 + 0.3 * 0.8, abs=1e-7)


def test_summary_rates_match_a_hand_count():
    rows = [{"truth": 0.30, "grid": 0.32, "grid_interval": [0.25, 0.35], "grid_step": 0.05, "search": 0.40,
             "search_interval": [0.33, 0.45], "search_values": 8, "search_new_values": 8, "stopped": "budget",
             "band_interval": [0.10, 0.50], "search_band_interval": [0.20, 0.60], "grid_replicate": 0.36,
             "bisection": 0.36},
            {"truth": 0.50, "grid": 0.52, "grid_interval": [0.45, 0.60], "grid_step": 0.10, "search": 0.50,
             "search_interval": [0.46, 0.55], "search_values": 6, "search_new_values": 6, "stopped": "converged",
             "band_interval": [0.51, 0.70], "search_band_interval": [0.40, float("inf")],
             "grid_replicate": float("nan"), "bisection": float("nan")}]
    s = summarize(rows)
    assert s["crossed"] == 2 and s["search_within_one_grid_step"] == 0.5  # |0.40-0.32| > 0.05, |0.50-0.52| <= 0.1
    assert s["replicate_within_one_grid_step"] == 0.5  # |0.36-0.32| <= 0.05; a replicate that never crossed misses
    assert s["bisection_within_one_grid_step"] == 0.5  # the same, for a bisection whose ends did not bracket
    assert s["median_error"]["bisection"] == pytest.approx(0.06)  # the one bisection that bracketed
    assert s["coverage"] == {"search": 0.5, "grid": 1.0, "band": 0.5, "search_band": 1.0}
    assert s["truth_below_interval"] == {"search": 0.5, "grid": 0.0, "band": 0.5, "search_band": 0.0}
    assert s["median_error"]["search"] == pytest.approx(0.05) and s["median_error"]["grid"] == pytest.approx(0.02)
    assert s["mean_signed_error"]["search"] == pytest.approx(0.05)
    assert s["median_interval_width"]["grid"] == pytest.approx(0.125)
    assert s["median_interval_width"]["band"] == pytest.approx(0.295)
    assert s["median_interval_width"]["search_band"] == float("inf")  # an open band is infinitely wide
    assert s["search_values_mean"] == 7 and s["search_new_values_max"] == 8
    assert s["stopped"] == {"budget": 1, "converged": 1}
    assert summarize([]) == {"crossed": 0}


def test_calibration_separates_few_items_from_many():
    """What the report's calibration table says, on 20 sweeps each: at 30 items per task the
    search's bootstrap interval misses the truth in about half the sweeps (mostly lying above it)
    while the planner's band covers it; at 1000 items the search lands within one grid step of the
    grid and the band still covers the truth in nearly every sweep."""
    few = calibrate(30, 0.1, sweeps=20, iterations=300)
    assert few["crossed"] >= 18 and len(few["rows"]) == few["crossed"]
    assert few["coverage"]["search"] <= 0.7 and few["truth_below_interval"]["search"] >= 0.3
    assert few["coverage"]["band"] >= 0.9 and few["coverage"]["search_band"] >= 0.9
    many = calibrate(1000, 0.02, sweeps=20, iterations=300)
    assert many["search_within_one_grid_step"] >= 0.9 and many["search_new_values_max"] <= 8
    assert many["coverage"]["band"] >= 0.85
    assert many["median_interval_width"]["search"] < few["median_interval_width"]["search"]
    table = markdown_table([many, {"items": 5, "noise": 0.1, "crossed": 0}])
    assert table.count("\n") == 3 and "| 1000 | 0.02 | 0.06 | 20 |" in table and "| 5 | 0.1 | 0.06 | 0 |" in table


@pytest.mark.parametrize("items, noise, sweeps, message", [
    ([1], [0.1], 10, "--items"), ([], [0.1], 10, "--items"), ([30], [1.5], 10, "--noise"),
    ([30], [float("nan")], 10, "--noise"), ([30], [0.1], 0, "--sweeps")])
def test_bad_calibration_settings_are_refused_in_one_line(items, noise, sweeps, message):
    with pytest.raises(ValueError, match=message) as error:
        check_calibration_settings(items, noise, sweeps)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("budget, iterations, scales, message", [
    (1, 1000, [0.06], "--budget"), (8, 50, [0.06], "--iterations"), (8, 1000, [0.0], "--scale"),
    (8, 1000, [], "--scale"), (8, 1000, [float("inf")], "--scale")])
def test_bad_budget_resamples_or_scale_are_refused(budget, iterations, scales, message):
    with pytest.raises(ValueError, match=message):
        check_calibration_settings([30], [0.1], 10, budget, iterations, scales)
    with pytest.raises(ValueError, match="--spread"):
        check_calibration_settings([30], [0.1], 10, spread=2.0)


def test_a_replicate_keeps_the_items_and_redraws_the_guesses():
    """The replicate grid of a row: the same dense answers and break points, other chance guesses
    (as another precision rounds a real sweep differently), read the same way as the grid."""
    sweep = SyntheticSweep(items=200, noise=0.1, centre=0.7, scale=0.1, seed=5)
    twin = sweep.replica()
    assert twin.replicate == 1 and all((a == b).all() for a, b in zip(sweep.dense, twin.dense))
    assert all((a == b).all() for a, b in zip(sweep.breaks, twin.breaks))
    assert any((a != b).any() for a, b in zip(sweep.items(0.5), twin.items(0.5)))
    assert all((a == b).all() for a, b in zip(sweep.items(0.5), SyntheticSweep(
        items=200, noise=0.1, centre=0.7, scale=0.1, seed=5).items(0.5)))  # replicate 0: the original draws
    row = calibrate_sweep(sweep, PAPER_DENSE_GRID, iterations=100, seed=5)
    results = [twin.items(v) for v in PAPER_DENSE_GRID]
    curve = task_average_curves([np.stack([r[t] for r in results]) for t in range(4)], twin.dense)
    expected, status = isotonic_crossing([sparsity_of(v) for v in PAPER_DENSE_GRID], curve)
    assert status == "crossed" and row["grid_replicate"] == pytest.approx(expected)
    assert row["grid_replicate"] != row["grid"]


def _flips(sweep, value):
    return np.concatenate(sweep.items(value)) != np.concatenate(sweep.dense)


def test_a_replicate_redraws_the_persistent_guesses():
    sweep = SyntheticSweep(items=500, noise=0.3, chance=0.5, persistence=1.0, seed=4)
    again = SyntheticSweep(items=500, noise=0.3, chance=0.5, persistence=1.0, seed=4)
    twin = sweep.replica()
    assert twin.persistence == 1.0 and (_flips(sweep, 0.95) == _flips(again, 0.95)).all()
    assert (_flips(sweep, 0.95) != _flips(twin, 0.95)).any()
    assert all((a == b).all() for a, b in zip(sweep.breaks, twin.breaks))


def test_calibration_records_and_prints_the_guess_settings():
    summary = calibrate(100, 0.2, sweeps=3, iterations=100, scale=0.1, chance=0.5, persistence=0.8)
    assert (summary["chance"], summary["persistence"]) == (0.5, 0.8)
    assert "| 100 | 0.2 (chance 0.5, persistence 0.8) | 0.1 |" in markdown_table([summary])
    with pytest.raises(ValueError, match="--persistence"):
        check_calibration_settings([30], [0.1], 10, persistence=1.5)
    with pytest.raises(ValueError, match="--chance"):
        check_calibration_settings([30], [0.1], 10, chance=0.0)
    with pytest.raises(ValueError, match="--fragile"):
        check_calibration_settings([30], [0.1], 10, fragile=-0.1)
    fragile = calibrate(100, 0.2, sweeps=2, iterations=100, fragile=0.05)
    assert fragile["fragile"] == 0.05 and "| 100 | 0.2 | 0.06, 0.05 fragile |" in markdown_table([fragile])


def test_on_curves_shaped_like_real_ones_a_second_grid_rarely_agrees():
    """The report's reading of the real-like rows, on 30 sweeps of 50 items per task: persistent
    flips (the same sweeps otherwise) bring a replicate grid within one grid step of the grid less
    often (10 of 30 against 17), the search stays well above the replicate (23 of 30), and the
    grid's interval is wide, as on the real grids."""
    settings = {"sweeps": 30, "iterations": 200, "chance": 0.5, "fragile": 0.05}
    persistent = calibrate(50, 0.2, persistence=0.8, **settings)
    independent = calibrate(50, 0.2, persistence=0.0, **settings)
    assert persistent["crossed"] == independent["crossed"] == 30
    assert persistent["replicate_within_one_grid_step"] <= independent["replicate_within_one_grid_step"] - 0.15
    assert persistent["search_within_one_grid_step"] >= persistent["replicate_within_one_grid_step"] + 0.3
    assert persistent["median_interval_width"]["grid"] > 0.2
