"""Shared-context scoring in the lm-eval bridge: the same log-likelihoods as lm-eval's per-request
path, and statistics that count each real context token once."""

import random
from contextlib import contextmanager

import pytest
import torch

from common.core.hooks import Sparsifier
from common.evaluation.bridge import SparseHFLM
from common.evaluation.shared_context import chunk_groups, group_by_context
from tiny_models import char_tokenizer, save_tiny_llama, tiny_model, tiny_moe

TOLERANCE = 1e-5  # float32


def _requests(seed=0, docs=5, vocab=(3, 100)):
    """Multiple-choice style requests: contexts of several lengths, 1-4 choices each of 1-5 tokens
    (single-token choices included), plus a left-over single-choice request."""
    rng = random.Random(seed)
    requests = []
    for doc in range(docs):
        context = [rng.randrange(*vocab) for _ in range(rng.randrange(2, 14))]
        for choice in range(rng.randrange(1, 5)):
            continuation = [rng.randrange(*vocab) for _ in range(rng.choice([1, 1, 2, 3, 5]))]
            requests.append(((f"doc{doc}", f"choice{choice}"), context, continuation))
    requests.append((("single", "x"), [5, 6, 7], [8, 9]))
    return requests


def _model(arch):
    return tiny_moe(arch) if arch == "qwen3_moe" else tiny_model(arch)


def _lm(model, shared, batch_size, sites=None, value=1.0):
    return SparseHFLM(pretrained=model, tokenizer=char_tokenizer(), batch_size=batch_size, sites=sites, value=value,
                      shared_context=shared)


@contextmanager
def _tokens_processed(model):
    """Counts the token positions (padding included) of every forward of ``model``."""
    processed = [0]

    def count(module, args, kwargs):
        processed[0] += kwargs["input_ids"].numel() if "input_ids" in kwargs else args[0].numel()

    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield processed
    finally:
        handle.remove()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "qwen3_moe"])
@pytest.mark.parametrize("sites,value", [(None, 1.0), ("input+up+gate+intermediate", 1.0),
                                         ("input+up+gate+intermediate", 0.7), ("intermediate", 0.5)])
def test_shared_context_equals_per_request_log_likelihoods(arch, sites, value):
    model, requests = _model(arch), _requests()
    reference = _lm(model, False, 4, sites, value)._loglikelihood_tokens(requests)
    for batch_size in (1, 3, 64):
        with _tokens_processed(model) as processed:
            shared = _lm(model, True, batch_size, sites, value)._loglikelihood_tokens(requests)
        distinct_contexts = {tuple(context) for _, context, _ in requests}
        assert processed[0] < sum(len(c) + len(k) - 1 for _, c, k in requests)  # the shared path ran
        assert processed[0] >= sum(map(len, distinct_contexts))
        assert [greedy for _, greedy in shared] == [greedy for _, greedy in reference]
        difference = max(abs(a - b) for (a, _), (b, _) in zip(shared, reference))
        assert difference <= TOLERANCE, (arch, sites, value, batch_size, difference)


def test_shared_context_answers_match_an_unhooked_forward():
    """Independent of lm-eval: log p(continuation | context) from one plain forward per request."""
    model, requests = tiny_model("llama"), _requests(seed=1)
    shared = _lm(model, True, 3)._loglikelihood_tokens(requests)
    for (_, context, continuation), (log_likelihood, greedy) in zip(requests, shared):
        with torch.no_grad():
            logits = model(torch.tensor([context + continuation[:-1]])).logits[0, len(context) - 1:]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        tokens = torch.tensor(continuation)
        assert log_likelihood == pytest.approx(float(log_probs.gather(-1, tokens[:, None]).sum()), abs=TOLERANCE)
        assert greedy == bool((log_probs.argmax(-1) == tokens).all())


