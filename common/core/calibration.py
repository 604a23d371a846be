"""What a criterion needs per (layer, site), computed from captured activations and the weights.

The math of the calibration step (``common.evaluation.calibration`` supplies the text, the capture,
the cache and the provenance; ``common.execution.thresholds`` calibrates TEAL thresholds with it):

* ``score_quantile``: the threshold below which a share of the scores lies (a calibrated
  selection keeps the scores at or above it, dropping about that share on similar text);
* ``column_norms``: ||W[:, i]||_2 over the matrices that read a site, stacked (WINA);
* ``layer_mode``: the peak of a Gaussian kernel density estimate over every entry of a layer's
  activations, at half Scott's bandwidth as SCAP's seaborn call (SCAP: one mode per layer);
* ``pca_rotation``: the eigenvectors of the damped second moment sum(x^T x) + 0.01 mean(diag) I
  (LaRoSA's rotation, uncentred, as its release computes it).

``calibrate`` computes every quantity a criterion needs, then its thresholds at each target from
the same scores the hooks rank by (``common.core.criteria.scores_of``). Token rows holding a NaN or
an infinity are left out (the hooks pass such rows through).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from common.core.criteria import Criterion, LayerState, SCORES, rotation_dtype, scores_of
from common.core.sites import linear_module_names

MODE_SAMPLES = 1 << 18  # entries drawn (seeded) for the kernel density estimate of a layer's mode
MODE_BINS = 1 << 14  # bins of the binned estimate between the smallest and the largest entry
PCA_DAMPING = 0.01  # times the mean diagonal of the second moment, as LaRoSA's release


def finite_rows(rows: torch.Tensor) -> torch.Tensor:
    """The token rows [N, D] of ``rows`` that hold no NaN and no infinity."""
    rows = rows.reshape(-1, rows.shape[-1])
    return rows[torch.isfinite(rows).all(dim=-1)]


def score_quantile(scores: torch.Tensor, fraction: float) -> float:
    """The smallest threshold ``t`` with about ``fraction`` of ``scores`` below it: the (k+1)-th
    smallest score for k = round(fraction * n); 0 for fraction 0, infinity when every score goes."""
    values = scores.detach().reshape(-1).float()
    k = int(round(float(fraction) * values.numel()))
    if k == 0:
        return 0.0
    if k >= values.numel():
        return float("inf")
    return float(torch.kthvalue(values, k + 1).values)


def column_norms(weights) -> torch.Tensor:
    """||W[:, i]||_2 [D] (float32) over the matrices [out, D] that read one input, stacked."""
    squares = sum(w.detach().double().pow(2).sum(dim=0) for w in weights)
    return squares.sqrt().float()


def consumer_weights(model: nn.Module, site: str, layers=None) -> dict[tuple[int, str], list[torch.Tensor]]:
    """(layer, site) -> the weights of the linear layers that read ``site`` (``input``: gate and
    up; ``intermediate``: down), from the site table's linear groups."""
    return {(layer, site): [model.get_submodule(name).weight for name in names]
            for layer, names in linear_module_names(model, site, layers).items()}


def layer_mode(rows: torch.Tensor, samples: int = MODE_SAMPLES, bins: int = MODE_BINS) -> float:
    """The peak of a Gaussian kernel density estimate over the entries of ``rows`` [N, D] (finite
    rows; at most ``samples`` entries, drawn with a fixed seed), at half Scott's bandwidth, on a
    binned grid from the smallest to the largest entry (convolved by FFT)."""
    values = finite_rows(rows).reshape(-1).double()
    if values.numel() == 0:
        raise ValueError("no finite activations to estimate a mode from")
    if values.numel() > samples:
        generator = torch.Generator().manual_seed(0)
        values = values[torch.randint(values.numel(), (samples,), generator=generator).to(values.device)]
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return low
    width = (high - low) / bins
    density = torch.histc(values, bins, low, high).cpu()
    bandwidth = 0.5 * float(values.std()) * values.numel() ** -0.2
    if bandwidth > 0.5 * width:
        reach = min(bins, int(4 * bandwidth / width) + 1)
        offsets = torch.arange(-reach, reach + 1, dtype=torch.float64) * width
        kernel = torch.exp(-0.5 * (offsets / bandwidth) ** 2)
        size = bins + kernel.numel() - 1
        spectrum = torch.fft.rfft(density, size) * torch.fft.rfft(kernel, size)
        density = torch.fft.irfft(spectrum, size)[reach:reach + bins]
    return low + (int(density.argmax()) + 0.5) * width


