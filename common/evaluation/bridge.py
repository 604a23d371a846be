"""lm-eval bridge: ``SparseHFLM``, an HFLM that sparsifies FFN sites around its model calls.

Registered as ``sparse-hf``. Model arguments: ``sites`` (``+``-separated, e.g.
``input+intermediate``), ``rule``, ``value``, ``power``, ``layers`` (``+``-separated indices,
default all), ``stats_file`` (a JSON written after each request type with the measured
sparsity) and ``shared_context`` (default true). Hooks are installed only around the model calls,
in the style of lm-eval's own ``SteeredModel``.

Shared-context scoring (``common.evaluation.shared_context``): log-likelihood requests of a causal
model are grouped by context; each context runs once and its choices continue its cache. Same
log-likelihoods as lm-eval's per-request path, but each real context token is counted once per
context instead of once per choice. ``shared_context=False``, rolling perplexity, generation,
seq2seq models and contexts that need truncation take lm-eval's own path, described next.

Real tokens only. lm-eval right-pads loglikelihood batches with id 0 and passes no attention
mask, so counts from a ``_model_call`` are held per token and committed row by row when
lm-eval slices each row to its real length (``_select_cont_toks`` receives that length).
Calls that are never sliced, such as the automatic batch-size probe, are discarded.
Generation passes an attention mask, which the hooks read directly; prefill and decode
statistics are kept apart.

Out of device memory (shard processes sharing one GPU, or requests longer than the memory estimate
assumed): the pass's counts are forgotten, the batch size halved for the rest of the process
and the requests scored again.

Data parallel (``accelerate launch ... --model sparse-hf`` on several GPUs): the statistics are
summed over all ranks, and the requests lm-eval repeats to pad a rank's share are scored and
counted once, so the numbers equal a single-process run on the same items.
"""

from __future__ import annotations

import inspect
import warnings

from contextlib import nullcontext
from functools import partial

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from common.core.criteria import Criterion
from common.core.hooks import Sparsifier
from common.core.recorder import SparsityRecorder, count_entries
from common.core.rules import validate_rule
from common.core.sites import detect_architecture, expand_sites, resolve_layers
from common.core.stats import summarize
from common.evaluation.plugins import PerTokenCounts, backend_for, register_backend
from common.evaluation.shared_context import SharedContextScorer, chunk_groups, group_by_context
from common.evaluation.store import atomic_write_json


