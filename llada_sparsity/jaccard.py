"""Temporal stability of sparse masks across denoising steps.

``StepJaccard`` is a recorder observer. At every denoising step t and layer it compares the
kept-neuron set A_t of each token with the same token's set at the previous step
(consecutive Jaccard J(A_t, A_{t-1})) and at the first step (drift Jaccard J(A_t, A_1)),
``J = |A ∩ B| / |A ∪ B|`` (1 when both are empty), in two ways, per sequence of the batch:

* per token (this toolkit's definition): J per token, averaged over the positions;
* flattened (the paper's released code): one set of (token, neuron) pairs per sequence,
  ``sum |A ∩ B| / sum |A ∪ B|`` over the positions.

Each is reported over the generated positions and over all real positions (padding is never
counted), with sparsity on the same two position sets, and kept / counted entries per
sequence in the recorder's row format.

Memory does not grow with the number of steps: only the previous and the first step's masks
are kept, bit-packed (D/8 bytes per token and layer); per-step results are a few scalars per
sequence. With ``dump_every = k`` the masks of every k-th step are saved per sequence (real
positions only, bit-packed); ``jaccard_from_dump`` recomputes the curves from such a folder.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

METRICS = ("consecutive_jaccard_generated", "consecutive_jaccard_all", "drift_jaccard_generated",
           "drift_jaccard_all", "sparsity_generated", "sparsity_all")
FLAT_METRICS = ("consecutive_jaccard_flat_generated", "consecutive_jaccard_flat_all", "drift_jaccard_flat_generated",
                "drift_jaccard_flat_all")
MEASURES = METRICS + FLAT_METRICS

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


def overlap_counts(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """|a ∩ b| and |a ∪ b| per token: counts over the last dimension of two boolean masks."""
    return (a & b).sum(dim=-1, dtype=torch.int32), (a | b).sum(dim=-1, dtype=torch.int32)


def _ratio(intersection: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union, dtype=torch.float))


def jaccard_per_token(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a ∩ b| / |a ∪ b| over the last dimension of two boolean masks (1 where both are empty)."""
    return _ratio(*overlap_counts(a, b))