def _expected_counts(model, requests, site, value):
    """Per layer (kept, counted) from plain Sparsifier runs on unpadded sequences: each distinct
    context once, plus each continuation's scored-through tokens (context + continuation[:-1]
    minus the context)."""
    def run(tokens):
        with Sparsifier(model, site, "topp", value) as sparsifier, torch.no_grad():
            model(torch.tensor([tokens]))
        return {row["layer"]: (row["kept"], row["counted"]) for row in sparsifier.recorder.rows()}

    total = {}

    def add(counts, sign=1):
        for layer, (kept, counted) in counts.items():
            old = total.get(layer, (0, 0))
            total[layer] = (old[0] + sign * kept, old[1] + sign * counted)

    contexts = {}
    for _, context, continuation in requests:
        contexts.setdefault(tuple(context), run(context))
        if len(continuation) > 1:
            add(run(context + continuation[:-1]))
            add(contexts[tuple(context)], sign=-1)
    for counts in contexts.values():
        add(counts)
    return total


@pytest.mark.parametrize("batch_size", [1, 4, "auto"])
def test_statistics_count_context_tokens_once_and_exclude_padding(batch_size):
    model, requests = tiny_model("qwen3"), _requests(seed=2)
    lm = _lm(model, True, batch_size, "intermediate", 0.7)
    lm._loglikelihood_tokens(requests)
    measured = {row["layer"]: (row["kept"], row["counted"]) for row in lm.recorder.rows()}
    expected = _expected_counts(model, requests, "intermediate", 0.7)
    real_tokens = sum(len(c) for c in {tuple(c) for _, c, _ in requests}) + sum(len(c) - 1 for _, _, c in requests)
    assert all(counted == real_tokens * model.config.intermediate_size for _, counted in measured.values())
    assert measured == expected
    assert {row.get("phase") for row in lm.recorder.rows()} == {None}  # continuing a cache is not decoding


def test_per_request_path_counts_the_context_once_per_choice():
    model, requests = tiny_model("llama"), _requests(seed=3)
    lm = _lm(model, False, 4, "intermediate", 0.7)
    lm._loglikelihood_tokens(requests)
    per_request_tokens = sum(len(context) + len(continuation) - 1 for _, context, continuation in requests)
    assert {row["counted"] for row in lm.recorder.rows()} == {per_request_tokens * model.config.intermediate_size}


def test_per_request_kept_counts_come_from_the_zeroing_without_a_mask(monkeypatch):
    """lm-eval's per-request path (rolling perplexity takes it) commits per-token kept counts of
    padded batches; they equal plain runs of each request alone, and no boolean mask is built."""
    import common.core.hooks as hooks

    model, requests = tiny_model("llama"), _requests(seed=3)
    expected = {}
    for _, context, continuation in requests:
        with Sparsifier(model, "intermediate", "topp", 0.7) as sparsifier, torch.no_grad():
            model(torch.tensor([context + continuation[:-1]]))
        for row in sparsifier.recorder.rows():
            kept, counted = expected.get(row["layer"], (0, 0))
            expected[row["layer"]] = (kept + row["kept"], counted + row["counted"])

    def no_mask(*args, **kwargs):
        raise AssertionError("a boolean keep-mask was built for counts only")

    monkeypatch.setattr(hooks, "keep_threshold", no_mask)
    lm = _lm(model, False, 4, "intermediate", 0.7)
    lm._loglikelihood_tokens(requests)
    assert {row["layer"]: (row["kept"], row["counted"]) for row in lm.recorder.rows()} == expected


def test_moe_expert_counts_count_context_tokens_once():
    model, requests = tiny_moe("qwen3_moe"), _requests(seed=4)
    lm = _lm(model, True, 4, "intermediate", 0.7)
    lm._loglikelihood_tokens(requests)
    real_tokens = sum(len(c) for c in {tuple(c) for _, c, _ in requests}) + sum(len(c) - 1 for _, _, c in requests)
    routed = {}
    for row in lm.sparsity_statistics()["experts"]:
        routed[row["layer"]] = routed.get(row["layer"], 0) + row["routed_tokens"]
    assert set(routed.values()) == {real_tokens * model.config.num_experts_per_tok}


