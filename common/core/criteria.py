"""Sparsification criteria: what a hook keeps of a site tensor, as a score per entry and a selection.

A criterion is two independent choices, each a row of a table here:

* a **score** (``SCORES``) ranks the entries of each token:

  - ``magnitude``: |x|^q, the paper's rules (``common.core.rules``);
  - ``weighted``: |x_i| * ||W[:, i]||_2 over the matrices that read the site (WINA): at ``input``
    gate and up stacked, at ``intermediate`` down (``common.core.sites.linear_module_names``);
  - ``centred``: |x_i - m|, m the layer's mode on calibration text (SCAP: one mode per layer, the
    peak of a kernel density estimate over every entry); a dropped entry becomes m instead of 0,
    which is SCAP's bias W m added back;
  - ``rotated``: |(x Q)_i|, Q the layer's orthogonal PCA basis of calibration activations
    (LaRoSA); the kept coordinates are rotated back, x~ = (mask * x Q) Q^T, which the consumer W
    reads as W Q applied to the sparse coordinates;
  - ``gate``: |act(gate)_i| for the intermediate entry i (CATS), read from the same layer's gate
    in the same forward; at the gate site itself it is the magnitude.

  Each row says where the score is defined and which per-layer quantities calibration must give.
* a **selection** (``SELECTIONS``) turns the scores into a keep-mask: per token with the rules of
  ``common.core.rules`` applied to the scores (top-p, top-k, max-p; the value is the rule's p), or
  per layer, keeping the scores at or above a threshold calibrated to a target sparsity (the value).

``NAMED`` spells the published criteria as (score, selection) pairs. At sparsity 0 every score
gives the tensor back: the centred fill and the rotation back only touch dropped coordinates.
Rows holding a NaN or an infinity (in the tensor or its scores) keep the rules' contract: passed
through unchanged, kept count ``NONFINITE``.

Adding a score is adding a ``Score`` row (its ranking function, where it is defined, what it
needs); adding a selection is adding a ``Selection`` row and its threshold in ``selection_threshold``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from common.core.rules import NONFINITE, magnitudes, nonfinite_rows, rule_threshold, validate_rule, zero_below
from common.core.sites import BASE_SITES, expand_sites

LINEAR_SITES = ("input", "intermediate")  # the FFN sites read by linear layers (gate and up; down)


@dataclass
class LayerState:
    """What a score reads at one (layer, site) besides the tensor: calibrated quantities (in the
    tensor's device and dtype, the rotation in float32 or wider) and, for the gate score at the
    intermediate site, the layer's act(gate) of this forward."""

    threshold: float | None = None
    column_norms: torch.Tensor | None = None
    mode: float | None = None
    rotation: torch.Tensor | None = None
    gate: torch.Tensor | None = None


def _magnitude(z: torch.Tensor, state: LayerState, power: float) -> torch.Tensor:
    return magnitudes(z, power)


def _weighted(z: torch.Tensor, state: LayerState, power: float) -> torch.Tensor:
    return z.abs().mul_(state.column_norms)


def _centred(z: torch.Tensor, state: LayerState, power: float) -> torch.Tensor:
    return (z - state.mode).abs_()


def _gate(z: torch.Tensor, state: LayerState, power: float) -> torch.Tensor:
    return (z if state.gate is None else state.gate.reshape(z.shape)).abs()


@dataclass(frozen=True)
class Score:
    """One row of the score table."""

    name: str
    sites: tuple[str, ...]  # base sites where it is defined
    needs: tuple[str, ...]  # LayerState fields calibration must fill: column_norms, mode, rotation
    rank: Callable[[torch.Tensor, LayerState, float], torch.Tensor]  # entries z [N, D] -> scores [N, D]
    source: str
    fills_mode: bool = False  # a dropped entry becomes the layer's mode instead of 0
    rotates: bool = False  # selected among the coordinates z = x Q, rotated back after
    reads_gate: bool = False  # at the intermediate site, ranks by the layer's act(gate)


SCORES: dict[str, Score] = {row.name: row for row in (
    Score("magnitude", BASE_SITES, (), _magnitude, "the paper's rules: |x|^q"),
    Score("weighted", LINEAR_SITES, ("column_norms",), _weighted,
          "WINA: |x_i| * ||W[:, i]||_2 of the matrices that read the site"),
    Score("centred", LINEAR_SITES, ("mode",), _centred,
          "SCAP: |x_i - m|, m the layer's mode on calibration text; dropped entries set to m", fills_mode=True),
    Score("rotated", LINEAR_SITES, ("rotation",), _magnitude,
          "LaRoSA: |(x Q)_i|, Q the layer's PCA basis; kept coordinates rotated back", rotates=True),
    Score("gate", ("gate", "intermediate"), (), _gate, "CATS: |act(gate)_i| of the same layer", reads_gate=True),
)}

# Quantities computed from calibration text (column norms come from the weights alone).
TEXT_QUANTITIES = ("mode", "rotation")


@dataclass(frozen=True)
class Selection:
    """One row of the selection table."""

    name: str
    per_token: bool
    value: str  # what the value means
    denser: str  # "higher" or "lower": which values keep more entries


SELECTIONS: dict[str, Selection] = {row.name: row for row in (
    Selection("topp", True, "p: each token keeps its largest scores up to a share p of their sum", "higher"),
    Selection("topk", True, "p: each token keeps its int(D p) largest scores", "higher"),
    Selection("maxp", True, "p: each token keeps the scores of at least p times its largest", "lower"),
    Selection("threshold", False, "target sparsity: each layer keeps the scores at or above a threshold "
                                  "calibrated to drop this share of them on calibration text", "lower"),
)}

# The published criteria as (score, selection).
NAMED: dict[str, tuple[str, str]] = {
    "teal": ("magnitude", "threshold"),
    "cats": ("gate", "threshold"),
    "scap": ("centred", "threshold"),
    "wina": ("weighted", "topk"),
    "larosa": ("rotated", "topk"),
}


@dataclass(frozen=True)
class Criterion:
    """A score and a selection; ``magnitude`` with a per-token rule is the paper's criterion."""

    score: str = "magnitude"
    selection: str = "topp"

    def __post_init__(self):
        if self.score not in SCORES:
            raise ValueError(f"unknown score {self.score!r}; choose one of {', '.join(SCORES)}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown selection {self.selection!r}; choose one of {', '.join(SELECTIONS)}")

    @property
    def name(self) -> str:
        """The published name where there is one (teal, cats, ...), else ``score-selection``."""
        for name, pair in NAMED.items():
            if pair == (self.score, self.selection):
                return name
        return f"{self.score}-{self.selection}"

    @property
    def is_rule(self) -> bool:
        """The magnitude score with a per-token rule: the paper's criterion, through ``common.core.rules``."""
        return self.score == "magnitude" and SELECTIONS[self.selection].per_token

    @property
    def calibrated(self) -> bool:
        """Whether the selection needs a threshold per layer."""
        return not SELECTIONS[self.selection].per_token

    @property
    def reads_text(self) -> bool:
        """Whether calibration text is needed (a calibrated threshold, a mode or a rotation)."""
        return self.calibrated or any(q in TEXT_QUANTITIES for q in SCORES[self.score].needs)

    @property
    def needs(self) -> tuple[str, ...]:
        """The LayerState fields calibration must fill, per (layer, site)."""
        return SCORES[self.score].needs + (("threshold",) if self.calibrated else ())

    def check_sites(self, sites) -> tuple[str, ...]:
        """The base sites of ``sites``; a one-line error where the score is not defined."""
        base = expand_sites(sites)
        score = SCORES[self.score]
        outside = [site for site in base if site not in score.sites]
        if outside:
            named = f" ({sites})" if isinstance(sites, str) and sites not in base else ""
            raise ValueError(f"criterion {self.name} does not apply at {', '.join(outside)}{named}: the {self.score} "
                             f"score is defined at {', '.join(score.sites)} only; choose another site or criterion")
        return base

    def check_value(self, value, power: float = 1.0) -> None:
        """A one-line error for a value (or power) this criterion cannot take."""
        if self.score != "magnitude" and float(power) != 1.0:
            raise ValueError(f"power q={power:g} applies to the magnitude score only, not to criterion {self.name}")
        if SELECTIONS[self.selection].per_token:
            validate_rule(self.selection, value, power)
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
            raise ValueError(f"criterion {self.name}: the value is a target sparsity in [0, 1), got {value!r}")
        if float(power) != 1.0:
            raise ValueError(f"power q={power:g} applies to per-token rules only, not to criterion {self.name}")


def parse_criterion(text: str, rule: str = "topp") -> Criterion:
    """A criterion from its name: a published one (``NAMED``), a score (with the selection ``rule``)
    or ``score-selection``; one line listing the choices otherwise."""
    if text in NAMED:
        return Criterion(*NAMED[text])
    if text in SCORES:
        return Criterion(text, rule)
    score, _, selection = str(text).partition("-")
    if score in SCORES and selection in SELECTIONS:
        return Criterion(score, selection)
    raise ValueError(f"unknown criterion {text!r}; give one of {', '.join(NAMED)}, a score ({', '.join(SCORES)}) "
                     f"or score-selection (selections: {', '.join(SELECTIONS)}), e.g. weighted-threshold")


def selection_threshold(scores: torch.Tensor, criterion: Criterion, value: float, state: LayerState) -> torch.Tensor:
    """The threshold on ``scores`` [N, D]: per row [N, 1] for a per-token rule, the layer's
    calibrated one [1, 1] (rounded to the scores' dtype as torch rounds a compared scalar)."""
    if SELECTIONS[criterion.selection].per_token:
        return rule_threshold(scores, criterion.selection, float(value))
    threshold = torch.tensor(float(state.threshold), dtype=torch.float32, device=scores.device)
    return threshold.to(scores.dtype).reshape(1, 1)


def _check_tensor(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"a criterion applies to a floating tensor [..., D] with D > 0, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")


def rotation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Rotations run in float32 (or the tensor's wider dtype): in bfloat16, x Q Q^T would round
    away the identity at sparsity 0."""
    return torch.promote_types(dtype, torch.float32)


def scores_of(x: torch.Tensor, criterion: Criterion, state: LayerState, power: float = 1.0):
    """(entries z [N, D] the selection keeps or drops, their scores [N, D]) of ``x`` [..., D]: z is
    x's rows, or x Q for a rotated score."""
    score = SCORES[criterion.score]
    rows = x.reshape(-1, x.shape[-1])
    z = rows.to(rotation_dtype(rows.dtype)) @ state.rotation if score.rotates else rows
    return z, score.rank(z, state, float(power))


def apply_criterion(x: torch.Tensor, criterion: Criterion, value: float, state: LayerState, power: float = 1.0,
                    want_mask: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(``x`` [..., D] sparsified by the criterion, the kept count per token [...] (int32,
    ``NONFINITE`` for rows passed through), the keep-mask [..., D] when ``want_mask``, in the
    coordinates the selection ranks: x's, or x Q's for a rotated score).

    The magnitude and weighted scores zero through ``common.core.rules.zero_below`` (their scores
    are finite exactly where x is); the others build the mask, fill the dropped coordinates (0 or
    the mode) and rotate back where they rotated.
    """
    _check_tensor(x)
    score = SCORES[criterion.score]
    rows = x.reshape(-1, x.shape[-1])
    z, a = scores_of(x, criterion, state, power)
    threshold = selection_threshold(a, criterion, value, state)
    if criterion.score in ("magnitude", "weighted"):
        sparse, kept = zero_below(rows, a, threshold)
        mask = None
        if want_mask:
            mask = ((a >= threshold) | (kept.reshape(-1, 1) == NONFINITE)).reshape(x.shape)
        return sparse.reshape(x.shape), kept.reshape(x.shape[:-1]), mask
    bad = nonfinite_rows(a) | nonfinite_rows(rows)
    keep = (a >= threshold) | bad.unsqueeze(-1)
    if score.fills_mode:
        kept_z = torch.where(keep, z, torch.tensor(state.mode, dtype=z.dtype, device=z.device))
    else:
        kept_z = z.masked_fill(~keep, 0)
    out = (kept_z @ state.rotation.transpose(0, 1)).to(x.dtype) if score.rotates else kept_z
    if score.rotates and bool(bad.any()):  # a non-finite row, rotated, would spread over every entry
        out[bad] = rows[bad]
    kept = keep.sum(dim=-1, dtype=torch.int32).masked_fill_(bad, NONFINITE)
    return out.reshape(x.shape), kept.reshape(x.shape[:-1]), keep.reshape(x.shape) if want_mask else None


def check_state(criterion: Criterion, state: LayerState, where: str) -> None:
    """A one-line error when a (layer, site) state lacks what the criterion needs."""
    missing = [name for name in criterion.needs if getattr(state, name) is None]
    if missing:
        raise ValueError(f"criterion {criterion.name} needs {', '.join(missing)} at {where}: calibrate it first "
                         "(common.core.calibration, or the calibration step of common.evaluation)")
    if state.threshold is not None and (math.isnan(state.threshold) or state.threshold < 0):
        raise ValueError(f"criterion {criterion.name}: threshold {state.threshold!r} at {where} must be a number >= 0")


__all__ = ["Criterion", "LINEAR_SITES", "LayerState", "NAMED", "SCORES", "SELECTIONS", "Score", "Selection",
           "apply_criterion", "check_state", "parse_criterion", "rotation_dtype", "scores_of", "selection_threshold"]
