"""The result store never trusts a file blindly, never mixes library versions silently, writes
standard JSON with shareable file modes, and carries provenance."""

from __future__ import annotations

import json
import os
import stat

import pytest

from common.evaluation.provenance import environment
from common.evaluation.store import ResultStore, atomic_write_json, cell_id
from common.evaluation.sweep import SweepSpec

KEY_A = {"model": "m", "site": "input", "value": 0.9, "task": "t"}
KEY_B = {"model": "m", "site": "input", "value": 0.8, "task": "t"}


def test_a_file_holding_another_cells_record_is_set_aside_not_used(tmp_path, capsys):
    store = ResultStore(tmp_path)
    store.put(KEY_B, {"score": 0.2})
    os.replace(store.path(KEY_B), store.path(KEY_A))  # KEY_A's file now holds KEY_B's record
    assert store.get(KEY_A) is None
    assert not store.path(KEY_A).exists() and store.path(KEY_A).with_suffix(".bad").exists()
    assert "holds another cell's record" in capsys.readouterr().err
    assert list(store.records()) == []  # and it is not listed as KEY_B either


def test_a_truncated_cell_is_reported_with_its_path_and_redone(tmp_path, capsys):
    store = ResultStore(tmp_path)
    store.put(KEY_A, {"score": 0.5})
    text = store.path(KEY_A).read_text()
    store.path(KEY_A).write_text(text[: len(text) // 2])
    assert not store.has(KEY_A)
    assert str(store.path(KEY_A)) in capsys.readouterr().err
    store.put(KEY_A, {"score": 0.5})
    assert store.get(KEY_A) == {"score": 0.5}


def test_cells_of_other_library_versions_are_refused_in_one_line_and_kept(tmp_path):
    old = environment("float32", "cpu")
    old["libraries"]["transformers"] = "5.0.0"
    ResultStore(tmp_path, provenance=old).put(KEY_A, {"score": 0.5})
    with pytest.raises(ValueError) as error:
        ResultStore(tmp_path, provenance=environment("float32", "cpu"))
    message = str(error.value)
    assert "transformers 5.0.0 (this run:" in message and "--allow-mixed" in message and "\n" not in message
    assert ResultStore(tmp_path).get(KEY_A) == {"score": 0.5}  # nothing lost
    mixed = ResultStore(tmp_path, provenance=environment("float32", "cpu"), allow_mixed=True)
    mixed.put(KEY_B, {"score": 0.4})
    assert len(list(mixed.records())) == 2


def test_dtype_and_device_are_part_of_every_cell_key():
    float32 = SweepSpec(model="m", sites=["input"], tasks=["t"], dtype="float32")
    bfloat16 = SweepSpec(model="m", sites=["input"], tasks=["t"], dtype="bfloat16")
    for site in ("dense", "input"):
        assert cell_id(float32.key(site, 0.9, "t")) != cell_id(bfloat16.key(site, 0.9, "t"))
    assert float32.key("input", 0.9, "t")["device_type"] == "cpu"


def test_records_carry_provenance(tmp_path):
    provenance = environment("bfloat16", "cuda:0", seed=7)
    store = ResultStore(tmp_path, provenance=provenance)
    store.put(KEY_A, {"score": 1.0})
    record = json.loads(store.path(KEY_A).read_text())
    for field in ("toolkit", "commit", "dirty", "python", "dtype", "device", "threads", "seed"):
        assert field in record["provenance"]
    assert record["provenance"]["dtype"] == "bfloat16" and record["provenance"]["seed"] == 7
    assert set(record["provenance"]["libraries"]) >= {"torch", "transformers", "lm_eval"}
    assert record["provenance"]["commit"] is None or len(record["provenance"]["commit"]) == 40
    assert store.commits() == [{"commit": provenance["commit"], "dirty": provenance["dirty"]}]


def test_json_is_standard_and_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "x.json", {"a": float("nan"), "b": [1.0, float("inf")]})
    finally:
        os.umask(old)
    text = (tmp_path / "x.json").read_text()
    assert json.loads(text) == {"a": None, "b": [1.0, None]} and "NaN" not in text
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o644


def _foreign(tmp_path, keys, version="5.0.0"):
    """A store whose cells ``keys`` were written with another transformers version."""
    old = environment("float32", "cpu")
    old["libraries"]["transformers"] = version
    store = ResultStore(tmp_path)
    for key in keys:
        store.put(key, {"score": 0.5})
        record = json.loads(store.path(key).read_text())
        record["provenance"] = old
        store.path(key).write_text(json.dumps(record))


def test_one_cell_of_another_version_is_enough_to_refuse_the_store(tmp_path):
    ResultStore(tmp_path, provenance=environment("float32", "cpu")).put(KEY_A, {"score": 0.5})  # manifest: ours
    _foreign(tmp_path, [KEY_B])
    with pytest.raises(ValueError, match=r"holds cells written with transformers 5\.0\.0 .*--allow-mixed"):
        ResultStore(tmp_path, provenance=environment("float32", "cpu"))
    mixed = ResultStore(tmp_path, provenance=environment("float32", "cpu"), allow_mixed=True)
    assert sorted(v["libraries"]["transformers"] for v in mixed.versions()) == sorted(
        ["5.0.0", environment()["libraries"]["transformers"]])


def test_every_cell_is_checked_when_the_manifest_is_gone_and_the_first_cell_agrees(tmp_path):
    keys = [{**KEY_A, "value": v} for v in (0.1, 0.2, 0.3, 0.4)]
    ResultStore(tmp_path, provenance=environment("float32", "cpu")).put(keys[0], {"score": 0.5})
    _foreign(tmp_path, keys[1:])
    first = sorted((tmp_path / "cells").glob("*.json"))[0]
    assert first.name == ResultStore(tmp_path).path(keys[0]).name  # the first cell is ours: not enough to look at
    (tmp_path / "store.json").unlink()
    with pytest.raises(ValueError, match="transformers 5.0.0"):
        ResultStore(tmp_path, provenance=environment("float32", "cpu"))


def test_a_cell_of_another_version_written_after_opening_is_refused_when_read(tmp_path):
    store = ResultStore(tmp_path, provenance=environment("float32", "cpu"))
    _foreign(tmp_path, [KEY_B])  # e.g. a shard started with other libraries
    with pytest.raises(ValueError, match=r"was written with transformers 5\.0\.0.*--allow-mixed"):
        store.get(KEY_B)


def test_a_broken_manifest_is_rebuilt_from_the_cells_with_one_warning(tmp_path):
    store = ResultStore(tmp_path, provenance=environment("float32", "cpu"))
    store.put(KEY_A, {"score": 0.5})
    (tmp_path / "store.json").write_text('{"provenance": {"libr')
    with pytest.warns(RuntimeWarning, match="store.json is unreadable or incomplete; rebuilt from its 1 cells"):
        ResultStore(tmp_path, provenance=environment("float32", "cpu"))
    rebuilt = json.loads((tmp_path / "store.json").read_text())
    assert rebuilt["provenance"]["libraries"] == environment()["libraries"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), object(), {1: "a"}])
def test_a_key_that_json_cannot_hold_exactly_is_refused_at_put(tmp_path, bad):
    import torch

    store = ResultStore(tmp_path)
    for key in ({**KEY_A, "value": bad}, {**KEY_A, "value": torch.tensor(0.9)}):
        if key["value"] is bad or isinstance(key["value"], torch.Tensor):
            with pytest.raises(ValueError, match="cell key"):
                store.put(key, {"score": 1.0})
    assert not (tmp_path / "cells").exists()


def test_provenance_must_be_an_environment_record(tmp_path):
    with pytest.raises(ValueError, match="provenance must be the dict"):
        ResultStore(tmp_path, provenance="garbage")