def test_rolling_and_truncated_requests_take_the_per_request_path():
    model = tiny_model("llama")
    long_request = (("long", "x"), list(range(3, 60)), [7, 8, 9])  # 60 tokens > max_length 32: truncated
    requests = _requests(seed=5) + [long_request]
    shared_lm = SparseHFLM(pretrained=model, tokenizer=char_tokenizer(), batch_size=4, max_length=32,
                           sites="intermediate", value=0.7)
    per_request_lm = SparseHFLM(pretrained=model, tokenizer=char_tokenizer(), batch_size=4, max_length=32,
                                sites="intermediate", value=0.7, shared_context=False)
    shared, reference = shared_lm._loglikelihood_tokens(requests), per_request_lm._loglikelihood_tokens(requests)
    assert max(abs(a - b) for (a, _), (b, _) in zip(shared, reference)) <= TOLERANCE
    rolling = [(None, [1] + list(range(3, 20)), list(range(20, 30)))]  # rolling windows carry no key
    assert shared_lm._loglikelihood_tokens(rolling) == per_request_lm._loglikelihood_tokens(rolling)


def test_simple_evaluate_and_model_arguments(tmp_path):
    import lm_eval

    from common.evaluation.tasks import task_manager

    path = save_tiny_llama(tmp_path / "tiny")
    manager = task_manager()
    outputs = {}
    for shared in (True, False):
        lm = SparseHFLM.create_from_arg_string(f"pretrained={path},sites=intermediate,value=0.8,"
                                               f"shared_context={shared},batch_size=3,device=cpu")
        assert lm.shared_context is shared
        outputs[shared] = lm_eval.simple_evaluate(model=lm, tasks=["bb_social_iqa"], task_manager=manager, limit=6,
                                                  log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    samples = {shared: sorted(out["samples"]["bb_social_iqa"], key=lambda s: s["doc_id"])
               for shared, out in outputs.items()}
    for a, b in zip(samples[True], samples[False]):
        assert [r[0] for r in a["filtered_resps"]] == pytest.approx([r[0] for r in b["filtered_resps"]],
                                                                    abs=TOLERANCE)
    assert outputs[True]["results"]["bb_social_iqa"] == outputs[False]["results"]["bb_social_iqa"]
    with pytest.raises(ValueError, match="expected true or false"):
        SparseHFLM(pretrained=tiny_model("llama"), tokenizer=char_tokenizer(), shared_context="maybe")


def test_groups_and_chunks():
    requests = [(("a", "1"), [1, 2], [3]), (("b", "1"), [4], [5, 6]), (("a", "2"), [1, 2], [7, 8, 9])]
    groups = group_by_context(requests)
    assert [(g.context, g.members) for g in groups] == [([1, 2], [0, 2]), ([4], [1])]  # longest continuation first
    by_continuation = group_by_context([(("a", "1"), [1, 2, 3], [5]), (("b", "1"), [4], [5, 6])])
    assert [g.context for g in by_continuation] == [[4], [1, 2, 3]]
    assert [[g.context for g in chunk] for chunk in chunk_groups(groups, 1)] == [[[1, 2]], [[4]]]
    assert len(chunk_groups(groups, 2)) == 1  # two contexts; 3 choices x 3 tokens <= 2 x (2 + 3) positions
    assert len(chunk_groups(groups, 8, max_span=4)) == 2  # padded span 2 + 3 > 4 would not fit a window
    many = group_by_context([((str(i), str(j)), [i + 1], [9, 9, 9, 9]) for i in range(2) for j in range(5)])
    # 5 choices x 4 tokens = 20 > 2 x (1 + 4) positions: one context per chunk (never none)
    assert [len(chunk) for chunk in chunk_groups(many, 2)] == [1, 1]
    assert [len(chunk) for chunk in chunk_groups(many, 8)] == [2]  # 10 x 4 <= 8 x 5
    with pytest.raises(ValueError, match="non-empty"):
        group_by_context([(("a", ""), [1], [])])
