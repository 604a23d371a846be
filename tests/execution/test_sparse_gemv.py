"""The fused sparse GEMV CPU kernel: equal to the masked dense product (float32 within 1e-5,
bfloat16 within its rounding), on 1 and 2 threads, with nothing and everything kept; non-finite
tokens handed back; the pure-torch path when it is off or cannot be built."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn as nn

from common.execution import GateBundle, SparseProduct, sparse_gemv

BF16_UNIT = 2.0 ** -8  # unit roundoff of bfloat16 (8 significant bits)


@pytest.fixture(scope="module")
def kernel():
    module = sparse_gemv.kernel()
    if module is None:
        pytest.skip("the sparse GEMV kernel cannot be built here (no C++ compiler or ninja)")
    return module


def _threads(count: int):
    class Threads:
        def __enter__(self):
            self.saved = torch.get_num_threads()
            torch.set_num_threads(count)

        def __exit__(self, *exc):
            torch.set_num_threads(self.saved)

    return Threads()


def _masked_dense(x, keep, rows, bias=None):
    """Reference in float64: the dropped entries zeroed, the dense product."""
    out = (x.double() * keep) @ rows.double()
    return out if bias is None else out + bias.double()


def _assert_within_rounding(actual, expected, x, keep, rows, dtype):
    """float32: 1e-5 absolute (the test data is O(1)). bfloat16: the output rounding (half a
    unit of its last place) plus float32 accumulation, relative to the sum of |terms|."""
    magnitude = (x.double().abs() * keep) @ rows.double().abs()
    error = (actual.double() - expected).abs()
    if dtype == torch.float32:
        assert float(error.max()) <= 1e-5
    else:
        bound = BF16_UNIT * expected.abs() + 1e-6 * magnitude + 1e-30
        assert bool((error <= bound).all()), float((error - bound).max())


SHAPES = [(576, 3072), (1536, 576), (37, 45), (64, 33), (5, 1)]  # SmolLM2's, and odd tails


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("threads", [1, 2])
def test_sparse_gemv_equals_masked_dense(kernel, dtype, shape, tokens, threads):
    inputs, outputs = shape
    generator = torch.Generator().manual_seed(inputs + outputs + tokens)
    x = torch.randn(tokens, inputs, generator=generator).to(dtype)
    rows = (torch.randn(inputs, outputs, generator=generator) / inputs ** 0.5).to(dtype)
    bias = torch.randn(outputs, generator=generator).to(dtype)
    with _threads(threads):
        for threshold in (0.0, 0.3, 1.0, 2.5, float("inf")):  # everything kept ... nothing kept
            keep = ~(x.float().abs() < threshold)
            out, kept, nonfinite = kernel.sparse_gemv(x, rows, threshold, None, None)
            assert out.dtype == dtype and out.shape == (tokens, outputs)
            assert kept == int(keep.sum()) and nonfinite == []
            _assert_within_rounding(out, _masked_dense(x, keep, rows), x, keep, rows, dtype)
            with_bias, _, _ = kernel.sparse_gemv(x, rows, threshold, None, bias)
            _assert_within_rounding(with_bias, _masked_dense(x, keep, rows, bias), x, keep, rows, dtype)
        mask = torch.rand(tokens, inputs, generator=generator) < 0.3  # a given mask (top-p)
        mask[0] = False  # a token with nothing kept: zeros
        out, kept, _ = kernel.sparse_gemv(x, rows, 0.0, mask, None)
        assert kept == int(mask.sum()) and not out[0].any()
        _assert_within_rounding(out, _masked_dense(x, mask, rows), x, mask, rows, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_gemv_keeps_the_leading_shape_of_x(kernel, dtype):
    """A decode step's [batch, 1, I] goes in as it is: out [batch, 1, O], the same values as the
    token rows [batch, I]; a mask given as token rows [T, I] applies to it."""
    x = torch.randn(2, 1, 37).to(dtype)
    rows = torch.randn(37, 45).to(dtype)
    out, kept, _ = kernel.sparse_gemv(x, rows, 0.5, None, None)
    flat, flat_kept, _ = kernel.sparse_gemv(x.reshape(2, 37), rows, 0.5, None, None)
    assert out.shape == (2, 1, 45) and kept == flat_kept == int((x.float().abs() >= 0.5).sum())
    assert torch.equal(out.reshape(2, 45), flat)
    mask = torch.rand(2, 37) < 0.5
    masked, _, _ = kernel.sparse_gemv(x, rows, 0.0, mask, None)
    assert torch.equal(masked.reshape(2, 45), kernel.sparse_gemv(x.reshape(2, 37), rows, 0.0, mask, None)[0])
    with pytest.raises(RuntimeError, match="rows"):
        kernel.sparse_gemv(x, rows, 0.0, torch.ones(2, 36, dtype=torch.bool), None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_and_two_threads_give_identical_bits(kernel, dtype):
    """Threads split the output columns: every column's sum keeps its order."""
    x = torch.randn(2, 1536).to(dtype)
    rows = torch.randn(1536, 577).to(dtype)
    with _threads(1):
        one = kernel.sparse_gemv(x, rows, 0.5, None, None)[0]
    with _threads(2):
        two = kernel.sparse_gemv(x, rows, 0.5, None, None)[0]
    assert torch.equal(one, two)


