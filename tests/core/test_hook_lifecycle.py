"""The hook lifecycle shared by every sparsifier: nesting and re-entry refused, phase read by
name whatever transformers calls the cache argument, hooks always removed."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import DynamicCache

from common.core.hooks import CACHE_ARGUMENTS, ActivationCapture, Sparsifier, call_arguments, call_phase
from tiny_models import tiny_model


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_nested_sparsifiers_on_one_model_are_refused():
    model = tiny_model("llama")
    with Sparsifier(model, "intermediate", "topp", 0.9):
        with pytest.raises(RuntimeError, match="already sparsified"):
            with Sparsifier(model, "input", "topp", 0.9):
                pass
        model(torch.randint(1, 90, (1, 4)))  # the outer one still works
    assert _hook_count(model) == 0


def test_reentering_one_sparsifier_is_refused_and_keeps_the_outer_hooks():
    model = tiny_model("llama")
    sparsifier = Sparsifier(model, "intermediate", "topp", 0.9)
    with sparsifier:
        installed = _hook_count(model)
        with pytest.raises(RuntimeError, match="already active"):
            with sparsifier:
                pass
        assert _hook_count(model) == installed
    assert _hook_count(model) == 0
    with sparsifier:  # usable again after exit
        assert _hook_count(model) == installed


def test_capture_inside_a_sparsifier_is_allowed_and_sees_sparse_activations():
    model = tiny_model("llama")
    ids = torch.randint(1, 90, (1, 6))
    with Sparsifier(model, "intermediate", "topp", 0.5) as sparsifier, \
            ActivationCapture(model, "intermediate", layers=[0]) as capture:
        model(ids)
    # intermediate is hooked at down_proj's input: the capture hook runs after the sparsifier's
    kept = sparsifier.recorder.rows()[0]["kept"]
    assert int((capture.activations[(0, "intermediate")][0] != 0).sum()) == kept


@pytest.mark.parametrize("spelling", ["cache", "past_key_values"])
def test_phase_is_read_under_either_cache_name(spelling):
    model = tiny_model("llama")
    empty, filled = DynamicCache(config=model.config), DynamicCache(config=model.config)
    accepted = next(n for n in CACHE_ARGUMENTS if n in inspect.signature(type(model).forward).parameters)
    with torch.no_grad():  # whichever spelling the installed transformers accepts
        model(torch.randint(1, 90, (1, 3)), use_cache=True, **{accepted: filled})
    assert filled.get_seq_length() == 3
    assert call_phase({spelling: empty}) == "prefill"
    assert call_phase({spelling: filled}) == "decode"
    assert call_phase({}) is None


def test_positional_arguments_are_bound_by_the_forward_signature():
    model = tiny_model("llama")
    ids, mask = torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)
    cache = DynamicCache(config=model.config)
    arguments = call_arguments(model, (ids, mask, None, cache), {})
    assert arguments["input_ids"] is ids and arguments["attention_mask"] is mask
    assert next(v for k, v in arguments.items() if k in ("cache", "past_key_values")) is cache


def test_generation_rows_match_a_hand_count_on_the_installed_transformers():
    """Prefill sees every prompt token once; each new token after the first needs one decode forward."""
    model = tiny_model("qwen3")
    ids = torch.randint(1, 90, (3, 4))
    with Sparsifier(model, "input", "topp", 0.7) as sparsifier:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
    width = model.config.hidden_size
    rows = {(r["phase"], r["layer"]): r for r in sparsifier.recorder.rows()}
    assert {phase for phase, _ in rows} == {"prefill", "decode"}
    for layer in range(model.config.num_hidden_layers):
        assert rows[("prefill", layer)]["counted"] == 3 * 4 * width
        assert rows[("decode", layer)]["counted"] == 3 * 4 * width  # tokens 2..5: 4 decode steps of 3 rows
        assert rows[("decode", layer)]["forwards"] == 4
