"""Shared fixtures: where the golden reference vectors live, tiny model factories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.skip(f"golden reference vectors not found at {GOLDEN} (they live in ../shared/golden beside the repo)")
    return GOLDEN


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