def _bundle_reference(x, gate, up, down, keep, dtype):
    """The masked dense MLP as the model rounds it: up(x) and act(gate) * up(x) in ``dtype``."""
    u = (x.double() @ up.double().T).to(dtype)
    hidden = (gate.double() * keep * u.double()).to(dtype)
    return hidden.double() @ down.double().T, (hidden.double().abs() @ down.double().abs().T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(576, 1536), (32, 48), (7, 5)])
@pytest.mark.parametrize("threads", [1, 2])
def test_bundled_glu_equals_masked_dense(kernel, dtype, shape, threads):
    hidden, neurons = shape
    generator = torch.Generator().manual_seed(hidden)
    x = torch.randn(2, hidden, generator=generator).to(dtype)
    gate = torch.randn(2, neurons, generator=generator).to(dtype)
    up = (torch.randn(neurons, hidden, generator=generator) / hidden ** 0.5).to(dtype)
    down = (torch.randn(hidden, neurons, generator=generator) / neurons ** 0.5).to(dtype)
    bundle = torch.cat([up, down.T], dim=1).contiguous()
    with _threads(threads):
        for threshold in (0.0, 0.7, float("inf")):
            keep = ~(gate.float().abs() < threshold)
            out, kept, nonfinite = kernel.bundled_glu(x, gate, bundle, threshold, None, None, None)
            assert kept == int(keep.sum()) and nonfinite == []
            expected, magnitude = _bundle_reference(x, gate, up, down, keep, dtype)
            error = (out.double() - expected).abs()
            # float32: summation order only; bfloat16: the roundings of up(x) and of its product
            # with the gate may land one unit apart, plus the output's rounding
            bound = (1e-6 if dtype == torch.float32 else 4 * BF16_UNIT) * (magnitude + expected.abs()) + 1e-30
            assert bool((error <= bound).all()), float((error - bound).max())


def test_nonfinite_tokens_are_handed_back(kernel):
    x = torch.randn(4, 64)
    x[1, 5], x[2, 0] = float("nan"), float("inf")
    rows = torch.randn(64, 40)
    out, kept, nonfinite = kernel.sparse_gemv(x, rows, 0.5, None, None)
    assert nonfinite == [1, 2]
    assert kept == int((x[[0, 3]].abs() >= 0.5).sum())  # only the finite tokens count
    gate = torch.randn(4, 48)
    gate[3, 1] = float("-inf")
    bundle = torch.randn(48, 128)
    assert kernel.bundled_glu(x, gate, bundle, 0.5, None, None, None)[2] == [1, 2, 3]


def _linears(inputs=48, widths=(40, 24), bias=True, dtype=torch.float32):
    torch.manual_seed(3)
    return [nn.Linear(inputs, width, bias=bias).to(dtype) for width in widths]


