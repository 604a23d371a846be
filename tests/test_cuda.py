"""The same numbers on a CUDA device: rule thresholds and zeroing, dense site hooks, per-expert MoE
hooks and LLaDA's instrumented denoising loop, each compared with the CPU result of this suite.

Skipped where no GPU is visible (CI); run with ``pytest -m cuda`` on a GPU machine.
``SPARSITY_TEST_DEVICE=cpu`` runs the same code on the CPU against itself (a dry run of the file).
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from common import Sparsifier, SparsityRecorder
from common.core.rules import keep_mask, keep_threshold, sparsify_and_count, zero_below
from llada_sparsity.generation import generate
from llada_sparsity.jaccard import StepJaccard
from llada_sparsity.modeling import load_llada
from moe_sparsity.experts import SUPPORTED_BACKENDS, ExpertSparsifier
from tiny_models import DENSE_ARCHITECTURES, MOE_ARCHITECTURES, tiny_model, tiny_moe

CUDA = torch.device(os.environ.get("SPARSITY_TEST_DEVICE", "cuda"))
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")]
IDS = torch.randint(2, 120, (2, 9))


def _rows(width: int, dtype: torch.dtype) -> torch.Tensor:
    """Random rows with ties, exact zeros and very different scales, as the golden rule tests use."""
    generator = torch.Generator().manual_seed(width)
    x = torch.randn(12, width, generator=generator) * torch.logspace(-3, 3, 12).unsqueeze(1)
    x[0] = 0.0
    x[1] = x[1].round()
    x[2, : width // 2] = 0.0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [1, 7, 576, 1536, 2048])
@pytest.mark.parametrize("rule,value", [("topp", 0.5), ("topp", 0.9), ("topp", 0.99), ("maxp", 0.3), ("topk", 0.25)])
def test_thresholds_and_zeroing_equal_cpu(dtype, width, rule, value):
    x = _rows(width, dtype)
    a_cpu, threshold_cpu = keep_threshold(x, rule, value)
    a_gpu, threshold_gpu = keep_threshold(x.to(CUDA), rule, value)
    assert torch.equal(threshold_gpu.cpu(), threshold_cpu)
    zeroed_cpu, kept_cpu = zero_below(x, a_cpu, threshold_cpu)
    zeroed_gpu, kept_gpu = zero_below(x.to(CUDA), a_gpu, threshold_gpu)
    assert zeroed_gpu.dtype == dtype and zeroed_gpu.device == x.to(CUDA).device
    assert torch.equal(zeroed_gpu.cpu(), zeroed_cpu)
    assert torch.equal(kept_gpu.cpu(), kept_cpu)
    assert torch.equal(keep_mask(x.to(CUDA), rule, value).cpu(), keep_mask(x, rule, value))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_rows_pass_through_on_the_device_as_on_the_cpu(dtype):
    x = _rows(576, dtype)
    x[3, 5], x[4, 0] = float("nan"), float("inf")
    for rule, value in (("topp", 0.9), ("maxp", 0.3), ("topk", 0.25)):
        sparse_cpu, kept_cpu = sparsify_and_count(x, rule, value)
        sparse_gpu, kept_gpu = sparsify_and_count(x.to(CUDA), rule, value)
        assert kept_cpu[3] == kept_cpu[4] == -1 and torch.equal(kept_gpu.cpu(), kept_cpu)
        assert torch.equal(sparse_gpu.cpu().isnan(), sparse_cpu.isnan())
        assert torch.equal(sparse_gpu.cpu().nan_to_num(), sparse_cpu.nan_to_num())


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits


def _kept_fraction(recorder):
    rows = recorder.rows()
    return sum(r["kept"] for r in rows) / sum(r["counted"] for r in rows)


@pytest.mark.parametrize("arch", DENSE_ARCHITECTURES)
@pytest.mark.parametrize("site", ["input", "intermediate", "all_inputs"])
def test_dense_hooks_on_cuda_match_cpu(arch, site):
    cpu = tiny_model(arch)
    gpu = tiny_model(arch).to(CUDA)
    plain = _logits(gpu)
    with Sparsifier(gpu, site, "topp", 1.0):
        assert torch.equal(_logits(gpu), plain)
    with Sparsifier(cpu, site, "topp", 0.7) as sp_cpu:
        sparse_cpu = _logits(cpu)
    with Sparsifier(gpu, site, "topp", 0.7) as sp_gpu:
        sparse_gpu = _logits(gpu)
    torch.testing.assert_close(sparse_gpu.cpu(), sparse_cpu, atol=1e-3, rtol=1e-3)
    assert _kept_fraction(sp_gpu.recorder) == pytest.approx(_kept_fraction(sp_cpu.recorder), abs=0.01)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_dense_hooks_in_bfloat16_on_cuda(arch):
    reference = tiny_model(arch).to(CUDA)
    model = tiny_model(arch).to(CUDA, torch.bfloat16)
    with Sparsifier(reference, "all_inputs", "topp", 0.8) as sp_reference:
        _logits(reference)
    with Sparsifier(model, "all_inputs", "topp", 0.8) as sp:
        logits = _logits(model)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert _kept_fraction(sp.recorder) == pytest.approx(_kept_fraction(sp_reference.recorder), abs=0.03)


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
@pytest.mark.parametrize("backend", SUPPORTED_BACKENDS)
def test_expert_hooks_on_cuda_match_cpu(arch, backend):
    cpu, gpu = tiny_moe(arch), tiny_moe(arch).to(CUDA)
    for model in (cpu, gpu):
        model.set_experts_implementation(backend)
    plain = _logits(gpu)
    with ExpertSparsifier(gpu, ["all_inputs", "up", "gate"], "topp", 1.0):
        assert torch.equal(_logits(gpu), plain)
    with ExpertSparsifier(cpu, ["intermediate"], "topp", 0.7) as sp_cpu:
        sparse_cpu = _logits(cpu)
    with ExpertSparsifier(gpu, ["intermediate"], "topp", 0.7) as sp_gpu:
        sparse_gpu = _logits(gpu)
    torch.testing.assert_close(sparse_gpu.cpu(), sparse_cpu, atol=1e-3, rtol=1e-3)
    kept = lambda sp: sum(r["kept"] for r in sp.recorder.expert_rows())  # noqa: E731
    assert kept(sp_gpu) == pytest.approx(kept(sp_cpu), rel=0.01)


@pytest.fixture(scope="module")
def llada(golden_dir):
    reference = load_file(str(golden_dir / "tiny_llada_reference.safetensors"))
    settings = json.loads((golden_dir / "tiny_llada_reference.json").read_text())
    model, _ = load_llada(str(golden_dir / "tiny_llada"))
    return model.to(CUDA), reference, settings


def test_llada_forward_and_generation_on_cuda_match_official(llada):
    model, reference, settings = llada
    with torch.no_grad():
        logits = model(reference["forward_input_ids"].to(CUDA)).logits
    torch.testing.assert_close(logits.cpu(), reference["forward_logits"], atol=1e-3, rtol=0)
    for case in settings["generate"]:
        name = case["name"]
        tokens = generate(model, reference[f"{name}_prompt"].to(CUDA), steps=case["steps"],
                          gen_length=case["gen_length"], block_length=case["block_length"],
                          temperature=case["temperature"], cfg_scale=case["cfg_scale"],
                          remasking=case["remasking"], mask_id=case["mask_id"])
        assert tokens.device.type == CUDA.type
        agree = (tokens.cpu() == reference[f"{name}_output"]).float().mean().item()
        assert agree >= 0.9, name


def _step_jaccard_rows(model, prompt):
    observer = StepJaccard()
    recorder = SparsityRecorder([observer])
    observer.start_sequence(prompt.shape[1])
    with Sparsifier(model, "all_inputs", "topp", 0.8, recorder=recorder):
        generate(model, prompt.to(model.device), steps=4, gen_length=16, block_length=16, recorder=recorder)
    return observer.rows()


def test_llada_step_jaccard_on_cuda_matches_cpu(llada, golden_dir):
    cpu_model, _ = load_llada(str(golden_dir / "tiny_llada"))
    prompt = torch.randint(0, 300, (1, 5))
    cpu_rows, gpu_rows = _step_jaccard_rows(cpu_model, prompt), _step_jaccard_rows(llada[0], prompt)
    assert len(gpu_rows) == len(cpu_rows) == 4 * 3 * 2  # steps x layers x sites
    for cpu_row, gpu_row in zip(cpu_rows, gpu_rows):
        for key in ("consecutive_jaccard_generated", "drift_jaccard_generated", "sparsity_generated"):
            assert gpu_row[key] == pytest.approx(cpu_row[key], abs=0.02, nan_ok=True), key


def test_memory_fraction_limits_the_process_and_the_scoring_batches():
    """--memory-fraction holds the process to a share of the GPU, and the bridge sizes its logit
    slices within that share (not the whole card)."""
    if CUDA.type != "cuda":
        pytest.skip("a per-process memory fraction exists on CUDA only")
    from common.cli.flags import limit_device_memory
    from common.evaluation.bridge import device_memory

    total = torch.cuda.get_device_properties(CUDA).total_memory
    try:
        limit_device_memory(0.25, str(CUDA))
        assert torch.cuda.get_per_process_memory_fraction(CUDA) == pytest.approx(0.25)
        assert device_memory(CUDA) == int(total * 0.25)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, CUDA)
    assert device_memory(CUDA) == total
