"""Calibrated keep rules that reach a target sparsity: per-layer magnitude thresholds (TEAL style)
and the single top-p value of the study's rule.

A per-token top-p costs a selection per token; a fixed threshold per layer costs a comparison.
``calibrate_thresholds`` sets each layer's threshold to the ``target``-quantile of ``|x|`` over
the calibration tokens, so that layer drops about that fraction of its entries on similar text:
the TEAL criterion's calibration (``common.core.calibration``, which the sweeps' criteria share).
``calibrate_topp_value`` finds the top-p value whose pooled sparsity over the calibration tokens
is the target (bisection on p; sparsity decreases as p grows).

Calibration batches are ``input_ids`` tensors [B, T] without padding (one document per tensor is
simplest); the activations are captured densely, at the FFN sites with
``common.core.hooks.ActivationCapture`` and at the inputs of the attention's linear layers
(``attention``: q/k/v, ``attention_output``: o; ``all_linear`` names every group, see
``common.execution.groups``) with ``LinearInputCapture``. Token rows holding a NaN or an infinity
are left out of the quantiles (sparse execution passes such rows through densely).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn

from common.core.calibration import calibrate, score_quantile
from common.core.criteria import Criterion
from common.core.hooks import ActivationCapture, ModelHooks
from common.core.rules import keep_mask
from common.core.sites import linear_module_names
from common.execution.groups import ALL_LINEAR, ATTENTION_GROUPS, expand_groups


def magnitude_mask(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep-mask of a fixed threshold: ``|x| >= threshold`` (threshold 0 keeps everything), and
    every NaN: a comparison with NaN is false, so ``|x| >= t`` would silently drop it (rows that
    hold one are passed through densely by the sparse products anyway)."""
    return ~(x.abs() < threshold)


