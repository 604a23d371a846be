"""Per-expert sparsification of fused-experts MoE models: equivalence with the stock forward for
every backend, an independent per-token reference loop, brute-force statistics, unrouted
experts, padding, the lm-eval bridge, and bad input."""

import pytest
import torch
import torch.nn.functional as F

from common.evaluation.bridge import SparseHFLM
from common.core.recorder import lengths_to_valid
from common.core.rules import keep_mask
from common.core.sites import expand_sites
from moe_sparsity.experts import SUPPORTED_BACKENDS, ExpertSparsifier
from outputs import assert_no_nan
from tiny_models import MOE_ARCHITECTURES, char_tokenizer, tiny_model, tiny_moe

IDS = torch.randint(2, 120, (2, 9))


def _logits(model, ids=IDS, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
@pytest.mark.parametrize("backend", SUPPORTED_BACKENDS)
def test_p_one_equals_stock_forward_exactly(arch, backend):
    model = tiny_moe(arch)
    model.set_experts_implementation(backend)
    plain = _logits(model)
    with ExpertSparsifier(model, ["all_inputs", "up", "gate"], "topp", 1.0) as sparsifier:
        hooked = _logits(model)
    assert torch.equal(hooked, plain)
    assert model.config._experts_implementation == backend  # restored
    assert {r["site"] for r in sparsifier.recorder.expert_rows()} == {"input", "up", "gate", "intermediate"}


def _reference_block(block, hidden, sites, rule, value):
    """Plain loop over tokens and their top-k experts, the rule applied per routed row."""
    experts = block.experts
    flat = hidden.reshape(-1, hidden.shape[-1])
    _, weights, indices = block.gate(flat)  # the router sees the dense hidden state
    out = torch.zeros_like(flat)
    counts = {}

    def cut(t, site, expert):
        if site not in sites:
            return t
        mask = keep_mask(t, rule, value)
        kept, counted, routed = counts.get((site, expert), (0, 0, 0))
        counts[(site, expert)] = (kept + int(mask.sum()), counted + t.numel(), routed + 1)
        return t * mask

    for token in range(flat.shape[0]):
        for slot in range(indices.shape[1]):
            e = int(indices[token, slot])
            x = cut(flat[token], "input", e)
            gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
            up = cut(up, "up", e)
            g = cut(experts.act_fn(gate), "gate", e)
            inter = cut(g * up, "intermediate", e)
            out[token] += weights[token, slot] * F.linear(inter, experts.down_proj[e])
    return out.reshape(hidden.shape), counts, indices


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
@pytest.mark.parametrize("backend", SUPPORTED_BACKENDS)
@pytest.mark.parametrize("site", ["input", "up", "gate", "intermediate", "all_inputs"])
def test_p_below_one_equals_per_token_reference_and_brute_force_counts(arch, backend, site):
    model = tiny_moe(arch)
    model.set_experts_implementation(backend)
    seen, handles = {}, []
    for layer, block in enumerate(l.mlp for l in model.model.layers):
        handles.append(block.register_forward_pre_hook(lambda m, a, layer=layer: seen.__setitem__((layer, "x"), a[0])))
        handles.append(block.register_forward_hook(lambda m, a, o, layer=layer: seen.__setitem__((layer, "y"), o)))
    with ExpertSparsifier(model, site, "topp", 0.6) as sparsifier:
        _logits(model)
    for handle in handles:
        handle.remove()
    rows = {(r["layer"], r["site"], r["expert"]): r for r in sparsifier.recorder.expert_rows()}
    sites = expand_sites(site)
    for layer, block in enumerate(l.mlp for l in model.model.layers):
        with torch.no_grad():
            expected, counts, indices = _reference_block(block, seen[(layer, "x")], sites, "topp", 0.6)
        torch.testing.assert_close(seen[(layer, "y")], expected, atol=1e-5, rtol=0)
        routed = torch.bincount(indices.reshape(-1), minlength=model.config.num_experts if hasattr(
            model.config, "num_experts") else model.config.num_local_experts)
        for s in sites:
            for e, n in enumerate(routed.tolist()):
                row = rows[(layer, s, e)]
                assert row["routed_tokens"] == n  # the router's own top-k indices
                if n:
                    kept, counted, _ = counts[(s, e)]
                    assert abs(row["kept"] - kept) <= 2 and row["counted"] == counted
                else:
                    assert row["sparsity"] is None


def test_unrouted_experts_are_reported_as_such():
    model = tiny_moe("qwen3_moe", experts=16, top_k=1)
    with ExpertSparsifier(model, "intermediate", "topp", 0.8) as sparsifier:
        _logits(model, IDS[:1, :3])
    rows = sparsifier.recorder.expert_rows()
    unrouted = [r for r in rows if r["routed_tokens"] == 0]
    assert unrouted and all(r["sparsity"] is None and r["counted"] == 0 for r in unrouted)
    assert sum(r["routed_tokens"] for r in rows if r["layer"] == 0) == 3


def test_padding_is_excluded_from_expert_counts():
    model = tiny_moe("olmoe")
    attention = lengths_to_valid([9, 4], 9).long()
    with ExpertSparsifier(model, "input", "topp", 0.8) as sparsifier:
        _logits(model, attention_mask=attention)
    layer0 = [r for r in sparsifier.recorder.expert_rows() if r["layer"] == 0]
    assert sum(r["routed_tokens"] for r in layer0) == (9 + 4) * 2
    assert sum(r["counted"] for r in layer0) == (9 + 4) * 2 * 32


def test_bridge_on_moe_matches_hflm_and_excludes_padding():
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from common.evaluation.tasks import task_manager

    manager = task_manager()
    model, tokenizer = tiny_moe("qwen3_moe"), char_tokenizer()

    def run(lm):
        return lm_eval.simple_evaluate(model=lm, tasks=["bb_general_knowledge"], task_manager=manager, limit=6,
                                       log_samples=True, bootstrap_iters=0, verbosity="ERROR")

    plain = run(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4))
    counted = {}
    for batch_size in (1, 5):
        lm = SparseHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, sites="intermediate", value=1.0)
        out = run(lm)
        assert out["results"]["bb_general_knowledge"]["acc,none"] == plain["results"]["bb_general_knowledge"]["acc,none"]
        experts = lm.sparsity_statistics()["experts"]
        counted[batch_size] = [(r["layer"], r["expert"], r["routed_tokens"], r["counted"]) for r in experts]
    assert counted[1] == counted[5]


