"""Result store: one JSON record per finished cell, written atomically, so runs resume.

A cell is identified by a dict of its defining fields (model, site, rule, value, task, dtype,
...); its file name is a readable prefix plus a hash of the canonical JSON of that dict. Writing
goes to a temporary file in the same folder followed by ``os.replace``, so an interrupted run
never leaves a half-written record, and several processes (shards) can share one store. Files
get the usual umask-respecting modes, so a team can share a store.

A record is never trusted by its file name: a cell whose stored key differs from the requested
one, or that does not parse, is reported with its path, moved aside (``*.bad``) and redone.
Keys hold only JSON values (strings, whole numbers, finite floats, booleans, None, lists and
dicts of them): anything else would be stored as another key than the one asked for.

Each record keeps the provenance of the run that wrote it. A run opened with its provenance
checks every cell's torch / transformers / lm-eval versions, when the store is opened and again
whenever a cell is read, and refuses a store holding any other version unless mixing is allowed
explicitly; ``versions()`` then lists every version present, for the summaries. ``store.json``
keeps the store's versions; a missing or broken one is rebuilt from the cells.
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

import warnings

from common.evaluation.provenance import LIBRARIES_THAT_MUST_MATCH, version_conflicts


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
    """Atomic CSV of dict rows (columns: union of keys, in first-seen order); an undefined number
    (NaN, an infinity) is an empty cell, as null is in the JSON files."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
                     for row in rows)
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


def check_key(key, where: str = "key") -> None:
    """A one-line ValueError unless ``key`` holds only JSON values, floats finite."""
    if isinstance(key, dict):
        for name, value in key.items():
            if not isinstance(name, str):
                raise ValueError(f"cell key field names must be strings, got {name!r} in {where}")
            check_key(value, f"{where}[{name!r}]")
    elif isinstance(key, (list, tuple)):
        for index, value in enumerate(key):
            check_key(value, f"{where}[{index}]")
    elif isinstance(key, float) and not math.isfinite(key):
        raise ValueError(f"cell key {where} is {key!r}: a key holds finite numbers only")
    elif key is not None and not isinstance(key, (str, int, float, bool)):
        raise ValueError(f"cell key {where} is a {type(key).__name__}: a key holds strings, numbers, booleans, "
                         "None and lists or dicts of them (convert it, e.g. with float() or .tolist())")


def library_versions(provenance: dict | None) -> dict | None:
    """The must-match library versions of a provenance record (None when it has none)."""
    libraries = provenance.get("libraries") if isinstance(provenance, dict) else None
    if not isinstance(libraries, dict):
        return None
    return {name: libraries.get(name) for name in LIBRARIES_THAT_MUST_MATCH}


class ResultStore:
    """A folder of cell records: ``<root>/cells/<cell id>.json`` holding {"key", "result", "provenance"}.

    ``provenance`` (``common.evaluation.provenance.environment(...)``) is stored with every cell;
    with it, opening a store written with other must-match library versions raises a one-line
    error unless ``allow_mixed``.
    """

    def __init__(self, root: str | Path, provenance: dict | None = None, allow_mixed: bool = False):
        if provenance is not None and library_versions(provenance) is None:
            raise ValueError(f"provenance must be the dict common.evaluation.provenance.environment() returns, got "
                             f"{type(provenance).__name__} {str(provenance)[:60]!r}")
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

    def _scan(self) -> tuple[list[dict], dict | None]:
        """(every combination of must-match versions among the cells with its cell count, the
        provenance of the first cell that has one)."""
        counts: dict[str, list] = {}
        first = None
        for path in sorted(self.cells.glob("*.json")) if self.cells.is_dir() else []:
            record = self._read_json(path)
            if isinstance(record, dict) and "key" in record:
                versions = library_versions(record.get("provenance"))
                first = first or (record["provenance"] if versions else None)
                counts.setdefault(json.dumps(versions, sort_keys=True), [versions, 0])[1] += 1
        return [{"libraries": versions, "cells": cells} for versions, cells in counts.values()], first

    def versions(self) -> list[dict]:
        """Every combination of must-match library versions among the cells, with its cell count
        (cells written before records carried provenance count under None)."""
        return self._scan()[0]

    def _conflicts(self, provenance: dict | None) -> list[str]:
        return version_conflicts(provenance, self.provenance) if library_versions(provenance) else []

    def _check_versions(self) -> None:
        """Refuse (one line) a store whose manifest or any cell holds other must-match versions
        than this run, unless ``allow_mixed``; write a missing ``store.json``, rebuild a broken one."""
        exists = self.manifest_path.exists()
        manifest = self._read_json(self.manifest_path) if exists else None
        broken = exists and (not isinstance(manifest, dict) or library_versions(manifest.get("provenance")) is None)
        found, first = self._scan()
        conflicts = self._conflicts(manifest["provenance"]) if exists and not broken else []
        for entry in found:
            conflicts += [c for c in self._conflicts({"libraries": entry["libraries"]}) if c not in conflicts]
        if conflicts and not self.allow_mixed:
            raise ValueError(f"{self.root} holds cells written with {'; '.join(conflicts)}: scores may differ, so it is "
                             "not resumed; use another --output, or pass --allow-mixed to add cells anyway")
        if broken:
            warnings.warn(f"{self.manifest_path} is unreadable or incomplete; rebuilt from its "
                          f"{sum(e['cells'] for e in found)} cells", RuntimeWarning, stacklevel=3)
        if not exists or broken:
            atomic_write_json(self.manifest_path, {"provenance": first or self.provenance})

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
        if self.provenance is not None and not self.allow_mixed:
            conflicts = self._conflicts(record.get("provenance"))
            if conflicts:
                raise ValueError(f"{path} was written with {'; '.join(conflicts)}: scores may differ, so it is not "
                                 "used; use another --output, or pass --allow-mixed to mix versions")
        return record

    def has(self, key: dict) -> bool:
        check_key(key)
        path = self.path(key)
        return path.is_file() and self._load(path, key) is not None

    def get(self, key: dict) -> dict | None:
        check_key(key)
        path = self.path(key)
        if not path.is_file():
            return None
        record = self._load(path, key)
        return None if record is None else record["result"]

    def put(self, key: dict, result: dict) -> None:
        check_key(key)
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
