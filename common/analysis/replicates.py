"""How far a grid's task-average crossing reproduces, in grid steps: against grids re-run on the
same items with other rounding (another device, dtype or processor), and against itself with one
of its values left out (how much the answer hangs on a single cell).

The step is the reference grid's, in measured sparsity, at the reference crossing
(``grid_step_at``), as the calibration reads its synthetic replicates, so a real replicate and a
synthetic one are held to the same standard.
"""

from __future__ import annotations

from itertools import combinations
from typing import Sequence

import numpy as np
import pandas as pd

from common.analysis.calibration import grid_step_at
from common.analysis.critical import isotonic_crossing
from common.analysis.orderings import task_average_points
from common.evaluation.tasks import PERPLEXITY_TASKS


def grid_curve(frame: pd.DataFrame, site: str) -> pd.DataFrame:
    """``site``'s task-average accuracy curve on a grid (a sweep's ``tidy.csv``): measured sparsity and
    normalized score at each rule value, over the multiple-choice tasks with a dense score above 0
    and the values every one of them has, as ``critical.json``'s curve; indexed by value, ascending."""
    rows = frame[(frame.site == site) & ~frame.task.isin(list(PERPLEXITY_TASKS)) & frame.normalized.notna()]
    return task_average_points(rows, site, rows.task.unique())


def grid_sparsity(frame: pd.DataFrame, site: str) -> np.ndarray:
    """Measured sparsity of ``site``'s task-average accuracy curve at each grid value, ascending."""
    return np.sort(grid_curve(frame, site).measured_sparsity.to_numpy())


def replicate_agreement(crossings: Sequence[float | None], reference_sparsity: Sequence[float]) -> list[dict]:
    """Each crossing after the first against the first (the reference grid's, whose task-average
    sparsity is ``reference_sparsity``): the difference, the reference grid's step at its crossing
    and whether the difference is at most that step. A missing crossing (None) gives None fields."""
    reference, *others = crossings
    step = None if reference is None else grid_step_at(reference_sparsity, reference)
    rows = []
    for other in others:
        if reference is None or other is None:
            rows.append({"difference": None, "step": step, "within_one_step": None})
            continue
        difference = other - reference
        rows.append({"difference": difference, "step": step, "within_one_step": bool(abs(difference) <= step)})
    return rows


def leave_values_out(values: Sequence[float], sparsity: Sequence[float], normalized: Sequence[float],
                     count: int = 1, threshold: float = 0.99) -> dict:
    """The isotonic crossing of a grid's curve, then again with every set of ``count`` values left
    out (never the point of lowest measured sparsity, the dense anchor): the difference from the
    whole grid's crossing, the whole grid's step there and whether the difference is at most that
    step. A search evaluates a subset of the grid, so it can match the grid's answer only as well
    as the grid matches itself without the cells the search skips."""
    values, sparsity, normalized = (np.asarray(a, dtype=float) for a in (values, sparsity, normalized))
    crossing, status = isotonic_crossing(sparsity, normalized, threshold)
    step = grid_step_at(sparsity, crossing)
    left_out = []
    for dropped in combinations(sorted(np.argsort(sparsity, kind="stable")[1:]), count):
        keep = ~np.isin(np.arange(values.size), dropped)
        other, other_status = isotonic_crossing(sparsity[keep], normalized[keep], threshold)
        left_out.append({"values": [float(values[k]) for k in dropped], "crossing": other, "status": other_status,
                         "difference": other - crossing, "within_one_step": bool(abs(other - crossing) <= step)})
    return {"crossing": crossing, "status": status, "step": step, "left_out": left_out}
