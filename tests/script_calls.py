"""Run the command-line scripts as a user does, offline: one call in a new Python process, or many
calls in one fresh Python process.

Starting Python and importing torch, transformers and lm-eval costs seconds, more than refusing a bad
flag does, so the bad-input checks run their calls one after another in a single child process: each
call executes the script as ``__main__`` with its own ``sys.argv``, environment and captured output,
and its exit status is that of ``sys.exit`` (1 for an uncaught exception, whose traceback lands in
its stderr, as it would in a process of its own). What one call leaves in ``sys.modules`` or a
warning registry the next inherits; the calls checked this way stop at their flags, before a model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

_CHILD = r"""
import contextlib, io, json, os, runpy, sys, traceback

results = []
for call in json.loads(sys.stdin.read()):
    environment = dict(os.environ)
    os.environ.update(call["env"])
    sys.argv = [call["script"], *call["argv"]]
    out, err, status = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(call["script"], run_name="__main__")
        except SystemExit as stop:
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)
            status = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        except BaseException:
            traceback.print_exc()
            status = 1
    os.environ.clear()
    os.environ.update(environment)
    results.append({"returncode": status, "stdout": out.getvalue(), "stderr": err.getvalue()})
sys.__stdout__.write("\n" + json.dumps(results) + "\n")
"""


def run_script(script: str, *argv, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """One call of a script under ``experiments/`` in a new Python process in the repository, offline,
    with ``env`` added."""
    return subprocess.run([sys.executable, str(EXPERIMENTS / script), *[str(a) for a in argv]], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout, env={**os.environ, **OFFLINE, **(env or {})})


def run_scripts(calls: list[tuple[str, list[str]]], env: dict | None = None,
                timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """Each (script under ``experiments/``, argv) of ``calls`` run in turn in one new Python process
    in the repository, offline, with ``env`` added: their exit statuses and outputs, in order."""
    payload = json.dumps([{"script": str(EXPERIMENTS / script), "argv": [str(a) for a in argv],
                           "env": {**OFFLINE, **(env or {})}} for script, argv in calls])
    child = subprocess.run([sys.executable, "-c", _CHILD], input=payload, capture_output=True, text=True,
                           cwd=REPO, timeout=timeout, env={**os.environ, **OFFLINE, **(env or {})})
    assert child.returncode == 0 and child.stdout.strip(), child.stderr[-2000:]
    results = json.loads(child.stdout.strip().splitlines()[-1])
    return [subprocess.CompletedProcess([script, *argv], r["returncode"], r["stdout"], r["stderr"])
            for (script, argv), r in zip(calls, results)]
