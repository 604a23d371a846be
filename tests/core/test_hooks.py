"""Site hooks on every architecture row: equivalence with the plain model, a hand-computed FFN
oracle, hook removal, padding-free statistics, prefill/decode split, bad input."""

import pytest
import torch
import torch.nn.functional as F

from common import ActivationCapture, EffectiveRank, Sparsifier, SparsityRecorder, keep_mask, summarize
from common.core.recorder import lengths_to_valid
from common.core.sites import detect_architecture, expand_sites
from tiny_models import DENSE_ARCHITECTURES, mlp_modules, tiny_model

IDS = torch.randint(1, 90, (2, 7))


def _logits(model, ids=IDS, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", DENSE_ARCHITECTURES)
@pytest.mark.parametrize("site", ["input", "up", "gate", "intermediate", "all_inputs"])
def test_p_one_equals_plain_model_exactly(arch, site):
    model = tiny_model(arch)
    plain = _logits(model)
    with Sparsifier(model, site, "topp", 1.0) as sp:
        hooked = _logits(model)
    assert torch.equal(hooked, plain)
    assert set(r["site"] for r in sp.recorder.rows()) == set(expand_sites(site))


def _hand_ffn(mlp, x, sites, rule, value):
    """The GLU FFN written out by hand, applying the same rule at the chosen sites."""
    def cut(t, name):
        return t * keep_mask(t, rule, value) if name in sites else t
    x = cut(x, "input")
    up = cut(F.linear(x, mlp.up_proj.weight), "up")
    gate = cut(mlp.act_fn(F.linear(x, mlp.gate_proj.weight)), "gate")
    return F.linear(cut(gate * up, "intermediate"), mlp.down_proj.weight)


@pytest.mark.parametrize("arch", DENSE_ARCHITECTURES)
@pytest.mark.parametrize("site", ["input", "up", "gate", "intermediate", "all_inputs"])
def test_p_below_one_equals_hand_computed_ffn(arch, site):
    model = tiny_model(arch)
    seen = {}
    handles = []
    for layer, mlp in enumerate(mlp_modules(model)):  # registered first: sees the raw FFN input
        handles.append(mlp.register_forward_pre_hook(lambda m, a, layer=layer: seen.__setitem__((layer, "x"), a[0])))
        handles.append(mlp.register_forward_hook(lambda m, a, o, layer=layer: seen.__setitem__((layer, "y"), o)))
    with Sparsifier(model, site, "topp", 0.6) as sp:
        sparse = _logits(model)
    for handle in handles:
        handle.remove()
    sites = expand_sites(site)
    for layer, mlp in enumerate(mlp_modules(model)):
        expected = _hand_ffn(mlp, seen[(layer, "x")], sites, "topp", 0.6)
        torch.testing.assert_close(seen[(layer, "y")], expected, atol=1e-5, rtol=0)
    assert not torch.allclose(sparse, _logits(model))
    summary = summarize(sp.recorder)
    assert 0.05 < summary[sites[0]]["element_weighted"] < 0.95


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_hooks_removed_on_exit_and_on_exception(arch):
    model = tiny_model(arch)
    before = _hook_count(model)
    plain = _logits(model)
    with Sparsifier(model, "all_inputs", "topp", 0.5):
        assert _hook_count(model) > before
    assert _hook_count(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with Sparsifier(model, "gate", "maxp", 0.5):
            _logits(model)
            raise RuntimeError("boom")
    assert _hook_count(model) == before
    assert torch.equal(_logits(model), plain)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padding_does_not_change_statistics(padding_side):
    model = tiny_model("llama")
    lengths = [7, 4]
    rows = [torch.randint(1, 90, (n,)) for n in lengths]
    batch = torch.zeros(2, 7, dtype=torch.long)
    for i, row in enumerate(rows):
        if padding_side == "right":
            batch[i, : len(row)] = row
        else:
            batch[i, 7 - len(row):] = row
    attention = lengths_to_valid(lengths, 7, padding_side).long()

    def stats(ids, **kwargs):
        with Sparsifier(model, "intermediate", "topp", 0.7) as sp:
            _logits(model, ids, **kwargs)
        return {(r["layer"]): (r["kept"], r["counted"]) for r in sp.recorder.rows()}

    padded = stats(batch, attention_mask=attention)
    alone = [stats(row.unsqueeze(0)) for row in rows]
    width = model.config.intermediate_size
    for layer, (kept, counted) in padded.items():
        assert counted == sum(lengths) * width
        expected_kept = sum(a[layer][0] for a in alone)
        assert abs(kept - expected_kept) <= 2  # same real tokens; float noise may flip a tie
    # Garbage in the padded slots changes nothing in the counts.
    noisy = batch.clone()
    noisy[attention == 0] = 89
    assert stats(noisy, attention_mask=attention) == padded


def test_explicit_lengths_win_over_missing_attention_mask():
    model = tiny_model("llama")
    recorder = SparsityRecorder()
    with Sparsifier(model, "up", "topp", 0.8, recorder=recorder):
        with recorder.valid_tokens(lengths_to_valid([5, 3], 7)):
            _logits(model)
    assert all(r["counted"] == 8 * model.config.intermediate_size for r in recorder.rows())


def test_prefill_and_decode_kept_apart():
    model = tiny_model("llama")
    ids = torch.randint(1, 90, (2, 5))
    with Sparsifier(model, "intermediate", "topp", 0.8) as sp:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                       pad_token_id=0)
    width = model.config.intermediate_size
    phases = {(r["phase"], r["layer"]): r for r in sp.recorder.rows()}
    assert phases[("prefill", 0)]["counted"] == 2 * 5 * width
    assert phases[("decode", 0)]["counted"] == 2 * 3 * width  # tokens 2..4 each need one decode forward
    assert phases[("decode", 0)]["forwards"] == 3
    assert set(summarize(sp.recorder, phase="decode")) == {"intermediate"}


def test_counts_from_the_zeroing_equal_counts_from_the_mask():
    """The Sparsifier counts kept entries while it zeroes (no mask); with an observer it also
    builds the mask, which must be the rule's, and the statistics must not change."""
    model = tiny_model("llama")
    attention = lengths_to_valid([7, 4], 7).long()
    seen = []

    class MaskObserver:
        def observe(self, layer, site, context, tensor, mask, valid):
            seen.append(torch.equal(mask, keep_mask(tensor, "topp", 0.7)))

    def stats(recorder):
        with Sparsifier(model, "all_inputs", "topp", 0.7, recorder=recorder) as sp:
            _logits(model, attention_mask=attention)
        return sp.recorder.rows()

    assert stats(SparsityRecorder()) == stats(SparsityRecorder([MaskObserver()]))
    assert seen and all(seen)
    x, valid = torch.randn(3, 5, 64), lengths_to_valid([5, 2, 4], 5)
    mask = keep_mask(x, "topp", 0.6)
    for tokens in (valid, None):
        from_mask, from_kept = SparsityRecorder(), SparsityRecorder()
        from_mask.record(0, "up", x, mask, valid=tokens)
        from_kept.record(0, "up", x, None, valid=tokens, kept=mask.sum(dim=-1))
        assert from_mask.rows() == from_kept.rows()
        expected = int(mask[valid].sum()) if tokens is not None else int(mask.sum())
        assert from_kept.rows()[0]["kept"] == expected


def test_summary_weights():
    rows = [
        {"layer": 0, "site": "input", "kept": 10, "counted": 100},
        {"layer": 1, "site": "input", "kept": 90, "counted": 300},
        {"layer": 0, "site": "intermediate", "kept": 50, "counted": 100},
    ]
    s = summarize(rows)
    assert s["input"]["per_layer"] == {0: 0.9, 1: 0.7}
    assert s["input"]["mean_over_layers"] == pytest.approx(0.8)
    assert s["input"]["element_weighted"] == pytest.approx(1 - 100 / 400)
    assert s["all_inputs"]["per_layer"][0] == pytest.approx(1 - 60 / 200)


def test_capture_leaves_output_unchanged_and_effective_rank():
    model = tiny_model("qwen2")
    plain = _logits(model)
    rank = EffectiveRank()
    attention = lengths_to_valid([7, 5], 7).long()
    with ActivationCapture(model, ["input", "intermediate"], recorder=SparsityRecorder([rank])) as cap:
        captured = _logits(model, attention_mask=attention)
    assert torch.equal(captured[0], plain[0])
    assert cap.activations[(0, "input")][0].shape == (12, model.config.hidden_size)
    summary = {(r["layer"], r["site"]): r for r in rank.summary()}
    acts = cap.activations[(1, "intermediate")][0]
    s = torch.linalg.svdvals(acts.double()).numpy()
    p = s / s.sum()
    import numpy as np
    expected = float(np.exp(-(p * np.log(p)).sum()))
    assert summary[(1, "intermediate")]["effective_rank"] == pytest.approx(expected, rel=1e-4)
    assert summary[(1, "intermediate")]["normalized_effective_rank"] == pytest.approx(
        expected / model.config.intermediate_size, rel=1e-4)


def test_effective_rank_known_values():
    from common.core.stats import effective_rank

    assert effective_rank(torch.eye(6)) == pytest.approx(6.0)
    assert effective_rank(torch.outer(torch.randn(9), torch.randn(5))) == pytest.approx(1.0, abs=1e-3)


def test_bad_input_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="out of range: the model has 2 layers"):
        Sparsifier(model, "up", "topp", 0.5, layers=[5])
    with pytest.raises(ValueError, match="unknown FFN site"):
        Sparsifier(model, "down", "topp", 0.5)
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        Sparsifier(model, "up", "topp", 2.0)
    import transformers as T

    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'; supported model types: .*llama"):
        Sparsifier(gpt2, "up", "topp", 0.5)
    moe = T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                 moe_intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                 num_key_value_heads=1, num_experts=4, num_experts_per_tok=2))
    assert detect_architecture(moe).is_moe
    with pytest.raises(ValueError, match="fused experts; use moe_sparsity"):
        Sparsifier(moe, "up", "topp", 0.5)
