"""Isotonic crossing, resampled curves and the exact McNemar test, against hand computations."""

import math

import numpy as np
import pytest

from common.analysis.critical import (Z95, band_bounds, bootstrap_indices, critical_sparsity, draw_counts,
                                      isotonic_crossing, isotonic_fit, isotonic_interval, mcnemar_exact,
                                      perplexity_curves, pointwise_band_interval, resampled_band,
                                      task_average_curves)
from common.evaluation.sweep import perplexity


def test_isotonic_crossing_pools_a_noisy_recovery():
    # 0.98 then 1.0 violate "non-increasing": pooled to 0.99; fitted [1.0, 0.99, 0.99, 0.9]
    sparsity, normalized = [0.0, 0.2, 0.4, 0.6], [1.0, 0.98, 1.0, 0.9]
    _, fitted = isotonic_fit(sparsity, normalized)
    np.testing.assert_allclose(fitted, [1.0, 0.99, 0.99, 0.9])
    crossing, status = isotonic_crossing(sparsity, normalized, threshold=0.985)
    assert status == "crossed"
    assert crossing == pytest.approx(0.4 + (0.99 - 0.985) / (0.99 - 0.9) * 0.2)  # 0.4111
    # the grid reading believes the recovery: it crosses later
    grid = critical_sparsity(sparsity, normalized, threshold=0.985)
    assert grid.grid == 0.4 and grid.interpolated == pytest.approx(0.4 + (1.0 - 0.985) / (1.0 - 0.9) * 0.2)


def test_isotonic_crossing_of_a_three_point_block_and_unsorted_input():
    # 0.97, 0.99, 1.0 pool to 2.96 / 3; the crossing is between the dense point and that block
    sparsity, normalized = [0.0, 0.1, 0.2, 0.3, 0.4], [1.0, 0.97, 0.99, 1.0, 0.8]
    crossing, status = isotonic_crossing(sparsity, normalized, threshold=0.99)
    block = (0.97 + 0.99 + 1.0) / 3
    assert status == "crossed" and crossing == pytest.approx(0.1 * (1.0 - 0.99) / (1.0 - block))  # 0.075
    order = [3, 0, 4, 2, 1]
    assert isotonic_crossing(np.take(sparsity, order), np.take(normalized, order), 0.99) == (crossing, status)


def test_isotonic_crossing_status_at_the_ends():
    assert isotonic_crossing([0.1, 0.3], [0.95, 0.9]) == (0.0, "never_reached")
    assert isotonic_crossing([0.1, 0.3], [1.0, 0.999]) == (0.3, "all_above")
    # a rise after a first point is pooled with it: (0.99 + 1.0) / 2 passes, (0.96 + 1.0) / 2 does not
    crossing, status = isotonic_crossing([0.0, 0.2, 0.4], [0.99, 1.0, 0.9], threshold=0.99)
    assert status == "crossed" and crossing == pytest.approx(0.2 + (0.995 - 0.99) / (0.995 - 0.9) * 0.2)
    assert isotonic_crossing([0.0, 0.2, 0.4], [0.96, 1.0, 0.9], threshold=0.99) == (0.0, "never_reached")
    with pytest.raises(ValueError, match="matching, non-empty"):
        isotonic_fit([0.1, 0.2], [1.0])


def test_task_average_curves_resample_items_in_pairs():
    rng = np.random.default_rng(0)
    dense = [rng.integers(0, 2, 20).astype(float), np.zeros(8)]  # the second task has no normalized score
    dense[0][0] = 1
    sparse = [rng.integers(0, 2, (3, 20)).astype(float), rng.integers(0, 2, (3, 8)).astype(float)]
    np.testing.assert_allclose(task_average_curves(sparse, dense), sparse[0].mean(axis=1) / dense[0].mean())
    indices = [bootstrap_indices(20, 50, seed=1), bootstrap_indices(8, 50, seed=2)]
    counts = draw_counts(indices[0])
    assert (counts.sum(axis=1) == 20).all() and counts[0, indices[0][0, 0]] == (indices[0][0] == indices[0][0, 0]).sum()
    expected = [sparse[0][:, row].mean(axis=1) / dense[0][row].mean() if dense[0][row].sum() else np.full(3, np.nan)
                for row in indices[0]]  # item by item, gathered
    np.testing.assert_allclose(task_average_curves(sparse, dense, indices), expected)
    two = [sparse[0], sparse[0] * 0]
    expected = sparse[0].mean(axis=1) / dense[0].mean() / 2  # the mean of the ratio and 0
    np.testing.assert_allclose(task_average_curves(two, [dense[0], dense[0]]), expected)


def test_perplexity_curves_equal_the_ratio_of_perplexities():
    rng = np.random.default_rng(1)
    words = rng.integers(5, 40, 12)
    dense = -rng.random(12) * words * 3
    sparse = dense - rng.random((4, 12)) * words * 0.1
    as_items = lambda logliks: [{"loglikelihood": l, "words": w} for l, w in zip(logliks, words)]
    expected = [perplexity(as_items(dense)) / perplexity(as_items(row)) for row in sparse]
    np.testing.assert_allclose(perplexity_curves(sparse, dense, words), expected)
    indices = bootstrap_indices(12, 5, seed=3)
    row = indices[2]
    drawn = lambda logliks: [{"loglikelihood": logliks[i], "words": words[i]} for i in row]
    resampled = [perplexity(drawn(dense)) / perplexity(drawn(s)) for s in sparse]
    np.testing.assert_allclose(perplexity_curves(sparse, dense, words, indices)[2], resampled)


