"""Mask reuse across denoising steps: compute masks at step t, reuse them for the next r steps.

The paper argues the sparse patterns drift too much between steps for reuse to be viable;
this measures it, for a batch of prompts at once. For each r the experiment reports, per
sequence,

* on the recomputing run's own step inputs (teacher-forced), how far the per-step logits move:
  mean KL(recomputed || reused) and top-1 agreement on the still-masked positions. These are
  measured during the recomputing run itself (``ReuseProbe``): after each step's forward, one
  extra forward per r on the same input applies the masks kept from the step's last refresh.
  At refresh steps (t a multiple of r + 1) the reused run is the recomputing run: KL 0.
* how many generated tokens differ when the run reuses masks freely: one batched generation
  holding every r (``ReusedMaskSparsifier`` with one period per row).

r = 0 is the recomputing run itself (the reference row: 0 by definition).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from common.core.hooks import Sparsifier
from common.core.rules import keep_mask

from .generation import DenoisingStep, generate, guided_logits, model_mask_id


def apply_mask(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``tensor`` with the entries outside ``mask`` zeroed (a product: several times faster than
    ``masked_fill`` on CPU, the same values for finite activations)."""
    return tensor * mask


def check_reuse_values(values) -> tuple[int, ...]:
    """The distinct reuse values, sorted; each must be an integer >= 0."""
    values = tuple(values)
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"mask reuse values are numbers of steps >= 0, got {value!r}")
    return tuple(sorted(set(values)))


class ReusedMaskSparsifier(Sparsifier):
    """A Sparsifier that recomputes the masks of a row only every ``reuse + 1`` denoising steps.

    ``reuse`` is one number for every row, or one per row of the batch (with classifier-free
    guidance the unconditional copies follow their rows).
    """

    def __init__(self, model, sites, rule, value, power=1.0, layers=None, recorder=None,
                 reuse: int | Sequence[int] = 0):
        super().__init__(model, sites, rule, value, power, layers, recorder)
        values = [reuse] if isinstance(reuse, int) else list(reuse)
        check_reuse_values(values)
        self.periods = torch.tensor(values, dtype=torch.long) + 1
        self.per_row = not isinstance(reuse, int)
        self.step = 0
        self.cache: dict[tuple[int, str], torch.Tensor] = {}

    def on_step(self, info: DenoisingStep, x: torch.Tensor) -> None:
        self.step = info.global_step

    def _refresh_rows(self, rows: int) -> torch.Tensor:
        periods = self.periods
        if self.per_row:
            if rows == 2 * len(periods):
                periods = torch.cat([periods, periods])
            elif rows != len(periods):
                raise ValueError(f"{len(periods)} reuse values for a batch of {rows} rows; give one per row")
        return (self.step % periods == 0).expand(rows)

    def transform(self, layer, site, tensor):
        key = (layer, site)
        cached = self.cache.get(key)
        refresh = self._refresh_rows(tensor.shape[0])
        if cached is None or cached.shape != tensor.shape or bool(refresh.all()):
            mask = keep_mask(tensor, self.rule, self.value, self.power)
        elif not bool(refresh.any()):
            mask = cached
        else:
            rows = refresh.nonzero().squeeze(-1).to(tensor.device)
            mask = cached.clone()
            mask[rows] = keep_mask(tensor[rows], self.rule, self.value, self.power)
        self.cache[key] = mask
        mask = mask | ~torch.isfinite(tensor).all(dim=-1, keepdim=True)  # a reused mask never cuts a non-finite row
        self.recorder.record(layer, site, tensor, mask)
        return apply_mask(tensor, mask)


