"""Non-finite activations are never counted as sparsity: a token row holding a NaN or an infinity
passes through unchanged (NaN propagates as in the dense model), its kept count is -1, the
recorder counts it apart and warns once naming layer and site. Every path: the fused kernel, the
pure-torch integer and boolean paths, the hooks, the expert sparsifier, the flattened rule and
mask reuse (sparse execution: tests/execution)."""

from __future__ import annotations

import warnings

import pytest
import torch

from common.core import fused_topp
from common.core.hooks import Sparsifier
from common.core.recorder import SparsityRecorder, count_entries
from common.core.rules import NONFINITE, keep_mask, sparsify_and_count
from common.core.stats import summarize
from tiny_models import tiny_model, tiny_moe

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
RULES = (("topp", 0.5), ("topp", 1.0), ("topp", 0.0), ("maxp", 0.5), ("topk", 0.5))


def _rows_with_nonfinite(dtype, width=16):
    x = torch.randn(4, width).to(dtype)
    x[0, 3] = float("nan")
    x[2, 5] = float("inf")
    x[3, 0] = -float("inf")
    return x


def _assert_passed_through(x, sparse, kept):
    bad = torch.tensor([True, False, True, True])
    assert kept.tolist()[1] >= 0 and all(kept[bad] == NONFINITE)
    # the non-finite rows come back bit for bit: NaN where NaN was, every other entry unchanged
    assert torch.equal(sparse[bad].isnan(), x[bad].isnan())
    finite = ~x[bad].isnan()
    assert torch.equal(sparse[bad][finite], x[bad][finite])


def test_the_reported_case_keeps_the_nan_and_counts_it_apart():
    x = torch.randn(2, 16)
    x[0, 3] = float("nan")
    sparse, kept = sparsify_and_count(x, "topp", 0.5)
    assert kept[0] == NONFINITE and 0 < kept[1] < 16
    assert sparse[0, 3].isnan() and torch.equal(sparse[0, :3], x[0, :3])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [True, False])
def test_every_rule_and_dtype_passes_nonfinite_rows_through(dtype, fused, monkeypatch):
    if not fused:
        monkeypatch.setenv(fused_topp.SWITCH, "0")
    x = _rows_with_nonfinite(dtype, 600)
    for rule, value in RULES:
        sparse, kept = sparsify_and_count(x, rule, value)
        _assert_passed_through(x, sparse, kept)
        assert keep_mask(x, rule, value)[[0, 2, 3]].all()
    # the boolean path (what CUDA tensors and inputs needing a gradient take) agrees
    y = x.clone().requires_grad_() if dtype in (torch.float32, torch.float64) else None
    if y is not None:
        sparse, kept = sparsify_and_count(y, "topp", 0.7)
        _assert_passed_through(x, sparse.detach(), kept)


def test_a_nan_made_by_the_power_is_not_mistaken_for_a_finite_row():
    """|x| ** q can turn a NaN into one whose sign bit is set: the integer path's finiteness check
    must not read it as a small number (it did, and zeroed the row)."""
    x = torch.randn(3, 576).to(torch.bfloat16)
    x[1, 7] = float("nan")
    sparse, kept = sparsify_and_count(x, "topp", 0.5, power=2.0)
    assert kept[1] == NONFINITE and sparse[1, 7].isnan() and torch.equal(sparse[1, :7], x[1, :7])


def test_count_entries_leaves_nonfinite_rows_out_of_kept_and_counted():
    kept = torch.tensor([[3, NONFINITE, 5], [NONFINITE, 2, 0]], dtype=torch.int32)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    k, c, n = count_entries(kept, 8)
    assert (int(k), int(c), int(n)) == (10, 4 * 8, 2)
    k, c, n = count_entries(kept, 8, valid)
    assert (int(k), int(c), int(n)) == (10, 3 * 8, 2)


def _nan_llama():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[5, 2] = float("nan")  # every token's intermediate at layer 0
    return model


