"""LLaDA against the official implementation's golden vectors, Jaccard against brute force,
memory independent of steps, the experiment script end to end, and bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common import ActivationCapture, Sparsifier, SparsityRecorder
from llada_sparsity.char_tokenizer import CharTokenizer
from llada_sparsity.generation import generate
from llada_sparsity.jaccard import StepJaccard, jaccard_per_token, pack_mask, unpack_mask
from llada_sparsity.likelihood import log_likelihood
from llada_sparsity.modeling import load_llada
from llada_sparsity.reuse import mask_reuse_experiment
from official_llada import OfficialLLaDA

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def golden(golden_dir):
    reference = load_file(str(golden_dir / "tiny_llada_reference.safetensors"))
    settings = json.loads((golden_dir / "tiny_llada_reference.json").read_text())
    model, tokenizer = load_llada(str(golden_dir / "tiny_llada"))
    return model, reference, settings


def test_forward_logits_match_official(golden):
    model, reference, _ = golden
    with torch.no_grad():
        logits = model(reference["forward_input_ids"]).logits
    torch.testing.assert_close(logits, reference["forward_logits"], atol=1e-4, rtol=0)


def _assert_sites(model, reference, layers=3):
    with ActivationCapture(model, ["input", "up", "gate", "intermediate"]) as capture, torch.no_grad():
        model(reference["forward_input_ids"])
    for layer in range(layers):
        for site in ("input", "up", "gate", "intermediate"):
            expected = reference[f"forward_site_{site}_{layer}"]
            got = capture.activations[(layer, site)][0].reshape(expected.shape)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_sites_match_official_through_the_loader(golden):
    model, reference, _ = golden
    _assert_sites(model, reference)


def test_sites_match_official_with_official_module_names(golden_dir, golden):
    """The site table's llada row, on a model carrying the official module names."""
    _, reference, _ = golden
    official = OfficialLLaDA.from_dir(golden_dir / "tiny_llada")
    _assert_sites(official, reference)


def test_generation_matches_official_step_by_step(golden):
    model, reference, settings = golden
    for case in settings["generate"]:
        name = case["name"]
        tokens, history = generate(model, reference[f"{name}_prompt"], steps=case["steps"],
                                   gen_length=case["gen_length"], block_length=case["block_length"],
                                   temperature=case["temperature"], cfg_scale=case["cfg_scale"],
                                   remasking=case["remasking"], mask_id=case["mask_id"], return_steps=True)
        assert torch.equal(torch.stack(history), reference[f"{name}_step_inputs"]), name
        assert torch.equal(tokens, reference[f"{name}_output"]), name


def test_log_likelihood_reproduces_seeded_official_values(golden):
    model, reference, settings = golden
    for case in settings["loglik"]:
        seeded = case["seeded"]
        for seed, expected in zip(seeded["seeds"], seeded["values"]):
            torch.manual_seed(seed)
            value = log_likelihood(model, reference[f"{case['name']}_prompt"], reference[f"{case['name']}_answer"],
                                   mc_num=seeded["mc_num"], batch_size=seeded["batch_size"],
                                   cfg_scale=seeded["cfg_scale"], mask_id=settings["mask_token_id"])
            assert value == pytest.approx(expected, abs=1e-4)


def test_log_likelihood_agrees_statistically_with_reference_mean(golden):
    model, reference, settings = golden
    for case in settings["loglik"]:
        torch.manual_seed(7)
        value = log_likelihood(model, reference[f"{case['name']}_prompt"], reference[f"{case['name']}_answer"],
                               mc_num=1024, batch_size=64, mask_id=settings["mask_token_id"])
        spread = case["reference_std_of_256_sample_estimates"] * (256 / 1024) ** 0.5
        assert abs(value - case["reference_mean"]) < 4 * spread + 1e-3, case["name"]


def test_pack_roundtrip_and_jaccard_brute_force():
    masks = torch.rand(2, 5, 3, 13) > 0.5
    masks[0, 0, 0] = False
    masks[1, 0, 0] = False  # both empty: J = 1
    assert torch.equal(unpack_mask(pack_mask(masks), 13), masks)
    got = jaccard_per_token(masks[0], masks[1])
    for i in range(5):
        for j in range(3):
            a = {k for k in range(13) if masks[0, i, j, k]}
            b = {k for k in range(13) if masks[1, i, j, k]}
            expected = len(a & b) / len(a | b) if a | b else 1.0
            assert got[i, j].item() == pytest.approx(expected)


