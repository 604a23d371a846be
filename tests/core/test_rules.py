"""Rules: identical to the paper's rule code (golden masks), fast path identical to the sort."""

import json

import pytest
import torch
from safetensors.torch import load_file

from common.core.rules import (_radix_select, _topp_threshold_bracketed, _topp_threshold_radix, _topp_threshold_radix32, keep_mask,
                               keep_threshold, magnitudes, sparsify, topp_threshold, topp_threshold_reference,
                               zero_below)


def _golden_cases(golden_dir):
    tensors = load_file(str(golden_dir / "sparsification_rules.safetensors"))
    cases = json.loads((golden_dir / "sparsification_rules.json").read_text())["cases"]
    return tensors, cases


def test_golden_masks_identical_float32_and_bfloat16(golden_dir):
    tensors, cases = _golden_cases(golden_dir)
    dtypes = {c["dtype"] for c in cases}
    assert {"float32", "bfloat16"} <= dtypes
    for case in cases:
        x = tensors[case["input"]]
        mask = keep_mask(x, case["rule"], case["value"], case["power"])
        expected = tensors[case["key"]].bool()
        assert torch.equal(mask, expected), case["key"]
        assert 1 - mask.float().mean().item() == pytest.approx(case["sparsity"], abs=1e-7), case["key"]


def test_golden_masks_through_the_bracketed_path(golden_dir):
    """Tile golden rows to a width that takes the bracketed path; masks must still match."""
    tensors, cases = _golden_cases(golden_dir)
    for case in cases:
        if case["rule"] != "topp" or not 0 < case["value"] < 1:
            continue
        x = tensors[case["input"]].reshape(-1, 512)
        wide = torch.cat([x, x, x, x], dim=-1)  # same mass fractions, 2048 wide
        a = magnitudes(wide, case["power"])
        assert torch.equal(a >= _topp_threshold_bracketed(a, case["value"]),
                           a >= topp_threshold_reference(a, case["value"])), case["key"]


def test_golden_masks_through_the_radix_path(golden_dir):
    """Golden top-p rows in bfloat16 and float16 through the radix select, called directly."""
    tensors, cases = _golden_cases(golden_dir)
    checked = 0
    for case in cases:
        if case["rule"] != "topp" or not 0 < case["value"] < 1:
            continue
        for dtype in (torch.bfloat16, torch.float16):
            x = tensors[case["input"]].to(dtype)
            a = magnitudes(x.reshape(-1, x.shape[-1]), case["power"])
            mask = (a >= _topp_threshold_radix(a, case["value"])).reshape(x.shape)
            assert torch.equal(mask, keep_mask(x, case["rule"], case["value"], case["power"])), case["key"]
            if case["dtype"] == "bfloat16" and dtype == torch.bfloat16:
                assert torch.equal(mask, tensors[case["key"]].bool()), case["key"]
            checked += 1
    assert checked >= 20


def test_golden_masks_through_the_float32_radix_path(golden_dir):
    """Golden float32 top-p rows through the float32 radix select, called directly."""
    tensors, cases = _golden_cases(golden_dir)
    checked = 0
    for case in cases:
        if case["rule"] != "topp" or not 0 < case["value"] < 1 or case["dtype"] != "float32":
            continue
        x = tensors[case["input"]].float()
        a = magnitudes(x.reshape(-1, x.shape[-1]), case["power"])
        mask = (a >= _topp_threshold_radix32(a, case["value"])).reshape(x.shape)
        assert torch.equal(mask, tensors[case["key"]].bool()), case["key"]
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("threshold_fn, dtype", [(_topp_threshold_radix32, torch.float32),
                                                 (_topp_threshold_radix, torch.bfloat16)])
def test_radix_paths_decide_typical_rows_without_the_full_sort(threshold_fn, dtype, monkeypatch):
    """The fallback to the full sort must stay rare: on SwiGLU-like rows it is never needed."""
    import common.core.rules as rules

    a = magnitudes((torch.randn(256, 1536) * torch.randn(256, 1536).exp()).to(dtype))
    expected = {p: a >= topp_threshold_reference(a, p) for p in (0.3, 0.9, 0.99)}

    def no_fallback(*args):
        raise AssertionError("a typical row fell back to the full sort")

    monkeypatch.setattr(rules, "topp_threshold_reference", no_fallback)
    for p, mask in expected.items():
        assert torch.equal(a >= threshold_fn(a, p), mask), p


