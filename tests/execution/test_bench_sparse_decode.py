"""The decode benchmark runs end to end on a tiny model (subprocess, seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import save_tiny_llama

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "bench_sparse_decode.py"


def _run(*args, cwd=REPO):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def test_benchmark_on_tiny_model(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "tiny")
    output = tmp_path / "out"
    result = _run("--model", str(model_dir), "--tokens", "3", "--repeats", "1", "--ffn-repeats", "1",
                  "--sparsities", "0.5", "--critical", "intermediate=0.6", "--calibration-docs", "3",
                  "--output", str(output))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((output / "summary.json").read_text())
    rows = summary["rows"]
    assert [(r["site"], r["mode"], r["kind"]) for r in rows] == [
        ("intermediate", "topp", "range"), ("intermediate", "threshold", "range"), ("input", "topp", "range"),
        ("input", "threshold", "range"), ("intermediate", "topp", "critical"),
        ("intermediate", "threshold", "critical")]
    assert summary["setup"]["dtype"] == "float32" and summary["setup"]["threads"] == 1
    layers, hidden, inter = 2, 32, 48
    total = summary["setup"]["decode_weight_bytes"]
    assert summary["setup"]["ffn_weight_bytes"] == 4 * 3 * layers * hidden * inter
    for row in rows:
        assert 0.0 < row["measured_decode_sparsity"] < 1.0
        # ideal = bytes read dense / bytes read sparse, from the measured decode sparsity (a second way)
        row_bytes = 4 * (hidden if row["site"] == "intermediate" else 2 * inter)
        width = inter if row["site"] == "intermediate" else hidden
        skipped = row["measured_decode_sparsity"] * layers * width * row_bytes
        assert row["ideal_speedup"] == pytest.approx(total / (total - skipped), rel=1e-9)
        assert row["speedup"] > 0 and row["mask_us"] > 0 and 0 <= row["greedy_agreement"] <= 1
        assert 1.0 < row["ffn_ideal_speedup"] < (3.0 if row["site"] == "input" else 1.5)
    assert (output / "speedup.png").is_file() and (output / "rows.csv").is_file()
    redrawn = _run("--replot", str(output / "summary.json"), "--figure", str(tmp_path / "again"))
    assert redrawn.returncode == 0, redrawn.stderr[-2000:]
    assert (tmp_path / "again.png").stat().st_size > 10_000


def test_benchmark_rejects_a_site_without_saving(tmp_path):
    result = _run("--model", "unused", "--sites", "gate", "--output", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --sites gate")
