"""The dense sweep's protocols: the quick default leads with the readings that decide, says what it
left out, and estimates its wall time; the paper protocol is one flag away; explicit flags win."""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

import pytest

from common.cli import flags
from common.cli.protocol import (PROTOCOLS, accuracy_verdict, apply_protocol, covering_interval, explicit_flags,
                                 left_out, offline_items)
from common.evaluation.progress import CellClock, duration
from tiny_models import save_tiny_llama

REPO = Path(__file__).resolve().parents[2]


def _args(*argv):
    parser = argparse.ArgumentParser()
    flags.add_sweep_arguments(parser, study="dense_sweep", default_limit=50)
    parser.add_argument("--protocol", default="quick", choices=sorted(PROTOCOLS))
    args = parser.parse_args(list(argv))
    apply_protocol(args, explicit_flags(parser, list(argv)))
    return args


def test_the_quick_protocol_is_a_ppl_led_search_on_two_sites_and_explicit_flags_win():
    quick = _args()
    assert (quick.sites, quick.limit, quick.search, quick.lead, quick.budget) == (
        ["intermediate", "input"], 50, True, "ppl", PROTOCOLS["quick"]["budget"])
    paper = _args("--protocol", "paper")
    assert paper.sites == ["input", "up", "gate", "intermediate", "all_inputs"] and paper.limit == 0
    assert not paper.search and paper.lead == "accuracy"
    mine = _args("--sites", "gate", "--limit=7", "--search")  # an explicit --search keeps the accuracy-led search
    assert (mine.sites, mine.limit, mine.search, mine.lead, mine.budget) == (["gate"], 7, True, "accuracy", 8)
    assert not _args("--grid", "1.0", "0.9").search and not _args("--target-halfwidth", "0.05").search


def test_what_a_run_leaves_out_of_the_paper_protocol():
    items = offline_items(["bb_social_iqa", "fables_ppl", "arc_easy"])
    assert items == {"bb_social_iqa": 300, "fables_ppl": 189}  # hub tasks are not counted
    missing = left_out(_args(), items)
    assert missing == ["sites up, gate, all_inputs (--sites all)",
                       "389 of 489 items and documents beyond the first 50 per task (--limit 0)",
                       "the paper's 26-value grid (--protocol paper)"]
    assert left_out(_args("--protocol", "paper"), items) == []


def test_the_led_interval_is_the_wider_of_bootstrap_and_band_and_accuracy_says_when_it_cannot_decide():
    assert covering_interval({"interval": [0.30, 0.36], "band": [0.31, 0.38]}) == (0.30, 0.38)
    assert covering_interval({"interval": [0.30, 0.36], "band": [0.31, None]}) == (0.30, math.inf)
    assert accuracy_verdict([0.30, 0.35], "200 items") == "decided"
    assert "200 items cannot decide it" in accuracy_verdict([0.0, 0.78], "200 items")
    assert "cannot decide" in accuracy_verdict([0.2, None], "200 items")


def test_the_estimate_costs_each_cell_at_its_task_s_mean():
    clock = CellClock()
    assert clock.estimate(["a"]) is None and duration(None) == "unknown"
    for task, seconds in (("fables", 30.0), ("fables", 50.0), ("mc", 5.0)):
        clock.add(task, seconds)
    assert clock.estimate(["fables", "mc", "mc", "other"]) == pytest.approx(40 + 5 + 5 + 85 / 3)
    assert (duration(42), duration(600), duration(3 * 3600)) == ("42 s", "10 min", "3.0 h")


def test_the_default_on_a_tiny_model_leads_with_ppl_then_answer_kl_then_accuracy(tmp_path):
    model = save_tiny_llama(tmp_path / "tiny")
    result = subprocess.run([sys.executable, str(REPO / "experiments" / "dense_sweep.py"), "--model", str(model),
                             "--tasks", "bb_social_iqa", "bb_general_knowledge", "fables_ppl", "--limit", "6",
                             "--dtype", "float32", "--bootstrap", "50", "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    announce = next(line for line in lines if line.startswith("protocol quick:"))
    assert "sites intermediate, input" in announce and "Left out: sites up, gate, all_inputs" in announce
    assert any(line.startswith("at most ") and "cells to evaluate" in line for line in lines)
    assert any(" cells evaluated; about " in line and " left for at most " in line for line in lines)
    first = next(i for i, line in enumerate(lines) if line.startswith("PPL-1% critical sparsity per site"))
    block = lines[first:first + 6]
    assert [line.split(":")[0].strip() for line in block[1:3]] == ["intermediate", "input"]
    for line in block[1:3]:  # a crossing and its interval, which may stay open where the curve never crosses
        assert " [" in line and ("]" in line or "open)" in line)
    assert block[3].startswith("sites at the same measured sparsity, answer KL") and "intermediate vs input:" in block[4]
    assert block[5].startswith("accuracy (6 items per task")
    accuracy = lines[first + 6:first + 8]
    assert all("band [" in line and ("cannot decide it" in line or line.endswith("decided")) for line in accuracy)
