"""The shared flags: dtype chosen to fit the device, devices and folders checked before any work."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from common.cli import flags


def test_auto_dtype_is_float32_on_a_cpu_without_native_bfloat16(monkeypatch):
    monkeypatch.setattr(flags, "cpu_has_native_bfloat16", lambda: False)
    dtype, why = flags.choose_dtype("auto", "cpu")
    assert dtype == torch.float32 and "no native bfloat16" in why
    monkeypatch.setattr(flags, "cpu_has_native_bfloat16", lambda: True)
    assert flags.choose_dtype("auto", "cpu")[0] == torch.bfloat16
    assert flags.choose_dtype(None, "cuda")[0] == torch.bfloat16


def test_an_explicit_dtype_always_wins(monkeypatch):
    monkeypatch.setattr(flags, "cpu_has_native_bfloat16", lambda: False)
    assert flags.choose_dtype("bfloat16", "cpu") == (torch.bfloat16, "as asked")
    assert flags.choose_dtype("float16", "cuda")[0] == torch.float16
    with pytest.raises(ValueError, match="unknown --dtype"):
        flags.choose_dtype("float8", "cpu")


def test_auto_threads_share_the_cores_among_shards_on_one_cpu_machine():
    assert flags.choose_threads("auto", "cpu", shards=2, cores=2, environ={}) == (
        1, "auto: 2 cores shared by 2 shards on this machine")
    assert flags.choose_threads("auto", "cpu", shards=2, cores=16, environ={})[0] == 8
    assert flags.choose_threads("auto", "cpu", shards=3, cores=2, environ={})[0] == 1  # never below one
    assert flags.choose_threads("auto", "cpu", shards=1, cores=2, environ={})[0] is None  # torch's own choice
    assert flags.choose_threads("auto", "cpu", shards=2, cores=2, environ={"OMP_NUM_THREADS": "2"}) == (
        None, "auto: OMP_NUM_THREADS=2")
    assert flags.choose_threads("auto", "cuda", shards=4, cores=16, environ={})[0] is None
    assert flags.choose_threads(3, "cpu", shards=2, cores=2, environ={"OMP_NUM_THREADS": "1"}) == (3, "as asked")
    assert flags.threads_flag("auto") == "auto" and flags.threads_flag("4") == 4
    for bad in ("0", "-1", "two"):
        with pytest.raises(argparse.ArgumentTypeError, match="a positive integer or auto"):
            flags.threads_flag(bad)


def test_sweep_settings_set_and_print_the_threads(capsys):
    parser = argparse.ArgumentParser()
    flags.add_sweep_arguments(parser, study="dense_sweep", default_limit=30)
    before = torch.get_num_threads()
    try:
        args = parser.parse_args(["--sites", "intermediate", "--tasks", "bb_social_iqa", "--device", "cpu",
                                  "--shard", "1/2", "--threads", "1"])
        flags.sweep_settings(args, [1.0, 0.9])
        assert torch.get_num_threads() == 1
        assert capsys.readouterr().out.rstrip().endswith("; threads 1 (as asked)")
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_one_line():
    with pytest.raises(ValueError, match="CUDA is not available"):
        flags.check_device("cuda")
    with pytest.raises(ValueError, match="unknown --device"):
        flags.check_device("gpu0")
    assert flags.check_device("cpu") == "cpu"


def test_output_that_is_a_file_or_unwritable_is_refused_before_work(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        flags.check_output_folder(tmp_path / "f")
    with pytest.raises(ValueError, match="cannot create"):
        flags.check_output_folder(tmp_path / "f" / "sub")
    assert flags.check_output_folder(tmp_path / "new" / "folder").is_dir()


@pytest.mark.parametrize("parse, text", [(flags.batch_size, "abc"), (flags.batch_size, "0"),
                                         (flags.non_negative_int, "-1"), (flags.finite_float, "nan"),
                                         (flags.finite_float, "inf"), (flags.positive_int, "0")])
def test_bad_numbers_are_argument_errors(parse, text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse(text)


def test_batch_size_accepts_lm_eval_forms():
    assert flags.batch_size("8") == 8 and flags.batch_size("auto") == "auto" and flags.batch_size("auto:4") == "auto:4"


def test_hub_only_tasks_with_an_unreachable_hub_read_the_local_cache_only(monkeypatch, capsys):
    from common.evaluation import tasks

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(tasks, "hub_reachable", lambda: False)
    tasks.check_tasks(["bb_social_iqa"])  # offline tasks never probe
    assert "HF_DATASETS_OFFLINE" not in os.environ
    tasks.check_tasks(["bb_social_iqa", "arc_easy"])
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert "arc_easy load from the local datasets cache only" in capsys.readouterr().out
    with pytest.raises(ValueError, match="need the dataset hub but HF_DATASETS_OFFLINE=1"):
        tasks.check_tasks(["arc_easy"])


@pytest.mark.parametrize("arg_string, message", [
    ("pretrained=/no/such/dir,sites=intermediate,value=2", "outside \\[0, 1\\]"),
    ("pretrained=/no/such/dir,sites=middle", "unknown FFN site"),
    ("pretrained=/no/such/dir,sites=intermediate,value=0.9,colour=blue", "unknown model argument"),
    ("pretrained=/no/such/dir,sites=intermediate,layers=a+b", "layers must be"),
    ("pretrained=/no/such/dir,sites=intermediate,value=0.9", "does not exist"),
])
def test_sparse_hf_model_args_are_checked_before_any_loading(arg_string, message):
    from common.evaluation.bridge import SparseHFLM

    with pytest.raises((ValueError, FileNotFoundError), match=message):
        SparseHFLM.create_from_arg_string(arg_string, {"batch_size": 1, "device": "cpu"})


def test_lm_eval_command_line_bad_value_is_one_line():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "common.cli.lm_eval", "run", "--model", "sparse-hf", "--model_args",
                             "pretrained=/no/such/dir,sites=intermediate,value=1.5", "--tasks", "bb_social_iqa"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: rule value p=1.5 is outside [0, 1]")
    assert "Traceback" not in result.stderr