def parse_bool(value) -> bool:
    """A model-argument flag: a bool, or 'true'/'false' (any case), '1'/'0'."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def once_per_request(run, requests, disable_tqdm: bool):
    """Run ``run`` on each distinct request object once; results in the order of ``requests``.

    lm-eval pads a data-parallel rank's share with repeats of its last request object; scoring
    them once keeps the statistics equal to a single-process run (log-likelihoods are
    deterministic, so the repeats get the same answer)."""
    position: dict[int, int] = {}
    unique, index = [], []
    for request in requests:
        if id(request) not in position:
            position[id(request)] = len(unique)
            unique.append(request)
        index.append(position[id(request)])
    results = run(unique, disable_tqdm=disable_tqdm)
    return [results[i] for i in index]


# bytes per (token, vocabulary entry) of one scored row: the logits in the model's dtype, their
# float32 log-softmax and the temporaries around them (Gemma's logit soft-capping makes copies)
LOGIT_BYTES = 16
LOGIT_MEMORY_SHARE = 0.25  # of the device's total memory: deterministic on a given machine


def device_memory(device) -> int:
    """Memory of the device the logits live on that this process may use, in bytes (on a GPU its
    total times the process's memory fraction, ``--memory-fraction``)."""
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return int(total * torch.cuda.get_per_process_memory_fraction(device))
    import psutil

    return psutil.virtual_memory().total


def memory_safe_batch(batch_size: int, longest: int, vocab: int, memory: int,
                      share: float = LOGIT_MEMORY_SHARE) -> int:
    """The largest batch up to ``batch_size`` whose [batch, longest, vocab] logits fit in ``share``
    of ``memory``. lm-eval scores a batch's full logits at once: a 262k-entry vocabulary (Gemma 3)
    at batch 16 needs over 20 GB for 330-token documents, and a process killed for memory dies
    without a message in the middle of a sweep."""
    per_row = max(1, longest) * vocab * LOGIT_BYTES
    return max(1, min(batch_size, int(share * memory) // per_row))


def split_arg(value) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [v for v in str(value).replace(",", "+").split("+") if v]


class PerTokenKept:
    """Dense per-token counts: an observer holding the kept count of every token of the last
    call, until rows are committed. It reads only the counts the hooks make while zeroing
    (``counts_only``), so no boolean mask is built for it."""

    counts_only = True

    def __init__(self):
        self.kept: dict[tuple[int, str], torch.Tensor] = {}
        self.width: dict[tuple[int, str], int] = {}

    def observe_counts(self, layer, site, context, kept, width, valid) -> None:
        if kept is not None:
            self.kept[(layer, site)] = kept
            self.width[(layer, site)] = width

    def commit_row(self, row: int, length: int, recorder: SparsityRecorder) -> None:
        for (layer, site), kept in self.kept.items():
            recorder.add_counts(layer, site, *count_entries(kept[row, :length], self.width[(layer, site)]), context={})


class DenseBackend:
    """Dense GLU models (and LLaDA): the site-table ``Sparsifier``."""

    def sparsifier(self, model, sites, rule, value, power, layers, recorder, per_token=None, criterion=None,
                   calibration=None):
        if per_token is not None:
            recorder.observers.append(per_token)
        return Sparsifier(model, sites, rule, value, power, layers, recorder, criterion=criterion,
                          calibration=calibration)

    def per_token_counts(self, model, sequence_length: int) -> PerTokenKept:
        return PerTokenKept()


register_backend("dense", DenseBackend())


class SparsificationSettings:
    """What an lm-eval model sparsifies, shared by ``sparse-hf`` and ``llada-sparse``.

    Expects ``self.model`` and ``self.recorder``; ``stats_file`` (optional) receives the
    statistics after each request type.
    """

    stats_file: str | None = None
    criterion: Criterion | None = None  # None: the magnitude score with ``rule``
    calibration = None  # what a criterion needs (common.core.calibration.Calibration)

    def set_sparsification(self, sites=None, rule: str = "topp", value: float = 1.0, power: float = 1.0,
                           layers=None, criterion: Criterion | None = None, calibration=None) -> None:
        """Change what is sparsified (keeps the loaded model); also resets the statistics.
        ``criterion`` (with its ``calibration``) replaces the magnitude score with ``rule``."""
        sites = split_arg(sites)
        if sites:
            expand_sites(sites)
            if criterion is None:
                validate_rule(rule, float(value), float(power))
            else:
                criterion.check_sites(sites)
                criterion.check_value(float(value), float(power))
                rule = criterion.selection
        layer_list = [int(layer) for layer in split_arg(layers)] or None
        if layer_list is not None:
            resolve_layers(self.model, layer_list)
        self.sites, self.rule, self.value, self.power, self.layers = sites, rule, float(value), float(power), layer_list
        self.criterion, self.calibration = criterion, calibration
        self.reset_statistics()

    def reset_statistics(self) -> None:
        self.recorder.reset()

    def sparsity_statistics(self) -> dict:
        """Measured sparsity (real tokens) per site: per layer, mean over layers, element-weighted.

        When lm-eval splits the requests over ranks (``world_size > 1``: ``accelerate launch`` on
        several GPUs) the counts are summed over the ranks; a collective, which every rank reaches
        after each request type. (On CPU, lm-eval runs every request on every process: no sum.)
        """
        if getattr(self, "world_size", 1) > 1:
            return self._statistics(self.recorder.summed_over_ranks())
        return self._statistics(self.recorder)

    def _statistics(self, recorder: SparsityRecorder) -> dict:
        rows = recorder.rows()
        out = {"sites": self.sites, "rule": self.rule, "value": self.value, "power": self.power,
               "layers": self.layers, "summary": summarize(rows)}
        if self.criterion is not None:
            out["criterion"] = self.criterion.name
        for phase in sorted({row.get("phase") for row in rows} - {None}):
            out[f"summary_{phase}"] = summarize(rows, phase=phase)
        return out

    def _write_stats(self) -> None:
        if self.stats_file:
            statistics = self.sparsity_statistics()
            if getattr(self, "rank", 0) == 0:
                atomic_write_json(self.stats_file, statistics)


# keyword arguments HFLM hands on to ``from_pretrained`` that are also accepted here
FROM_PRETRAINED_ARGS = {"attn_implementation", "experts_implementation", "low_cpu_mem_usage", "cache_dir",
                        "local_files_only", "token", "use_safetensors", "variant", "device_map"}


def check_model_args(sites, rule, value, power, layers, other: dict) -> None:
    """One-line errors for bad sparsification arguments and unknown model arguments, before loading."""
    sites = split_arg(sites)
    if sites:
        expand_sites(sites)
    try:
        value, power = float(value), float(power)
    except (TypeError, ValueError):
        raise ValueError(f"value and power must be numbers, got value={value!r}, power={power!r}") from None
    validate_rule(rule, value, power)
    bad_layers = [layer for layer in split_arg(layers) if not str(layer).lstrip("-").isdigit()]
    if bad_layers:
        raise ValueError(f"layers must be '+'-separated integers, got {', '.join(map(str, bad_layers))}")
    known = (set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}) | FROM_PRETRAINED_ARGS
    unknown = sorted(set(other) - known)
    if unknown:
        raise ValueError(f"unknown model argument(s) {', '.join(unknown)} for sparse-hf; it takes sites, rule, value, "
                         "power, layers, stats_file, shared_context and lm-eval's HFLM arguments")


@register_model("sparse-hf")
class SparseHFLM(SparsificationSettings, HFLM):
    """HFLM with per-token FFN sparsification; ``sites=None`` evaluates the dense model."""

    def __init__(self, pretrained, sites=None, rule: str = "topp", value: float = 1.0, power: float = 1.0,
                 layers=None, stats_file: str | None = None, shared_context=True, **kwargs):
        from common.models.loading import resolve_model_path  # aliases; one line, not hub retries, offline

        check_model_args(sites, rule, value, power, layers, kwargs)  # before the (slow) model load
        pretrained = resolve_model_path(pretrained) if isinstance(pretrained, str) else pretrained
        if isinstance(kwargs.get("tokenizer"), str):
            kwargs["tokenizer"] = resolve_model_path(kwargs["tokenizer"])
        super().__init__(pretrained=pretrained, **kwargs)
        self.shared_context = parse_bool(shared_context)
        self.is_moe = detect_architecture(self.model).is_moe
        self.sparsification_backend = backend_for("fused_experts" if self.is_moe else "dense")
        self.recorder = SparsityRecorder()
        self.stats_file = stats_file
        self._pending: PerTokenCounts | None = None
        self._pending_row = 0
        self._batch_cap: int | None = None  # batch size, once the device has run out of memory
        self.set_sparsification(sites, rule, value, power, layers)

    def reset_statistics(self) -> None:
        super().reset_statistics()
        self._pending = None

    # ---- model calls ---------------------------------------------------------------------------
    def sparsifier(self, recorder: SparsityRecorder, per_token=None):
        """The hook set of the current settings around one model call (or a pass over many)."""
        return self.sparsification_backend.sparsifier(self.model, self.sites, self.rule, self.value, self.power,
                                                      self.layers, recorder, per_token, criterion=self.criterion,
                                                      calibration=self.calibration)

    def _model_call(self, inps, attn_mask=None, labels=None):
        if not self.sites:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        per_token = self.sparsification_backend.per_token_counts(self.model, inps.shape[1])
        with self.sparsifier(SparsityRecorder(), per_token):
            logits = super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        self._pending, self._pending_row = per_token, 0
        return logits

    def _select_cont_toks(self, logits, contlen=None, inplen=None):
        if self._pending is not None and inplen is not None:
            self._pending.commit_row(self._pending_row, inplen, self.recorder)
            self._pending_row += 1
        return super()._select_cont_toks(logits, contlen=contlen, inplen=inplen)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        if not self.sites:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        with self.sparsifier(self.recorder):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    # ---- request types: write statistics after each -----------------------------------------
    def _then_write_stats(self, run, requests, disable_tqdm: bool):
        """Run one request type; drop uncommitted per-token counts and write the statistics after."""
        try:
            return run(requests, disable_tqdm=disable_tqdm)
        finally:
            self._pending = None
            self._write_stats()

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._then_write_stats(partial(once_per_request, super().loglikelihood), requests, disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._then_write_stats(partial(once_per_request, super().loglikelihood_rolling), requests,
                                      disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._then_write_stats(super().generate_until, requests, disable_tqdm)

    # ---- shared-context scoring ------------------------------------------------------------
    @property
    def _sliding_window(self) -> int | None:
        return getattr(self.model.config.get_text_config(), "sliding_window", None)

    def _shareable(self, request) -> bool:
        """A loglikelihood request (rolling windows have no key) that needs no truncation and fits
        the sliding window, if any, so that padded batches never evict cache entries."""
        key, context, continuation = request
        span = len(context) + len(continuation)
        window = self._sliding_window
        return key is not None and span <= self.max_length + 1 and (window is None or span <= window)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """Score ``requests``. Where the device runs out of memory (shard processes sharing one GPU,
        or requests longer than the memory estimate assumed), the counts of the failed pass are
        forgotten, the batch size halved for the rest of this process, and the requests scored
        again: a sweep slows down instead of dying in the middle."""
        while True:
            counts = self.recorder.snapshot()
            try:
                return self._score_tokens(requests, disable_tqdm, override_bs)
            except torch.OutOfMemoryError:
                size = self._batch_cap or self._integer_batch_size(override_bs)
                if size <= 1:
                    raise
                self._batch_cap = size // 2
            self.recorder.restore(counts)
            self._pending = None
            if torch.device(self.device).type == "cuda":
                torch.cuda.empty_cache()
            warnings.warn(f"out of device memory at batch size {size}: scoring these {len(requests)} requests "
                          f"again at {self._batch_cap} (and everything after); fewer processes per GPU avoid this",
                          stacklevel=2)

    def _integer_batch_size(self, override_bs: int | None) -> int:
        batch_size = override_bs or self.batch_size
        return int(batch_size) if str(batch_size).isdigit() else max(self.batch_sizes.values(), default=64)

    def _capped(self, batch_size):
        """``batch_size`` (an integer or 'auto'), at most the batch size left by running out of memory."""
        if self._batch_cap is None:
            return batch_size
        return self._batch_cap if batch_size == "auto" else min(int(batch_size), self._batch_cap)

    def _score_tokens(self, requests, disable_tqdm: bool, override_bs: int | None) -> list:
        """Shared-context scoring of the shareable requests; lm-eval's path for the rest."""
        shared = [i for i, request in enumerate(requests) if self._shareable(request)] \
            if self.shared_context and self.backend == "causal" else []
        if not shared:
            return self._lm_eval_path(requests, disable_tqdm, override_bs)
        results: list = [None] * len(requests)
        rest = sorted(set(range(len(requests))) - set(shared))
        if rest:
            scored = self._lm_eval_path([requests[i] for i in rest], True, override_bs)
            for i, answer in zip(rest, scored):
                results[i] = answer
        requests_shared = [requests[i] for i in shared]
        groups = group_by_context(requests_shared)
        batch_size = self._capped(override_bs or self.batch_size)
        if batch_size == "auto":  # lm-eval's probe, on the longest request
            group = max(groups, key=lambda g: g.longest)
            longest = (None, group.context, max(group.continuations, key=len))
            batch_size = self._detect_batch_size([longest], 0)
        scorer = SharedContextScorer(self.model, self.device, self.softmax_dtype, self.mixed_precision_dtype,
                                     self.recorder)
        hooks = self.sparsifier(self.recorder) if self.sites else nullcontext()
        progress = tqdm(total=len(requests_shared), disable=disable_tqdm or self.rank != 0,
                        desc="Running loglikelihood requests (shared contexts)")
        with hooks:
            for chunk in chunk_groups(groups, int(batch_size), self._sliding_window):
                for group, answers in zip(chunk, scorer.score(chunk)):
                    for member, answer in zip(group.members, answers):
                        results[shared[member]] = answer
                        key = requests_shared[member][0]
                        self.cache_hook.add_partial("loglikelihood", key, answer)
                    progress.update(len(group.members))
        progress.close()
        return results

    def _lm_eval_path(self, requests, disable_tqdm: bool, override_bs: int | None) -> list:
        """lm-eval's own scoring, in slices of at most ``memory_safe_batch`` requests (longest
        first) where its batch size would not fit the device's memory or the device has run out of
        memory before; unchanged otherwise. (lm-eval batches by its own integer batch size whatever
        ``override_bs`` says, so a smaller batch means smaller slices.)"""
        batch_size = override_bs or self.batch_size
        if (batch_size == "auto" and self._batch_cap is None) or not requests:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        lengths = [min(len(context) + len(continuation), self.max_length) for _, context, continuation in requests]
        vocab = self.model.get_output_embeddings().weight.shape[0]
        cap = memory_safe_batch(int(self._capped(batch_size)), max(lengths), vocab, device_memory(self.device))
        if self._batch_cap is None and cap >= int(batch_size):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        order = sorted(range(len(requests)), key=lambda i: -lengths[i])
        results: list = [None] * len(requests)
        for start in range(0, len(order), cap):
            part = order[start:start + cap]
            for i, answer in zip(part, super()._loglikelihood_tokens([requests[i] for i in part], disable_tqdm=True,
                                                                     override_bs=len(part))):
                results[i] = answer
        return results

    def _statistics(self, recorder: SparsityRecorder) -> dict:
        out = super()._statistics(recorder)
        if self.is_moe:
            expert_rows = recorder.expert_rows()
            out["experts"] = expert_rows
            out["summary"] = summarize(expert_rows)
        return out
