"""Result store: one JSON record per finished cell, written atomically, so runs resume.

A cell is identified by a dict of its defining fields (model, site, rule, value, task, ...);
its file name is a readable prefix plus a hash of the canonical JSON of that dict. Writing goes
to a temporary file in the same folder followed by ``os.replace``, so an interrupted run never
leaves a half-written record, and several processes (shards) can share one store.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True, default=_json_default) + "\n")


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """Atomic CSV of dict rows (columns: union of keys, in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in a result record")


def cell_id(key: dict) -> str:
    canonical = json.dumps(key, sort_keys=True, default=_json_default)
    digest = hashlib.sha1(canonical.encode()).hexdigest()[:12]
    readable = "_".join(re.sub(r"[^A-Za-z0-9.+-]+", "-", str(key[k])) for k in sorted(key))[:80]
    return f"{readable}_{digest}"


class ResultStore:
    """A folder of cell records: ``<root>/cells/<cell id>.json`` holding {"key": ..., "result": ...}."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.cells = self.root / "cells"

    def path(self, key: dict) -> Path:
        return self.cells / f"{cell_id(key)}.json"

    def has(self, key: dict) -> bool:
        return self.path(key).is_file()

    def get(self, key: dict) -> dict | None:
        path = self.path(key)
        if not path.is_file():
            return None
        return json.loads(path.read_text())["result"]

    def put(self, key: dict, result: dict) -> None:
        atomic_write_json(self.path(key), {"key": key, "result": result})

    def records(self, **match) -> Iterator[tuple[dict, dict]]:
        """All (key, result) pairs whose key matches ``match``."""
        if not self.cells.is_dir():
            return
        for path in sorted(self.cells.glob("*.json")):
            record = json.loads(path.read_text())
            if all(record["key"].get(k) == v for k, v in match.items()):
                yield record["key"], record["result"]


def parse_shard(text: str | None) -> tuple[int, int]:
    """'K/N' (1-based K) -> (K-1, N); None -> (0, 1)."""
    if not text:
        return 0, 1
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise ValueError(f"--shard must look like K/N with 1 <= K <= N (e.g. 2/4), got {text!r}")
    return int(match.group(1)) - 1, int(match.group(2))


def in_shard(key: dict, shard: tuple[int, int]) -> bool:
    """Stable assignment of a cell to one of N shards by its id hash."""
    index, count = shard
    return int(hashlib.sha1(cell_id(key).encode()).hexdigest(), 16) % count == index
