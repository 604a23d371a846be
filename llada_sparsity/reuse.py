"""Mask reuse across denoising steps: compute masks at step t, reuse them for the next r steps.

The paper argues the sparse patterns drift too much between steps for reuse to be viable;
this measures it. For each r the experiment reports
* how many generated tokens differ from the run that recomputes masks at every step, and
* on the same inputs (the recomputing run's step sequence, teacher-forced), how far the
  per-step logits move: mean KL(recomputed || reused) and top-1 agreement on masked positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.core.hooks import Sparsifier
from common.core.rules import keep_mask

from .generation import DenoisingStep, generate


class ReusedMaskSparsifier(Sparsifier):
    """A Sparsifier that recomputes its masks only every ``reuse + 1`` denoising steps."""

    def __init__(self, model, sites, rule, value, power=1.0, layers=None, recorder=None, reuse: int = 0):
        super().__init__(model, sites, rule, value, power, layers, recorder)
        if reuse < 0:
            raise ValueError(f"reuse must be >= 0 steps, got {reuse}")
        self.period = reuse + 1
        self.refresh = True
        self.cache: dict[tuple[int, str], torch.Tensor] = {}

    def on_step(self, info: DenoisingStep, x: torch.Tensor) -> None:
        self.refresh = info.global_step % self.period == 0

    def transform(self, layer, site, tensor):
        key = (layer, site)
        mask = self.cache.get(key)
        if self.refresh or mask is None or mask.shape != tensor.shape:
            mask = keep_mask(tensor, self.rule, self.value, self.power)
            self.cache[key] = mask
        self.recorder.record(layer, site, tensor, mask)
        return tensor.masked_fill(~mask, 0)


@torch.no_grad()
def _teacher_forced_logits(model, sparsifier: ReusedMaskSparsifier, history: list[torch.Tensor],
                           info_for_step) -> list[torch.Tensor]:
    out = []
    with sparsifier:
        for step, x in enumerate(history):
            sparsifier.on_step(info_for_step(step), x)
            out.append(model(x).logits.float())
    return out


@torch.no_grad()
def mask_reuse_experiment(model, prompt: torch.Tensor, sites, rule: str, value: float, power: float = 1.0,
                          reuse_values=(1, 2, 4, 8), mask_id: int | None = None, **generate_kwargs) -> list[dict]:
    """Rows per r (and r=0, the recomputing reference): token change and per-step logit drift."""
    steps = generate_kwargs["steps"]
    gen_length = generate_kwargs["gen_length"]
    prompt_length = prompt.shape[-1]

    steps_per_block = steps // (gen_length // generate_kwargs.get("block_length", gen_length))

    def info_for_step(step: int) -> DenoisingStep:
        return DenoisingStep(step, step // steps_per_block, step % steps_per_block, steps, prompt_length, gen_length)

    reference = ReusedMaskSparsifier(model, sites, rule, value, power, reuse=0)
    with reference:
        tokens, history = generate(model, prompt, mask_id=mask_id, return_steps=True, on_step=[reference.on_step],
                                   **generate_kwargs)
    reference_logits = _teacher_forced_logits(model, ReusedMaskSparsifier(model, sites, rule, value, power),
                                              history, info_for_step)
    mask_id = mask_id if mask_id is not None else model.config.mask_token_id
    rows = []
    for reuse in (0,) + tuple(reuse_values):
        free = ReusedMaskSparsifier(model, sites, rule, value, power, reuse=reuse)
        with free:
            reused_tokens = generate(model, prompt, mask_id=mask_id, on_step=[free.on_step], **generate_kwargs)
        changed = (reused_tokens[:, prompt_length:] != tokens[:, prompt_length:]).float().mean().item()
        forced = _teacher_forced_logits(model, ReusedMaskSparsifier(model, sites, rule, value, power, reuse=reuse),
                                        history, info_for_step)
        for step, (ref, new, x) in enumerate(zip(reference_logits, forced, history)):
            masked = x == mask_id
            ref_logp, new_logp = F.log_softmax(ref[masked], -1), F.log_softmax(new[masked], -1)
            kl = (ref_logp.exp() * (ref_logp - new_logp)).sum(-1).mean().item()
            agree = (ref_logp.argmax(-1) == new_logp.argmax(-1)).float().mean().item()
            rows.append({"reuse": reuse, "step": step, "kl_recomputed_vs_reused": kl, "top1_agreement": agree,
                         "generated_tokens_changed": changed})
    return rows
