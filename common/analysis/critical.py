"""Critical sparsity: the highest measured sparsity at which the model keeps >= 99% of its dense
score, from a curve of (measured sparsity, normalized score) points.

Readings, always reported together:

* ``grid``: the highest measured sparsity among the evaluated points whose normalized score is
  >= the threshold (the paper's definition on its grid);
* ``interpolated``: the linear crossing of the threshold between that point and the next
  sparser evaluated point (which is below the threshold by construction).

Non-monotone curves: points above the threshold beyond a dip still count (the definition is
"highest sparsity with >= 99%"), so a noisy recovery can raise the estimate; the status field
says when the curve never reaches the threshold or never leaves it. A paired bootstrap over
items gives intervals for normalized scores and for the critical sparsity.

A third reading, ``isotonic``, uses every point: the least-squares non-increasing fit of the
score against measured sparsity (pool-adjacent-violators), crossed linearly between fitted
points; its paired-bootstrap interval refits every resample. The noise-aware search
(``common.analysis.search``) and the grid report share it. An exact McNemar test says whether
sparse and dense correctness differ on the same items at the critical value.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class CriticalSparsity:
    grid: float  # highest evaluated sparsity with score >= threshold (0.0 if none)
    interpolated: float  # linear crossing between that point and the next sparser one
    status: str  # "crossed", "all_above" (a lower bound), "never_reached" (below every evaluated point)
    grid_value: float | None = None  # the rule value (threshold p) of the grid point, when known

    def as_dict(self) -> dict:
        return asdict(self)


def critical_sparsity(sparsity, normalized, threshold: float = 0.99, values=None) -> CriticalSparsity:
    """Critical sparsity of one curve. ``sparsity`` and ``normalized`` are per evaluated point."""
    s = np.asarray(sparsity, dtype=float)
    n = np.asarray(normalized, dtype=float)
    if s.shape != n.shape or s.size == 0:
        raise ValueError("critical sparsity needs matching, non-empty sparsity and score lists")
    order = np.argsort(s, kind="stable")
    s, n = s[order], n[order]
    vals = None if values is None else np.asarray(values, dtype=float)[order]
    passing = np.flatnonzero(n >= threshold)
    if passing.size == 0:
        return CriticalSparsity(0.0, 0.0, "never_reached")
    best = passing[-1]
    grid = float(s[best])
    value = None if vals is None else float(vals[best])
    if best == s.size - 1:
        return CriticalSparsity(grid, grid, "all_above", value)
    s_a, n_a, s_b, n_b = s[best], n[best], s[best + 1], n[best + 1]
    fraction = (n_a - threshold) / (n_a - n_b) if n_a != n_b else 0.0
    return CriticalSparsity(grid, float(s_a + fraction * (s_b - s_a)), "crossed", value)


def paired_bootstrap_ratio(sparse_items, dense_items, iterations: int = 1000, seed: int = 0,
                           indices: np.ndarray | None = None) -> tuple[float, float]:
    """95% interval of mean(sparse) / mean(dense) over items resampled in pairs."""
    sparse_items = np.asarray(sparse_items, dtype=float)
    dense_items = np.asarray(dense_items, dtype=float)
    if indices is None:
        indices = bootstrap_indices(len(dense_items), iterations, seed)
    dense_means = dense_items[indices].mean(axis=1)
    ratios = sparse_items[indices].mean(axis=1) / np.where(dense_means == 0, np.nan, dense_means)
    if np.isnan(ratios).all():
        return math.nan, math.nan  # the dense score is 0 on every resample: no ratio exists
    low, high = np.nanpercentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def bootstrap_indices(items: int, iterations: int = 1000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, items, size=(iterations, items))


def bootstrap_critical(sparsity, sparse_item_scores, dense_item_scores, threshold: float = 0.99,
                       iterations: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the interpolated critical sparsity under a paired item bootstrap.

    ``sparse_item_scores`` is [points, items] (the same items at every point).
    """
    scores = np.asarray(sparse_item_scores, dtype=float)
    dense = np.asarray(dense_item_scores, dtype=float)
    indices = bootstrap_indices(dense.size, iterations, seed)
    dense_means = dense[indices].mean(axis=1)
    estimates = []
    for row, dense_mean in zip(indices, dense_means):
        if dense_mean == 0:
            continue
        normalized = scores[:, row].mean(axis=1) / dense_mean
        estimates.append(critical_sparsity(sparsity, normalized, threshold).interpolated)
    if not estimates:
        return math.nan, math.nan
    low, high = np.percentile(estimates, [2.5, 97.5])
    return float(low), float(high)


