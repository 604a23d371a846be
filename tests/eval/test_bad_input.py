"""What a new user may type: each mistake is one line that says what to do, before any model loads,
never a traceback or a silently wrong number."""

from __future__ import annotations

import argparse
import subprocess

import pytest

from common.cli import flags
from outputs import assert_no_nan
from script_calls import run_script, run_scripts


def _sweep_args(*argv):
    parser = argparse.ArgumentParser()
    flags.add_sweep_arguments(parser, study="dense_sweep", default_limit=30)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("argv, message", [
    (["--sites", "all", "intermediate"], "--sites all names every site .* give it alone"),
    (["--sites", "intermediate", "intermediate"], "--sites names intermediate more than once"),
    (["--metric", "f1score", "--tasks", "small"], "--metric f1score is not a metric of bb_social_iqa.* reports acc, "
                                                  "acc_norm"),
    (["--tasks", "bb_socal_iqa"], r"unknown task bb_socal_iqa \(did you mean bb_social_iqa"),
])
def test_sweep_settings_refuse_in_one_line(argv, message):
    with pytest.raises(ValueError, match=message) as error:
        flags.sweep_settings(_sweep_args(*argv), [1.0, 0.9])
    assert "\n" not in str(error.value)


def test_the_metric_check_skips_perplexity_and_accepts_a_metric_every_task_has():
    flags.check_metric("acc", ["bb_social_iqa", "fables_ppl"])
    flags.check_metric(None, ["bb_social_iqa"])


@pytest.mark.parametrize("argv", [["--sites", "input", "--sites", "gate"], ["--bootstrap", "0"]])
def test_flags_given_twice_or_out_of_range_are_argument_errors(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        _sweep_args(*argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert "--sites is given twice; give it once" in err or "--bootstrap: expected 1 or more, got 0" in err


@pytest.mark.parametrize("value", ["abc", "0", "-3", "2.5"])
def test_a_bad_omp_num_threads_is_refused(value):
    with pytest.raises(ValueError, match=f"OMP_NUM_THREADS='{value}' is not a whole number"):
        flags.check_thread_environment({"OMP_NUM_THREADS": value})
    flags.check_thread_environment({"OMP_NUM_THREADS": "2"})
    flags.check_thread_environment({})


def test_an_over_long_output_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="File name too long; choose a shorter or writable --output") as error:
        flags.check_output_folder(tmp_path / ("x" * 300))
    assert "\n" not in str(error.value) and len(str(error.value)) < 200


def test_model_folders_that_cannot_be_studied_are_refused_before_the_weights_load(tmp_path):
    import transformers

    from common.models.loading import check_model_folder, resolve_model_path
    from common.models.plan import model_plan
    from tiny_models import char_tokenizer, save_tiny_llama

    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    char_tokenizer().save_pretrained(gpt2)
    with pytest.raises(ValueError, match="'gpt2' model, which the site table does not know .*add a row to "
                                         "common.core.sites.ARCHITECTURES"):
        model_plan(str(gpt2), dtype=None)
    with pytest.raises(ValueError, match="'gpt2' model"):
        check_model_folder("gpt2", str(gpt2))

    truncated = save_tiny_llama(tmp_path / "truncated")
    text = (truncated / "config.json").read_text()
    (truncated / "config.json").write_text(text[:40])
    with pytest.raises(ValueError, match=r"truncated/config.json is not valid JSON .*download or copy it again"):
        model_plan(str(truncated), dtype=None)

    no_tokenizer = save_tiny_llama(tmp_path / "no_tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no tokenizer files .*tokenizer.save_pretrained"):
        check_model_folder("no_tokenizer", str(no_tokenizer))

    with pytest.raises(ValueError, match="is a file; give the folder that holds config.json"):
        resolve_model_path(str(truncated / "config.json"))


@pytest.mark.parametrize("path, message", [(".", "is a folder"), ("/dev/null", "is not a regular file")])
def test_prompts_that_are_not_files_say_so(path, message):
    from llada_sparsity.study import read_prompts

    with pytest.raises(ValueError, match=message):
        read_prompts(path, None)


def test_a_model_too_large_for_the_machine_names_the_rehearsal():
    import moe_sparsity.models  # noqa: F401  (registers the MoE aliases)
    from common.models.plan import print_plan

    with pytest.raises(ValueError, match="does not fit here.*--rehearse"):
        print_plan("qwen3-30b-a3b", None, "cpu", family="moe")


def _run(script: str, *argv, timeout: int = 120) -> subprocess.CompletedProcess:
    return run_script(script, *argv, timeout=timeout)


def test_the_dense_script_refuses_before_the_plan_or_the_model(tmp_path):
    cases = [(["--ppl-percent", "-1"], "--ppl-percent: expected a number above 0"),
             (["--metric", "f1score"], "error: --metric f1score is not a metric of bb_social_iqa"),
             (["--tasks", "no_such_task"], "error: unknown task no_such_task")]
    results = run_scripts([("dense_sweep.py", [*argv, "--output", tmp_path / "out"]) for argv, _ in cases])
    for (argv, message), result in zip(cases, results):
        assert result.returncode == 2 and "Traceback" not in result.stderr, (argv, result.stderr[-1000:])
        assert message in result.stderr.strip().splitlines()[-1], argv
        assert "plan for" not in result.stdout, argv  # nothing loaded
    assert not (tmp_path / "out").exists()  # nothing written


def test_written_outputs_hold_no_nan_where_a_number_is_promised(tmp_path):
    """The LLaDA default on two prompts: every number in every JSON and CSV it writes is finite (JSON
    nulls stand for undefined numbers, never NaN)."""
    result = _run("llada_jaccard.py", "--limit", "2", "--steps", "8", "--gen-length", "16", "--block-length", "8",
                  "--reuse", "1", "--output", str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_no_nan(tmp_path)
