"""The fused top-p CPU kernel: the golden masks, the full sort's masks on hard rows, the rows it
cannot decide handed back, and the pure-torch path when it is off or cannot be built."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from common.core import fused_topp
from common.core.rules import keep_mask, keep_threshold, kept_counts, sparsify_and_count, zero_below

BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@pytest.fixture(scope="module")
def kernel():
    module = fused_topp.kernel()
    if module is None:
        pytest.skip("the fused top-p kernel cannot be built here (no C++ compiler or ninja)")
    return module


def _expected(x, p):
    mask = keep_mask(x, "topp", p)  # the sort-based rule (identical to the paper's, see test_rules)
    return x.masked_fill(~mask, 0), kept_counts(mask, x)  # -1: a non-finite row, passed through


def _assert_identical(x, p):
    sparse, kept = sparsify_and_count(x, "topp", p)
    expected, counts = _expected(x, p)
    assert sparse.shape == x.shape and kept.shape == x.shape[:-1] and kept.dtype == torch.int32
    assert torch.equal(sparse.view(BITS[x.dtype]), expected.view(BITS[x.dtype])), (x.dtype, p)
    assert torch.equal(kept, counts), (x.dtype, p)


def test_golden_masks_through_the_fused_kernel(kernel, golden_dir):
    tensors = load_file(str(golden_dir / "sparsification_rules.safetensors"))
    cases = json.loads((golden_dir / "sparsification_rules.json").read_text())["cases"]
    checked = 0
    for case in cases:
        if case["rule"] != "topp" or not 0 < case["value"] < 1 or case["power"] != 1:
            continue
        x = tensors[case["input"]]
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        sparse, kept, accepted = kernel.topp_sparsify_rows(rows, case["value"])
        golden = tensors[case["key"]].bool().reshape(rows.shape)
        assert bool(accepted.all()), case["key"]  # decided by the kernel itself, not the fallback
        assert torch.equal(sparse.view(BITS[x.dtype]), rows.masked_fill(~golden, 0).view(BITS[x.dtype])), case["key"]
        assert torch.equal(kept, golden.sum(dim=-1, dtype=torch.int32)), case["key"]
        checked += 1
    assert checked >= 10


def _hard_rows(width: int, dtype: torch.dtype) -> torch.Tensor:
    """Heavy-tailed rows plus the rows that break naive fast paths."""
    x = (torch.randn(24, width) * torch.randn(24, width).exp()).to(dtype)
    x[0] = 0  # all zeros: the kernel hands the row back
    x[1, :1] = 1e4  # a massive activation
    x[2] = x[2].round()  # heavy ties
    x[3, ::2] = 0
    x[4] = 1.0  # all ties
    x[5, : (width + 3) // 4], x[5, (width + 3) // 4:] = 1.0, 0.5  # p = 0.4 on a group boundary
    x[6, 0] = float("inf")  # non-finite: handed back
    x[7, -1] = float("nan")
    x[8] = -x[8].abs()  # negative rows keep their sign
    x[9, ::3] = -0.0
    x[10, 0] = 1e-7  # tiny entries
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1, 3, 5, 64, 577, 1536, 9000])
def test_fused_kernel_matches_the_full_sort_on_hard_rows(kernel, dtype, width):
    x = _hard_rows(width, dtype)
    for p in (0.01, 0.3, 0.4, 0.5, 0.9, 0.99, 0.999):
        _assert_identical(x, p)
        _assert_identical(x.reshape(4, 6, width), p)  # any leading shape
    _assert_identical(x[:, ::2], 0.9)  # a strided view


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_kernel_decides_typical_rows_and_hands_back_the_rest(kernel, dtype):
    """SwiGLU-like rows are all decided by the kernel; all-zero and non-finite ones never are."""
    x = (torch.randn(256, 1536) * torch.randn(256, 1536).exp()).to(dtype)
    for p in (0.3, 0.9, 0.99):
        assert bool(kernel.topp_sparsify_rows(x, p)[2].all()), p
    x[0], x[1, 3], x[2, 5] = 0, float("inf"), float("nan")
    assert kernel.topp_sparsify_rows(x, 0.9)[2][:4].tolist() == [False, False, False, True]


def test_fused_kernel_same_result_on_one_and_two_threads(kernel):
    x = (torch.randn(300, 1536) * torch.randn(300, 1536).exp()).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel.topp_sparsify_rows(x, 0.9)
        torch.set_num_threads(2)
        two = kernel.topp_sparsify_rows(x, 0.9)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(u.view(torch.int16) if u.dtype == torch.bfloat16 else u,
                           v.view(torch.int16) if v.dtype == torch.bfloat16 else v) for u, v in zip(one, two))


def test_rules_the_kernel_does_not_take_use_the_torch_path(kernel, monkeypatch):
    """Other rules, p = 0 or 1, q != 1, float64 and inputs that need a gradient never reach it."""
    def refuse(*args):
        raise AssertionError("the fused kernel was called")

    monkeypatch.setattr(fused_topp, "sparsify_rows", refuse)
    x = torch.randn(8, 64)
    for rule, value, power in (("maxp", 0.5, 1.0), ("topk", 0.5, 1.0), ("topp", 1.0, 1.0), ("topp", 0.0, 1.0),
                               ("topp", 0.9, 2.0)):
        sparse, kept = sparsify_and_count(x, rule, value, power)
        assert torch.equal(sparse, zero_below(x, *keep_threshold(x, rule, value, power))[0])
    sparsify_and_count(x.double(), "topp", 0.9)
    x.requires_grad_()
    sparse, _ = sparsify_and_count(x, "topp", 0.9)
    sparse.sum().backward()
    assert torch.equal(x.grad, keep_mask(x.detach(), "topp", 0.9).float())


def test_switched_off_or_unbuildable_kernel_falls_back_to_the_torch_path(monkeypatch):
    x = (torch.randn(64, 576) * torch.randn(64, 576).exp()).to(torch.bfloat16)
    monkeypatch.setenv(fused_topp.SWITCH, "0")
    assert fused_topp.kernel() is None
    _assert_identical(x, 0.9)
    monkeypatch.delenv(fused_topp.SWITCH)

    import torch.utils.cpp_extension as cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    fused_topp._build.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built .*Ninja is required"):
            assert fused_topp.kernel() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once, not on every call
            assert fused_topp.kernel() is None
            _assert_identical(x, 0.9)
    finally:
        fused_topp._build.cache_clear()  # the next test loads the real kernel again


def test_a_compiler_without_openmp_is_asked_for_the_one_thread_build(monkeypatch, kernel):
    """Apple's clang rejects -fopenmp: the loader asks again, without OpenMP and under its own name,
    and says so once (the build itself is compiled by the slow test below)."""
    import torch.utils.cpp_extension as cpp_extension

    calls = []

    def no_openmp(*args, **kwargs):
        calls.append(kwargs)
        if "-fopenmp" in kwargs.get("extra_cflags", []):
            raise RuntimeError("clang: error: unsupported option '-fopenmp'")
        return kernel  # stands in for the one-thread build

    monkeypatch.setattr(cpp_extension, "load", no_openmp)
    fused_topp._build.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="without OpenMP .*unsupported option '-fopenmp'.* one thread"):
            assert fused_topp.kernel() is kernel
        first, second = calls
        assert second["name"] == first["name"] + "_serial" and second["sources"] == first["sources"]
        assert "-fopenmp" not in second["extra_cflags"] + second.get("extra_ldflags", [])
    finally:
        fused_topp._build.cache_clear()  # the next test loads the real kernel again


@pytest.mark.slow
def test_a_compiler_without_openmp_gets_the_one_thread_kernel(monkeypatch):
    """Apple's clang rejects -fopenmp: the kernel is built again without it (one thread per
    process, a warning says so) and gives the same outputs (a compile of about 30 s)."""
    import torch.utils.cpp_extension as cpp_extension

    real_load = cpp_extension.load

    def no_openmp(*args, **kwargs):
        if "-fopenmp" in kwargs.get("extra_cflags", []):
            raise RuntimeError("clang: error: unsupported option '-fopenmp'")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(cpp_extension, "load", no_openmp)
    fused_topp._build.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="without OpenMP .*unsupported option '-fopenmp'.* one thread"):
            module = fused_topp.kernel()
        assert module is not None and module.__name__.endswith("_serial")
        for dtype in (torch.bfloat16, torch.float32):
            _assert_identical((torch.randn(64, 1536) * torch.randn(64, 1536).exp()).to(dtype), 0.9)
    finally:
        fused_topp._build.cache_clear()  # the next test loads the real kernel again
