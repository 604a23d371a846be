"""The batched LLaDA study against one prompt at a time, the paper-compatible computation against
a hand computation, the mask dump reader against the live curves, and mask reuse against the
step-by-step teacher-forced computation."""

import math
import shutil

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from common import Sparsifier, SparsityRecorder
from llada_sparsity.char_tokenizer import CharTokenizer
from llada_sparsity.generation import DenoisingStep, generate, guided_logits
from llada_sparsity.jaccard import MEASURES, StepJaccard, jaccard_from_dump
from llada_sparsity.modeling import load_llada
from llada_sparsity.paper_compat import flattened_keep_mask
from llada_sparsity.reuse import ReusedMaskSparsifier, mask_reuse_experiment
from llada_sparsity.study import PAPER_COMPAT, JaccardStudy, run_batch, run_study

PROMPTS = ["An exception is raised", "The for statement is used to iterate over", "A class"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, golden_dir):
    """The golden checkpoint with a character tokenizer (its ids stay below the mask id)."""
    model_dir = tmp_path_factory.mktemp("tiny") / "model"
    shutil.copytree(golden_dir / "tiny_llada", model_dir)
    CharTokenizer.default().save(model_dir)
    return load_llada(str(model_dir))


def _study(**overrides):
    settings = dict(model="tiny", value=0.8, steps=8, gen_length=8, block_length=4, reuse=[1, 3])
    return JaccardStudy(**{**settings, **overrides})


def _assert_rows_close(batched, alone, atol):
    assert len(batched) == len(alone) > 0
    for got, expected in zip(batched, alone):
        assert {k: v for k, v in got.items() if not isinstance(v, float)} == \
               {k: v for k, v in expected.items() if not isinstance(v, float)}
        for name, value in expected.items():
            if isinstance(value, float):
                assert got[name] == pytest.approx(value, abs=atol, nan_ok=True), name


def test_batched_study_equals_one_prompt_at_a_time(tiny):
    """Prompts of three lengths, left-padded into one batch: same tokens, same statistics."""
    model, tokenizer = tiny
    study = _study()
    batched = run_batch(model, tokenizer, study, PROMPTS)
    for prompt, together in zip(PROMPTS, batched):
        alone = run_batch(model, tokenizer, study, [prompt])[0]
        assert together["prompt"] == prompt
        assert together["completion"] == alone["completion"]
        _assert_rows_close(together["jaccard"], alone["jaccard"], atol=1e-6)
        _assert_rows_close(together["mask_reuse"], alone["mask_reuse"], atol=1e-6)
        assert together["sparsity"] == alone["sparsity"]  # kept / counted per step and layer: padding not counted
    lengths = {len(p) for p in PROMPTS}
    assert len(lengths) == 3 and batched[0]["batch_size"] == 3


def test_batched_paper_compat_equals_one_prompt_at_a_time(tiny):
    model, tokenizer = tiny
    study = _study(reuse=[], paper_compat=True)
    batched = run_batch(model, tokenizer, study, PROMPTS, PAPER_COMPAT)
    for prompt, together in zip(PROMPTS, batched):
        alone = run_batch(model, tokenizer, study, [prompt], PAPER_COMPAT)[0]
        assert together["completion"] == alone["completion"]
        _assert_rows_close(together["jaccard"], alone["jaccard"], atol=1e-6)


