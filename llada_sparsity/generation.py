"""LLaDA's denoising loop (the official ``generate``), with its step structure exposed.

Semantics follow the official implementation: ``x = [prompt | MASK * gen_length]``; the
generation is split into ``gen_length / block_length`` semi-autoregressive blocks with
``steps / num_blocks`` steps each; per block the masked count is split evenly over its steps
(earlier steps take the remainder); each step unmasks the most confident predictions of the
current block. Classifier-free guidance, Gumbel-max sampling in float64 and random remasking
are supported.

Observers learn which step a forward belongs to from an explicit ``DenoisingStep`` handed to
``on_step`` callbacks and set as recorder context (``step``, ``block``) around each forward;
nothing is kept in module globals. With cfg > 0 only the conditional half of the batch is
counted.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from common.core.recorder import SparsityRecorder


@dataclass(frozen=True)
class DenoisingStep:
    """Where a forward pass sits in the denoising schedule."""

    global_step: int  # 0-based over the whole generation
    block: int
    step_in_block: int
    total_steps: int
    prompt_length: int
    gen_length: int


def add_gumbel_noise(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Gumbel-max perturbation in float64 (official): exp(logits) / (-log U) ** temperature."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand_like(logits, dtype=torch.float64)
    return logits.exp() / (-torch.log(noise)) ** temperature


def num_transfer_tokens(block_mask: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, steps] tokens to unmask per step: an even split, earlier steps take the remainder."""
    masked = block_mask.sum(dim=1, keepdim=True)
    base, remainder = masked // steps, masked % steps
    counts = base.expand(-1, steps).clone()
    counts += torch.arange(steps, device=block_mask.device).unsqueeze(0) < remainder
    return counts


def check_schedule(steps: int, gen_length: int, block_length: int) -> int:
    """Validate the block schedule; returns the number of blocks."""
    if gen_length <= 0 or block_length <= 0 or steps <= 0:
        raise ValueError(f"steps, gen_length and block_length must be positive (got {steps}, {gen_length}, "
                         f"{block_length})")
    if gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} is not divisible by block_length={block_length}; "
                         "choose a block_length that divides it")
    blocks = gen_length // block_length
    if steps % blocks:
        raise ValueError(f"steps={steps} is not divisible by the number of blocks ({blocks} = gen_length / "
                         "block_length); choose steps as a multiple of it")
    return blocks