def test_a_nan_weight_propagates_through_the_sparsified_model_and_is_counted():
    model = _nan_llama()
    ids = torch.randint(1, 90, (2, 7))
    with torch.no_grad():
        dense = model(ids).logits
        with Sparsifier(model, ["input", "intermediate"], "topp", 0.9) as sparsifier:
            sparse = model(ids).logits
    assert dense.isnan().all() and sparse.isnan().all()  # as dense: NaN, not a finite "sparse" answer
    with pytest.warns(RuntimeWarning, match="14 token row.*layer 0, site intermediate.*NaN or an infinity"):
        rows = sparsifier.recorder.rows()
    by_key = {(r["layer"], r["site"]): r for r in rows}
    assert by_key[(0, "intermediate")]["nonfinite_rows"] == 14 and by_key[(0, "intermediate")]["counted"] == 0
    assert by_key[(0, "intermediate")]["sparsity"] is None  # nothing finite to measure, not 1.0
    assert by_key[(0, "input")]["nonfinite_rows"] == 0 and 0 < by_key[(0, "input")]["sparsity"] < 1
    summary = summarize(rows)
    assert summary["intermediate"]["nonfinite_rows"] == 28  # layer 1 too: the NaN reached the residual
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsifier.recorder.rows()  # said once per key, not on every read


def test_the_boolean_mask_observers_see_nonfinite_rows_kept_whole():
    model = _nan_llama()

    class Masks:
        def __init__(self):
            self.seen = {}

        def observe(self, layer, site, context, tensor, mask, valid):
            self.seen[(layer, site)] = mask

    masks = Masks()
    with torch.no_grad(), Sparsifier(model, "intermediate", "topp", 0.5, recorder=SparsityRecorder([masks])) as sp:
        model(torch.randint(1, 90, (1, 5)))
    assert masks.seen[(0, "intermediate")].all()
    with pytest.warns(RuntimeWarning):
        assert sp.recorder.rows()[0]["nonfinite_rows"] == 5


@pytest.mark.parametrize("backend", ["grouped_mm", "eager"])
def test_the_expert_sparsifier_counts_nonfinite_routed_rows_per_expert(backend):
    from moe_sparsity.experts import ExpertSparsifier

    model = tiny_moe("qwen3_moe")
    model.set_experts_implementation(backend)
    with torch.no_grad():
        model.model.layers[0].mlp.experts.gate_up_proj[2, 60, 3] = float("nan")  # expert 2's up half
    ids = torch.randint(1, 90, (1, 9))
    with torch.no_grad(), ExpertSparsifier(model, ["input", "intermediate"], "topp", 0.8) as sparsifier:
        model(ids)
    with pytest.warns(RuntimeWarning, match="layer 0, site intermediate"):
        rows = sparsifier.recorder.expert_rows()
    layer0 = {r["expert"]: r for r in rows if r["layer"] == 0 and r["site"] == "intermediate"}
    assert layer0[2]["routed_tokens"] > 0 and layer0[2]["nonfinite_rows"] == layer0[2]["routed_tokens"]
    assert layer0[2]["counted"] == 0 and layer0[2]["sparsity"] is None
    others = [r for e, r in layer0.items() if e != 2 and r["routed_tokens"]]
    assert others and all(r["nonfinite_rows"] == 0 and 0 < r["sparsity"] < 1 for r in others)


def test_the_flattened_rule_passes_a_nonfinite_sequence_through_and_counts_its_tokens():
    from llada_sparsity.paper_compat import FlattenedSparsifier

    model = tiny_model("llama")
    recorder = SparsityRecorder()
    sparsifier = FlattenedSparsifier(model, "intermediate", "topp", 0.7, recorder=recorder)
    x = torch.randn(2, 5, 48)
    x[1, 2, 4] = float("nan")
    out = sparsifier.transform(0, "intermediate", x)
    assert torch.equal(out[1].isnan(), x[1].isnan()) and torch.equal(out[1, 0], x[1, 0])  # sequence 1 untouched
    assert (out[0] == 0).any()  # sequence 0 sparsified as usual
    with pytest.warns(RuntimeWarning):
        (row,) = recorder.rows()
    assert row["nonfinite_rows"] == 5 and row["counted"] == 5 * 48


def test_a_reused_mask_never_cuts_a_nonfinite_row():
    from llada_sparsity.reuse import ReusedMaskSparsifier

    model = tiny_model("llama")
    sparsifier = ReusedMaskSparsifier(model, "intermediate", "topp", 0.5, reuse=4)
    x = torch.randn(1, 3, 48)
    sparsifier.transform(0, "intermediate", x)  # step 0: a fresh mask, cached
    sparsifier.step = 1
    y = torch.randn(1, 3, 48)
    y[0, 1, 0] = float("inf")
    out = sparsifier.transform(0, "intermediate", y)  # step 1 reuses step 0's mask
    assert torch.equal(out[0, 1], y[0, 1]) and (out[0, 0] == 0).any()
