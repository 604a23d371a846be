"""Result store: one JSON record per finished cell, written atomically, so runs resume.

A cell is identified by a dict of its defining fields (model, site, rule, value, task, dtype,
...); its file name is a readable prefix plus a hash of the canonical JSON of that dict. Writing
goes to a temporary file in the same folder followed by ``os.replace``, so an interrupted run
never leaves a half-written record, and several processes (shards) can share one store. Files
get the usual umask-respecting modes, so a team can share a store.

A record is never trusted by its file name: a cell whose stored key differs from the requested
one, or that does not parse, is reported with its path, moved aside (``*.bad``) and redone.
Each record keeps the provenance of the run that wrote it; ``store.json`` keeps the library
versions of the store, and a run with other torch / transformers / lm-eval versions is refused
unless mixing is allowed explicitly.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from common.evaluation.provenance import version_conflicts


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, _file_mode())  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _finite_or_null(value):
    """Standard JSON has no NaN or infinity: an undefined number is stored as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def atomic_write_json(path: str | Path, data) -> None:
    """Standard JSON, atomically (NaN and infinities become null; Python's NaN is not JSON)."""
    text = json.dumps(_finite_or_null(json.loads(json.dumps(data, default=_json_default))), indent=1, sort_keys=True,
                      allow_nan=False)
    atomic_write_text(path, text + "\n")


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


def _canonical(key: dict) -> str:
    return json.dumps(key, sort_keys=True, default=_json_default)


class ResultStore:
    """A folder of cell records: ``<root>/cells/<cell id>.json`` holding {"key", "result", "provenance"}.

    ``provenance`` (``common.evaluation.provenance.environment(...)``) is stored with every cell;
    with it, opening a store written with other must-match library versions raises a one-line
    error unless ``allow_mixed``.
    """

    def __init__(self, root: str | Path, provenance: dict | None = None, allow_mixed: bool = False):
        self.root = Path(root)
        self.cells = self.root / "cells"
        self.provenance = provenance
        self.allow_mixed = allow_mixed
        if provenance is not None:
            self._check_versions()

    # ---- versions ------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / "store.json"

    def _check_versions(self) -> None:
        manifest = self._read_json(self.manifest_path)
        if manifest is None:
            if self.cells.is_dir() and any(self.cells.glob("*.json")):
                # a store from before manifests: its first cell's provenance stands in, if any
                first = next((r for r in map(self._read_json, sorted(self.cells.glob("*.json"))) if r), None)
                manifest = {"provenance": (first or {}).get("provenance")}
            if not manifest or not manifest.get("provenance"):
                atomic_write_json(self.manifest_path, {"provenance": self.provenance})
                return
        conflicts = version_conflicts(manifest["provenance"], self.provenance)
        if conflicts and not self.allow_mixed:
            raise ValueError(f"{self.root} was written with {'; '.join(conflicts)}: scores may differ, so it is not "
                             "resumed; use another --output, or pass --allow-mixed to add cells anyway")

    # ---- cells ---------------------------------------------------------------------------------
    def path(self, key: dict) -> Path:
        return self.cells / f"{cell_id(key)}.json"

    @staticmethod
    def _read_json(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None

    def _set_aside(self, path: Path, why: str) -> None:
        bad = path.with_suffix(".bad")
        print(f"warning: {path} {why}; moved to {bad.name} and the cell will be redone", file=sys.stderr)
        try:
            os.replace(path, bad)
        except OSError:
            pass

    def _load(self, path: Path, key: dict | None = None) -> dict | None:
        """The record at ``path`` if it is whole and holds ``key`` (or its own file name's key)."""
        record = self._read_json(path)
        if not isinstance(record, dict) or "key" not in record or "result" not in record:
            self._set_aside(path, "is not a complete cell record (truncated or corrupt)")
            return None
        expected = _canonical(key) if key is not None else None
        if (expected is not None and _canonical(record["key"]) != expected) or path.stem != cell_id(record["key"]):
            self._set_aside(path, "holds another cell's record")
            return None
        return record

    def has(self, key: dict) -> bool:
        path = self.path(key)
        return path.is_file() and self._load(path, key) is not None

    def get(self, key: dict) -> dict | None:
        path = self.path(key)
        if not path.is_file():
            return None
        record = self._load(path, key)
        return None if record is None else record["result"]

    def put(self, key: dict, result: dict) -> None:
        record = {"key": key, "result": result}
        if self.provenance is not None:
            record["provenance"] = self.provenance
        atomic_write_json(self.path(key), record)

    def count(self) -> int:
        """How many cell files the store holds (a cheap sign of other processes' progress)."""
        return sum(1 for _ in self.cells.glob("*.json")) if self.cells.is_dir() else 0

    def records(self, **match) -> Iterator[tuple[dict, dict]]:
        """All (key, result) pairs whose key matches ``match`` (damaged files are set aside)."""
        for key, result, _ in self.records_with_provenance(**match):
            yield key, result

    def records_with_provenance(self, **match) -> Iterator[tuple[dict, dict, dict | None]]:
        if not self.cells.is_dir():
            return
        for path in sorted(self.cells.glob("*.json")):
            record = self._load(path)
            if record is not None and all(record["key"].get(k) == v for k, v in match.items()):
                yield record["key"], record["result"], record.get("provenance")

    def commits(self) -> list[dict]:
        """The distinct toolkit commits (with their dirty flags) that wrote this store's cells."""
        seen = {}
        for _, _, provenance in self.records_with_provenance():
            if provenance:
                seen[(provenance.get("commit"), provenance.get("dirty"))] = None
        return [{"commit": c, "dirty": d} for c, d in seen]


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
