"""What produced a result: toolkit version and commit, library versions, dtype, device, threads.

Every summary and every stored cell carries ``environment(...)``, so a number can always be
traced to the code and libraries that made it. ``LIBRARIES_THAT_MUST_MATCH`` are the ones whose
upgrade may change scores: a store written with other versions of them is not resumed silently.
"""

from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

LIBRARIES = ("torch", "transformers", "lm_eval", "accelerate", "tokenizers", "numpy", "scipy")
LIBRARIES_THAT_MUST_MATCH = ("torch", "transformers", "lm_eval")
DISTRIBUTIONS = {"lm_eval": "lm-eval"}


def _version(name: str) -> str | None:
    try:
        return version(DISTRIBUTIONS.get(name, name))
    except PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def toolkit_commit() -> dict:
    """Git commit of the checkout the toolkit runs from, and whether it has uncommitted changes."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": dirty if commit else None}


def environment(dtype=None, device=None, seed: int | None = None) -> dict:
    """Provenance of a run: toolkit version/commit/dirty, python and library versions, dtype, device, threads, seed."""
    return {
        "toolkit": _version("activation-sparsity"), **toolkit_commit(),
        "python": platform.python_version(),
        "libraries": {name: _version(name) for name in LIBRARIES},
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "device": str(device) if device is not None else None,
        "threads": torch.get_num_threads(), "seed": seed,
    }


def version_conflicts(stored: dict, current: dict) -> list[str]:
    """'transformers 5.23.0 (this run: 5.24.0)' for every must-match library whose version differs."""
    before, now = stored.get("libraries", {}), current.get("libraries", {})
    return [f"{name} {before.get(name)} (this run: {now.get(name)})" for name in LIBRARIES_THAT_MUST_MATCH
            if before.get(name) != now.get(name)]