def jaccard_flattened(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Per row of [B, L, D] masks: J of the sets of (position, neuron) pairs at positions ``where`` [B, L]."""
    intersection, union = overlap_counts(a, b)
    return _flattened(intersection, union, where)


def _flattened(intersection: torch.Tensor, union: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    weights = where.to(torch.int64)
    return _ratio((intersection * weights).sum(dim=-1), (union * weights).sum(dim=-1))


def _row_mean(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Mean of [B, L] values over the positions ``where`` of each row."""
    weights = where.to(values.dtype)
    return (values * weights).sum(dim=-1) / weights.sum(dim=-1).clamp_min(1)


def step_measures(mask: torch.Tensor, previous: torch.Tensor | None, first: torch.Tensor | None,
                  generated: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """[B, len(MEASURES)] float64: every measure of one step's [B, L, D] masks, per sequence.

    ``previous`` / ``first`` are the masks to compare with (None at the first step: NaN);
    ``generated`` and ``real`` are [B, L] position sets.
    """
    nan = torch.full((mask.shape[0],), float("nan"), device=mask.device)
    values = dict.fromkeys(MEASURES, nan)
    for name, other in (("consecutive", previous), ("drift", first)):
        if other is None:
            continue
        intersection, union = overlap_counts(mask, other)
        per_token = _ratio(intersection, union)
        values[f"{name}_jaccard_generated"] = _row_mean(per_token, generated)
        values[f"{name}_jaccard_all"] = _row_mean(per_token, real)
        values[f"{name}_jaccard_flat_generated"] = _flattened(intersection, union, generated)
        values[f"{name}_jaccard_flat_all"] = _flattened(intersection, union, real)
    dropped = 1.0 - mask.sum(dim=-1, dtype=torch.int32) / mask.shape[-1]
    values["sparsity_generated"] = _row_mean(dropped, generated)
    values["sparsity_all"] = _row_mean(dropped, real)
    return torch.stack([values[name].double() for name in MEASURES], dim=-1)


class StepJaccard:
    """Observer of step-keyed masks of a batch of sequences.

    Call ``start_batch(prompt_length, sequences)`` before each generation: positions from
    ``prompt_length`` on are generated ones, and only the first ``sequences`` rows of a forward
    are measured (with classifier-free guidance the unconditional copies follow them).
    ``dump_dirs`` (one folder or None per sequence) receives the masks of every
    ``dump_every``-th step.
    """

    def __init__(self, dump_every: int = 0):
        if dump_every < 0:
            raise ValueError(f"dump_every must be >= 0 (0 = no dumps), got {dump_every}")
        self.dump_every = dump_every
        self.prompt_length = 0
        self.sequences = 0
        self.batch_index = -1
        self.first_sequence = 0
        self.previous: dict[tuple[int, str], torch.Tensor] = {}
        self.first: dict[tuple[int, str], torch.Tensor] = {}
        self.sums: dict[tuple, torch.Tensor] = {}  # (batch, step, layer, site) -> [B, M]
        self.counts: dict[tuple, int] = defaultdict(int)
        self.kept: dict[tuple, torch.Tensor] = {}  # (batch, layer, site, context) -> [B]
        self.counted: dict[tuple, torch.Tensor] = {}
        self.forwards: dict[tuple, int] = defaultdict(int)
        self.batch_offsets: dict[int, tuple[int, int]] = {}
        self.dump_dirs: list[Path | None] = []
        self._dump_buffer: dict[int, dict[str, torch.Tensor]] = {}
        self._dump_meta: dict[int, dict[str, str]] = {}
        self._dump_step: int | None = None

    def start_batch(self, prompt_length: int, sequences: int, dump_dirs=None) -> None:
        self._flush_dump()
        if self.batch_index >= 0:
            self.first_sequence += self.sequences
        self.batch_index += 1
        self.prompt_length, self.sequences = prompt_length, sequences
        self.batch_offsets[self.batch_index] = (self.first_sequence, sequences)
        self.dump_dirs = [Path(d) if d else None for d in (dump_dirs or [None] * sequences)]
        self.previous.clear()
        self.first.clear()

    def start_sequence(self, prompt_length: int) -> None:
        """One sequence of its own (batch of one)."""
        self.start_batch(prompt_length, 1)

    def stored_bytes(self) -> int:
        """Bytes of masks held between steps (independent of the number of steps)."""
        return sum(t.numel() * t.element_size() for d in (self.previous, self.first) for t in d.values())

    def observe(self, layer, site, context, tensor, mask, valid) -> None:
        step = context.get("step")
        if mask is None or step is None:
            return
        if mask.dim() != 3:
            raise ValueError(f"StepJaccard expects [batch, length, D] masks, got {tuple(mask.shape)}")
        mask = mask[: self.sequences]
        batch, length, width = mask.shape
        real = (torch.ones(batch, length, dtype=torch.bool, device=mask.device) if valid is None
                else valid[: self.sequences].bool())
        generated = real.clone()
        generated[:, : self.prompt_length] = False
        key = (layer, site)
        previous = unpack_mask(self.previous[key], width) if key in self.previous else None
        first = unpack_mask(self.first[key], width) if key in self.first else None
        values = step_measures(mask, previous, first, generated, real)
        packed = pack_mask(mask)
        self.previous[key] = packed
        self.first.setdefault(key, packed)
        result_key = (self.batch_index, step, layer, site)
        self.sums[result_key] = self.sums[result_key] + values if result_key in self.sums else values
        self.counts[result_key] += 1
        count_key = (self.batch_index, layer, site, tuple(sorted(context.items())))
        kept = (mask & real.unsqueeze(-1)).sum(dim=(-2, -1))
        counted = real.sum(dim=-1) * width
        if count_key in self.kept:
            kept, counted = self.kept[count_key] + kept, self.counted[count_key] + counted
        self.kept[count_key], self.counted[count_key] = kept, counted
        self.forwards[count_key] += 1
        if self.dump_every and step % self.dump_every == 0 and any(self.dump_dirs):
            self._buffer_dump(step, layer, site, packed, real, width)

    def _buffer_dump(self, step, layer, site, packed, real, width) -> None:
        if self._dump_step != step:
            self._flush_dump()
            self._dump_step = step
        for row, folder in enumerate(self.dump_dirs):
            if folder is None:
                continue
            self._dump_buffer.setdefault(row, {})[f"layer{layer}.{site}"] = packed[row][real[row]].contiguous()
            pads = int((~real[row, : self.prompt_length]).sum())
            self._dump_meta[row] = {"step": str(step), "prompt_length": str(self.prompt_length - pads),
                                    "width": str(width)}

    def _flush_dump(self) -> None:
        for row, tensors in self._dump_buffer.items():
            folder = self.dump_dirs[row]
            folder.mkdir(parents=True, exist_ok=True)
            name = f"masks_step{self._dump_step:05d}.safetensors"
            save_file({k: v.cpu() for k, v in tensors.items()}, str(folder / name), metadata=self._dump_meta[row])
        self._dump_buffer, self._dump_meta = {}, {}

    def finish(self) -> None:
        self._flush_dump()

    def rows(self) -> list[dict]:
        """One dict per (sequence, step, layer, site); NaN where undefined (the first step).

        ``sequence`` counts the sequences of all batches in order.
        """
        out = []
        for (batch, step, layer, site), total in sorted(self.sums.items()):
            first, _ = self.batch_offsets[batch]
            mean = (total / self.counts[(batch, step, layer, site)]).tolist()
            for row, values in enumerate(mean):
                out.append({"sequence": first + row, "step": step, "layer": layer, "site": site,
                            **dict(zip(MEASURES, values))})
        return sorted(out, key=lambda r: r["sequence"])

    def sparsity_rows(self) -> list[dict]:
        """Kept / counted entries per (sequence, layer, site, context), as ``SparsityRecorder.rows``."""
        out = []
        for key in sorted(self.kept, key=lambda k: (k[0], k[1], k[2], str(k[3]))):
            batch, layer, site, context = key
            first, _ = self.batch_offsets[batch]
            for row, (kept, counted) in enumerate(zip(self.kept[key].tolist(), self.counted[key].tolist())):
                out.append({"sequence": first + row, "layer": layer, "site": site, **dict(context), "kept": kept,
                            "counted": counted, "sparsity": (1.0 - kept / counted) if counted else None,
                            "forwards": self.forwards[key]})
        return sorted(out, key=lambda r: r["sequence"])


def read_mask_dump(folder: str | Path) -> tuple[dict, dict[int, dict[tuple[int, str], torch.Tensor]]]:
    """The masks one sequence's dump folder holds: ({prompt_length, width}, {step: {(layer, site): bool [L, D]}})."""
    files = sorted(Path(folder).glob("masks_step*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no masks_step*.safetensors files; run the study with --dump-every")
    masks: dict[int, dict[tuple[int, str], torch.Tensor]] = {}
    info: dict = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            meta = handle.metadata()
            width = int(meta["width"])
            info = {"prompt_length": int(meta["prompt_length"]), "width": width}
            step_masks = {}
            for name in handle.keys():
                layer, site = name.split(".", 1)
                step_masks[(int(layer.removeprefix("layer")), site)] = unpack_mask(handle.get_tensor(name), width)
            masks[int(meta["step"])] = step_masks
    return info, dict(sorted(masks.items()))


def jaccard_from_dump(folder: str | Path) -> list[dict]:
    """Recompute the Jaccard curves of one sequence from its dumped masks.

    One row per (dumped step, layer, site) with the same measures as ``StepJaccard.rows``;
    "consecutive" compares with the previous *dumped* step (``previous_step``), so it is the
    live consecutive Jaccard when every step was dumped, and drift compares with step 0.
    """
    info, masks = read_mask_dump(folder)
    steps = list(masks)
    out = []
    for index, step in enumerate(steps):
        for (layer, site), mask in sorted(masks[step].items()):
            real = torch.ones(1, mask.shape[0], dtype=torch.bool)
            generated = real.clone()
            generated[:, : info["prompt_length"]] = False
            previous = masks[steps[index - 1]][(layer, site)][None] if index else None
            first = masks[steps[0]][(layer, site)][None] if index else None
            values = step_measures(mask[None], previous, first, generated, real)[0].tolist()
            out.append({"step": step, "previous_step": steps[index - 1] if index else None, "layer": layer,
                        "site": site, **dict(zip(MEASURES, values))})
    return out
