"""Sparse FFN execution equals the masked dense computation, and the swap is clean."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from common.core.hooks import Sparsifier
from common.core.sites import layer_list_path
from common.execution import GATHER_GEMV, LayerThresholds, SparseFFNExecution, SparseGLU, calibrate_thresholds
from common.execution.kernels import kept_entries
from common.execution.products import GATHER_TOKENS
from tests.tiny_models import DENSE_ARCHITECTURES, mlp_modules, tiny_model, tiny_moe

SITES = ["intermediate", "input", "all_inputs", "gate"]
TOPP_VALUES = [1.0, 0.7, 0.0]  # sparsity 0 (p = 1 keeps every non-zero entry), mid, one kept per token
# token rows up to which a product gathers (on CPU: the fused kernel): the default sends the
# 18-row test batches through the masked dense (prefill) path, 64 through the kernel
PATHS = {"prefill": GATHER_TOKENS, "kernel": 64}


def _ids(seed: int = 1, shape=(2, 9)) -> torch.Tensor:
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(seed))


def _pooled_sparsity(recorder, site: str) -> float:
    kept = sum(int(v) for k, v in recorder.kept.items() if k[1] == site)
    counted = sum(int(v) for k, v in recorder.counted.items() if k[1] == site)
    return 1.0 - kept / counted


@pytest.mark.parametrize("name", DENSE_ARCHITECTURES)
@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("path", list(PATHS))
def test_topp_execution_equals_masked_dense(name, site, path):
    model = tiny_model(name)
    ids = _ids()
    for value in TOPP_VALUES:
        with torch.no_grad():
            with Sparsifier(model, site, "topp", value) as reference:
                expected = model(input_ids=ids).logits
            with SparseFFNExecution(model, site, value=value, gather_tokens=PATHS[path]) as sparse:
                actual = model(input_ids=ids).logits
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
        # the kept counts agree with the study's recorder, entry for entry
        for base in sparse.sites:
            assert sparse.sparsity()[base]["pooled"] == pytest.approx(_pooled_sparsity(reference.recorder, base),
                                                                       abs=1e-12)
        if value == 1.0 and site == "intermediate":
            assert sparse.sparsity()["intermediate"]["pooled"] == 0.0


def _magnitude_hooks(model, site: str, thresholds: LayerThresholds):
    """Reference: hooks that zero |x| < t on the dense modules (written independently): before
    the MLP (input), before down (intermediate), after the activation (gate)."""
    handles = []
    for layer, mlp in enumerate(mlp_modules(model)):
        t = thresholds.values[site][layer]
        if site == "gate":
            handles.append(mlp.act_fn.register_forward_hook(lambda m, args, out, t=t: out * (out.abs() >= t)))
            continue
        module = mlp if site == "input" else mlp.down_proj
        handles.append(module.register_forward_pre_hook(
            lambda m, args, t=t: (args[0] * (args[0].abs() >= t),)))
    return handles


@pytest.mark.parametrize("name", DENSE_ARCHITECTURES)
@pytest.mark.parametrize("site", ["intermediate", "input", "gate"])
@pytest.mark.parametrize("path", list(PATHS))
def test_threshold_execution_equals_masked_dense(name, site, path):
    model = tiny_model(name)
    ids = _ids(2)
    calibrated = [calibrate_thresholds(model, [ids], site, target) for target in (0.0, 0.3, 0.9)]
    nothing = LayerThresholds(1.0, {site: {layer: float("inf") for layer in calibrated[0].values[site]}})
    for thresholds in calibrated + [nothing]:
        handles = _magnitude_hooks(model, site, thresholds)
        try:
            with torch.no_grad():
                expected = model(input_ids=ids).logits
        finally:
            for handle in handles:
                handle.remove()
        with torch.no_grad(), SparseFFNExecution(model, site, thresholds=thresholds,
                                                 gather_tokens=PATHS[path]) as sparse:
            actual = model(input_ids=ids).logits
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
        # on its own calibration text (later layers see sparsified inputs: not exact)
        assert sparse.sparsity()[site]["pooled"] == pytest.approx(thresholds.target_sparsity, abs=0.1)
        assert sparse.sparsity()[site]["nonfinite_rows"] == 0


def _mask_fns():
    def keep_all(x):
        return torch.ones_like(x, dtype=torch.bool)

    def all_but_one(x):  # drop each token's smallest |x|
        return torch.ones_like(x, dtype=torch.bool).scatter(-1, x.abs().argmin(-1, keepdim=True), False)

    def only_one(x):  # keep each token's largest |x|
        return torch.zeros_like(x, dtype=torch.bool).scatter(-1, x.abs().argmax(-1, keepdim=True), True)

    def none(x):
        return torch.zeros_like(x, dtype=torch.bool)

    def half(x):
        return torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.5

    return [keep_all, all_but_one, only_one, none, half]


@pytest.mark.parametrize("kernel", ["auto"] + list(GATHER_GEMV))
@pytest.mark.parametrize("sites", [("intermediate",), ("input",), ("input", "intermediate"), ("gate",)])
@pytest.mark.parametrize("tokens", [1, 5])
def test_sparse_glu_equals_hand_written_masked_mlp(kernel, sites, tokens):
    """Masks with everything, all but one, one, nothing and half kept; "auto" takes the fused
    kernel for one token and the masked dense product for five."""
    mlp = mlp_modules(tiny_model("llama"))[0]
    x = torch.randn(1, tokens, mlp.gate_proj.in_features)
    for mask_fn in _mask_fns():
        module = SparseGLU(mlp, {site: mask_fn for site in sites}, kernel)
        with torch.no_grad():
            actual = module(x)
            x_in = x * mask_fn(x.reshape(-1, x.shape[-1])).reshape(x.shape) if "input" in sites else x
            gate = mlp.act_fn(x_in @ mlp.gate_proj.weight.T)
            if "gate" in sites:
                gate = gate * mask_fn(gate.reshape(-1, gate.shape[-1])).reshape(gate.shape)
            hidden = gate * (x_in @ mlp.up_proj.weight.T)
            if "intermediate" in sites:
                hidden = hidden * mask_fn(hidden.reshape(-1, hidden.shape[-1])).reshape(hidden.shape)
            expected = hidden @ mlp.down_proj.weight.T
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5, msg=f"{mask_fn.__name__}")


def test_sparse_glu_adds_biases():
    import transformers as T

    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                             num_attention_heads=2, mlp_bias=True)).eval()
    mlp = mlp_modules(model)[0]
    for bias in (mlp.gate_proj.bias, mlp.up_proj.bias, mlp.down_proj.bias):
        torch.nn.init.normal_(bias)
    x = torch.randn(3, 16)
    for rules in ({"input": lambda t: t.abs() > 0.5, "intermediate": lambda t: t.abs() > 0.1},
                  {"input": 0.5, "intermediate": 0.1}):  # a mask function or a threshold (the fused kernel)
        module = SparseGLU(mlp, rules)
        with torch.no_grad():
            x_in = x * (x.abs() > 0.5)
            hidden = mlp.act_fn(mlp.gate_proj(x_in)) * mlp.up_proj(x_in)
            expected = mlp.down_proj(hidden * (hidden.abs() > 0.1))
            torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-5)
    for kernel in ("auto", "embedding_bag"):
        module = SparseGLU(mlp, {"gate": 0.3}, kernel)
        with torch.no_grad():
            gate = mlp.act_fn(mlp.gate_proj(x))
            expected = mlp.down_proj(gate * (gate.abs() >= 0.3) * mlp.up_proj(x))
            torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 4])
def test_gather_gemv_kernels_agree_with_dense_product(tokens):
    weight_rows = torch.randn(12, 7)
    x = torch.randn(tokens, 12)
    mask = torch.rand(tokens, 12) < 0.4
    mask[-1] = False  # a token with nothing kept gets zeros
    expected = (x * mask) @ weight_rows
    values, index, offsets = kept_entries(x, mask)
    assert index.numel() == int(mask.sum())
    for name, kernel in GATHER_GEMV.items():
        torch.testing.assert_close(kernel(values, index, offsets, weight_rows), expected, rtol=0, atol=1e-6,
                                   msg=name)


def test_custom_kernel_is_called_and_bfloat16_runs():
    model = tiny_model("llama").to(torch.bfloat16)
    calls = []

    def counting_kernel(values, index, offsets, weight_rows):
        calls.append(index.numel())
        return GATHER_GEMV["embedding_bag"](values, index, offsets, weight_rows)

    ids = _ids(3)
    with torch.no_grad():
        with Sparsifier(model, "intermediate", "topp", 0.8):
            expected = model(input_ids=ids).logits
        with SparseFFNExecution(model, "intermediate", value=0.8, kernel=counting_kernel):
            actual = model(input_ids=ids).logits
    assert len(calls) == len(mlp_modules(model)) and all(0 < n < ids.numel() * 48 for n in calls)
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0.05, atol=0.05)


def test_skipped_bytes_are_dropped_rows_times_row_bytes():
    model = tiny_model("qwen2")
    ids = _ids(4)
    with torch.no_grad(), SparseFFNExecution(model, "all_inputs", value=0.6) as sparse:
        model(input_ids=ids)
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    dropped = {site: sum(m.seen[site] - m.kept[site] for m in sparse.modules_by_layer.values())
               for site in ("input", "intermediate")}
    assert dropped["input"] > 0 and dropped["intermediate"] > 0
    assert sparse.skipped_weight_bytes() == 4 * (dropped["input"] * 2 * inter + dropped["intermediate"] * hidden)


def _weight_bits(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def _assert_bit_identical(model, saved) -> None:
    now = model.state_dict()
    assert set(now) == set(saved)
    for name, tensor in saved.items():
        assert now[name].dtype == tensor.dtype and torch.equal(now[name].view(torch.uint8), tensor.view(torch.uint8)), \
            name


@pytest.mark.parametrize("site", ["input", "intermediate", "gate"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_modules_and_weights_restored_on_exit_and_on_error(site, dtype):
    model = tiny_model("gemma3").to(dtype)
    layers = model.get_submodule(layer_list_path(model))
    originals = [layer.mlp for layer in layers]
    saved = _weight_bits(model)
    thresholds = calibrate_thresholds(model, [_ids(6)], site, 0.5)
    with torch.no_grad(), SparseFFNExecution(model, site, thresholds=thresholds, gather_tokens=64):
        model(input_ids=_ids(7))
    _assert_bit_identical(model, saved)
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), SparseFFNExecution(model, site, thresholds=thresholds, gather_tokens=64):
            assert all(isinstance(layer.mlp, SparseGLU) for layer in layers)
            model(input_ids=_ids(7))
            raise RuntimeError("boom")
    assert [layer.mlp for layer in layers] == originals
    assert not any(isinstance(m, SparseGLU) for m in model.modules())
    _assert_bit_identical(model, saved)


def test_refuses_nesting_and_bad_arguments():
    model = tiny_model("llama")
    with Sparsifier(model, "intermediate", "topp", 0.9):
        with pytest.raises(RuntimeError, match="already sparsified"):
            with SparseFFNExecution(model, "intermediate", value=0.9):
                pass
    with pytest.raises(ValueError, match="cannot skip weight reads"):
        SparseFFNExecution(model, "up", value=0.9)
    with pytest.raises(ValueError, match="gate site runs alone"):
        SparseFFNExecution(model, ["gate", "input"], value=0.9)
    with pytest.raises(ValueError, match="exactly one rule"):
        SparseFFNExecution(model, "input")
    with pytest.raises(ValueError, match="no calibrated threshold"):
        SparseFFNExecution(model, "input", thresholds=LayerThresholds(0.5, {"input": {0: 0.1}}))
    with pytest.raises(ValueError, match="unknown gather-GEMV kernel"):
        SparseFFNExecution(model, "input", value=0.5, kernel="cutlass")
    with pytest.raises(ValueError, match="fused experts"):
        SparseFFNExecution(tiny_moe("mixtral"), "intermediate", value=0.5)


ALLOWED_IMPORTS = ("torch", "common.core", "common.execution", "__future__", "contextlib", "dataclasses", "functools",
                   "hashlib", "numbers", "pathlib", "platform", "typing")


def test_execution_layer_imports_only_torch_and_core():
    package = Path(__file__).resolve().parents[2] / "common" / "execution"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.startswith(ALLOWED_IMPORTS), f"{path.name} imports {name}"


def test_reentry_reuses_packed_weights_until_they_change():
    model = tiny_model("llama")
    ids = _ids(5)
    sparse = SparseFFNExecution(model, "intermediate", value=0.7)
    with sparse:
        first = dict(sparse.modules_by_layer)
    with sparse:
        assert sparse.modules_by_layer == first  # same packed modules, no repacking
    with torch.no_grad():
        mlp_modules(model)[0].down_proj.weight.mul_(2.0)  # an in-place change bumps the version
        with sparse:
            assert sparse.modules_by_layer[0] is not first[0] and sparse.modules_by_layer[1] is first[1]
            actual = model(input_ids=ids).logits
        with Sparsifier(model, "intermediate", "topp", 0.7):
            expected = model(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