def logit_drift(reference: torch.Tensor, other: torch.Tensor, where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: mean KL(reference || other) and top-1 agreement of [B, L, V] logits at positions ``where``."""
    rows = where.nonzero()[:, 0]
    ref_logp = F.log_softmax(reference[where].float(), dim=-1)
    new_logp = F.log_softmax(other[where].float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - new_logp)).sum(-1)
    agree = (ref_logp.argmax(-1) == new_logp.argmax(-1)).float()
    count = where.sum(dim=-1).float()
    zeros = torch.zeros(where.shape[0], device=where.device)
    return zeros.index_add(0, rows, kl) / count, zeros.index_add(0, rows, agree) / count


class ReuseProbe(Sparsifier):
    """The recomputing run's per-token Sparsifier, measuring mask reuse teacher-forced as it goes.

    Pass ``on_step`` and ``on_logits`` to ``generate``. For every r the masks of the last step
    t0 with t0 % (r + 1) == 0 are kept (references, no copies); after a step's forward, one more
    forward, with the recorder paused, runs a copy of the step's input (and the same guidance)
    for each r that does not refresh at this step and applies that r's kept masks to it.
    """

    def __init__(self, model, sites, rule, value, power=1.0, layers=None, recorder=None, reuse_values=(1, 2, 4, 8),
                 cfg_scale: float = 0.0, mask_id: int | None = None, attention_mask: torch.Tensor | None = None):
        super().__init__(model, sites, rule, value, power, layers, recorder)
        self.reuse_values = check_reuse_values(reuse_values)
        self.cfg_scale = cfg_scale
        self.mask_id = model_mask_id(model) if mask_id is None else int(mask_id)
        self.attention_mask = attention_mask
        self.step = 0
        self.kept_masks: dict[int, dict[tuple[int, str], torch.Tensor]] = {r: {} for r in self.reuse_values}
        self.replaying: list[int] = []
        self.drift: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []  # (r, step, kl [B], agreement [B])

    def on_step(self, info: DenoisingStep, x: torch.Tensor) -> None:
        self.step = info.global_step

    def transform(self, layer, site, tensor):
        if self.replaying:
            masks = [self.kept_masks[r][(layer, site)] for r in self.replaying]
            if self.cfg_scale > 0:  # rows are [conditional copies; unconditional copies]
                masks = [half for halves in zip(*(m.chunk(2) for m in masks)) for half in halves]
            return apply_mask(tensor, torch.cat(masks))
        mask = keep_mask(tensor, self.rule, self.value, self.power)
        self.recorder.record(layer, site, tensor, mask)
        for r in self.reuse_values:
            if self.step % (r + 1) == 0:
                self.kept_masks[r][(layer, site)] = mask
        return apply_mask(tensor, mask)

    @torch.no_grad()
    def on_logits(self, info: DenoisingStep, x: torch.Tensor, logits: torch.Tensor) -> None:
        masked = x == self.mask_id
        batch = x.shape[0]
        attention_mask = None
        if self.attention_mask is not None:
            attention_mask = torch.cat([self.attention_mask.to(x.device), torch.ones(
                batch, info.gen_length, dtype=self.attention_mask.dtype, device=x.device)], dim=-1)
        replay = [r for r in self.reuse_values if info.global_step % (r + 1)]
        for r in self.reuse_values:
            if r not in replay:  # a refresh step: the reused run is the recomputing run
                self.drift.append((r, info.global_step, torch.zeros(batch), torch.ones(batch)))
        if not replay:
            return
        copies = len(replay)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat(copies, 1)
        self.replaying = replay
        try:
            with self.recorder.paused():
                reused = guided_logits(self.model, x.repeat(copies, 1), info.prompt_length, self.cfg_scale,
                                       self.mask_id, attention_mask)
        finally:
            self.replaying = []
        for index, r in enumerate(replay):
            drift = logit_drift(logits, reused[index * batch:(index + 1) * batch], masked)
            self.drift.append((r, info.global_step, *drift))

    def rows(self, tokens_changed: dict[int, torch.Tensor]) -> list[dict]:
        """One row per (sequence, r, step); ``tokens_changed[r]`` is the free-running change per sequence."""
        out = []
        for r, step, kl, agree in self.drift:
            changed = tokens_changed[r].tolist()
            for sequence, (k, a) in enumerate(zip(kl.tolist(), agree.tolist())):
                out.append({"sequence": sequence, "reuse": r, "step": step, "kl_recomputed_vs_reused": k,
                            "top1_agreement": a, "generated_tokens_changed": changed[sequence]})
        return sorted(out, key=lambda row: (row["sequence"], row["reuse"], row["step"]))


@torch.no_grad()
def free_running_changes(model, prompt: torch.Tensor, reference: torch.Tensor, sites, rule, value, power,
                         reuse_values, attention_mask=None, mask_id=None, on_step=(),
                         **generate_kwargs) -> dict[int, torch.Tensor]:
    """Fraction of generated tokens differing from ``reference`` when reusing masks for r steps, per sequence.

    All r run as one batch (r-major copies of the prompts). r = 0 is the reference run: 0.
    """
    batch, prompt_length = prompt.shape
    values = [r for r in check_reuse_values(reuse_values) if r > 0]
    out = {0: torch.zeros(batch)}
    if not values:
        return out
    copies = prompt.repeat(len(values), 1)
    mask = None if attention_mask is None else attention_mask.repeat(len(values), 1)
    free = ReusedMaskSparsifier(model, sites, rule, value, power, reuse=[r for r in values for _ in range(batch)])
    with free, free.recorder.paused():
        tokens = generate(model, copies, mask_id=mask_id, attention_mask=mask, on_step=[free.on_step, *on_step],
                          **generate_kwargs)
    changed = (tokens[:, prompt_length:] != reference[:, prompt_length:].repeat(len(values), 1)).float().mean(-1)
    for index, r in enumerate(values):
        out[r] = changed[index * batch:(index + 1) * batch].cpu()
    return out


@torch.no_grad()
def generate_with_reuse_probe(model, prompt: torch.Tensor, sites, rule: str, value: float, power: float = 1.0,
                              reuse_values=(1, 2, 4, 8), mask_id: int | None = None,
                              attention_mask: torch.Tensor | None = None, recorder=None, on_step=(),
                              **generate_kwargs) -> tuple[torch.Tensor, list[dict]]:
    """The recomputing (per-token) generation with the mask-reuse experiment: (tokens, rows).

    ``on_step`` callbacks follow both generations (the recomputing one, then the free-running one).
    """
    values = (0,) + check_reuse_values(reuse_values)
    probe = ReuseProbe(model, sites, rule, value, power, recorder=recorder, reuse_values=values,
                       cfg_scale=generate_kwargs.get("cfg_scale", 0.0), mask_id=mask_id,
                       attention_mask=attention_mask)
    with probe:
        tokens = generate(model, prompt, mask_id=mask_id, attention_mask=attention_mask, recorder=recorder,
                          on_step=[probe.on_step, *on_step], on_logits=[probe.on_logits], **generate_kwargs)
    changed = free_running_changes(model, prompt, tokens, sites, rule, value, power, values,
                                   attention_mask=attention_mask, mask_id=mask_id, on_step=on_step, **generate_kwargs)
    return tokens, probe.rows(changed)


def mask_reuse_experiment(model, prompt: torch.Tensor, sites, rule: str, value: float, power: float = 1.0,
                          reuse_values=(1, 2, 4, 8), mask_id: int | None = None,
                          attention_mask: torch.Tensor | None = None, **generate_kwargs) -> list[dict]:
    """Rows per (sequence, r, step), r = 0 (the recomputing reference) included."""
    return generate_with_reuse_probe(model, prompt, sites, rule, value, power, reuse_values, mask_id,
                                     attention_mask, **generate_kwargs)[1]
