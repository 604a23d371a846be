"""Shared-context scoring of log-likelihood requests: each context runs once, its choices share its cache.

lm-eval's HFLM runs ``context + continuation`` once per choice. In a causal model a token's hidden
states, and so its per-token sparsity masks, depend only on the tokens up to it, so the context's
keys and values are the same for every choice. Here the requests are grouped by their context
token ids; a chunk of groups (as many contexts as the batch size, as long as the continuation
pass holds no more token positions than a per-request batch) runs its contexts once (right-padded, ``use_cache=True``), the
cache rows are repeated to one row per choice, and only ``continuation[:-1]`` runs for every
choice (single-token continuations need no second pass: the context's last logits score them).

The hooks see both passes; ``recorder.valid_tokens`` marks the real tokens of each, so each real
context token is counted once per context and each continuation token once per choice (the
per-request path counts the context once per choice).
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from common.core.recorder import SparsityRecorder


@dataclass
class ContextGroup:
    """One context and the requests (by index) that continue it."""

    context: list[int]
    members: list[int] = field(default_factory=list)
    continuations: list[list[int]] = field(default_factory=list)

    @property
    def longest(self) -> int:
        return len(self.context) + max(len(c) for c in self.continuations)


def group_by_context(requests) -> list[ContextGroup]:
    """Group lm-eval ``(key, context_ids, continuation_ids)`` requests by context ids, by longest
    continuation first, then longest context: the continuation pass pads every choice of a chunk to
    its longest continuation, and a chunk of similar continuation lengths wastes the fewest
    positions there (each carries the logits over the vocabulary)."""
    groups: dict[tuple[int, ...], ContextGroup] = {}
    for index, (_, context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise ValueError("a log-likelihood request needs a non-empty context and continuation")
        group = groups.setdefault(tuple(context), ContextGroup(list(context)))
        group.members.append(index)
        group.continuations.append(list(continuation))
    return sorted(groups.values(), key=lambda g: (-max(len(c) for c in g.continuations), -len(g.context), g.context))


def chunk_groups(groups: list[ContextGroup], batch_size: int, max_span: int | None = None) -> list[list[ContextGroup]]:
    """Consecutive groups, at least one per chunk, with no pass larger than a per-request batch of
    ``batch_size``: at most ``batch_size`` contexts (the context pass), and choices x longest
    continuation at most ``batch_size`` x (padded context + longest continuation) token positions
    (the continuation pass). ``max_span`` bounds padded context length + longest continuation
    (sliding-window caches).

    Counting contexts rather than choices keeps the passes as large as lm-eval's own: a small
    model on a CPU spends a forward mostly reading its weights, so the number of forwards, not
    the rows in each, sets the time."""
    chunks: list[list[ContextGroup]] = []
    current: list[ContextGroup] = []
    for group in groups:
        candidate = current + [group]
        context = max(len(g.context) for g in candidate)
        continuation = max(len(c) for g in candidate for c in g.continuations)
        rows = sum(len(g.members) for g in candidate)
        too_big = (len(candidate) > batch_size or rows * continuation > batch_size * (context + continuation)
                   or (max_span is not None and context + continuation > max_span))
        if current and too_big:
            chunks.append(current)
            current = []
        current.append(group)
    if current:
        chunks.append(current)
    return chunks


def _right_pad(sequences: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] token ids (0-padded on the right, as lm-eval pads) and their [B, L] real-token mask."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long, device=device)
    mask = torch.zeros(len(sequences), width, dtype=torch.long, device=device)
    for row, sequence in enumerate(sequences):
        ids[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long, device=device)
        mask[row, :len(sequence)] = 1
    return ids, mask


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class SharedContextScorer:
    """Scores chunks of context groups with one context pass and at most one continuation pass.

    ``recorder`` (when not None) receives the real-token masks of each pass; ``autocast_dtype``
    and ``softmax_dtype`` follow lm-eval's ``HFLM`` so the log-likelihoods match its own path.
    """

    def __init__(self, model: torch.nn.Module, device, softmax_dtype=torch.float32, autocast_dtype=None,
                 recorder: SparsityRecorder | None = None):
        self.model, self.device = model, torch.device(device)
        self.softmax_dtype, self.autocast_dtype, self.recorder = softmax_dtype, autocast_dtype, recorder
        parameters = inspect.signature(type(model).forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"  # transformers < 5.24

    def _call(self, valid: torch.Tensor, **inputs):
        scope = self.recorder.valid_tokens(valid) if self.recorder is not None else nullcontext()
        phase = self.recorder.phase(None) if self.recorder is not None else nullcontext()
        with torch.no_grad(), scope, phase, torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype,
                                                           enabled=self.autocast_dtype is not None):
            return self.model(**inputs, use_cache=True)

    def score(self, chunk: list[ContextGroup]) -> list[list[tuple[float, bool]]]:
        """(log-likelihood, is_greedy) of every continuation of every group of ``chunk``."""
        lengths = torch.tensor([len(g.context) for g in chunk], device=self.device)
        context_ids, context_mask = _right_pad([g.context for g in chunk], self.device)
        last = torch.unique(lengths - 1)  # sorted positions of the context's last tokens
        output = self._call(context_mask, input_ids=context_ids, attention_mask=context_mask, logits_to_keep=last)
        first = output.logits[torch.arange(len(chunk), device=self.device), torch.searchsorted(last, lengths - 1)]
        first = F.log_softmax(first, dim=-1, dtype=self.softmax_dtype)  # [G, V]: scores continuation[0]

        rows = [(g, j) for g, group in enumerate(chunk) for j, c in enumerate(group.continuations) if len(c) > 1]
        rest = {}
        if rows:
            group_index = torch.tensor([g for g, _ in rows], device=self.device)
            cache = _cache_of(output)
            cache.reorder_cache(group_index)
            inputs, input_mask = _right_pad([chunk[g].continuations[j][:-1] for g, j in rows], self.device)
            positions = lengths[group_index].unsqueeze(-1) + torch.arange(inputs.shape[1], device=self.device)
            attention = torch.cat([context_mask[group_index], input_mask], dim=1)
            logits = self._call(input_mask, input_ids=inputs, attention_mask=attention, position_ids=positions,
                                **{self.cache_argument: cache}).logits
            log_probs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
            rest = {row: log_probs[i] for i, row in enumerate(rows)}

        results = []
        for g, group in enumerate(chunk):
            scored = []
            for j, continuation in enumerate(group.continuations):
                if len(continuation) > 1:
                    log_probs = torch.cat([first[g:g + 1], rest[(g, j)][:len(continuation) - 1]])
                else:
                    log_probs = first[g:g + 1]
                tokens = torch.tensor(continuation, dtype=torch.long, device=self.device)
                greedy = bool((log_probs.argmax(dim=-1) == tokens).all())
                scored.append((float(log_probs.gather(-1, tokens.unsqueeze(-1)).sum()), greedy))
            results.append(scored)
        return results