def pca_rotation(rows: torch.Tensor, damping: float = PCA_DAMPING) -> torch.Tensor:
    """An orthogonal [D, D] basis (float32, columns the eigenvectors) of the damped second moment
    of ``rows`` [N, D] (finite rows)."""
    rows = finite_rows(rows).double()
    moment = rows.transpose(0, 1) @ rows
    moment.diagonal().add_(damping * float(moment.diagonal().mean()))
    return torch.linalg.eigh(moment).eigenvectors.float()


@dataclass
class Calibration:
    """What a criterion needs per (layer, site), and the target its thresholds reach (None for
    per-token selections). Tensors are float32 on the device they were computed on."""

    criterion: Criterion
    target: float | None = None
    thresholds: dict[tuple[int, str], float] = field(default_factory=dict)
    column_norms: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    modes: dict[tuple[int, str], float] = field(default_factory=dict)
    rotations: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def state(self, layer: int, site: str) -> LayerState:
        key = (layer, site)
        return LayerState(threshold=self.thresholds.get(key), column_norms=self.column_norms.get(key),
                          mode=self.modes.get(key), rotation=self.rotations.get(key))

    def check_covers(self, keys) -> None:
        """A one-line error unless every (layer, site) of ``keys`` has what the criterion needs."""
        tables = {"threshold": self.thresholds, "column_norms": self.column_norms, "mode": self.modes,
                  "rotation": self.rotations}
        missing = sorted({f"{site}/{layer}" for layer, site in keys for need in self.criterion.needs
                          if (layer, site) not in tables[need]})
        if missing:
            raise ValueError(f"criterion {self.criterion.name}: no calibration for (site/layer) "
                             f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; calibrate these sites "
                             "and layers first")

    def summary(self) -> dict:
        """The small part, for records: the target, per-layer thresholds and modes."""
        def per_site(table):
            out: dict[str, dict[str, float]] = {}
            for (layer, site), value in sorted(table.items()):
                out.setdefault(site, {})[str(layer)] = value
            return out

        return {"criterion": self.criterion.name, "target": self.target, "thresholds": per_site(self.thresholds),
                "modes": per_site(self.modes)}


@torch.no_grad()
def calibrate(criterion: Criterion, activations: dict[tuple[int, str], torch.Tensor] | None, targets=(None,),
              weights: dict[tuple[int, str], list[torch.Tensor]] | None = None) -> list[Calibration]:
    """One ``Calibration`` per target (one, target None, for a per-token selection) from the
    activations [tokens, D] the score reads per (layer, site) (for the gate score at the
    intermediate site: the layer's act(gate)) and, for the weighted score, the weights that read
    each site. Modes, rotations and column norms are shared by the targets. A criterion that reads no
    text (the weighted or gate score with a per-token rule) needs no activations."""
    score = SCORES[criterion.score]
    targets = list(targets) if criterion.calibrated else [None]
    if criterion.calibrated and any(t is None or not 0.0 <= float(t) < 1.0 for t in targets):
        raise ValueError(f"criterion {criterion.name} needs target sparsities in [0, 1), got {targets}")
    out = [Calibration(criterion, None if t is None else float(t)) for t in targets]
    first = out[0]
    if not criterion.reads_text:  # the weights alone (or nothing, for the gate score)
        if "column_norms" in score.needs:
            for key, matrices in sorted((weights or {}).items()):
                first.column_norms[key] = column_norms(matrices).to(matrices[0].device)
        return out
    for key, rows in sorted((activations or {}).items()):
        rows = finite_rows(rows)
        if "column_norms" in score.needs:
            if weights is None or key not in weights:
                raise ValueError(f"the weighted score needs the weights that read {key[1]} in layer {key[0]}")
            first.column_norms[key] = column_norms(weights[key]).to(rows.device)
        if "mode" in score.needs:
            first.modes[key] = layer_mode(rows)
        if "rotation" in score.needs:
            first.rotations[key] = pca_rotation(rows).to(rows.device)
        if criterion.calibrated:
            state = first.state(*key)
            if state.column_norms is not None:
                state.column_norms = state.column_norms.to(rows.dtype)
            if state.rotation is not None:
                state.rotation = state.rotation.to(rotation_dtype(rows.dtype))
            _, scores = scores_of(rows, criterion, state)
            for calibration, target in zip(out, targets):
                calibration.thresholds[key] = score_quantile(scores, target)
            del scores
    for calibration in out[1:]:
        calibration.column_norms, calibration.modes, calibration.rotations = \
            first.column_norms, first.modes, first.rotations
    return out