@pytest.mark.parametrize("path", ["kernel", "torch_gather", "torch_prefill"])
@pytest.mark.parametrize("rule", ["threshold", "mask"])
def test_nonfinite_rows_pass_through_densely_and_are_counted(path, rule, monkeypatch):
    """A token row holding a NaN or an infinity is not sparsified: it equals the dense layers'
    output (NaN where they give NaN) and is counted apart, never as sparse."""
    if path != "kernel":
        monkeypatch.setenv(sparse_gemv.SWITCH, "0")
    elif sparse_gemv.kernel() is None:
        pytest.skip("the sparse GEMV kernel cannot be built here")
    linears = _linears()
    keep_rule = 0.8 if rule == "threshold" else (lambda t: t.abs() > 0.8)
    product = SparseProduct(linears, keep_rule, gather_tokens=1 if path == "torch_prefill" else 8)
    x = torch.randn(5, 48)
    x[1, 3], x[3, 7] = float("nan"), float("inf")
    with torch.no_grad():
        out = product(x)
        dense = torch.cat([linear(x) for linear in linears], dim=-1)
    for row in (1, 3):
        torch.testing.assert_close(out[row], dense[row], equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(out[1]).all()
    finite = x[[0, 2, 4]]
    assert product.nonfinite == 2 and product.seen == 3 * 48
    assert product.kept == int((finite.abs() > 0.8).sum() if rule == "mask" else (finite.abs() >= 0.8).sum())
    expected = (finite * (finite.abs() >= 0.8)) @ torch.cat([l.weight for l in linears]).T \
        + torch.cat([l.bias for l in linears])
    torch.testing.assert_close(out[[0, 2, 4]], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", ["kernel", "torch_gather", "torch_prefill"])
def test_gate_bundle_passes_nonfinite_rows_through(path, monkeypatch):
    if path != "kernel":
        monkeypatch.setenv(sparse_gemv.SWITCH, "0")
    elif sparse_gemv.kernel() is None:
        pytest.skip("the sparse GEMV kernel cannot be built here")
    gate, up = _linears(32, (48, 48), bias=False)
    down = nn.Linear(48, 32, bias=False)
    bundle = GateBundle(gate, up, down, nn.SiLU(), 0.2, gather_tokens=1 if path == "torch_prefill" else 8)
    x = torch.randn(4, 32)
    x[2, 0] = float("nan")
    with torch.no_grad():
        out = bundle(x)
        g = nn.functional.silu(gate(x))
        expected = down(g * ~(g.abs() < 0.2) * up(x))
    assert torch.isnan(out[2]).all() and bundle.nonfinite == 1 and bundle.seen == 3 * 48
    torch.testing.assert_close(out[[0, 1, 3]], expected[[0, 1, 3]], rtol=0, atol=1e-5)


def test_switched_off_or_unbuildable_kernel_falls_back_with_one_warning(monkeypatch):
    linears = _linears()
    x = torch.randn(1, 48)
    product = SparseProduct(linears, 0.5)
    with torch.no_grad():
        fused = product(x)
        monkeypatch.setenv(sparse_gemv.SWITCH, "0")
        assert sparse_gemv.kernel() is None
        torch.testing.assert_close(product(x), fused, rtol=0, atol=1e-6)
        monkeypatch.delenv(sparse_gemv.SWITCH)

        import torch.utils.cpp_extension as cpp_extension

        def no_compiler(*args, **kwargs):
            raise RuntimeError("Ninja is required to load C++ extensions")

        monkeypatch.setattr(cpp_extension, "load", no_compiler)
        # a fresh cache for this test only: the real build stays cached for the next tests (a second
        # load in one process would rebuild it)
        monkeypatch.setattr(sparse_gemv, "_build", functools.lru_cache(maxsize=None)(sparse_gemv._build.__wrapped__))
        with pytest.warns(RuntimeWarning, match="sparse GEMV CPU kernel could not be built .*Ninja is required"):
            fallback = product(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once, not on every call
            assert sparse_gemv.kernel() is None
            again = product(x)
    torch.testing.assert_close(fallback, fused, rtol=0, atol=1e-6)
    assert torch.equal(fallback, again)


def test_extension_name_carries_the_cpu():
    name = sparse_gemv.extension_name()
    assert name.startswith(sparse_gemv.NAME + "_") and len(name) == len(sparse_gemv.NAME) + 11
    assert sparse_gemv.cpu_signature()  # model and flags, or the platform's names


def test_bad_thresholds_are_refused():
    for bad in (-0.1, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="threshold|keep rule"):
            SparseProduct(_linears(), bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_bundle_torch_path_agrees_with_the_kernel(kernel, dtype, monkeypatch):
    """The fallback gathers the same bundle rows and rounds as the kernel does (sums in float32)."""
    torch.manual_seed(5)
    gate, up = (nn.Linear(64, 96, bias=False).to(dtype) for _ in range(2))
    down = nn.Linear(96, 64, bias=False).to(dtype)
    bundle = GateBundle(gate, up, down, nn.SiLU(), 0.1)
    x = torch.randn(2, 64).to(dtype)
    with torch.no_grad():
        fused = bundle(x).double()
        monkeypatch.setenv(sparse_gemv.SWITCH, "0")
        fallback = bundle(x).double()
    tolerance = 1e-6 if dtype == torch.float32 else 4 * BF16_UNIT
    assert float((fused - fallback).abs().max()) <= tolerance * float(fused.abs().max())