@dataclass
class LayerThresholds:
    """One threshold on ``|x|`` per (site, layer), calibrated for ``target_sparsity``."""

    target_sparsity: float
    values: dict[str, dict[int, float]] = field(default_factory=dict)

    def check_covers(self, sites, layers) -> None:
        missing = [f"{site}/{layer}" for site in sites for layer in layers if layer not in self.values.get(site, {})]
        if missing:
            raise ValueError(f"no calibrated threshold for (site/layer) {', '.join(missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''}; calibrate these sites and layers first")

    def as_dict(self) -> dict:
        return {"target_sparsity": self.target_sparsity,
                "values": {site: {str(layer): t for layer, t in per_layer.items()}
                           for site, per_layer in self.values.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "LayerThresholds":
        return cls(float(data["target_sparsity"]),
                   {site: {int(layer): float(t) for layer, t in per_layer.items()}
                    for site, per_layer in data["values"].items()})


def _check_target(target_sparsity: float) -> None:
    if not isinstance(target_sparsity, (int, float)) or not 0.0 <= float(target_sparsity) < 1.0:
        raise ValueError(f"target sparsity {target_sparsity!r} is outside [0, 1); give the fraction of entries to drop")


class LinearInputCapture(ModelHooks):
    """Observe the input [tokens, D] of each (layer, linear group) densely: a forward pre-hook on
    the group's first linear layer keeps the real-token rows (padding left out as the recorder
    knows it), per (layer, group) in ``activations``."""

    sparsifies = False

    def __init__(self, model: nn.Module, groups, layers=None):
        super().__init__(model)
        self.names = {group: linear_module_names(model, group, layers) for group in expand_groups(groups)}
        self.activations: dict[tuple[int, str], list[torch.Tensor]] = {}

    def _keep(self, key: tuple[int, str], module, args) -> None:
        x = args[0].detach()
        rows = x.reshape(-1, x.shape[-1])
        valid = self.recorder.valid_for(x)
        if valid is not None:
            rows = rows[valid.reshape(-1)]
        self.activations.setdefault(key, []).append(rows)

    def install(self) -> None:
        for group, per_layer in self.names.items():
            for layer, names in per_layer.items():
                module = self.model.get_submodule(names[0])
                self.add(module.register_forward_pre_hook(partial(self._keep, (layer, group))))


def _split_names(sites) -> tuple[list[str], list[str]]:
    """(FFN sites for ActivationCapture, attention groups for LinearInputCapture) of the names;
    the FFN groups ``input`` / ``intermediate`` are the FFN sites of the same name."""
    names = [sites] if isinstance(sites, str) else list(sites)
    ffn, attention = [], []
    for name in names:
        if name == ALL_LINEAR or name in ATTENTION_GROUPS:
            for group in expand_groups(name):
                (attention if group in ATTENTION_GROUPS else ffn).append(group)
        else:
            ffn.append(name)
    return list(dict.fromkeys(ffn)), list(dict.fromkeys(attention))


@torch.no_grad()
def capture_activations(model: nn.Module, batches, sites, layers=None) -> dict[tuple[int, str], torch.Tensor]:
    """Dense activations [tokens, D] per (layer, site) over the calibration ``batches``; ``sites``
    may name FFN sites and linear input groups (``attention``, ``attention_output``, ``all_linear``)."""
    batches = list(batches)
    if not batches:
        raise ValueError("calibration needs at least one batch of input_ids")
    ffn, attention = _split_names(sites)
    with ExitStack() as stack:
        captures = []
        if ffn:
            captures.append(stack.enter_context(ActivationCapture(model, ffn, layers, keep=True)))
        if attention:
            captures.append(stack.enter_context(LinearInputCapture(model, attention, layers)))
        for input_ids in batches:
            model(input_ids=input_ids)
    return {key: torch.cat(rows) for capture in captures for key, rows in capture.activations.items()}


def magnitude_quantile(values: torch.Tensor, fraction: float) -> float:
    """The smallest threshold ``t`` with about ``fraction`` of ``|values|`` below it: the
    (k+1)-th smallest magnitude for k = round(fraction * n); 0 for fraction 0
    (``common.core.calibration.score_quantile`` of the magnitudes)."""
    return score_quantile(values.detach().abs(), fraction)


def thresholds_from_activations(activations: dict[tuple[int, str], torch.Tensor],
                                target_sparsity: float) -> LayerThresholds:
    """Per (site, layer): the ``target_sparsity`` quantile of ``|x|`` over captured activations
    (their finite token rows): the calibration step of the TEAL criterion
    (``common.core.calibration.calibrate`` with the magnitude score and a calibrated threshold)."""
    _check_target(target_sparsity)
    [calibration] = calibrate(Criterion("magnitude", "threshold"), activations, [float(target_sparsity)])
    values: dict[str, dict[int, float]] = {}
    for (layer, site), threshold in sorted(calibration.thresholds.items()):
        values.setdefault(site, {})[layer] = threshold
    return LayerThresholds(float(target_sparsity), values)


def calibrate_thresholds(model: nn.Module, batches, sites, target_sparsity: float, layers=None) -> LayerThresholds:
    """Per (site, layer): the ``target_sparsity`` quantile of ``|x|`` on the calibration batches.
    ``sites``: FFN sites and/or linear input groups (``"all_linear"`` for the TEAL mode)."""
    _check_target(target_sparsity)
    return thresholds_from_activations(capture_activations(model, batches, sites, layers), target_sparsity)


def pooled_topp_sparsity(activations: list[torch.Tensor], value: float, power: float = 1.0) -> float:
    """Fraction of entries the top-p rule drops, pooled over the given [tokens, D] tensors."""
    dropped = sum(int((~keep_mask(rows, "topp", value, power)).sum()) for rows in activations)
    return dropped / sum(rows.numel() for rows in activations)


def topp_value_from_activations(activations: list[torch.Tensor], target_sparsity: float, power: float = 1.0,
                                tolerance: float = 0.002, max_steps: int = 20) -> float:
    """The top-p value whose pooled sparsity over ``activations`` is within ``tolerance`` of
    ``target_sparsity`` (bisection on p; the closest value seen if none is)."""
    _check_target(target_sparsity)
    low, high = 0.0, 1.0  # sparsity(low) >= target >= sparsity(high)
    best_value, best_error = 1.0, abs(pooled_topp_sparsity(activations, 1.0, power) - target_sparsity)
    for _ in range(max_steps):
        if best_error <= tolerance:
            break
        middle = 0.5 * (low + high)
        sparsity = pooled_topp_sparsity(activations, middle, power)
        if abs(sparsity - target_sparsity) < best_error:
            best_value, best_error = middle, abs(sparsity - target_sparsity)
        if sparsity > target_sparsity:
            low = middle
        else:
            high = middle
    return best_value


def calibrate_topp_value(model: nn.Module, batches, site: str, target_sparsity: float, layers=None,
                         power: float = 1.0, tolerance: float = 0.002) -> float:
    """The top-p value whose pooled sparsity at ``site`` on the calibration batches is the target."""
    _check_target(target_sparsity)
    activations = list(capture_activations(model, batches, site, layers).values())
    return topp_value_from_activations(activations, target_sparsity, power, tolerance)
