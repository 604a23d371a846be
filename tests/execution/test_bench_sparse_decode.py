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
    result = _run("--model", str(model_dir), "--sparsities", "0.5", "--critical", "intermediate=0.6",
                  "--tokens", "3", "--repeats", "1", "--rounds", "2", "--warmup", "1", "--stream-tokens", "2",
                  "--calibration-docs", "2", "--cache-sweep-mib", "4", "--max-load", "0", "--idle-wait", "0",
                  "--quality", "--quality-docs", "2", "--quality-items", "2", "--output", str(output))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((output / "summary.json").read_text())
    rows = summary["rows"]
    assert [(r["scope"], r["kind"]) for r in rows] == [
        ("input", "range"), ("intermediate", "range"), ("gate", "range"), ("all_linear", "range"),
        ("intermediate", "critical")]
    assert summary["setup"]["cpu"] and summary["environment"]["cache_sweep"]["1"]["mib"] == [1, 2, 4]
    # a load limit of 0 is never met: every round is recorded busy, and the output says so
    assert all(r["busy_rounds"] == r["rounds"] == 5 for r in rows)
    assert "machine busy" in result.stderr and "WARNING" in result.stdout
    layers, hidden, inter, vocab, heads_kv = 2, 32, 48, 128, 2
    mlp, attention, o = 4 * 3 * hidden * inter, 4 * hidden * (hidden + 2 * hidden // 4 * heads_kv), 4 * hidden * hidden
    for row in rows:
        assert row["dtype"] == "float32" and row["threads"] == 1
        assert 0.0 < row["entry_sparsity"] < 1.0 and 0.0 < row["scope_bytes_skipped"] < 1.0
        scope_bytes = layers * {"input": mlp * 2 // 3, "intermediate": mlp // 3, "gate": mlp,
                                "all_linear": mlp + attention + o}[row["scope"]]
        assert row["scope_bytes"] == scope_bytes
        assert row["stream_bytes"] == layers * (mlp + attention + o) + 4 * vocab * hidden
        skipped = row["scope_bytes_skipped"] * scope_bytes
        assert row["scope_ideal_speedup"] == pytest.approx(scope_bytes / (scope_bytes - skipped), rel=1e-9)
        for base in ("torch", "kernel0"):  # share = (base - sparse) / (base - ideal), from the medians
            base_ms, sparse_ms = row[f"scope_{base}"]["median_ms"], row["scope_sparse"]["median_ms"]
            ideal_ms = base_ms * (scope_bytes - skipped) / scope_bytes
            assert row[f"scope_share_vs_{base}"] == pytest.approx((base_ms - sparse_ms) / (base_ms - ideal_ms))
        assert row["step_ideal_speedup"] > 1.0 and 0 <= row["greedy_agreement"] <= 1
        assert row["other_ms"] == pytest.approx(row["step_torch"]["median_ms"] - row["stream_torch"]["median_ms"])
        assert row["nonfinite_rows"] == 0
        assert ("perplexity_ratio" in row) == (row["scope"] == "all_linear")
    linear = rows[3]
    assert linear["perplexity_ratio"] > 0 and linear["token_perplexity_ratio"] > 0 and linear["answer_kl"] >= 0
    assert set(linear["decode_sparsity"]) == {"attention", "attention_output", "input", "intermediate"}
    assert (output / "share_of_ideal.png").is_file() and (output / "rows.csv").is_file()
    redrawn = _run("--replot", str(output / "summary.json"), "--figure", str(tmp_path / "again"))
    assert redrawn.returncode == 0, redrawn.stderr[-2000:]
    assert (tmp_path / "again.png").stat().st_size > 10_000


def test_benchmark_rejects_bad_settings_without_loading(tmp_path):
    result = _run("--model", "unused", "--sparsities", "1.5", "--output", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --sparsities 1.5")

