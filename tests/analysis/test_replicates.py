"""Replicate grids against a reference grid, and a grid against itself with one value left out: by
hand, and on stores' cells through report_tables."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from common.analysis.replicates import grid_curve, grid_sparsity, leave_values_out, replicate_agreement
from common.analysis.report import write_report
from common.evaluation.store import ResultStore
from common.evaluation.sweep import DENSE, SweepRunner, SweepSpec

TASKS = ["bb_general_knowledge", "bb_social_iqa"]
GRID = [1.0, 0.9, 0.8, 0.7, 0.6]  # measured sparsity 1 - p: 0, 0.1, ..., 0.4
ITEMS = 20  # every item correct dense: one lost item is 5% of the task
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "report_tables.py"


def test_replicate_agreement_by_hand():
    sparsity = [0.0, 0.1, 0.2, 0.4]
    rows = replicate_agreement([0.15, 0.24, 0.26, None], sparsity)
    assert [r["step"] for r in rows] == pytest.approx([0.1, 0.1, 0.1])  # the step holding 0.15
    assert rows[0]["difference"] == pytest.approx(0.09) and rows[0]["within_one_step"] is True
    assert rows[1]["difference"] == pytest.approx(0.11) and rows[1]["within_one_step"] is False
    assert rows[2] == {"difference": None, "step": pytest.approx(0.1), "within_one_step": None}
    assert replicate_agreement([0.3, 0.1], sparsity)[0]["step"] == pytest.approx(0.2)  # the last, wider step
    assert replicate_agreement([None, 0.1], sparsity) == [{"difference": None, "step": None, "within_one_step": None}]


def test_grid_sparsity_is_the_mean_over_the_scoring_tasks_at_values_every_task_has():
    nan = float("nan")
    frame = pd.DataFrame({"site": ["input"] * 8 + ["up"],
                          "task": ["a", "b", "fables_ppl", "a", "b", "a", "c", "c", "a"],
                          "value": [0.9, 0.9, 0.9, 1.0, 1.0, 0.8, 0.9, 1.0, 0.9],
                          "measured_sparsity": [0.2, 0.4, 0.9, 0.0, 0.0, 0.5, 0.8, 0.0, 0.7],
                          "normalized": [1.0, 0.9, 1.0, 1.0, 1.0, 0.8, nan, nan, 0.9]})
    # left out: the perplexity task, task c (no dense score: no normalized score), p = 0.8 (task b lacks it), up
    assert grid_sparsity(frame, "input") == pytest.approx([0.0, 0.3])
    curve = grid_curve(frame, "input")
    assert list(curve.index) == [0.9, 1.0] and list(curve.normalized) == pytest.approx([0.95, 1.0])


def test_leave_values_out_by_hand():
    # fit 1, 1, 1, 1, 0.9 (0.97 and 1.03 pooled): 0.3 + 0.01 / 0.1 x 0.1 = 0.31, in a step of 0.1
    grid = ([1.0, 0.9, 0.8, 0.7, 0.6], [0.0, 0.1, 0.2, 0.3, 0.4], [1, 1, 0.97, 1.03, 0.9])
    reading = leave_values_out(*grid)
    assert reading["crossing"] == pytest.approx(0.31) and reading["step"] == pytest.approx(0.1)
    rows = {row["values"][0]: row for row in reading["left_out"]}
    assert sorted(rows) == [0.6, 0.7, 0.8, 0.9]  # never the dense anchor
    assert rows[0.9]["crossing"] == pytest.approx(0.31)  # 1, 0.97, 1.03, 0.9: the same pool
    assert rows[0.8]["crossing"] == pytest.approx(0.3 + 0.02 / 0.11 * 0.1)  # 1, 1, 1.03 pooled to 1.01
    assert rows[0.7]["crossing"] == pytest.approx(0.1 + 0.01 / 0.03 * 0.1)  # no rise left: 1, 1, 0.97, 0.9
    assert rows[0.7]["difference"] == pytest.approx(0.4 / 3 - 0.31) and rows[0.7]["within_one_step"] is False
    assert rows[0.6]["crossing"] == pytest.approx(0.3) and rows[0.6]["status"] == "all_above"
    assert [rows[v]["within_one_step"] for v in (0.9, 0.8, 0.6)] == [True, True, True]
    pairs = {tuple(row["values"]): row for row in leave_values_out(*grid, count=2)["left_out"]}
    assert len(pairs) == 6 and (1.0, 0.9) not in pairs
    assert pairs[(0.9, 0.8)]["crossing"] == pytest.approx(0.3 + 0.025 / 0.115 * 0.1)  # 1, 1.03 pooled to 1.015
    assert pairs[(0.8, 0.7)]["crossing"] == pytest.approx(0.1 + 0.01 / 0.1 * 0.3)  # 1, 1, 0.9 at 0, 0.1, 0.4


class LostItemsRunner(SweepRunner):
    """Cells in which the first ``lost[value]`` items of each task turn wrong; measured sparsity 1 - p."""

    def __init__(self, spec, store, lost):
        super().__init__(lm=None, spec=spec, store=store, task_manager=None, verbose=False)
        self.lost = lost

    def _evaluate(self, site, value, task, items=None):
        lost = 0 if site == DENSE else self.lost[value]
        metric = self.spec.metric_for(task)
        scores = [float(i >= lost) for i in range(ITEMS)]
        sparsity = {} if site == DENSE else {site: {"element_weighted": 1 - value, "mean_over_layers": 1 - value,
                                                          "per_layer": {"0": 1 - value}}}
        return {"metrics": {metric: sum(scores) / ITEMS}, "seconds": 1.0, "sparsity": sparsity,
                "items": [{"doc_id": i, metric: s, "gold": 0, "choice_logliks": [-1.0, -2.0]}
                          for i, s in enumerate(scores)]}


def _grid(folder: Path, lost: list[int], limit: int = ITEMS) -> Path:
    spec = SweepSpec(model="synthetic", sites=["input"], tasks=TASKS, grid=list(GRID), limit=limit)
    store = ResultStore(folder)
    LostItemsRunner(spec, store, dict(zip(GRID, lost))).run_grid()
    write_report(store, spec, folder, iterations=20)
    return folder


def test_report_tables_read_replicates_against_the_first_grid(tmp_path):
    # normalized task-average curves at sparsity 0-0.4 and their 99% crossings (linear between points):
    reference = _grid(tmp_path / "reference", [0, 0, 1, 4, 6])  # 1, 1, 0.95, 0.8, 0.7: 0.1 + 0.1 x 0.01/0.05 = 0.12
    close = _grid(tmp_path / "close", [0, 0, 2, 4, 6])  # 1, 1, 0.9, ...: 0.11, one step of 0.1 away at most
    far = _grid(tmp_path / "far", [0, 0, 0, 0, 2])  # 1, 1, 1, 1, 0.9: 0.31
    tables = subprocess.run([sys.executable, str(SCRIPT), "--replicates", str(reference), str(close), str(far)],
                            capture_output=True, text=True, check=True).stdout
    row = next(line for line in tables.splitlines() if line.startswith("| input |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1].startswith("0.120 [") and cells[2].startswith("0.110 [") and cells[2].endswith("(-0.010)")
    assert cells[3].startswith("0.310 [") and cells[3].endswith("(+0.190)")
    assert cells[4:] == ["0.100", "yes, no"]
    assert "Within one grid step of the first grid: 1 of 2 site readings." in tables


def test_replicates_of_other_items_are_refused_in_one_line(tmp_path):
    reference = _grid(tmp_path / "reference", [0, 0, 1, 4, 6])
    other_items = _grid(tmp_path / "other", [0, 0, 1, 4, 6], limit=10)
    for arguments in ([str(reference)], [str(reference), str(other_items)], [str(reference), str(tmp_path)]):
        bad = subprocess.run([sys.executable, str(SCRIPT), "--replicates", *arguments], capture_output=True, text=True)
        assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: --replicates")


def test_report_tables_leave_one_value_out_of_a_grid(tmp_path):
    # 1, 1, 0.95, 1, 0.7 at sparsity 0-0.4; fit 1, 1, 0.975, 0.975, 0.7: 0.1 + 0.01 / 0.025 x 0.1 = 0.14
    grid = _grid(tmp_path / "grid", [0, 0, 1, 0, 6])
    tables = subprocess.run([sys.executable, str(SCRIPT), "--leave-out", "1", str(grid)],
                            capture_output=True, text=True, check=True).stdout
    row = next(line for line in tables.splitlines() if "| input |" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    # without p = 0.9: 0.08; without 0.8 (the dip): 0.3 + 0.01 / 0.3 x 0.1 = 0.303, +0.163; without 0.7: 0.12
    assert cells[1:] == ["input", "0.140", "4", "0.080 to 0.303", "0.100", "1: p = 0.8 (+0.163)"]
    assert "Leaving out 1 value moves the crossing more than one grid step on 1 of 1 site readings." in tables
    for arguments in ([str(tmp_path)], ["1", str(tmp_path)], ["0", str(grid)], []):
        bad = subprocess.run([sys.executable, str(SCRIPT), "--leave-out", *arguments], capture_output=True, text=True)
        assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: --leave-out")
