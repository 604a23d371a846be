"""Bad input to the LLaDA study: a one-line error saying what to do, raised before the model loads
where it can be."""

import json

import pytest

from llada_sparsity.char_tokenizer import CharTokenizer
from llada_sparsity.study import JaccardStudy, apply_chat_template, read_prompts
from script_calls import run_scripts


def test_limit_zero_is_all_and_negative_is_refused():
    assert len(read_prompts(None, 0)) == len(read_prompts(None, None)) == 8
    assert len(read_prompts(None, 3)) == 3
    with pytest.raises(ValueError, match=r"--limit must be >= 0 \(0 = all prompts\), got -1"):
        read_prompts(None, -1)


@pytest.mark.parametrize("overrides, match", [
    (dict(dump_every=-1), "--dump-every must be >= 0"),
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(cfg_scale=float("inf")), "cfg_scale must be a finite number >= 0"),
    (dict(cfg_scale=-0.5), "cfg_scale must be a finite number >= 0"),
    (dict(power=float("nan")), "power q=nan must be a finite number >= 1"),
    (dict(value=float("nan")), "rule value p=nan is outside"),
    (dict(reuse=[2, -1]), "mask reuse values are numbers of steps >= 0, got -1"),
    (dict(batch_size=0), "--batch-size must be >= 1"),
    (dict(paper_compat=True, rule="maxp"), "--paper-compat reproduces the released top-p"),
])
def test_study_settings_are_validated(overrides, match):
    with pytest.raises(ValueError, match=match):
        JaccardStudy(model="m", **overrides).validate()


def test_generation_longer_than_the_model_is_refused():
    study = JaccardStudy(model="m", steps=1, gen_length=100_000_000, block_length=100_000_000)
    study.validate()
    with pytest.raises(ValueError, match="--gen-length 100000000 exceeds the model's 128 positions"):
        study.check_length(128)
    study.check_length(None)  # unknown: nothing to check


def test_jsonl_line_without_prompt_names_file_and_line(tmp_path):
    source = tmp_path / "prompts.jsonl"
    source.write_text(json.dumps({"prompt": "fine"}) + "\n\n" + json.dumps({"question": "no prompt"}) + "\n")
    with pytest.raises(ValueError, match=rf'{source}:3: no "prompt" \(or "text"\) string'):
        read_prompts(str(source), None)
    source.write_text('{"prompt": "fine"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=rf"{source}:2: not a JSON object"):
        read_prompts(str(source), None)
    source.write_text('{"text": "from text"}\n')
    assert read_prompts(str(source), None) == ["from text"]


def test_prompt_file_that_is_not_utf8(tmp_path):
    source = tmp_path / "prompts.txt"
    source.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"prompt file {source} is not UTF-8 text .*save it as UTF-8"):
        read_prompts(str(source), None)


def test_chat_without_a_chat_template():
    with pytest.raises(ValueError, match="--chat needs a tokenizer with a chat template"):
        apply_chat_template(CharTokenizer.default(), ["hello"])


BAD_FLAGS = [
    (["--limit", "-1"], "error: --limit must be >= 0 (0 = all prompts), got -1"),
    (["--temperature", "nan"], "error: temperature must be a finite number >= 0 (0 = off), got nan"),
    (["--gen-length", "100000000", "--block-length", "100000000", "--steps", "1"],
     "error: --gen-length 100000000 exceeds the model's 128 positions"),
    (["--chat", "--limit", "1", "--reuse"], "error: --chat needs a tokenizer with a chat template"),
]


def test_script_bad_input_is_one_line(tmp_path):
    results = run_scripts([("llada_jaccard.py", [*args, "--output", tmp_path / "out"]) for args, _ in BAD_FLAGS])
    for (args, message), result in zip(BAD_FLAGS, results):
        assert result.returncode == 2, (args, result.stderr)
        lines = [line for line in result.stderr.strip().splitlines() if "Loading weights" not in line]
        assert len(lines) == 1 and lines[0].startswith(message), (args, result.stderr)
    assert not (tmp_path / "out").exists()


def test_script_bad_prompt_files_are_one_line(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "fine"}\n{"question": "no prompt"}\n')
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café\n".encode("latin-1"))
    first, second = run_scripts([("llada_jaccard.py", ["--prompts", prompts, "--output", tmp_path / "out"])
                                 for prompts in (broken, latin)])
    assert first.returncode == 2
    assert first.stderr.strip().splitlines() == [
        f'error: {broken}:2: no "prompt" (or "text") string; write one {{"prompt": "..."}} per line']
    assert second.returncode == 2
    assert second.stderr.strip().splitlines()[0].startswith(f"error: prompt file {latin} is not UTF-8 text")
