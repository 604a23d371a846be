"""Every decoder linear sparsified (TEAL style): equal to dense at sparsity 0 and to the masked
dense model at calibrated thresholds, for every dense row of the site table; the swap is clean
and the weights come back bit-identical."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from common.core.sites import ARCHITECTURES, LINEAR_INPUTS, linear_module_names
from common.execution import ALL_LINEAR, LayerThresholds, SparseLinearExecution, calibrate_thresholds
from common.execution.products import GATHER_TOKENS
from common.execution.sparse_linear import SparseLinear
from tests.tiny_models import tiny_model, tiny_model_for_row, tiny_moe

DENSE_ROWS = [row.name for row in ARCHITECTURES if not row.is_moe]
PATHS = {"prefill": GATHER_TOKENS, "kernel": 64}  # 9-token calls: masked dense, or the fused kernel per token


def _ids(seed: int = 1, shape=(1, 9)) -> torch.Tensor:
    return torch.randint(3, 90, shape, generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    output = model(input_ids=ids)
    return output.logits if hasattr(output, "logits") else output[0]


def _masked_hooks(model, thresholds: LayerThresholds):
    """Reference: a pre-hook on every linear of each group that zeros |x| < t (written independently)."""
    handles = []
    for group in LINEAR_INPUTS:
        for layer, names in linear_module_names(model, group).items():
            t = thresholds.values[group][layer]
            for name in names:
                handles.append(model.get_submodule(name).register_forward_pre_hook(
                    lambda m, args, t=t: (args[0] * (args[0].abs() >= t),)))
    return handles


@pytest.mark.parametrize("row", DENSE_ROWS)
@pytest.mark.parametrize("path", list(PATHS))
def test_all_linear_at_sparsity_zero_equals_dense(row, path):
    model = tiny_model_for_row(row)
    ids = _ids()
    zero = calibrate_thresholds(model, [ids], ALL_LINEAR, 0.0)
    assert set(zero.values) == set(LINEAR_INPUTS) and all(t == 0.0 for v in zero.values.values() for t in v.values())
    with torch.no_grad():
        dense = _logits(model, ids)
        with SparseLinearExecution(model, thresholds=zero, gather_tokens=PATHS[path]) as sparse:
            actual = _logits(model, ids)
    torch.testing.assert_close(actual, dense, rtol=0, atol=1e-5)
    assert all(summary["pooled"] == 0.0 for summary in sparse.sparsity().values())


@pytest.mark.parametrize("row", DENSE_ROWS)
@pytest.mark.parametrize("path", list(PATHS))
def test_all_linear_equals_masked_dense(row, path):
    model = tiny_model_for_row(row)
    ids = _ids(2)
    thresholds = calibrate_thresholds(model, [ids], ALL_LINEAR, 0.5)
    handles = _masked_hooks(model, thresholds)
    try:
        with torch.no_grad():
            expected = _logits(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad(), SparseLinearExecution(model, thresholds=thresholds, gather_tokens=PATHS[path]) as sparse:
        actual = _logits(model, ids)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    summary = sparse.sparsity()
    assert set(summary) == set(LINEAR_INPUTS)
    for group, values in summary.items():  # on its own calibration text, near the target
        assert values["pooled"] == pytest.approx(0.5, abs=0.15), group
        assert values["nonfinite_rows"] == 0
    # one fused product per group and call: q, k and v (gate and up) share it
    assert all(p.seen == ids.numel() * p.in_features for p in sparse.products.values())
    # the bytes skipped are the dropped entries times their fused rows
    assert sparse.skipped_weight_bytes() == sum((p.seen - p.kept) * p.rows.shape[1] * 4
                                                for p in sparse.products.values())


def test_top_p_rule_and_group_subset():
    model = tiny_model("qwen3")
    ids = _ids(3)
    with torch.no_grad(), SparseLinearExecution(model, ["attention", "attention_output"], value=0.8) as sparse:
        _logits(model, ids)
    assert set(sparse.sparsity()) == {"attention", "attention_output"}
    assert all(0 < s["pooled"] < 1 for s in sparse.sparsity().values())
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.gate_proj, nn.Linear)  # groups not chosen stay dense


def _bits(model):
    return {name: p.detach().clone().view(torch.uint8) for name, p in model.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_modules_and_weights_restored_on_exit_and_on_error(dtype):
    model = tiny_model("llama").to(dtype)
    names = [name for group in LINEAR_INPUTS for per_layer in linear_module_names(model, group).values()
             for name in per_layer]
    originals = {name: model.get_submodule(name) for name in names}
    saved = _bits(model)
    thresholds = calibrate_thresholds(model, [_ids(4)], ALL_LINEAR, 0.6)
    with torch.no_grad(), SparseLinearExecution(model, thresholds=thresholds, gather_tokens=64):
        assert all(isinstance(model.get_submodule(name), SparseLinear) for name in names)
        _logits(model, _ids(5))
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), SparseLinearExecution(model, thresholds=thresholds, gather_tokens=64):
            _logits(model, _ids(5))
            raise RuntimeError("boom")
    assert all(model.get_submodule(name) is module for name, module in originals.items())
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    now = _bits(model)
    assert set(now) == set(saved) and all(torch.equal(now[name], saved[name]) for name in saved)


def test_bfloat16_decode_step_is_close_to_masked_dense():
    """One decode token through the fused bf16 kernel against the masked dense bf16 model."""
    model = tiny_model("gemma3_text").to(torch.bfloat16)
    ids = _ids(6)
    thresholds = calibrate_thresholds(model, [ids], ALL_LINEAR, 0.4)
    step = ids[:, -1:]
    handles = _masked_hooks(model, thresholds)
    try:
        with torch.no_grad():
            expected = _logits(model, step).float()
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad(), SparseLinearExecution(model, thresholds=thresholds):
        actual = _logits(model, step).float()
    # bf16 roundings inside the model (2 layers) compound: a few units of the last place
    torch.testing.assert_close(actual, expected, rtol=0.05, atol=0.05)


def test_reentry_reuses_packed_weights_until_they_change():
    model = tiny_model("llama")
    thresholds = calibrate_thresholds(model, [_ids(7)], ALL_LINEAR, 0.5)
    sparse = SparseLinearExecution(model, thresholds=thresholds)
    with sparse:
        first = dict(sparse.products)
    with sparse:
        assert all(sparse.products[key] is product for key, product in first.items())
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight.mul_(2.0)
    with sparse:
        assert sparse.products[("attention", 1)] is not first[("attention", 1)]
        assert sparse.products[("attention", 0)] is first[("attention", 0)]


def test_bad_arguments():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="exactly one rule"):
        SparseLinearExecution(model)
    with pytest.raises(ValueError, match="unknown linear input group"):
        SparseLinearExecution(model, "mlp", value=0.5)
    with pytest.raises(ValueError, match="no calibrated threshold"):
        SparseLinearExecution(model, thresholds=LayerThresholds(0.5, {"attention": {0: 0.1}}))
    with pytest.raises(ValueError, match="fused experts"):
        SparseLinearExecution(tiny_moe("mixtral"), value=0.5)


@pytest.mark.parametrize("row", DENSE_ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_every_group_product_equals_masked_dense_within_rounding(row, dtype, threads):
    """Each linear group's fused product of every dense row, one decode token (the fused kernel
    on CPU): float32 within 1e-5; bfloat16 within its rounding (half a unit of the output's last
    place, plus float32 accumulation relative to the sum of |terms|)."""
    from common.execution import SparseProduct

    model = tiny_model_for_row(row).to(dtype)
    generator = torch.Generator().manual_seed(7)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for group in LINEAR_INPUTS:
            for layer, names in linear_module_names(model, group).items():
                linears = [model.get_submodule(name) for name in names]
                weight = torch.cat([linear.weight for linear in linears]).detach().double()
                x = torch.randn(1, weight.shape[1], generator=generator).to(dtype)
                for threshold in (0.0, 0.6, float("inf")):
                    product = SparseProduct(linears, threshold, gather_tokens=1)
                    with torch.no_grad():
                        actual = product(x).double()
                    keep = ~(x.float().abs() < threshold)
                    expected = (x.double() * keep) @ weight.T
                    error = (actual - expected).abs()
                    if dtype == torch.float32:
                        assert float(error.max()) <= 1e-5, (group, layer, threshold)
                    else:
                        magnitude = (x.double().abs() * keep) @ weight.abs().T
                        bound = 2.0 ** -8 * expected.abs() + 1e-6 * magnitude + 1e-30
                        assert bool((error <= bound).all()), (group, layer, threshold)
                    assert product.kept == int(keep.sum())
    finally:
        torch.set_num_threads(saved)
