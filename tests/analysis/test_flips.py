"""Flips along a sweep: the share kept from one grid value to the next, by hand, on synthetic sweeps
and on a store's cells through report_tables."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.analysis.flips import persistence, site_flips
from common.analysis.report import tidy_table, write_report
from common.analysis.synthetic import SyntheticSweep, sparsity_of
from common.evaluation.store import ResultStore
from common.evaluation.sweep import DENSE, SweepRunner, SweepSpec

TASKS = ["bb_general_knowledge", "bb_social_iqa"]
GRID = [1.0, 0.9, 0.8, 0.7]
ITEMS = 20
# items that differ from dense (the first 10 are correct dense) at each rule value, per task
FLIPPED = {0.9: {0, 1, 10}, 0.8: {0, 1, 2, 11}, 0.7: {0, 1, 2, 3, 4, 11}}


def test_persistence_by_hand():
    flips = [[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]
    shares = persistence(flips)
    assert shares[0] == 0.5 and shares[1] == 0.0 and math.isnan(shares[2])  # no flips to keep at the third point


def test_persistent_synthetic_guesses_are_kept_independent_ones_are_not():
    """The calibration's model against this reading: persistence 1 keeps every flip of one grid
    value at the next (a break point passed between them keeps the item differing too); independent
    guesses keep few."""
    values = [0.99, 0.985, 0.98, 0.975, 0.97]  # sparser and sparser
    assert np.all(np.diff([sparsity_of(v) for v in values]) > 0)
    kept = {}
    for share in (0.0, 1.0):
        sweep = SyntheticSweep(items=1000, noise=0.3, chance=0.5, persistence=share, scale=0.1, centre=0.75, seed=3)
        dense = np.concatenate(sweep.dense)
        kept[share] = persistence([np.concatenate(sweep.items(v)) != dense for v in values])
    assert (kept[1.0] == 1.0).all() and (kept[0.0] < 0.3).all()


class FlipRunner(SweepRunner):
    """Cells whose flips are ``FLIPPED``: measured sparsity 1 - v."""

    def __init__(self, spec, store):
        super().__init__(lm=None, spec=spec, store=store, task_manager=None, verbose=False)

    def _evaluate(self, site, value, task, items=None):
        flipped = set() if site == DENSE or value == 1.0 else FLIPPED[value]
        metric = self.spec.metric_for(task)
        scores = [float((i < 10) != (i in flipped)) for i in range(ITEMS)]
        sparsity = {} if site == DENSE else {site: {"element_weighted": 1 - value, "mean_over_layers": 1 - value,
                                                          "per_layer": {"0": 1 - value}}}
        return {"metrics": {metric: sum(scores) / ITEMS}, "seconds": 1.0, "sparsity": sparsity,
                "items": [{"doc_id": i, metric: s, "gold": 0, "choice_logliks": [-1.0, -2.0]}
                          for i, s in enumerate(scores)]}


@pytest.fixture
def flip_study(tmp_path):
    spec = SweepSpec(model="synthetic", sites=["input"], tasks=TASKS, grid=list(GRID), limit=ITEMS)
    runner = FlipRunner(spec, ResultStore(tmp_path / "store"))
    runner.run_grid()
    return runner.store, spec


def test_site_flips_reads_the_cells_by_hand(flip_study):
    store, spec = flip_study
    row = site_flips(store, spec, tidy_table(store, spec, iterations=20), "input", max_sparsity=0.25)
    # p = 0.7 (sparsity 0.3) lies beyond 0.25; two tasks with the same flips: 3, then 4 of 40 items
    assert row["sparsity"] == pytest.approx([0.0, 0.1, 0.2])
    assert row["flip_rate"] == pytest.approx([0.0, 3 / 20, 4 / 20])
    assert math.isnan(row["persistence"][0]) and row["persistence"][1] == pytest.approx(2 / 3)  # 0 and 1 kept, 10 not
    every = site_flips(store, spec, tidy_table(store, spec, iterations=20), "input", max_sparsity=1.0)
    assert every["persistence"][2] == 1.0  # all four of p = 0.8 ({0, 1, 2, 11}) differ at p = 0.7 too


def test_report_tables_print_the_flips(flip_study):
    store, spec = flip_study
    write_report(store, spec, store.root, iterations=20)
    script = Path(__file__).resolve().parents[2] / "scripts" / "report_tables.py"
    tables = subprocess.run([sys.executable, str(script), "--flips", str(store.root), "0.25"], capture_output=True,
                            text=True, check=True)
    assert "| input | 3 | 0.150 to 0.200 | 0.67 (0.67 to 0.67) |" in tables.stdout
    bad = subprocess.run([sys.executable, str(script), "--flips", str(store.root), "2"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error: --flips' highest measured sparsity")