# ---- isotonic reading: a monotone fit through every evaluated point ---------------------------

def isotonic_fit(sparsity, normalized, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """(sorted sparsity, non-increasing least-squares fit of the score) by pool-adjacent-violators.

    The score can only fall as sparsity rises; a noisy rise is pooled with its neighbours instead
    of being read as a recovery, so every point informs the crossing.
    """
    from scipy.optimize import isotonic_regression

    s = np.asarray(sparsity, dtype=float)
    n = np.asarray(normalized, dtype=float)
    if s.shape != n.shape or s.ndim != 1 or s.size == 0:
        raise ValueError("the isotonic fit needs matching, non-empty sparsity and score lists")
    order = np.argsort(s, kind="stable")
    w = None if weights is None else np.asarray(weights, dtype=float)[order]
    return s[order], isotonic_regression(n[order], weights=w, increasing=False).x


def fitted_crossing(sparsity_sorted: np.ndarray, fitted: np.ndarray, threshold: float) -> tuple[float, str, int]:
    """(crossing, status, index of the last fitted point >= threshold, -1 if none) of a fitted
    non-increasing curve: the linear crossing between the last fitted point at or above the
    threshold and the next one. Status as in ``CriticalSparsity``."""
    passing = np.flatnonzero(fitted >= threshold)
    if passing.size == 0:
        return 0.0, "never_reached", -1
    k = int(passing[-1])
    if k == fitted.size - 1:
        return float(sparsity_sorted[k]), "all_above", k
    s_a, s_b, f_a, f_b = sparsity_sorted[k], sparsity_sorted[k + 1], fitted[k], fitted[k + 1]
    return float(s_a + (f_a - threshold) / (f_a - f_b) * (s_b - s_a)), "crossed", k


def isotonic_crossing(sparsity, normalized, threshold: float = 0.99, weights=None) -> tuple[float, str]:
    """(crossing, status) of the threshold on the isotonic fit of one curve."""
    s, fitted = isotonic_fit(sparsity, normalized, weights)
    crossing, status, _ = fitted_crossing(s, fitted, threshold)
    return crossing, status


def isotonic_crossings(sparsity, curves, threshold: float = 0.99) -> np.ndarray:
    """Isotonic crossing of every row of ``curves`` ([resamples, points]); rows with a NaN are dropped."""
    curves = np.atleast_2d(np.asarray(curves, dtype=float))
    return np.array([isotonic_crossing(sparsity, row, threshold)[0] for row in curves
                     if not np.isnan(row).any()])


def draw_counts(indices: np.ndarray) -> np.ndarray:
    """[resamples, items]: how often each item is drawn in each row of ``bootstrap_indices``, so a
    resampled mean is one matrix product instead of a [points, resamples, items] gather."""
    indices = np.asarray(indices)
    iterations, items = indices.shape
    offsets = indices + items * np.arange(iterations)[:, None]
    return np.bincount(offsets.ravel(), minlength=iterations * items).reshape(iterations, items).astype(float)


def task_average_curves(sparse_items, dense_items, indices=None) -> np.ndarray:
    """Task-average normalized score per point: the mean over tasks of mean(sparse) / mean(dense)
    on the same items. ``sparse_items[t]`` is [points, items_t], ``dense_items[t]`` is [items_t];
    with ``indices[t]`` ([resamples, items_t] from ``bootstrap_indices``: the items of task t drawn
    in each resample, paired across points and dense) the result is [resamples, points], else
    [points]. A task whose dense mean is 0 (in a resample) has no ratio and is left out of that
    average; NaN where every task is."""
    ratios = []
    for t, (sparse, dense) in enumerate(zip(sparse_items, dense_items)):
        sparse, dense = np.asarray(sparse, dtype=float), np.asarray(dense, dtype=float)
        if indices is None:
            sparse_sums, dense_sums = sparse.sum(axis=1), dense.sum()
        else:
            counts = draw_counts(indices[t])
            sparse_sums, dense_sums = counts @ sparse.T, (counts @ dense)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            ratios.append(np.where(dense_sums == 0, np.nan, sparse_sums / np.where(dense_sums == 0, 1, dense_sums)))
    stacked = np.stack(ratios)
    present = ~np.isnan(stacked)
    return np.where(present.any(axis=0), np.where(present, stacked, 0).sum(axis=0) / np.maximum(present.sum(axis=0), 1),
                    np.nan)


def perplexity_curves(sparse_logliks, dense_logliks, words, indices=None) -> np.ndarray:
    """Dense perplexity / sparse perplexity per point, from per-document log-likelihoods
    (``sparse_logliks`` [points, documents]) and word counts: exp((sum sparse - sum dense) / words).
    With ``indices`` ([resamples, documents], paired) the result is [resamples, points]."""
    sparse, dense, words = (np.asarray(a, dtype=float) for a in (sparse_logliks, dense_logliks, words))
    if indices is None:
        return np.exp((sparse.sum(axis=1) - dense.sum()) / words.sum())
    counts = draw_counts(indices)
    return np.exp((counts @ sparse.T - (counts @ dense)[:, None]) / (counts @ words)[:, None])


def isotonic_interval(sparsity, curves, threshold: float = 0.99) -> tuple[float, float]:
    """95% interval (2.5 and 97.5 percentiles) of the isotonic crossing over resampled curves."""
    crossings = isotonic_crossings(sparsity, curves, threshold)
    if crossings.size == 0:
        return math.nan, math.nan
    low, high = np.percentile(crossings, [2.5, 97.5])
    return float(low), float(high)


# ---- the band interval: the curve shifted by its pointwise 95% error --------------------------

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def band_crossings(sparsity_sorted: np.ndarray, scores: np.ndarray, standard_errors: np.ndarray, threshold: float):
    """((low crossing, its index), (high crossing, its status, its index)): the crossings of the
    curve shifted down and up by 1.96 standard errors at every point (points sorted by sparsity).
    A crossing only rises when a point rises, so this interval also holds a wrong bracket (a noisy
    point beyond the crossing that is really below the threshold), which a bootstrap of the
    crossing misses where few items have changed yet."""
    x_low, _, k_low = fitted_crossing(sparsity_sorted, scores - Z95 * standard_errors, threshold)
    x_high, high_status, k_high = fitted_crossing(sparsity_sorted, scores + Z95 * standard_errors, threshold)
    return (x_low, k_low), (x_high, high_status, k_high)


def pointwise_band_interval(sparsity, scores, standard_errors, threshold: float = 0.99) -> tuple[float, float]:
    """(low, high) of ``band_crossings`` for points in any order; high is inf while the upper band
    stays above the threshold at the sparsest point."""
    s = np.asarray(sparsity, dtype=float)
    order = np.argsort(s, kind="stable")
    (x_low, _), (x_high, high_status, _) = band_crossings(s[order], np.asarray(scores, dtype=float)[order],
                                                          np.asarray(standard_errors, dtype=float)[order], threshold)
    return float(x_low), math.inf if high_status == "all_above" else float(x_high)


def band_bounds(band) -> str:
    """``[low, high]`` for printing; an open band (upper end inf, stored as null in JSON) reads
    ``[low, open)``."""
    high = band[1]
    return f"[{band[0]:.3f}, {high:.3f}]" if high is not None and high != math.inf else f"[{band[0]:.3f}, open)"


def resampled_band(sparsity, curve, resampled, threshold: float) -> tuple[float, float]:
    """The band interval of a continuous criterion (the PPL-p% ratio): the standard error at each
    point is the curve's standard deviation over paired resamples (``resampled``, [resamples,
    points]). Every document's likelihood moves with sparsity, so no floor is needed (unlike
    accuracy, where no item may have changed yet)."""
    return pointwise_band_interval(sparsity, curve, np.asarray(resampled, dtype=float).std(axis=0, ddof=1), threshold)


# ---- is the critical point distinguishable from dense at all? ---------------------------------

def mcnemar_exact(sparse_correct, dense_correct) -> dict:
    """Exact (binomial) two-sided McNemar test of paired correctness on the same items.

    ``b`` items dense got right and sparse wrong, ``c`` the reverse; under "sparse and dense are
    equally accurate" b ~ Binomial(b + c, 1/2), p = min(1, 2 P(X <= min(b, c))). Scores must be 0/1.
    """
    from scipy.stats import binom

    sparse, dense = np.asarray(sparse_correct, dtype=float), np.asarray(dense_correct, dtype=float)
    if sparse.shape != dense.shape:
        raise ValueError(f"McNemar needs the same items for sparse and dense ({sparse.shape} vs {dense.shape})")
    if not np.isin(np.concatenate([sparse, dense]), (0.0, 1.0)).all():
        raise ValueError("McNemar needs 0/1 correctness per item (acc or acc_norm), not graded scores")
    b = int(((dense == 1) & (sparse == 0)).sum())
    c = int(((dense == 0) & (sparse == 1)).sum())
    p_value = 1.0 if b + c == 0 else float(min(1.0, 2 * binom.cdf(min(b, c), b + c, 0.5)))
    return {"dense_only_correct": b, "sparse_only_correct": c, "items": int(dense.size), "p_value": p_value}