def test_bad_input():
    with pytest.raises(ValueError, match="not a mixture-of-experts model"):
        ExpertSparsifier(tiny_model("llama"), "up", "topp", 0.5)
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        ExpertSparsifier(tiny_moe("olmoe"), "up", "topp", -0.5)
    model = tiny_moe("mixtral")
    model.config._experts_implementation = "sonicmoe"
    with pytest.raises(ValueError, match="backend 'sonicmoe' is not supported"):
        ExpertSparsifier(model, "up", "topp", 0.5)


def test_balanced_assignment_gives_equal_experts():
    from moe_sparsity.moefy import balanced_kmeans

    labels = balanced_kmeans(torch.randn(96, 20), 8)
    assert torch.bincount(labels, minlength=8).tolist() == [12] * 8


def test_moefication_with_every_expert_active_reproduces_the_dense_model():
    from moe_sparsity.moefy import moefy

    dense, tokenizer = tiny_model("llama"), char_tokenizer()
    moe, report = moefy(dense, tokenizer, experts=4, top_k=4, router_scale=1e-6, calibration_tokens=256)
    assert type(moe).__name__ == "MixtralForCausalLM" and len(report["router_fit_r2"]) == 2
    torch.testing.assert_close(_logits(moe), _logits(dense), atol=1e-4, rtol=0)
    routed, _ = moefy(dense, tokenizer, experts=4, top_k=2, calibration_tokens=256)
    assert not torch.allclose(_logits(routed), _logits(dense), atol=1e-4)  # half the clusters per token