def test_step_jaccard_against_brute_force_sets():
    """Feed synthetic per-step masks; consecutive and drift Jaccard equal a set computation."""
    observer = StepJaccard()
    observer.start_sequence(prompt_length=2)
    steps = [torch.rand(1, 4, 10) > 0.4 for _ in range(3)]
    for step, mask in enumerate(steps):
        observer.observe(0, "intermediate", {"step": step}, mask.float(), mask, None)
    rows = {r["step"]: r for r in observer.rows()}

    def jac(a, b):
        a, b = set(torch.nonzero(a).flatten().tolist()), set(torch.nonzero(b).flatten().tolist())
        return len(a & b) / len(a | b) if a | b else 1.0

    for step in (1, 2):
        generated = [jac(steps[step][0, t], steps[step - 1][0, t]) for t in (2, 3)]
        every = [jac(steps[step][0, t], steps[step - 1][0, t]) for t in range(4)]
        drift = [jac(steps[step][0, t], steps[0][0, t]) for t in (2, 3)]
        assert rows[step]["consecutive_jaccard_generated"] == pytest.approx(sum(generated) / 2)
        assert rows[step]["consecutive_jaccard_all"] == pytest.approx(sum(every) / 4)
        assert rows[step]["drift_jaccard_generated"] == pytest.approx(sum(drift) / 2)
    sparsity = 1 - steps[2][0, 2:].float().mean().item()
    assert rows[2]["sparsity_generated"] == pytest.approx(sparsity)


def _stored_bytes_after(model, steps):
    observer = StepJaccard()
    recorder = SparsityRecorder([observer])
    prompt = torch.randint(0, 300, (1, 5))
    observer.start_sequence(5)
    with Sparsifier(model, "all_inputs", "topp", 0.8, recorder=recorder):
        generate(model, prompt, steps=steps, gen_length=16, block_length=16, recorder=recorder)
    return observer.stored_bytes(), len(observer.rows())