def test_batched_jaccard_and_sparsity_against_recorded_masks(tiny):
    """The study's per-sequence rows, recomputed by brute force from masks captured per step."""
    model, tokenizer = tiny
    study = _study(reuse=[])
    captured = {}

    class Capture:
        def observe(self, layer, site, context, tensor, mask, valid):
            captured.setdefault(layer, []).append(mask.clone())

    result = run_batch(model, tokenizer, study, PROMPTS[:2])
    ids = [tokenizer.encode(p) for p in PROMPTS[:2]]
    for row, prompt_ids in enumerate(ids):  # prompt alone, masks per step: J by Python sets
        captured.clear()
        with Sparsifier(model, "intermediate", "topp", 0.8, recorder=SparsityRecorder([Capture()])):
            generate(model, torch.tensor([prompt_ids]), steps=8, gen_length=8, block_length=4)
        rows = {(r["step"], r["layer"]): r for r in result[row]["jaccard"]}
        for layer, masks in captured.items():
            for step in range(1, 8):
                sets = [[{int(i) for i in torch.nonzero(m[0, t]).flatten()} for t in range(m.shape[1])]
                        for m in (masks[step], masks[step - 1], masks[0])]
                generated = range(len(prompt_ids), len(prompt_ids) + 8)
                consecutive = [_jac(sets[0][t], sets[1][t]) for t in generated]
                flat_inter = sum(len(sets[0][t] & sets[2][t]) for t in range(len(sets[0])))
                flat_union = sum(len(sets[0][t] | sets[2][t]) for t in range(len(sets[0])))
                got = rows[(step, layer)]
                assert got["consecutive_jaccard_generated"] == pytest.approx(sum(consecutive) / 8, abs=1e-5)
                assert got["drift_jaccard_flat_all"] == pytest.approx(flat_inter / flat_union, abs=1e-5)
                kept = sum(len(sets[0][t]) for t in generated)
                assert got["sparsity_generated"] == pytest.approx(1 - kept / (8 * masks[0].shape[-1]), abs=1e-5)


def _jac(a, b):
    return len(a & b) / len(a | b) if a | b else 1.0


def _flat_topp_by_hand(values, p):
    """The released rule on a flat list: sort descending, float64 cumsum, threshold, keep >= threshold."""
    ordered = sorted(values, reverse=True)
    total, running = math.fsum(ordered), 0.0
    for value in ordered:
        running += value
        if running >= p * total:
            return [v >= value for v in values]
    return [True] * len(values)


def test_flattened_rule_and_flattened_jaccard_by_hand():
    x = torch.tensor([[[0.0, 0.0, 0.0], [4.0, -1.0, 0.5], [0.2, 3.0, -2.0]],  # row 0: first position is padding
                      [[1.0, 1.0, 1.0], [-6.0, 0.1, 0.3], [0.4, 0.2, 2.5]]])
    real = torch.tensor([[False, True, True], [True, True, True]])
    mask = flattened_keep_mask(x, "topp", 0.8, real=real)
    for row in range(2):
        flat = [abs(v) for pos in range(3) if real[row, pos] for v in x[row, pos].tolist()]
        expected = _flat_topp_by_hand(flat, 0.8)
        got = [bool(k) for pos in range(3) if real[row, pos] for k in mask[row, pos].tolist()]
        assert got == expected
        assert not mask[row][~real[row]].any()
    # row 1 with p = 0.8: |x| sorted 6, 2.5, 1, 1, 1, ... -> cumsum 6, 8.5, 9.5 >= 0.8 * 12.5 = 10? no, 10.5 yes
    assert mask[1].sum().item() == 5
    assert mask[1, 2].tolist() == [False, False, True]

    observer = StepJaccard()
    observer.start_batch(prompt_length=1, sequences=2)
    steps = [torch.rand(2, 3, 5) > 0.5 for _ in range(3)]
    for step, m in enumerate(steps):
        observer.observe(0, "intermediate", {"step": step}, m.float(), m, real)
    rows = {(r["sequence"], r["step"]): r for r in observer.rows()}
    for row in range(2):
        positions = [t for t in range(3) if real[row, t]]
        for step in (1, 2):
            pairs = [{(t, i) for t in positions for i in range(5) if steps[s][row, t, i]} for s in (step, step - 1, 0)]
            assert rows[(row, step)]["consecutive_jaccard_flat_all"] == pytest.approx(_jac(pairs[0], pairs[1]))
            assert rows[(row, step)]["drift_jaccard_flat_all"] == pytest.approx(_jac(pairs[0], pairs[2]))
            generated = {(t, i) for t in (1, 2) for i in range(5)}
            assert rows[(row, step)]["consecutive_jaccard_flat_generated"] == pytest.approx(
                _jac(pairs[0] & generated, pairs[1] & generated))


