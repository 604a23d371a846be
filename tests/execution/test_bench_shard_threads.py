"""The shard-threads benchmark runs end to end on a tiny model's config (subprocesses, seconds)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import save_tiny_llama

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "bench_shard_threads.py"


def _run(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="compares thread pools on two or more cores")
def test_both_settings_are_timed_on_a_tiny_config(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "tiny")
    result = _run("--model", str(model_dir), "--shards", "2", "--batch", "1", "--sequence", "8", "--forwards", "1",
                  "--repeats", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    cores = len(os.sched_getaffinity(0))
    rows = {line.split("|")[1].strip(): float(line.split("|")[3]) for line in result.stdout.splitlines()
            if line.startswith("| ") and " each " in line.split("|")[1]}
    assert set(rows) == {f"{cores} threads each (torch's default)", f"{cores // 2} thread(s) each (--threads auto)"}
    assert rows[f"{cores // 2} thread(s) each (--threads auto)"] == 1.0 and rows[f"{cores} threads each (torch's default)"] > 0


def test_one_process_is_refused_before_building_a_model():
    result = _run("--model", "unused", "--shards", "1")
    assert result.returncode == 1 and result.stderr.strip().startswith("error: needs --shards 2 or more")
