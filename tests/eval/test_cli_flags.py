"""The shared flags: dtype chosen to fit the device, devices and folders checked before any work."""

from __future__ import annotations

import argparse

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
