"""Temporal stability of sparse masks across denoising steps.

``StepJaccard`` is a recorder observer. At every denoising step t and layer it compares the
kept-neuron set A_t of each token with the same token's set at the previous step
(consecutive Jaccard J(A_t, A_{t-1})) and at the first step (drift Jaccard J(A_t, A_1)),
``J = |A ∩ B| / |A ∪ B|`` per token (1 when both are empty), then averages over the generated
positions and, separately, over all real positions. It also records sparsity per step on the
same two position sets.

Memory does not grow with the number of steps: only the previous and the first step's masks
are kept, bit-packed (D/8 bytes per token and layer); per-step results are six scalars.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file

METRICS = ("consecutive_jaccard_generated", "consecutive_jaccard_all", "drift_jaccard_generated",
           "drift_jaccard_all", "sparsity_generated", "sparsity_all")

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a boolean [..., D] mask into uint8 [..., ceil(D / 8)]."""
    width = mask.shape[-1]
    padded = torch.nn.functional.pad(mask, (0, (-width) % 8)) if width % 8 else mask
    bits = padded.reshape(*mask.shape[:-1], -1, 8).to(torch.uint8)
    return (bits * _BIT_WEIGHTS.to(mask.device)).sum(dim=-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of ``pack_mask``."""
    bits = (packed.unsqueeze(-1) & _BIT_WEIGHTS.to(packed.device)) != 0
    return bits.reshape(*packed.shape[:-1], -1)[..., :width]


def jaccard_per_token(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a ∩ b| / |a ∪ b| over the last dimension of two boolean masks (1 where both are empty)."""
    intersection = (a & b).sum(dim=-1)
    union = (a | b).sum(dim=-1)
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union, dtype=torch.float))


def _masked_mean(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    weights = where.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1)


class StepJaccard:
    """Observer of step-keyed masks; call ``start_sequence(prompt_length)`` before each generation."""

    def __init__(self, dump_every: int = 0, dump_dir: str | Path | None = None):
        self.prompt_length = 0
        self.sequence_index = -1
        self.previous: dict[tuple[int, str], torch.Tensor] = {}
        self.first: dict[tuple[int, str], torch.Tensor] = {}
        self.sums: dict[tuple[int, int, str], torch.Tensor] = {}
        self.counts: dict[tuple[int, int, str], int] = defaultdict(int)
        self.dump_every = dump_every
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self._dump_buffer: dict[str, torch.Tensor] = {}
        self._dump_step: int | None = None

    def start_sequence(self, prompt_length: int) -> None:
        self._flush_dump()
        self.prompt_length = prompt_length
        self.sequence_index += 1
        self.previous.clear()
        self.first.clear()

    def stored_bytes(self) -> int:
        """Bytes of masks held between steps (independent of the number of steps)."""
        return sum(t.numel() * t.element_size() for d in (self.previous, self.first) for t in d.values())

    def observe(self, layer, site, context, tensor, mask, valid) -> None:
        step = context.get("step")
        if mask is None or step is None:
            return
        if mask.dim() != 3:
            raise ValueError(f"StepJaccard expects [batch, length, D] masks, got {tuple(mask.shape)}")
        batch, length, width = mask.shape
        real = torch.ones(batch, length, dtype=torch.bool, device=mask.device) if valid is None else valid
        generated = real.clone()
        generated[:, : self.prompt_length] = False
        key = (layer, site)
        nan = torch.tensor(float("nan"), device=mask.device)
        consecutive_gen = consecutive_all = drift_gen = drift_all = nan
        if key in self.previous:
            previous = unpack_mask(self.previous[key], width)
            first = unpack_mask(self.first[key], width)
            consecutive = jaccard_per_token(mask, previous)
            drift = jaccard_per_token(mask, first)
            consecutive_gen, consecutive_all = _masked_mean(consecutive, generated), _masked_mean(consecutive, real)
            drift_gen, drift_all = _masked_mean(drift, generated), _masked_mean(drift, real)
        dropped = 1.0 - mask.float().mean(dim=-1)
        values = torch.stack([consecutive_gen, consecutive_all, drift_gen, drift_all,
                              _masked_mean(dropped, generated), _masked_mean(dropped, real)]).double()
        packed = pack_mask(mask)
        self.previous[key] = packed
        if key not in self.first:
            self.first[key] = packed
        result_key = (step, layer, site)
        self.sums[result_key] = self.sums[result_key] + values if result_key in self.sums else values
        self.counts[result_key] += 1
        if self.dump_every and self.dump_dir is not None and step % self.dump_every == 0:
            if self._dump_step != step:
                self._flush_dump()
                self._dump_step = step
            self._dump_buffer[f"layer{layer}.{site}"] = packed.contiguous()

    def _flush_dump(self) -> None:
        if self._dump_buffer and self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            name = f"masks_seq{self.sequence_index}_step{self._dump_step}.safetensors"
            save_file({k: v.cpu() for k, v in self._dump_buffer.items()}, str(self.dump_dir / name))
        self._dump_buffer = {}

    def finish(self) -> None:
        self._flush_dump()

    def rows(self) -> list[dict]:
        """One dict per (step, layer, site), averaged over sequences; NaN where undefined (step 0)."""
        out = []
        for (step, layer, site), total in sorted(self.sums.items()):
            mean = (total / self.counts[(step, layer, site)]).tolist()
            out.append({"step": step, "layer": layer, "site": site, **dict(zip(METRICS, mean))})
        return out
