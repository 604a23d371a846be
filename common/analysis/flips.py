"""How answers change along a sweep: at each rule value, the share of items whose answer differs
from dense (a flip, lost or gained), and how many of those still differ at the next sparser value.

Real sweeps keep most of their flips from one grid value to the next (the masks of neighbouring
values differ little), so their bumps span several grid values; the synthetic sweeps of the
calibration model this with ``persistence`` (``common.analysis.synthetic``). Independent draws
keep about the flip rate.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from common.analysis.orderings import task_average_sparsity
from common.evaluation.store import ResultStore
from common.evaluation.sweep import DENSE, SweepSpec
from common.evaluation.tasks import PERPLEXITY_TASKS


def persistence(flips: Sequence[np.ndarray]) -> np.ndarray:
    """Per pair of neighbouring points (flags ordered by sparsity), the share of the first point's
    flips that are flips at the second too; NaN where the first has none."""
    shares = []
    for first, second in zip(flips, flips[1:]):
        first, second = np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)
        shares.append((first & second).sum() / first.sum() if first.any() else np.nan)
    return np.array(shares, dtype=float)


def site_flips(store: ResultStore, spec: SweepSpec, frame: pd.DataFrame, site: str,
               max_sparsity: float = 0.45) -> dict:
    """Flip rate and persistence of one site over its grid values up to ``max_sparsity`` (the
    stretch before the cliff, where a 99% crossing lies), pooled over the binary-scored tasks."""
    tasks = [t for t in spec.tasks if t not in PERPLEXITY_TASKS]
    dense = {t: np.array([i[spec.metric_for(t)] for i in store.get(spec.key(DENSE, 1.0, t))["items"]]) for t in tasks}
    tasks = [t for t in tasks if set(np.unique(dense[t])) <= {0.0, 1.0}]
    sparsity = task_average_sparsity(frame, site, tasks)
    if not tasks or sparsity.empty:
        return {"site": site, "sparsity": [], "flip_rate": [], "persistence": []}
    points = sorted((float(s), v) for v, s in sparsity.items() if s <= max_sparsity)
    flips = [np.concatenate([np.array([i[spec.metric_for(t)] for i in store.get(spec.key(site, v, t))["items"]])
                             != dense[t] for t in tasks]) for _, v in points]
    return {"site": site, "sparsity": [s for s, _ in points], "flip_rate": [float(f.mean()) for f in flips],
            "persistence": persistence(flips).tolist()}