def test_recorder_memory_independent_of_number_of_steps(golden):
    model = golden[0]
    small, rows_small = _stored_bytes_after(model, 4)
    large, rows_large = _stored_bytes_after(model, 16)
    assert small == large > 0
    assert rows_large == 4 * rows_small
    # previous + first packed masks: 3 layers x 2 sites x 2 copies x 21 tokens x D/8 bytes
    d_in, d_mid = model.config.hidden_size, model.config.intermediate_size
    assert large == 3 * 2 * 21 * (d_in // 8 + d_mid // 8)


def test_cfg_counts_only_the_conditional_half(golden):
    model = golden[0]
    recorder = SparsityRecorder()
    with Sparsifier(model, "intermediate", "topp", 0.8, recorder=recorder):
        generate(model, torch.randint(0, 300, (2, 4)), steps=2, gen_length=8, block_length=8, cfg_scale=1.0,
                 recorder=recorder)
    rows = recorder.rows()
    assert {r["step"] for r in rows} == {0, 1}
    assert all(r["counted"] == 2 * 12 * model.config.intermediate_size for r in rows)


def test_mask_reuse_changes_logits(golden):
    """Rows per (r, step), r = 0 the recomputing reference; values against a second computation in
    test_llada_batched.py."""
    model = golden[0]
    rows = mask_reuse_experiment(model, torch.randint(0, 300, (1, 4)), "intermediate", "topp", 0.7,
                                 reuse_values=(3,), steps=8, gen_length=8, block_length=8)
    assert [(r["reuse"], r["step"]) for r in rows] == [(r, s) for r in (0, 3) for s in range(8)]
    reused = [r for r in rows if r["reuse"] == 3]
    assert max(r["kl_recomputed_vs_reused"] for r in reused[1:4]) > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(gen_length=10, block_length=4, steps=4), "not divisible by block_length"),
    (dict(gen_length=16, block_length=4, steps=6), "not divisible by the number of blocks"),
])
def test_bad_schedules(golden, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(golden[0], torch.randint(0, 300, (1, 3)), **kwargs)


def test_prompt_with_mask_id_is_rejected(golden):
    with pytest.raises(ValueError, match="contains the mask token id 311"):
        generate(golden[0], torch.tensor([[5, 311, 7]]), steps=2, gen_length=4, block_length=4)
    with pytest.raises(ValueError, match="mask token id 311"):
        log_likelihood(golden[0], torch.tensor([5, 311]), torch.tensor([3]), mc_num=2, batch_size=2)


def test_not_a_llada_checkpoint(tmp_path, golden_dir):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not an official LLaDA checkpoint"):
        load_llada(str(tmp_path))
    shutil.copy(golden_dir / "tiny_llada" / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="weights are missing"):
        load_llada(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="cannot find LLaDA checkpoint"):
        load_llada(str(tmp_path / "nowhere"))


@pytest.fixture()
def golden_with_tokenizer(tmp_path, golden_dir):
    """The golden checkpoint plus a character tokenizer (its ids stay below the mask id)."""
    model_dir = tmp_path / "tiny"
    shutil.copytree(golden_dir / "tiny_llada", model_dir)
    CharTokenizer.default().save(model_dir)
    return model_dir


def _run_script(*args):
    return subprocess.run([sys.executable, str(REPO / "experiments" / "llada_jaccard.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_llada_jaccard_script_end_to_end_and_resume(golden_with_tokenizer, tmp_path):
    out = tmp_path / "out"
    args = ["--model", str(golden_with_tokenizer), "--limit", "2", "--steps", "8", "--gen-length", "8",
            "--block-length", "4", "--reuse", "2", "--output", str(out), "--dump-every", "4"]
    first = _run_script(*args)
    assert first.returncode == 0, first.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompts"] == 2
    from common.cli import choose_dtype

    auto = str(choose_dtype("auto", "cpu")[0]).replace("torch.", "")  # no --dtype: the CPU's own choice
    assert summary["provenance"]["dtype"] == auto and summary["provenance"]["libraries"]["transformers"]
    assert summary["study"]["dtype"] == auto and summary["store_commits"]
    assert 0 < summary["sparsity_per_site"]["intermediate"]["element_weighted"] < 1
    assert (out / "figures" / "heatmap_drift_jaccard_generated.png").is_file()
    assert (out / "figures" / "jaccard_per_step.pdf").is_file()
    assert len(list((out / "masks").rglob("*.safetensors"))) == 2 * 2  # 2 prompts x steps {0, 4}
    cells = sorted((out / "cells").glob("*.json"))
    stamps = [c.stat().st_mtime_ns for c in cells]
    second = _run_script(*args)
    assert second.returncode == 0, second.stderr
    assert "already done" in second.stdout
    assert [c.stat().st_mtime_ns for c in cells] == stamps  # nothing recomputed


def test_llada_jaccard_script_bad_input_is_one_line(golden_with_tokenizer):
    result = _run_script("--model", str(golden_with_tokenizer), "--value", "1.5")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: rule value p=1.5 is outside [0, 1]; give a threshold "
                                                  "between 0 and 1"]
    result = _run_script("--model", str(golden_with_tokenizer), "--gen-length", "10", "--block-length", "4")
    assert result.returncode == 2 and "not divisible by block_length" in result.stderr


def test_llada_lm_eval_model_at_p_one_equals_dense_and_counts(golden_with_tokenizer):
    import lm_eval

    from common.evaluation.tasks import task_manager
    from llada_sparsity.lm_eval_llada import LLaDALM

    manager = task_manager()

    def run(**sparsity):
        lm = LLaDALM(str(golden_with_tokenizer), mc_num=4, batch_size=4, steps=4, gen_length=4, block_length=4,
                     **sparsity)
        out = lm_eval.simple_evaluate(model=lm, tasks=["bb_general_knowledge"], task_manager=manager, limit=3,
                                      log_samples=True, bootstrap_iters=0, verbosity="ERROR")
        lls = [[r[0] for r in s["filtered_resps"]] for s in out["samples"]["bb_general_knowledge"]]
        return lls, lm

    dense, _ = run()
    same, lm = run(sites="intermediate", value=1.0)
    assert same == dense  # same seed, p = 1 keeps every non-zero entry
    sparse, lm = run(sites="intermediate", value=0.5)
    assert sparse != dense
    summary = lm.sparsity_statistics()["summary"]["intermediate"]
    assert 0.3 < summary["element_weighted"] < 0.99
    with pytest.raises(NotImplementedError, match="perplexity tasks are not supported"):
        lm.loglikelihood_rolling([])
