"""LLaDA's Monte Carlo log-likelihood estimator (the official ``get_log_likelihood``).

``seq = prompt + answer`` repeated ``batch_size`` times. Each round draws ``k ~ U{1..L}``
(L = answer length), masks ``round(linspace(k, k + (b-1) L / b, b))`` answer positions per
row (wrapped into [1, L]) chosen by random permutation, never the prompt; the loss is the
cross-entropy on masked positions divided by the row's masked fraction, summed and divided by
b. The estimate is minus the mean loss over ``mc_num / batch_size`` rounds. The random calls
are made in the official order, so seeding reproduces the official values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.core.recorder import SparsityRecorder

from .generation import check_sampling, guided_logits, model_mask_id


def forward_process(batch: torch.Tensor, prompt_length: int, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask answer positions of each row; returns the noisy batch and each row's masked fraction [b, 1]."""
    rows, length = batch.shape
    target_length = length - prompt_length
    k = torch.randint(1, target_length + 1, (), device=batch.device)
    counts = torch.round(torch.linspace(float(k), k + (rows - 1) * (target_length / rows), steps=rows,
                                        device=batch.device)).long()
    counts = ((counts - 1) % target_length) + 1
    positions = torch.arange(target_length, device=batch.device).repeat(rows, 1)
    is_mask = positions < counts.unsqueeze(1)
    for row in range(rows):
        is_mask[row] = is_mask[row][torch.randperm(target_length)]
    is_mask = torch.cat([torch.zeros(rows, prompt_length, dtype=torch.bool, device=batch.device), is_mask], dim=1)
    return torch.where(is_mask, mask_id, batch), (counts / target_length).unsqueeze(1)


@torch.no_grad()
def log_likelihood(model, prompt: torch.Tensor, answer: torch.Tensor, mc_num: int = 128, batch_size: int = 16,
                   cfg_scale: float = 0.0, mask_id: int | None = None,
                   recorder: SparsityRecorder | None = None) -> float:
    """Monte Carlo estimate of log p(answer | prompt) under LLaDA (1-D token id tensors)."""
    mask_id = model_mask_id(model) if mask_id is None else int(mask_id)
    prompt, answer = torch.as_tensor(prompt).reshape(-1), torch.as_tensor(answer).reshape(-1)
    if answer.numel() == 0:
        raise ValueError("the answer is empty; the likelihood of an empty answer is not defined")
    if bool((prompt == mask_id).any()) or bool((answer == mask_id).any()):
        raise ValueError(f"prompt or answer contains the mask token id {mask_id}; remove it")
    check_sampling(0.0, cfg_scale)
    if mc_num % batch_size:
        raise ValueError(f"mc_num={mc_num} must be a multiple of batch_size={batch_size}")
    device = next(model.parameters()).device
    seq = torch.cat([prompt, answer]).to(device).unsqueeze(0).repeat(batch_size, 1)
    losses = []
    for _ in range(mc_num // batch_size):
        noisy, fraction = forward_process(seq, len(prompt), mask_id)
        masked = noisy == mask_id
        logits = guided_logits(model, noisy, len(prompt), cfg_scale, mask_id, recorder=recorder)
        weights = fraction.expand_as(masked)[masked]
        loss = F.cross_entropy(logits[masked].float(), seq[masked], reduction="none") / weights
        losses.append(loss.sum() / batch_size)
    return -sum(float(loss) for loss in losses) / len(losses)
