"""Calibrated keep rules reach their target sparsity, on the calibration text and on held-out text."""

from __future__ import annotations

import pytest
import torch

from common.core.hooks import Sparsifier
from common.execution import LayerThresholds, SparseFFNExecution, calibrate_thresholds, calibrate_topp_value
from common.execution.thresholds import magnitude_quantile
from tests.tiny_models import tiny_model

# Held-out pooled sparsity of calibrated per-layer thresholds stays within this of the target
# (8 calibration documents of 24 tokens, 8 held-out ones, 2 layers of width 32 / 48).
HELD_OUT_TOLERANCE = 0.05


def _documents(seed: int, count: int = 8, tokens: int = 24) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (1, tokens), generator=generator) for _ in range(count)]


def test_magnitude_quantile_exact_values():
    values = torch.arange(1.0, 101.0)[torch.randperm(100)] * torch.where(torch.rand(100) < 0.5, -1.0, 1.0)
    assert magnitude_quantile(values, 0.25) == 26.0  # 25 entries (1..25) lie below it
    assert magnitude_quantile(values, 0.0) == 0.0
    assert magnitude_quantile(values, 0.99) == 100.0  # only the largest is kept
    assert magnitude_quantile(values, 0.999) == float("inf")  # rounds to dropping all 100
    assert (values.abs() < magnitude_quantile(values, 0.6)).sum() == 60


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
@pytest.mark.parametrize("site", ["intermediate", "input"])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.8])
def test_calibrated_thresholds_reach_target_on_held_out_text(name, site, target):
    model = tiny_model(name)
    thresholds = calibrate_thresholds(model, _documents(seed=10), site, target)
    assert thresholds.target_sparsity == target and set(thresholds.values[site]) == {0, 1}
    with torch.no_grad(), SparseFFNExecution(model, site, thresholds=thresholds) as sparse:
        for ids in _documents(seed=20):
            model(input_ids=ids)
    pooled = sparse.sparsity()[site]
    assert pooled["pooled"] == pytest.approx(target, abs=HELD_OUT_TOLERANCE)
    for layer_sparsity in pooled["per_layer"].values():  # each layer on its own, too
        assert layer_sparsity == pytest.approx(target, abs=2 * HELD_OUT_TOLERANCE)


@pytest.mark.parametrize("site", ["intermediate", "input"])
def test_calibrated_topp_value_reaches_target_on_calibration_text(site):
    model = tiny_model("qwen3")
    documents = _documents(seed=30)
    value = calibrate_topp_value(model, documents, site, 0.6)
    assert 0.0 < value < 1.0
    with torch.no_grad(), Sparsifier(model, site, "topp", value) as sparsifier:  # measured by the study's hooks
        for ids in documents:
            model(input_ids=ids)
    kept = sum(int(v) for v in sparsifier.recorder.kept.values())
    counted = sum(int(v) for v in sparsifier.recorder.counted.values())
    assert 1.0 - kept / counted == pytest.approx(0.6, abs=0.01)


def test_thresholds_round_trip_and_bad_input():
    thresholds = LayerThresholds(0.5, {"input": {0: 0.25, 1: 0.5}})
    assert LayerThresholds.from_dict(thresholds.as_dict()) == thresholds
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="target sparsity"):
        calibrate_thresholds(model, _documents(1), "input", 1.0)
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate_thresholds(model, [], "input", 0.5)


@pytest.mark.parametrize("target", [0.3, 0.7])
def test_all_linear_thresholds_reach_target_on_held_out_text(target):
    from common.execution import ALL_LINEAR, SparseLinearExecution

    model = tiny_model("qwen2")
    thresholds = calibrate_thresholds(model, _documents(seed=10), ALL_LINEAR, target)
    assert set(thresholds.values) == {"attention", "attention_output", "input", "intermediate"}
    assert all(set(per_layer) == {0, 1} for per_layer in thresholds.values.values())
    with torch.no_grad(), SparseLinearExecution(model, thresholds=thresholds) as sparse:
        for ids in _documents(seed=20):
            model(input_ids=ids)
    for group, summary in sparse.sparsity().items():
        assert summary["pooled"] == pytest.approx(target, abs=2 * HELD_OUT_TOLERANCE), group


def test_attention_inputs_are_captured_where_the_site_table_says():
    """The q/k/v input is the attention's normed input; the FFN groups are the FFN sites."""
    from common.execution.thresholds import capture_activations

    model = tiny_model("llama")
    ids = _documents(seed=3, count=1)[0]
    captured = capture_activations(model, [ids], ["attention", "attention_output", "input"])
    assert {site for _, site in captured} == {"attention", "attention_output", "input"}
    layer = model.model.layers[0]
    with torch.no_grad():
        embedded = model.model.embed_tokens(ids)
        normed = layer.input_layernorm(embedded)
    torch.testing.assert_close(captured[(0, "attention")], normed[0], rtol=0, atol=1e-6)
    assert captured[(0, "attention_output")].shape == (ids.shape[1], 32)


def test_magnitude_mask_keeps_nan_and_calibration_skips_nonfinite_rows():
    from common.execution.thresholds import magnitude_mask, thresholds_from_activations

    x = torch.tensor([[0.1, float("nan"), -2.0, float("inf")]])
    assert magnitude_mask(x, 0.5).tolist() == [[False, True, True, True]]  # NaN never silently dropped
    assert magnitude_mask(x, 0.0).all()
    rows = torch.arange(1.0, 9.0).reshape(2, 4)
    poisoned = torch.cat([rows, torch.full((1, 4), float("nan"))])
    assert thresholds_from_activations({(0, "input"): poisoned}, 0.5).values == \
        thresholds_from_activations({(0, "input"): rows}, 0.5).values