def _hard_rows(width: int, dtype: torch.dtype) -> torch.Tensor:
    """SwiGLU-like heavy-tailed rows plus the rows that break naive fast paths."""
    x = (torch.randn(96, width) * torch.randn(96, width).exp()).to(dtype)
    x[0] = 0  # all zeros
    x[1, :5] = 1e4  # massive activations
    x[2] = x[2].round()  # heavy ties
    x[3, ::2] = 0
    x[4, :] = 1.0  # all ties
    x[5, : width // 4], x[5, width // 4:] = 1.0, 0.5  # p = 0.4 lands exactly on a group boundary
    x[6, 0] = float("inf")  # non-finite
    x[7, 1] = 1e-7  # tiny entries
    return x


@pytest.mark.parametrize("threshold_fn, dtype, width", [
    *[(_topp_threshold_radix, d, w) for d in (torch.bfloat16, torch.float16) for w in (64, 576, 1536, 8192)],
    *[(_topp_threshold_radix32, torch.float32, w) for w in (7, 64, 576, 1536, 8192)],
    *[(_topp_threshold_bracketed, d, w) for d in (torch.float32, torch.bfloat16, torch.float16)
      for w in (1024, 3000, 8192)],
])
def test_fast_topp_paths_match_full_sort(threshold_fn, dtype, width):
    x = _hard_rows(width, dtype)
    for p in (0.05, 0.3, 0.4, 0.5, 0.8, 0.9, 0.99):
        for power in (1.0, 2.0):
            a = magnitudes(x, power)
            assert torch.equal(a >= threshold_fn(a, p), a >= topp_threshold_reference(a, p)), (p, power)


@pytest.mark.parametrize("dtype, scales", [(torch.float32, (-30, 30)), (torch.bfloat16, (-30, 30)),
                                           (torch.float16, (-3, 3))])
@pytest.mark.parametrize("n_rows", [1, 3, 40])
def test_radix_paths_on_few_rows_of_different_scales(dtype, scales, n_rows):
    """Rows whose magnitudes differ by many orders share one bincount (each row its own key
    range); few rows, ties and zeros must still give the reference threshold."""
    x = torch.randn(n_rows, 1536) * torch.randn(n_rows, 1536).exp() * torch.logspace(*scales, n_rows).unsqueeze(-1)
    x[:, ::7] = 0
    x[:, 1::5] = x[:, 1:2]  # ties
    a = magnitudes(x.to(dtype))
    for p in (0.1, 0.5, 0.9, 0.99):
        assert torch.equal(a >= topp_threshold(a, p), a >= topp_threshold_reference(a, p)), p


@pytest.mark.parametrize("dtype, width", [(torch.bfloat16, 1536), (torch.bfloat16, 2 ** 16), (torch.float16, 2 ** 13)])
def test_16_bit_radix_sums_are_exact_in_float32(dtype, width):
    """Up to these widths the 16-bit radix select sums in float32; on rows of the largest
    significands, mostly in one binade, its results must equal the float64 sums' bit for bit."""
    significand = torch.randint(0, 2, (3, width)) * 0.0078125 + 1.9921875 - torch.rand(3, width) * 0.03
    x = significand * 2.0 ** torch.randint(-1, 2, (3, width))
    a = magnitudes(x.to(dtype))
    keys = a.view(torch.int16).to(torch.int32)
    for p in (0.3, 0.9, 0.99):
        in_float32 = _radix_select(keys.clone(), a.float(), p)
        in_float64 = _radix_select(keys.clone(), a.double(), p)
        assert all(torch.equal(u, v) for u, v in zip(in_float32, in_float64)), p
    assert torch.equal(a >= topp_threshold(a, 0.9), a >= topp_threshold_reference(a, 0.9))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_radix_paths_on_more_rows_than_one_chunk(dtype):
    """Narrow rows put more than 2^15 rows in a chunk's worth of elements; chunks stay below
    the radix select's row limit."""
    a = magnitudes(torch.randn(70_000, 6).to(dtype))
    assert torch.equal(a >= topp_threshold(a, 0.7), a >= topp_threshold_reference(a, 0.7))


_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_zero_below_is_masked_fill_and_counts_the_mask(dtype):
    """The integer-domain zeroing equals ``masked_fill`` bit for bit (dropped entries are +0) and
    its counts are the mask's; tensors with infinities or NaN take the boolean mask, and their
    non-finite rows are kept whole and counted -1."""
    finite = _hard_rows(576, dtype)
    finite[6] = 1.0
    with_inf = _hard_rows(576, dtype)
    with_nan = finite.clone()
    with_nan[8, 3] = float("nan")
    cases = [("topp", 0.9, 1.0), ("topp", 0.5, 2.0), ("topp", 1.0, 1.0), ("topp", 0.0, 1.0), ("maxp", 0.3, 1.0),
             ("maxp", 0.0, 1.0), ("topk", 0.2, 1.0)]
    for x in (finite, with_inf, with_nan, finite.reshape(8, 12, 576), finite[:, ::2]):
        for rule, value, power in cases:
            mask = keep_mask(x, rule, value, power)
            sparse, kept = zero_below(x, *keep_threshold(x, rule, value, power))
            expected = x.masked_fill(~mask, 0)
            assert sparse.shape == x.shape and kept.shape == x.shape[:-1] and kept.dtype == torch.int32
            assert torch.equal(sparse.view(_BITS[dtype]), expected.view(_BITS[dtype])), (rule, value, power)
            passed = ~torch.isfinite(x.abs() ** power).all(dim=-1)  # rows the rule cannot rank pass through
            assert torch.equal(mask, mask | passed.unsqueeze(-1))
            assert torch.equal(kept, mask.sum(dim=-1, dtype=torch.int32).masked_fill(passed, -1)), (rule, value, power)
            assert torch.equal(sparsify(x, rule, value, power).view(_BITS[dtype]), expected.view(_BITS[dtype]))
    # Inputs that need a gradient keep it (masked_fill's: the incoming gradient where kept, else 0).
    x = finite.clone().requires_grad_()
    sparse, _ = zero_below(x, *keep_threshold(x.detach(), "topp", 0.8))
    sparse.sum().backward()
    assert torch.equal(x.grad, keep_mask(finite, "topp", 0.8).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_p_one_shortcut_matches_full_sort(dtype):
    from common.core.rules import topp_threshold

    x = (torch.randn(64, 700) * torch.randn(64, 700).exp()).to(dtype)
    x[0] = 0  # all zeros: the reference keeps everything
    x[1, ::3] = 0
    x[2, 0], x[2, 1] = 1e6, 1e-30  # the tiny entry is absorbed by the float64 cumsum
    x[3, :] = 1.0  # all ties
    a = magnitudes(x)
    assert torch.equal(a >= topp_threshold(a, 1.0), a >= topp_threshold_reference(a, 1.0))


def test_keep_mask_any_leading_shape_and_sparsify():
    x = torch.randn(2, 3, 5, 64)
    mask = keep_mask(x, "topp", 0.7)
    assert mask.shape == x.shape and mask.dtype == torch.bool
    flat = keep_mask(x.reshape(-1, 64), "topp", 0.7).reshape(x.shape)
    assert torch.equal(mask, flat)
    y = sparsify(x, "topp", 0.7)
    assert y.dtype == x.dtype
    assert torch.equal(y, torch.where(mask, x, torch.zeros_like(x)))


def test_topp_keeps_the_smallest_prefix_reaching_p():
    """Independent check: the kept mass reaches p, and dropping the smallest kept value would not."""
    x = torch.randn(50, 300).double()
    for p in (0.2, 0.6, 0.95):
        mask = keep_mask(x, "topp", p)
        a = x.abs()
        kept_mass = (a * mask).sum(-1)
        assert torch.all(kept_mass >= p * a.sum(-1) - 1e-9)
        smallest_kept = torch.where(mask, a, torch.inf).amin(-1)
        assert torch.all(kept_mass - smallest_kept < p * a.sum(-1))


def test_topk_and_maxp_semantics():
    x = torch.tensor([[4.0, -3.0, 2.0, 1.0, 0.5]])
    assert keep_mask(x, "topk", 0.4).tolist() == [[True, True, False, False, False]]
    assert keep_mask(x, "maxp", 0.5).tolist() == [[True, True, True, False, False]]
    assert keep_mask(x, "topp", 1.0).tolist() == [[True] * 5]
    assert keep_mask(x, "topp", 0.0).tolist() == [[True, False, False, False, False]]


@pytest.mark.parametrize("kwargs, match", [
    (dict(rule="topq", value=0.5), "unknown sparsification rule"),
    (dict(rule="topp", value=1.5), "outside \\[0, 1\\]"),
    (dict(rule="topp", value=-0.1), "outside \\[0, 1\\]"),
    (dict(rule="topp", value=0.5, power=0.5), "must be a finite number >= 1"),
    (dict(rule="maxp", value=0.5, power=2.0), "applies only to rule 'topp'"),
])
def test_bad_rule_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keep_mask(torch.randn(2, 8), **kwargs)


def test_integer_tensor_is_rejected():
    with pytest.raises(TypeError, match="floating tensor"):
        keep_mask(torch.arange(8).reshape(2, 4), "topp", 0.5)


@pytest.mark.parametrize("script, args", [
    ("bench_rules.py", ["--values", "0.9"]),
    ("bench_topp_paths.py", []),
])
def test_rule_benchmarks_run_and_check_identity(script, args):
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / script
    result = subprocess.run([sys.executable, str(path), "--rows", "64", "--widths", "576", "1536", "--repeats", "1",
                             *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 576") or line.startswith("| 1536")]
    assert rows and all(line.rstrip(" |").endswith("True") for line in rows)
