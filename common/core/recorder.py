"""Per-key counts of kept and counted entries, real tokens only, plus pluggable observers.

A key is (layer, site, context), where the context is whatever the caller set with
``recorder.context(...)``: a diffusion step, an expert id, the generation phase. Counts stay
on the model's device as tensors and are read (one sync) only when a summary is asked for.

Padding is removed here, once: the valid-token mask comes from the model call's 2D
``attention_mask`` (picked up by the hooks' root pre-hook) or from ``valid_tokens(...)`` /
``valid_tokens_from_lengths(...)`` set explicitly by the caller, which wins.

Tokens whose activations hold a NaN or an infinity (kept count ``NONFINITE``: the rules pass
them through unsparsified) are left out of the kept and counted entries and counted apart, per
key, as ``nonfinite_rows``; reading the rows warns once per key that has any.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator, Protocol

import torch

from common.core.rules import kept_counts


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


def count_entries(kept: torch.Tensor, width: int, valid: torch.Tensor | None = None):
    """(kept entries, counted entries, non-finite rows) of per-token kept counts ``kept`` [...] over
    the real tokens (``valid`` [...], None: all): tokens counted ``NONFINITE`` (< 0) add to the last
    only. Device tensors, no synchronization."""
    finite = kept >= 0
    if valid is None:
        finite_tokens = finite.sum()
        return kept.clamp_min(0).sum(), finite_tokens * width, kept.numel() - finite_tokens
    valid = valid.bool()
    real_finite = valid & finite
    return (kept.clamp_min(0) * real_finite).sum(), real_finite.sum() * width, (valid & ~finite).sum()


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
        self.nonfinite: dict[tuple, torch.Tensor] = {}  # token rows passed through for a NaN or an infinity
        self.forwards: dict[tuple, int] = {}
        # MoE: per (layer, site, context) vectors over experts, [E] device tensors.
        self.expert_kept: dict[tuple, torch.Tensor] = {}
        self.expert_counted: dict[tuple, torch.Tensor] = {}
        self.expert_routed: dict[tuple, torch.Tensor] = {}
        self.expert_nonfinite: dict[tuple, torch.Tensor] = {}
        self._warned: set = set()
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

    def _count_tables(self) -> tuple[dict, ...]:
        return (self.kept, self.counted, self.nonfinite, self.forwards, self.expert_kept, self.expert_counted,
                self.expert_routed, self.expert_nonfinite)

    def snapshot(self) -> tuple[dict, ...]:
        """The counts so far, for ``restore``. Cheap: counts are replaced, never updated in place."""
        return tuple(dict(counts) for counts in self._count_tables())

    def restore(self, snapshot: tuple[dict, ...]) -> None:
        """Forget what was counted since ``snapshot`` (a pass that failed midway and runs again).
        Observers are not rewound."""
        (self.kept, self.counted, self.nonfinite, self.forwards, self.expert_kept, self.expert_counted,
         self.expert_routed, self.expert_nonfinite) = (dict(counts) for counts in snapshot)

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
        while it zeroes; ``NONFINITE`` marks tokens passed through for a NaN or an infinity);
        otherwise it is counted from ``mask`` [..., D] (True = kept, None in capture mode), with
        the tokens whose ``tensor`` is not finite marked. Counting per token and then over the real
        tokens reads the mask once.
        """
        if not self.enabled:
            return
        if valid is None:
            valid = self.valid_for(tensor)
        context = {**self._context, **extra} if extra else self._context
        if kept is None and mask is not None:
            kept = kept_counts(mask, tensor)
        if kept is not None:
            self.add_counts(layer, site, *count_entries(kept, tensor.shape[-1], valid), context=context)
        for observer in self.observers:
            if getattr(observer, "counts_only", False):
                observer.observe_counts(layer, site, dict(context), kept, tensor.shape[-1], valid)
            else:
                observer.observe(layer, site, dict(context), tensor, mask, valid)

    @property
    def needs_masks(self) -> bool:
        """Whether an observer needs the boolean keep-mask (not only the kept counts)."""
        return self.enabled and any(not getattr(observer, "counts_only", False) for observer in self.observers)

    def add_counts(self, layer: int, site: str, kept, counted, nonfinite=0, context: dict | None = None) -> None:
        """Add kept / counted entries and non-finite token rows to a key (counts may be device
        tensors: no sync here)."""
        key = (layer, site, tuple(sorted((self._context if context is None else context).items())))
        if key in self.kept:
            self.kept[key] = self.kept[key] + kept
            self.counted[key] = self.counted[key] + counted
            self.nonfinite[key] = self.nonfinite[key] + nonfinite
            self.forwards[key] += 1
        else:
            self.kept[key], self.counted[key], self.nonfinite[key], self.forwards[key] = kept, counted, nonfinite, 1

    def add_expert_counts(self, layer: int, site: str, kept: torch.Tensor, counted: torch.Tensor,
                          routed: torch.Tensor, nonfinite: torch.Tensor | None = None,
                          context: dict | None = None) -> None:
        """Add per-expert vectors [E]: kept entries, counted entries, routed real tokens, and the
        routed rows passed through for a NaN or an infinity (left out of kept and counted)."""
        if not self.enabled:
            return
        if nonfinite is None:
            nonfinite = torch.zeros_like(routed)
        key = (layer, site, tuple(sorted((self._context if context is None else context).items())))
        if key in self.expert_kept:
            self.expert_kept[key] = self.expert_kept[key] + kept
            self.expert_counted[key] = self.expert_counted[key] + counted
            self.expert_routed[key] = self.expert_routed[key] + routed
            self.expert_nonfinite[key] = self.expert_nonfinite[key] + nonfinite
        else:
            self.expert_kept[key], self.expert_counted[key] = kept, counted
            self.expert_routed[key], self.expert_nonfinite[key] = routed, nonfinite

    def _warn_nonfinite(self, key: tuple, rows: int) -> None:
        """Say once per key that token rows were passed through unsparsified for non-finite values."""
        if rows and key not in self._warned:
            self._warned.add(key)
            layer, site, context = key
            where = f"layer {layer}, site {site}" + "".join(f", {k} {v}" for k, v in context)
            warnings.warn(f"{rows} token row(s) at {where} hold a NaN or an infinity: passed through unsparsified "
                          "(the dense model's values) and left out of the sparsity, counted as nonfinite_rows",
                          RuntimeWarning, stacklevel=3)

    def expert_rows(self) -> list[dict]:
        """One dict per (layer, site, context, expert); sparsity is None for experts no token reached."""
        out = []
        for key in sorted(self.expert_kept, key=lambda k: (k[0], k[1], str(k[2]))):
            layer, site, context = key
            kept = self.expert_kept[key].tolist()
            counted = self.expert_counted[key].tolist()
            routed = self.expert_routed[key].tolist()
            nonfinite = self.expert_nonfinite[key].tolist()
            self._warn_nonfinite(key, int(sum(nonfinite)))
            for expert, (k, c, r, n) in enumerate(zip(kept, counted, routed, nonfinite)):
                out.append({"layer": layer, "site": site, **dict(context), "expert": expert, "kept": int(k),
                            "counted": int(c), "routed_tokens": int(r), "nonfinite_rows": int(n),
                            "sparsity": (1.0 - k / c) if c else None})
        return out

    def reset(self) -> None:
        for counts in self._count_tables():
            counts.clear()

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
            "counts": {key: (int(self.kept[key]), int(self.counted[key]), int(self.nonfinite[key]), self.forwards[key])
                       for key in self.kept},
            "experts": {key: (self.expert_kept[key].tolist(), self.expert_counted[key].tolist(),
                              self.expert_routed[key].tolist(), self.expert_nonfinite[key].tolist())
                        for key in self.expert_kept},
        }
        parts: list = [None] * distributed.get_world_size()
        distributed.all_gather_object(parts, local)
        total = SparsityRecorder()
        for part in parts:
            for key, counts in part["counts"].items():
                for table, count in zip((total.kept, total.counted, total.nonfinite, total.forwards), counts):
                    table[key] = table.get(key, 0) + count
            for key, vectors in part["experts"].items():
                tables = (total.expert_kept, total.expert_counted, total.expert_routed, total.expert_nonfinite)
                for table, vector in zip(tables, vectors):
                    vector = torch.tensor(vector, dtype=torch.long)
                    table[key] = table[key] + vector if key in table else vector
        return total

    def rows(self) -> list[dict]:
        """One dict per key: layer, site, context fields, kept, counted, sparsity, forwards."""
        out = []
        for key in sorted(self.kept, key=lambda k: (k[0], k[1], str(k[2]))):
            layer, site, context = key
            kept, counted, nonfinite = int(self.kept[key]), int(self.counted[key]), int(self.nonfinite[key])
            self._warn_nonfinite(key, nonfinite)
            out.append({
                "layer": layer, "site": site, **dict(context), "kept": kept, "counted": counted,
                "nonfinite_rows": nonfinite, "sparsity": (1.0 - kept / counted) if counted else None,
                "forwards": self.forwards[key],
            })
        return out
