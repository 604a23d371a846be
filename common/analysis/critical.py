"""Critical sparsity: the highest measured sparsity at which the model keeps >= 99% of its dense
score, from a curve of (measured sparsity, normalized score) points.

Two readings, always reported together:

* ``grid``: the highest measured sparsity among the evaluated points whose normalized score is
  >= the threshold (the paper's definition on its grid);
* ``interpolated``: the linear crossing of the threshold between that point and the next
  sparser evaluated point (which is below the threshold by construction).

Non-monotone curves: points above the threshold beyond a dip still count (the definition is
"highest sparsity with >= 99%"), so a noisy recovery can raise the estimate; the status field
says when the curve never reaches the threshold or never leaves it. A paired bootstrap over
items gives intervals for normalized scores and for the critical sparsity.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

PAPER_DENSE_GRID = [1.0, 0.995, 0.99, 0.985, 0.98, 0.975, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91, 0.90, 0.85,
                    0.80, 0.75, 0.70, 0.65, 0.60, 0.50, 0.40, 0.30, 0.20, 0.10, 0.0]
PAPER_MOE_GRID = [1.0, 0.99, 0.98, 0.97, 0.95, 0.92, 0.90, 0.75, 0.50]


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