@pytest.mark.parametrize("dump_every", [1, 2])
def test_dump_reader_recomputes_the_live_curves(tiny, tmp_path, dump_every):
    model, tokenizer = tiny
    study = _study(reuse=[], dump_every=dump_every)
    folders = [tmp_path / f"p{i}" for i in range(2)]
    live = run_batch(model, tokenizer, study, PROMPTS[:2], dump_dirs=folders)  # padded batch
    for folder, result in zip(folders, live):
        recomputed = {(r["step"], r["layer"]): r for r in jaccard_from_dump(folder)}
        assert sorted({s for s, _ in recomputed}) == list(range(0, 8, dump_every))
        for row in result["jaccard"]:
            if row["step"] % dump_every:
                continue
            again = recomputed[(row["step"], row["layer"])]
            names = MEASURES if dump_every == 1 else [m for m in MEASURES if not m.startswith("consecutive")]
            for name in names:
                assert again[name] == pytest.approx(row[name], abs=1e-6, nan_ok=True), name


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_mask_reuse_against_step_by_step_teacher_forcing(tiny, cfg_scale):
    """KL and agreement from the in-run probe (all r in one replay batch) equal a separate
    teacher-forced run per r; the free-running change equals a single-prompt run with the
    reused-mask sparsifier."""
    model, tokenizer = tiny
    prompt = torch.tensor([tokenizer.encode(PROMPTS[1])])
    kwargs = dict(steps=8, gen_length=8, block_length=8, cfg_scale=cfg_scale)
    rows = mask_reuse_experiment(model, prompt, "intermediate", "topp", 0.7, reuse_values=(1, 3), **kwargs)
    with Sparsifier(model, "intermediate", "topp", 0.7):
        tokens, history = generate(model, prompt, return_steps=True, **kwargs)
    mask_id = model.config.mask_token_id

    def forced(reuse):
        sparsifier = ReusedMaskSparsifier(model, "intermediate", "topp", 0.7, reuse=reuse)
        out = []
        with sparsifier, torch.no_grad():
            for step, x in enumerate(history):
                sparsifier.on_step(DenoisingStep(step, 0, step, 8, prompt.shape[1], 8), x)
                out.append(guided_logits(model, x, prompt.shape[1], cfg_scale, mask_id))
        return out

    reference = forced(0)
    for reuse in (1, 3):
        reused = forced(reuse)
        by_step = {r["step"]: r for r in rows if r["reuse"] == reuse}
        for step, x in enumerate(history):
            masked = x == mask_id
            ref, new = F.log_softmax(reference[step][masked], -1), F.log_softmax(reused[step][masked], -1)
            kl = (ref.exp() * (ref - new)).sum(-1).mean().item()
            assert by_step[step]["kl_recomputed_vs_reused"] == pytest.approx(kl, abs=1e-6)
            agree = (ref.argmax(-1) == new.argmax(-1)).float().mean().item()
            assert by_step[step]["top1_agreement"] == pytest.approx(agree)
        assert max(by_step[s]["kl_recomputed_vs_reused"] for s in range(1, 8) if s % (reuse + 1)) > 0
        assert all(by_step[s]["kl_recomputed_vs_reused"] == 0 for s in range(0, 8, reuse + 1))
        free = ReusedMaskSparsifier(model, "intermediate", "topp", 0.7, reuse=reuse)
        with free:
            alone = generate(model, prompt, on_step=[free.on_step], **kwargs)
        changed = (alone[:, prompt.shape[1]:] != tokens[:, prompt.shape[1]:]).float().mean().item()
        assert by_step[0]["generated_tokens_changed"] == pytest.approx(changed)


def test_study_with_paper_compat_writes_one_table_and_one_figure(tiny, tmp_path):
    model, tokenizer = tiny
    study = _study(reuse=[1], paper_compat=True, batch_size=2)
    summary = run_study(model, tokenizer, study, PROMPTS, tmp_path)
    table = pd.read_csv(tmp_path / "computations.csv")
    assert set(table.computation) == {"per_token", "paper_compat"}
    assert len(table) == 2 * 8 * model.config.num_hidden_layers
    assert (tmp_path / "figures" / "computations_per_step.png").is_file()
    per_token, paper = summary["computations"]["per_token"], summary["computations"]["paper_compat"]
    assert per_token["mean_consecutive_jaccard_generated"] == summary["mean_consecutive_jaccard_generated"]
    assert paper["sparsity_per_site"]["intermediate"]["element_weighted"] != \
        per_token["sparsity_per_site"]["intermediate"]["element_weighted"]
    assert len(list((tmp_path / "cells").glob("*.json"))) == 2 * len(PROMPTS)
    assert summary["prompts"] == len(PROMPTS) and {r["reuse"] for r in summary["mask_reuse"]} == {0, 1}
