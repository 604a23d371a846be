"""The calibration step: held-out accuracy of calibrated thresholds, text that is never an evaluation
item, the cache, and cell keys that separate criteria and keep the old ones."""

from __future__ import annotations

import json

import pytest
import torch

from common.core.criteria import Criterion, parse_criterion
from common.core.hooks import Sparsifier
from common.evaluation.calibration import CORPUS, Calibrator, calibration_passages, check_disjoint
from common.evaluation.store import cell_id
from common.evaluation.sweep import SweepSpec
from common.evaluation.tasks import DATA
from tests.tiny_models import char_tokenizer, tiny_model

HELD_OUT_TOLERANCE = 0.02


def _split_corpus(tmp_path):
    """The shipped calibration text in two halves: calibrate on the first, measure on the second."""
    lines = CORPUS.read_text().splitlines()
    first = tmp_path / "calibration.jsonl"
    first.write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    return first, [json.loads(line)["text"] for line in lines[len(lines) // 2:]]


@pytest.mark.parametrize("name, site", [("teal", "input"), ("teal", "intermediate"), ("cats", "intermediate"),
                                        ("scap", "input"), ("scap", "intermediate"), ("weighted-threshold", "input"),
                                        ("rotated-threshold", "intermediate")])
def test_calibrated_thresholds_reach_the_target_on_held_out_text(tmp_path, name, site):
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    corpus, held_out = _split_corpus(tmp_path)
    criterion = parse_criterion(name)
    targets = (0.3, 0.5, 0.7)
    calibrator = Calibrator(model, tokenizer, "tiny", criterion, targets, max_tokens=6000, corpus=corpus,
                            root=tmp_path / "cache")
    for target in targets:
        with torch.no_grad(), Sparsifier(model, site, criterion=criterion, value=target,
                                         calibration=calibrator(site, target)) as sparse:
            for text in held_out[:40]:
                model(input_ids=torch.tensor([tokenizer(text)["input_ids"][:256]]))
        rows = sparse.recorder.rows()
        measured = 1 - sum(r["kept"] for r in rows) / sum(r["counted"] for r in rows)
        assert measured == pytest.approx(target, abs=HELD_OUT_TOLERANCE), (name, site, target)


def test_calibration_never_sees_evaluation_items(tmp_path):
    passages = calibration_passages()  # the shipped text passes the check every time it is read
    assert len(passages) == 300
    fable = json.loads((DATA / "fables.jsonl").read_text().splitlines()[7])["text"]
    item = json.loads((DATA / "social_iqa.jsonl").read_text().splitlines()[3])
    for leaked, where in ((f"Some words first. {fable}", "fables.jsonl"),
                          (f"{item['query']} {item['choices'][0]}", "social_iqa.jsonl")):
        with pytest.raises(ValueError, match=f"shares the words .* with evaluation item .* of .*{where}") as refused:
            check_disjoint([passages[0], leaked])
        assert "passage 1" in str(refused.value) and "\n" not in str(refused.value)
        corpus = tmp_path / "leaky.jsonl"
        corpus.write_text(json.dumps({"text": passages[0]}) + "\n" + json.dumps({"text": leaked}) + "\n")
        calibrator = Calibrator(tiny_model("llama"), char_tokenizer(), "tiny", parse_criterion("teal"), (0.5,),
                                corpus=corpus, root=tmp_path / "cache")
        with pytest.raises(ValueError, match="calibration text must never be an evaluation item"):
            calibrator("input", 0.5)  # refused before any activation is captured
        calibration_passages.cache_clear()
    with pytest.raises(ValueError, match="too short to check"):
        check_disjoint(["Far too short."])


def test_the_cache_is_reused_and_keyed(tmp_path):
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    corpus, _ = _split_corpus(tmp_path)
    criterion = Criterion("rotated", "threshold")
    first = Calibrator(model, tokenizer, "tiny", criterion, (0.3, 0.6), max_tokens=2000, corpus=corpus,
                       root=tmp_path / "cache")
    computed = first("all_inputs", 0.6)
    files = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert len([f for f in files if f.endswith(".safetensors")]) == 2  # one rotation file per base site
    second = Calibrator(model, tokenizer, "tiny", criterion, (0.3, 0.6), max_tokens=2000, corpus=corpus,
                        root=tmp_path / "cache")
    assert second._read("input", [0.3, 0.6]) is not None  # read back, nothing captured
    loaded = second("all_inputs", 0.6)
    assert loaded.thresholds == computed.thresholds
    for key, rotation in computed.rotations.items():
        torch.testing.assert_close(loaded.rotations[key], rotation)
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()) == files
    provenance = second.provenance("input")["input"]
    assert provenance["tokens"] == 2000 and provenance["corpus"] == first.corpus_id and provenance["libraries"]
    other = Calibrator(model.to(torch.bfloat16), tokenizer, "tiny", criterion, (0.6,), max_tokens=2000, corpus=corpus,
                       root=tmp_path / "cache")
    assert other._read("input", [0.6]) is None  # another dtype: another entry
    assert first._key("input", 0.3) != first._key("input", 0.6) != first._key("intermediate", 0.6)


def test_cell_keys_separate_criteria_and_keep_the_old_ones():
    spec = SweepSpec(model="smollm2-135m", sites=["input"], tasks=["bb_social_iqa"], limit=None, dtype="bfloat16")
    old = {"model": "smollm2-135m", "site": "input", "rule": "topp", "power": 1.0, "value": 0.9,
           "task": "bb_social_iqa", "limit": None, "layers": None, "dtype": "bfloat16", "device_type": "cpu"}
    assert spec.key("input", 0.9, "bb_social_iqa") == old  # the magnitude criterion: the keys stores hold
    assert cell_id(spec.key("input", 0.9, "bb_social_iqa")) == \
        "cpu_bfloat16_None_None_smollm2-135m_1.0_topp_input_bb-social-iqa_0.9_80e73794d718"
    keys = {}
    for name in ("magnitude", "teal", "cats", "scap", "wina", "larosa", "weighted-topp", "magnitude-topk"):
        criterion = parse_criterion(name)
        other = SweepSpec(**{**spec.as_dict(), "rule": criterion.selection, "score": criterion.score,
                             "calibration": "calibration-0123" if criterion.reads_text else None})
        keys[name] = other.key("intermediate", 0.5, "bb_social_iqa")
        assert other.key("dense", 1.0, "bb_social_iqa") == spec.key("dense", 1.0, "bb_social_iqa")  # shared dense
    assert len({cell_id(k) for k in keys.values()}) == len(keys)  # two criteria never share a cell
    assert "score" not in keys["teal"] and keys["teal"]["rule"] == "threshold"
    assert keys["wina"]["score"] == "weighted" and "calibration" not in keys["wina"]
    assert keys["scap"]["calibration"] == "calibration-0123"


def test_llada_study_keys_keep_the_old_ones():
    from llada_sparsity.study import JaccardStudy

    study = JaccardStudy(model="tiny", dtype="float32", device_type="cpu")
    key = study.key("a prompt")
    assert "score" not in key and "calibration" not in key and key["rule"] == "topp"
    teal = JaccardStudy(model="tiny", dtype="float32", device_type="cpu", rule="threshold", value=0.5,
                        calibration="calibration-0123", reuse=[])
    assert teal.key("a prompt") != study.key("a prompt") and teal.key("a prompt")["calibration"] == "calibration-0123"
    with pytest.raises(ValueError, match="mask-reuse experiment reuses magnitude masks"):
        JaccardStudy(model="tiny", rule="threshold", value=0.5).validate()
