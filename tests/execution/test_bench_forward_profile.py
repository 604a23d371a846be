"""The forward-profile benchmark runs end to end on a tiny model's config (subprocess, seconds)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.tiny_models import save_tiny_llama

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "bench_forward_profile.py"


def _run(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)


def test_profile_on_tiny_config(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "tiny")
    result = _run("--model", str(model_dir), "--dtype", "float32", "--batch", "2", "--sequence", "8",
                  "--repeats", "1", "--sites", "intermediate", "all_inputs", "--profile")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dense output unchanged afterwards: True" in result.stdout
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in result.stdout.splitlines()
            if line.startswith("| ") and line.split("|")[2].strip().replace(".", "").isdigit()}
    assert set(rows) == {"dense body", "log-softmax scoring (full logits)", "intermediate: sparsified body",
                         "intermediate: threshold search alone", "all_inputs: sparsified body",
                         "all_inputs: threshold search alone"}
    assert all(ms > 0 for ms in rows.values())
    assert "Self CPU time total" in result.stdout  # the profiler table


def test_unknown_site_is_refused_before_building_a_model():
    result = _run("--model", "unused", "--sites", "mlp")
    assert result.returncode == 2 and "invalid choice: 'mlp'" in result.stderr