def check_sampling(temperature: float, cfg_scale: float) -> None:
    """Temperature and guidance scale must be finite numbers >= 0 (0 = greedy / no guidance)."""
    for name, value in (("temperature", temperature), ("cfg_scale", cfg_scale)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0 (0 = off), got {value!r}")


def model_mask_id(model) -> int:
    mask_id = getattr(getattr(model, "config", None), "mask_token_id", None)
    if mask_id is None:
        raise ValueError("model.config has no mask_token_id; pass mask_id= explicitly")
    return int(mask_id)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, steps: int = 128, gen_length: int = 128, block_length: int = 128,
             temperature: float = 0.0, cfg_scale: float = 0.0, remasking: str = "low_confidence",
             mask_id: int | None = None, attention_mask: torch.Tensor | None = None,
             logits_eos_inf: bool = False, confidence_eos_eot_inf: bool = False,
             eos_id: int = 126081, eot_id: int = 126348, recorder: SparsityRecorder | None = None,
             on_step: Iterable[Callable[[DenoisingStep, torch.Tensor], None]] = (),
             on_logits: Iterable[Callable[[DenoisingStep, torch.Tensor, torch.Tensor], None]] = (),
             return_steps: bool = False):
    """Official LLaDA sampling. ``prompt`` is [B, P] token ids (left-padded with ``attention_mask``).

    ``on_step(info, x)`` callbacks run before each step's forward, ``on_logits(info, x, logits)``
    after it (the step's guided logits, before any EOS masking). Returns the [B, P + gen_length]
    tokens, and with ``return_steps`` also the list of sequences fed to the model at each step.
    """
    mask_id = model_mask_id(model) if mask_id is None else int(mask_id)
    blocks = check_schedule(steps, gen_length, block_length)
    check_sampling(temperature, cfg_scale)
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking must be 'low_confidence' or 'random', got {remasking!r}")
    if prompt.dim() == 1:
        prompt = prompt.unsqueeze(0)
    if bool((prompt == mask_id).any()):
        raise ValueError(f"the prompt contains the mask token id {mask_id}; remove it from the prompt")
    device = next(model.parameters()).device
    batch, prompt_length = prompt.shape
    x = torch.full((batch, prompt_length + gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :prompt_length] = prompt.to(device)
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.to(device),
                                    torch.ones(batch, gen_length, dtype=attention_mask.dtype, device=device)], dim=-1)
    steps_per_block = steps // blocks
    on_step, on_logits = list(on_step), list(on_logits)
    history = []
    for block in range(blocks):
        start = prompt_length + block * block_length
        end = start + block_length
        transfer_counts = num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)
        for i in range(steps_per_block):
            info = DenoisingStep(block * steps_per_block + i, block, i, steps, prompt_length, gen_length)
            for callback in on_step:
                callback(info, x)
            if return_steps:
                history.append(x.clone())
            mask_index = x == mask_id
            context = (recorder.context(step=info.global_step, block=info.block) if recorder is not None
                       else nullcontext())
            with context:
                logits = guided_logits(model, x, prompt_length, cfg_scale, mask_id, attention_mask, recorder)
            for callback in on_logits:
                callback(info, x, logits)
            if logits_eos_inf:
                logits[:, :, eos_id] = -torch.inf
            noisy = add_gumbel_noise(logits, temperature)
            x0 = torch.argmax(noisy, dim=-1)
            if confidence_eos_eot_inf:  # the official code silences EoT in the logits used for confidence
                noisy[:, :, eos_id] = -torch.inf
                logits[:, :, eot_id] = -torch.inf
            if remasking == "low_confidence":
                probs = F.softmax(logits, dim=-1)
                x0_p = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
            else:
                x0_p = torch.rand(x0.shape, device=x0.device)
            x0_p[:, end:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(-torch.inf, device=device))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for row in range(batch):
                _, chosen = torch.topk(confidence[row], k=int(transfer_counts[row, i]))
                transfer[row, chosen] = True
            x[transfer] = x0[transfer]
    return (x, history) if return_steps else x


def guided_logits(model, x: torch.Tensor, prompt_length: int, cfg_scale: float, mask_id: int,
                  attention_mask: torch.Tensor | None = None,
                  recorder: SparsityRecorder | None = None) -> torch.Tensor:
    """Logits of one forward; with ``cfg_scale > 0`` classifier-free guidance (official).

    The unconditional copy of ``x`` has its first ``prompt_length`` positions masked and runs
    in the same batch; logits = un + (cfg + 1)(cond - un). Only the conditional half is counted
    by the recorder. Used by denoising and by the Monte Carlo likelihood alike.
    """
    if cfg_scale <= 0:
        return model(x, attention_mask=attention_mask).logits
    unconditional = x.clone()
    unconditional[:, :prompt_length] = mask_id
    inputs = torch.cat([x, unconditional], dim=0)
    mask = None if attention_mask is None else torch.cat([attention_mask, attention_mask], dim=0)
    counted = nullcontext()
    if recorder is not None:
        valid = torch.zeros(inputs.shape, dtype=torch.bool, device=x.device)
        valid[: x.shape[0]] = True if attention_mask is None else attention_mask.bool()
        counted = recorder.valid_tokens(valid)
    with counted:
        logits = model(inputs, attention_mask=mask).logits
    conditional, unconditional_logits = torch.chunk(logits, 2, dim=0)
    return unconditional_logits + (cfg_scale + 1) * (conditional - unconditional_logits)
