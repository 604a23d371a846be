"""Per-key counts of kept and counted entries, real tokens only, plus pluggable observers.

A key is (layer, site, context), where the context is whatever the caller set with
``recorder.context(...)``: a diffusion step, an expert id, the generation phase. Counts stay
on the model's device as tensors and are read (one sync) only when a summary is asked for.

Padding is removed here, once: the valid-token mask comes from the model call's 2D
``attention_mask`` (picked up by the hooks' root pre-hook) or from ``valid_tokens(...)`` /
``valid_tokens_from_lengths(...)`` set explicitly by the caller, which wins.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Protocol

import torch


class Observer(Protocol):
    """Receives every site tensor a hook sees (mask is None in capture mode)."""

    def observe(self, layer: int, site: str, context: dict, tensor: torch.Tensor,
                mask: torch.Tensor | None, valid: torch.Tensor | None) -> None: ...


class CountObserver(Protocol):
    """Needs only the kept count per token [...] (None in capture mode), so the sparsifying hooks
    build no boolean mask for it (``counts_only = True`` marks it)."""

    counts_only: bool

    def observe_counts(self, layer: int, site: str, context: dict, kept: torch.Tensor | None, width: int,
                       valid: torch.Tensor | None) -> None: ...


def lengths_to_valid(lengths, seq_len: int, padding_side: str = "right", device=None) -> torch.Tensor:
    """[B, L] bool mask of real tokens from per-row lengths."""
    lengths = torch.as_tensor(lengths, device=device).reshape(-1, 1)
    positions = torch.arange(seq_len, device=lengths.device).unsqueeze(0)
    if padding_side == "right":
        return positions < lengths
    if padding_side == "left":
        return positions >= seq_len - lengths
    raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")


class SparsityRecorder:
    """Counts kept and real entries per (layer, site, context) and feeds observers."""

    def __init__(self, observers: tuple | list = ()):
        self.observers = list(observers)
        self.kept: dict[tuple, torch.Tensor] = {}
        self.counted: dict[tuple, torch.Tensor] = {}
        self.forwards: dict[tuple, int] = {}
        # MoE: per (layer, site, context) vectors over experts, [E] device tensors.
        self.expert_kept: dict[tuple, torch.Tensor] = {}
        self.expert_counted: dict[tuple, torch.Tensor] = {}
        self.expert_routed: dict[tuple, torch.Tensor] = {}
        self._context: dict = {}
        self._call_valid: torch.Tensor | None = None
        self._explicit_valid: torch.Tensor | None = None
        self._fixed_phase: tuple[str | None] | None = None
        self.enabled = True

    # ---- context -------------------------------------------------------------------------
    @contextmanager
    def context(self, **values) -> Iterator[None]:
        """Add ``values`` (e.g. step=3) to the key of everything recorded inside."""
        saved = dict(self._context)
        self._context.update(values)
        try:
            yield
        finally:
            self._context = saved

    @contextmanager
    def valid_tokens(self, valid: torch.Tensor | None) -> Iterator[None]:
        """Count only positions where ``valid`` [B, L] is True, for calls inside."""
        saved = self._explicit_valid
        self._explicit_valid = None if valid is None else valid.bool()
        try:
            yield
        finally:
            self._explicit_valid = saved

    @contextmanager
    def phase(self, phase: str | None) -> Iterator[None]:
        """Key calls inside by ``phase`` (None: no phase) whatever cache they carry: a scoring pass
        that continues a context's cache is not a generation step."""
        saved, self._fixed_phase = self._fixed_phase, (phase,)
        try:
            yield
        finally:
            self._fixed_phase = saved

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Record nothing inside (e.g. a batch-size probe); masks are still applied."""
        saved, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = saved

    def snapshot(self) -> tuple[dict, ...]:
        """The counts so far, for ``restore``. Cheap: counts are replaced, never updated in place."""
        return tuple(dict(counts) for counts in (self.kept, self.counted, self.forwards, self.expert_kept,
                                                 self.expert_counted, self.expert_routed))

    def restore(self, snapshot: tuple[dict, ...]) -> None:
        """Forget what was counted since ``snapshot`` (a pass that failed midway and runs again).
        Observers are not rewound."""
        (self.kept, self.counted, self.forwards, self.expert_kept, self.expert_counted,
         self.expert_routed) = (dict(counts) for counts in snapshot)

    def begin_call(self, attention_mask: torch.Tensor | None, phase: str | None) -> None:
        """Called by the hooks before each model forward."""
        if attention_mask is not None and attention_mask.dim() == 2:
            self._call_valid = attention_mask.bool()
        else:
            self._call_valid = None
        if self._fixed_phase is not None:
            phase = self._fixed_phase[0]
        if phase is None:
            self._context.pop("phase", None)
        else:
            self._context["phase"] = phase

    # ---- recording -----------------------------------------------------------------------
    def valid_for(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The [..., ] real-token mask aligned with ``tensor`` [..., D] (None = all real)."""
        valid = self._explicit_valid if self._explicit_valid is not None else self._call_valid
        if valid is None:
            return None
        token_shape = tensor.shape[:-1]
        if valid.shape == token_shape:
            return valid
        if tensor.dim() == 3 and valid.dim() == 2 and valid.shape[0] == token_shape[0] \
                and valid.shape[1] > token_shape[1]:
            return valid[:, -token_shape[1]:]  # decoding with a cache: the mask covers past tokens too
        if tensor.dim() == 2 and valid.numel() == token_shape[0]:
            return valid.reshape(-1)
        raise RuntimeError(
            f"valid-token mask of shape {tuple(valid.shape)} does not match activations of shape "
            f"{tuple(tensor.shape)}; pass valid_tokens(...) with one entry per token"
        )

    def record(self, layer: int, site: str, tensor: torch.Tensor, mask: torch.Tensor | None,
               valid: torch.Tensor | None = None, kept: torch.Tensor | None = None, **extra) -> None:
        """Count kept entries over real tokens and hand everything to the observers.

        ``kept`` [...] is the kept count per token, when the caller has it (``zero_below`` counts
        while it zeroes); otherwise it is counted from ``mask`` [..., D] (True = kept, None in
        capture mode). Counting per token and then over the real tokens reads the mask once.
        """
        if not self.enabled:
            return
        if valid is None:
            valid = self.valid_for(tensor)
        context = {**self._context, **extra} if extra else self._context
        if kept is None and mask is not None:
            kept = mask.sum(dim=-1, dtype=torch.int32)
        if kept is not None:
            width = tensor.shape[-1]
            if valid is None:
                self.add_counts(layer, site, kept.sum(), torch.tensor(kept.numel() * width, device=kept.device),
                                context)
            else:
                self.add_counts(layer, site, (kept * valid).sum(), valid.sum() * width, context)
        for observer in self.observers:
            if getattr(observer, "counts_only", False):
                observer.observe_counts(layer, site, dict(context), kept, tensor.shape[-1], valid)
            else:
                observer.observe(layer, site, dict(context), tensor, mask, valid)

    @property
    def needs_masks(self) -> bool:
        """Whether an observer needs the boolean keep-mask (not only the kept counts)."""
        return self.enabled and any(not getattr(observer, "counts_only", False) for observer in self.observers)

    def add_counts(self, layer: int, site: str, kept, counted, context: dict | None = None) -> None:
        """Add kept / counted entries to a key (counts may be device tensors: no sync here)."""
        key = (layer, site, tuple(sorted((self._context if context is None else context).items())))
        if key in self.kept:
            self.kept[key] = self.kept[key] + kept
            self.counted[key] = self.counted[key] + counted
            self.forwards[key] += 1
        else:
            self.kept[key], self.counted[key], self.forwards[key] = kept, counted, 1

    def add_expert_counts(self, layer: int, site: str, kept: torch.Tensor, counted: torch.Tensor,
                          routed: torch.Tensor, context: dict | None = None) -> None:
        """Add per-expert vectors [E]: kept entries, counted entries, routed real tokens."""
        if not self.enabled:
            return
        key = (layer, site, tuple(sorted((self._context if context is None else context).items())))
        if key in self.expert_kept:
            self.expert_kept[key] = self.expert_kept[key] + kept
            self.expert_counted[key] = self.expert_counted[key] + counted
            self.expert_routed[key] = self.expert_routed[key] + routed
        else:
            self.expert_kept[key], self.expert_counted[key], self.expert_routed[key] = kept, counted, routed

    def expert_rows(self) -> list[dict]:
        """One dict per (layer, site, context, expert); sparsity is None for experts no token reached."""
        out = []
        for key in sorted(self.expert_kept, key=lambda k: (k[0], k[1], str(k[2]))):
            layer, site, context = key
            kept = self.expert_kept[key].tolist()
            counted = self.expert_counted[key].tolist()
            routed = self.expert_routed[key].tolist()
            for expert, (k, c, r) in enumerate(zip(kept, counted, routed)):
                out.append({"layer": layer, "site": site, **dict(context), "expert": expert, "kept": int(k),
                            "counted": int(c), "routed_tokens": int(r),
                            "sparsity": (1.0 - k / c) if c else None})
        return out

    def reset(self) -> None:
        self.kept.clear()
        self.counted.clear()
        self.forwards.clear()
        self.expert_kept.clear()
        self.expert_counted.clear()
        self.expert_routed.clear()

    # ---- data parallel -------------------------------------------------------------------
    def summed_over_ranks(self) -> "SparsityRecorder":
        """A recorder with this one's counts summed over every ``torch.distributed`` rank, so a
        data-parallel run reports what one process would on the same items; ``self`` when not
        distributed. A collective: every rank must call it. Ranks may hold different keys (a
        rank that never decoded has no decode rows), so counts travel as objects keyed like here."""
        distributed = torch.distributed
        if not (distributed.is_available() and distributed.is_initialized()) or distributed.get_world_size() == 1:
            return self
        local = {
            "counts": {key: (int(self.kept[key]), int(self.counted[key]), self.forwards[key]) for key in self.kept},
            "experts": {key: (self.expert_kept[key].tolist(), self.expert_counted[key].tolist(),
                              self.expert_routed[key].tolist()) for key in self.expert_kept},
        }
        parts: list = [None] * distributed.get_world_size()
        distributed.all_gather_object(parts, local)
        total = SparsityRecorder()
        for part in parts:
            for key, (kept, counted, forwards) in part["counts"].items():
                total.kept[key] = total.kept.get(key, 0) + kept
                total.counted[key] = total.counted.get(key, 0) + counted
                total.forwards[key] = total.forwards.get(key, 0) + forwards
            for key, vectors in part["experts"].items():
                kept, counted, routed = (torch.tensor(v, dtype=torch.long) for v in vectors)
                if key in total.expert_kept:
                    kept, counted, routed = (kept + total.expert_kept[key], counted + total.expert_counted[key],
                                             routed + total.expert_routed[key])
                total.expert_kept[key], total.expert_counted[key], total.expert_routed[key] = kept, counted, routed
        return total

    def rows(self) -> list[dict]:
        """One dict per key: layer, site, context fields, kept, counted, sparsity, forwards."""
        out = []
        for key in sorted(self.kept, key=lambda k: (k[0], k[1], str(k[2]))):
            layer, site, context = key
            kept, counted = int(self.kept[key]), int(self.counted[key])
            out.append({
                "layer": layer, "site": site, **dict(context), "kept": kept, "counted": counted,
                "sparsity": (1.0 - kept / counted) if counted else None, "forwards": self.forwards[key],
            })
        return out
