"""Two stores of one sweep compared: summed cell time per site and the score change per cell."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.analysis.report import cell_time_comparison
from common.evaluation.store import ResultStore

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "report_tables.py"


def _key(site, value, task, **extra):
    return {"model": "m", "site": site, "value": value, "task": task, "limit": 4, "rule": "topp", "power": 1.0,
            "layers": None, **extra}


def _result(seconds, score, metric="acc_norm", items=4):
    return {"seconds": seconds, "metrics": {metric: score}, "items": [{}] * items, "sparsity": {}}


@pytest.fixture
def stores(tmp_path):
    before, after = ResultStore(tmp_path / "before"), ResultStore(tmp_path / "after")
    # The older store's keys lack the dtype; cells still match by site, value, task and limit.
    before.put(_key("dense", 1.0, "bb_social_iqa"), _result(4.0, 0.50))
    before.put(_key("input", 0.9, "bb_social_iqa"), _result(6.0, 0.50))
    before.put(_key("input", 0.8, "bb_social_iqa"), _result(6.0, 0.75))
    before.put(_key("input", 0.9, "fables_ppl"), _result(10.0, 20.0, metric="word_perplexity"))
    before.put(_key("input", 0.7, "bb_social_iqa"), _result(5.0, 0.25))  # not in the second store
    after.put(_key("dense", 1.0, "bb_social_iqa", dtype="bfloat16"), _result(1.0, 0.50))
    after.put(_key("input", 0.9, "bb_social_iqa", dtype="bfloat16"), _result(2.0, 0.25))
    after.put(_key("input", 0.8, "bb_social_iqa", dtype="bfloat16"), _result(1.0, 0.75))
    after.put(_key("input", 0.9, "fables_ppl", dtype="bfloat16"), _result(10.0, 21.0, metric="word_perplexity"))
    return before, after


def test_cell_time_and_score_changes(stores):
    summary = cell_time_comparison(*stores)
    by_site = {row["site"]: row for row in summary["sites"]}
    assert by_site["dense"]["seconds"] == [4.0, 1.0] and by_site["dense"]["cells"] == 1
    assert by_site["input"]["seconds"] == [22.0, 13.0] and by_site["input"]["cells"] == 3
    assert summary["only_first"] == 1 and summary["only_second"] == 0
    assert summary["scored_cells"] == 3 and summary["same_score"] == 2
    assert summary["cells_by_item_change"] == {0: 2, 1: 1}  # 0.50 -> 0.25 on 4 items is one item
    assert summary["largest_item_change"]["value"] == 0.9
    assert summary["largest_perplexity_change"]["relative"] == pytest.approx(0.05)


def test_report_tables_prints_the_comparison(stores):
    before, after = stores
    out = subprocess.run([sys.executable, str(SCRIPT), "--cell-time", str(before.root), str(after.root)],
                         capture_output=True, text=True, check=True).stdout
    assert "| input | 3 | 22 | 13 | 0.59x |" in out and "| all | 4 | 26 | 14 | 0.54x |" in out
    assert "same score: 2 of 3; largest change 1 item(s)" in out and "0: 2, 1: 1" in out
    missing = subprocess.run([sys.executable, str(SCRIPT), "--cell-time", str(before.root)], capture_output=True,
                             text=True)
    assert missing.returncode == 1 and "needs two sweep folders" in missing.stderr
