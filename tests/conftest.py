"""Shared fixtures: where the golden reference vectors live, tiny model factories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).resolve().parent / "golden"  # copied from the official implementations


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    assert GOLDEN.is_dir(), f"golden reference vectors missing at {GOLDEN} (they ship with the repository)"
    return GOLDEN


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