def _moe_script(*args):
    from script_calls import run_script

    return run_script("moe_experts.py", *args)


def test_moe_experts_script_end_to_end(tmp_path):
    import json

    model_dir = tmp_path / "moe"
    tiny_moe("qwen3_moe").save_pretrained(str(model_dir))
    char_tokenizer().save_pretrained(str(model_dir))
    out = tmp_path / "out"
    result = _moe_script("--model", str(model_dir), "--grid", "1.0", "0.9", "0.5", "--limit", "4", "--tasks",
                         "bb_general_knowledge", "bb_emoji_movie", "--dtype", "float32", "--bootstrap", "20",
                         "--output", str(out), "--experts-implementation", "eager",
                         "--critical-value", "0.9")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "the weights need about" in result.stdout
    experts = json.loads((out / "experts.json").read_text())
    layers = experts["sites"]["intermediate"]["per_layer_pooled"]
    assert experts["provenance"]["dtype"] == "float32" and experts["provenance"]["libraries"]["transformers"]
    assert [row["layer"] for row in layers] == [0, 1]
    assert all(row["min"] <= row["mean"] <= row["max"] for row in layers)
    for figure in ("expert_minmeanmax_intermediate.png", "expert_heatmap_intermediate.pdf",
                   "expert_sparsity_vs_tokens_intermediate.png", "expert_task_spread_intermediate.png"):
        assert (out / "figures" / figure).is_file(), figure
    search_args = ["--model", str(model_dir), "--search", "--resolution", "0.5", "--limit", "4", "--dtype", "float32",
                   "--bootstrap", "20", "--output", str(tmp_path / "search"), "--experts-implementation", "eager"]
    # this random model scores 0 on these 4 items: no normalized score, a clear error instead of a NaN search
    undefined = _moe_script(*search_args, "--tasks", "bb_general_knowledge")
    assert undefined.returncode == 2 and "the dense model scores 0 on every scoring task" in undefined.stderr
    searched = _moe_script(*search_args, "--tasks", "bb_social_iqa")
    assert searched.returncode == 0, searched.stderr[-2000:]
    [search] = json.loads((tmp_path / "search" / "search.json").read_text())
    assert all(point["normalized"] == point["normalized"] for point in search["points"])  # no NaN
    assert search["order"][:4] == [1.0, 0.95, 0.85, 0.6] and search["new_values"] == len(search["order"]) <= 8
    justified = {"converged": search["interval"][1] - search["interval"][0] <= 0.5, "budget": search["new_values"] == 8,
                 "all_above": 0.0 in search["order"], "no_room": search["status"] == "crossed"}
    assert justified.get(search["stopped"]), search  # the coarse pass, then as many values as the stop reason says
    assert json.loads((tmp_path / "search" / "experts.json").read_text())["sites"]["intermediate"]["per_layer_pooled"]
    assert_no_nan(out)
    assert_no_nan(tmp_path / "search")


def test_moe_experts_script_rejects_dense_models_and_unknown_aliases(tmp_path):
    from script_calls import run_scripts
    from tiny_models import save_tiny_llama

    cases = [(["--model", save_tiny_llama(tmp_path / "dense")], "is a 'llama' model, not a mixture of experts"),
             (["--model", "mixtral-huge"], "unknown MoE model 'mixtral-huge'"),
             (["--model", "olmoe-1b-7b", "--grid", "2"], "outside [0, 1]"),
             (["--model", "olmoe-1b-7b", "--critical-value", "2.5"], "rule value p=2.5 is outside [0, 1]")]
    for (argv, message), result in zip(cases, run_scripts([("moe_experts.py", argv) for argv, _ in cases])):
        assert result.returncode == 2 and message in result.stderr, (argv, result.stderr[-1000:])


