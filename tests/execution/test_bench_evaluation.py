"""The two evaluation benchmarks run end to end on a tiny Llama (subprocess, seconds): mask
overhead (sparse against dense) and shared-context against per-request scoring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import save_tiny_llama

REPO = Path(__file__).resolve().parents[2]


def _run(script, *args, env=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=600)


def _table(stdout):
    """Rows of the printed markdown table as lists of cells."""
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| site")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


def test_eval_overhead_on_tiny_model(tiny_dir, tmp_path):
    result = _run("bench_eval_overhead.py", "--model", str(tiny_dir), "--limit", "3", "--repeats", "1",
                  "--sites", "intermediate", "input", "--threads", "1", "--output", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 threads" in result.stdout
    rows = _table(result.stdout)
    assert [row[0] for row in rows] == ["intermediate", "input"]
    for row in rows:
        dense, sparse, ratio = float(row[1]), float(row[2]), float(row[3].rstrip("x"))
        rounding = 0.005 * (dense + sparse) / dense ** 2 + 0.005  # the times are printed to 0.01 s
        assert dense > 0 and sparse > 0 and ratio == pytest.approx(sparse / dense, abs=rounding)
    summary = json.loads((tmp_path / "summary.json").read_text())  # what the findings page reads
    assert summary["setup"]["threads"] == 1 and [r["site"] for r in summary["rows"]] == ["intermediate", "input"]
    for row, printed in zip(summary["rows"], rows):
        assert len(row["dense_seconds"]) == 1 and row["dense_seconds"][0] == pytest.approx(float(printed[1]), abs=0.006)


def test_shared_context_benchmark_on_tiny_model(tiny_dir, tmp_path):
    result = _run("bench_shared_context.py", "--model", str(tiny_dir), "--limit", "3", "--repeats", "1",
                  "--tasks", "bb_social_iqa", "--threads", "1", "--output", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "scores identical between the paths (tolerance 0.000)" in result.stdout
    rows = _table(result.stdout)
    assert [(row[0], row[1]) for row in rows] == [("dense", "per-request"), ("dense", "shared"),
                                                   ("intermediate", "per-request"), ("intermediate", "shared")]
    assert all(int(row[6]) > 0 for row in rows)  # token positions (equal here: the tiny model truncates every request)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(r["site"], r["path"]) for r in summary["rows"]] == [(row[0], row[1]) for row in rows]
    assert all(r["token_positions"] == int(row[6]) for r, row in zip(summary["rows"], rows))


@pytest.mark.parametrize("script", ["bench_eval_overhead.py", "bench_shared_context.py"])
def test_threads_must_be_positive(script):
    result = _run(script, "--threads", "0")
    assert result.returncode == 2 and "--threads: expected 1 or more, got 0" in result.stderr


def test_eval_overhead_times_criteria_beside_top_p(tiny_dir, tmp_path):
    result = _run("bench_eval_overhead.py", "--model", str(tiny_dir), "--limit", "3", "--repeats", "1",
                  "--sites", "input", "intermediate", "--threads", "1", "--criteria", "teal", "cats", "wina",
                  "--target", "0.4", "--output", str(tmp_path), env={"ACTIVATION_SPARSITY_CACHE": str(tmp_path / "c")})
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["setup"]["criteria"] == ["teal", "cats", "wina"] and summary["setup"]["target"] == 0.4
    assert len(summary["setup"]["load_average_at_start"]) == 3
    timed = {r["site"]: sorted(r["criteria_seconds"]) for r in summary["rows"]}
    assert timed == {"input": ["teal", "wina"], "intermediate": ["cats", "teal", "wina"]}  # CATS: intermediate only
    assert all(len(s) == 1 and s[0] > 0 for r in summary["rows"] for s in r["criteria_seconds"].values())
    assert "|   cats at 0.4 |" in result.stdout
    assert list((tmp_path / "c" / "calibration").iterdir())  # calibrated before the timing, cached


def test_eval_overhead_refuses_an_unknown_criterion_before_loading():
    result = _run("bench_eval_overhead.py", "--model", "no-such-model", "--criteria", "teel")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("unknown criterion 'teel'")