def test_isotonic_interval_brackets_the_crossing_of_identical_resamples():
    curve = np.array([1.0, 0.995, 0.98, 0.9])
    low, high = isotonic_interval([0.0, 0.2, 0.4, 0.6], np.tile(curve, (10, 1)))
    assert low == high == pytest.approx(isotonic_crossing([0.0, 0.2, 0.4, 0.6], curve)[0])
    assert all(math.isnan(x) for x in isotonic_interval([0.0, 0.2], np.full((3, 2), np.nan)))


def test_mcnemar_exact_equals_the_binomial_sum():
    # 7 items only dense gets right, 1 only sparse: p = 2 * (C(8,0) + C(8,1)) / 2^8
    dense = np.array([1] * 7 + [0] + [1] * 5 + [0] * 3)
    sparse = np.array([0] * 7 + [1] + [1] * 5 + [0] * 3)
    result = mcnemar_exact(sparse, dense)
    assert (result["dense_only_correct"], result["sparse_only_correct"], result["items"]) == (7, 1, 16)
    assert result["p_value"] == pytest.approx(2 * (math.comb(8, 0) + math.comb(8, 1)) / 2 ** 8)  # 0.0703125
    # 2 against 5: p = 2 * (1 + 7 + 21) / 128
    dense, sparse = np.array([1, 1, 0, 0, 0, 0, 0]), np.array([0, 0, 1, 1, 1, 1, 1])
    assert mcnemar_exact(sparse, dense)["p_value"] == pytest.approx(2 * (1 + 7 + 21) / 2 ** 7)
    assert mcnemar_exact([1, 0, 1], [1, 0, 1])["p_value"] == 1.0  # no discordant items
    assert mcnemar_exact([0, 1, 0, 1], [1, 0, 1, 0])["p_value"] == 1.0  # balanced: capped at 1
    with pytest.raises(ValueError, match="0/1 correctness"):
        mcnemar_exact([0.5, 1], [1, 1])
    with pytest.raises(ValueError, match="same items"):
        mcnemar_exact([1, 0], [1, 0, 1])


def test_pointwise_band_interval_by_hand():
    # points out of order; sorted and shifted down by 1.96 se: [1.0, 0.99814, 0.96040, 0.88040], up: [1.0, 1.01186,
    # 0.99960, 0.91960]
    sparsity, scores, errors = [0.4, 0.0, 0.2, 0.6], [0.98, 1.0, 1.005, 0.9], [0.01, 0.0, 0.0035, 0.01]
    low, high = pointwise_band_interval(sparsity, scores, errors, 0.99)
    lower_a, lower_b = 1.005 - Z95 * 0.0035, 0.98 - Z95 * 0.01  # the last point clearing 0.99, the next one
    assert low == pytest.approx(0.2 + (lower_a - 0.99) / (lower_a - lower_b) * 0.2)
    upper_a, upper_b = 0.98 + Z95 * 0.01, 0.9 + Z95 * 0.01
    assert high == pytest.approx(0.4 + (upper_a - 0.99) / (upper_a - upper_b) * 0.2)
    assert pointwise_band_interval([0.0, 0.5], [1.0, 0.99], [0.0, 0.01], 0.99)[1] == math.inf  # open above
    assert band_bounds((low, high)) == f"[{low:.3f}, {high:.3f}]"
    assert band_bounds([0.0, math.inf]) == band_bounds([0.0, None]) == "[0.000, open)"  # null: inf after JSON


def test_resampled_band_shifts_the_perplexity_ratio_by_its_resampled_deviation():
    rng = np.random.default_rng(2)
    words = rng.integers(5, 40, 30)
    dense = -rng.random(30) * words * 3
    sparsity = np.array([0.1, 0.2, 0.3, 0.4])
    sparse = dense - np.outer(sparsity ** 2, words) * 0.2 * rng.uniform(0.5, 1.5, (4, 30))
    indices = bootstrap_indices(30, 400, seed=1)
    ratio = perplexity_curves(sparse, dense, words)
    spread = np.array([np.std([perplexity_curves(sparse, dense, words, indices[i:i + 1])[0, p] for i in range(400)],
                              ddof=1) for p in range(4)])
    threshold = float(ratio[1] - 0.3 * (ratio[1] - ratio[2]))  # a crossing between the second and third point
    expected = pointwise_band_interval(sparsity, ratio, spread, threshold)
    resampled = perplexity_curves(sparse, dense, words, indices)
    assert resampled_band(sparsity, ratio, resampled, threshold) == pytest.approx(expected)
    low, high = expected
    assert low < isotonic_crossing(sparsity, ratio, threshold)[0] < high
