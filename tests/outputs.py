"""Checks on what the studies write."""

from __future__ import annotations

import json
from pathlib import Path


def assert_no_nan(folder: Path) -> None:
    """No JSON or CSV summary under ``folder`` holds NaN or an infinity where a number is promised
    (JSON null and an empty CSV cell stand for an undefined number)."""
    checked = 0
    for path in sorted(folder.rglob("*")):
        if path.suffix == ".json" and "cells" not in path.parts:
            def refuse(name, path=path):
                raise AssertionError(f"{path} holds {name}")

            json.loads(path.read_text(), parse_constant=refuse)
            checked += 1
        elif path.suffix == ".csv":
            cells = {cell.strip().lower() for line in path.read_text().splitlines() for cell in line.split(",")}
            assert not cells & {"nan", "inf", "-inf", "infinity", "-infinity"}, path
            checked += 1
    assert checked, f"no JSON or CSV under {folder}"
