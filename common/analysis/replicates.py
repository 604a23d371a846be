"""Grids re-run on the same items with other rounding (another device, dtype or processor): do
their task-average crossings agree to one grid step?

The step is the reference grid's, in measured sparsity, at the reference crossing
(``grid_step_at``), as the calibration reads its synthetic replicates, so a real replicate and a
synthetic one are held to the same standard.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from common.analysis.calibration import grid_step_at
from common.analysis.orderings import task_average_sparsity
from common.evaluation.tasks import PERPLEXITY_TASKS


def grid_sparsity(frame: pd.DataFrame, site: str) -> np.ndarray:
    """Measured sparsity of ``site``'s task-average accuracy curve at each grid value, ascending: the
    multiple-choice tasks with a dense score above 0, as ``critical.json``'s curve (a sweep's ``tidy.csv``)."""
    rows = frame[(frame.site == site) & ~frame.task.isin(list(PERPLEXITY_TASKS)) & frame.normalized.notna()]
    return np.sort(task_average_sparsity(rows, site, rows.task.unique()).to_numpy())


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
