"""Hooks at FFN sites, as context managers addressed by module names (baukit style).

``ModelHooks`` is the lifecycle every hook set shares (the MoE package's expert sparsifier
included): a root pre-hook that hands each model call's attention mask and generation phase to
the recorder, hooks removed on exit, also when the body raises. ``SiteHooks`` adds one hook per
(layer, site) from the site table. ``Sparsifier`` zeroes the entries outside the
rule's keep-mask (or applies a criterion of ``common.core.criteria``) and records the counts;
``ActivationCapture`` leaves activations unchanged and only feeds observers (and, optionally,
keeps the real-token activations).
"""

from __future__ import annotations

import inspect
from functools import lru_cache, partial

import torch
import torch.nn as nn

from common.core.criteria import Criterion, LayerState, apply_criterion, check_state, rotation_dtype
from common.core.recorder import SparsityRecorder
from common.core.rules import NONFINITE, keep_threshold, sparsify_and_count, zero_below
from common.core.sites import site_module_names

CACHE_ARGUMENTS = ("cache", "past_key_values")  # transformers >= 5.24 spells it ``cache``


@lru_cache(maxsize=None)
def _positional_names(forward) -> tuple[str, ...]:
    """Names of a ``forward`` function's positional parameters after ``self``."""
    try:
        parameters = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return ()
    return tuple(p.name for p in parameters[1:] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def call_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The named arguments of a call to ``module`` (positional ones bound through its class's
    ``forward`` signature), so hooks read arguments by name whatever order or spelling
    transformers uses (the KV cache became ``cache`` instead of ``past_key_values`` in 5.24)."""
    if not args:
        return kwargs
    return {**dict(zip(_positional_names(type(module).forward), args)), **kwargs}


def call_phase(arguments: dict) -> str | None:
    """'prefill' / 'decode' when the call carries a KV cache (generation), else None."""
    cache = next((arguments[name] for name in CACHE_ARGUMENTS if arguments.get(name) is not None), None)
    if cache is None:
        return None
    try:
        return "decode" if cache.get_seq_length() > 0 else "prefill"
    except (AttributeError, TypeError):
        return "prefill"


def call_attention_mask(arguments: dict) -> torch.Tensor | None:
    mask = arguments.get("attention_mask")
    return mask if isinstance(mask, torch.Tensor) else None


class ModelHooks:
    """The lifecycle every hook set shares: a root pre-hook that hands each model call's attention
    mask and generation phase to the recorder, hooks added by ``install``, all removed on exit
    (also when the body raises).

    Re-entering one object, or entering a second sparsifying hook set on a model that already has
    one (masks would be applied twice), is refused with a clear error. Observing hook sets
    (``sparsifies = False``) may be entered inside a sparsifying one.
    """

    sparsifies = True

    def __init__(self, model: nn.Module, recorder: SparsityRecorder | None = None):
        self.model = model
        self.recorder = recorder if recorder is not None else SparsityRecorder()
        self._handles: list = []
        self._active = False

    def install(self) -> None:
        """Register this set's hooks with ``self.add(handle)``."""
        raise NotImplementedError

    def uninstall(self) -> None:
        """Undo anything ``install`` did besides registering hooks."""

    def add(self, handle) -> None:
        self._handles.append(handle)

    def _root_pre_hook(self, module, args, kwargs):
        arguments = call_arguments(module, args, kwargs)
        self.recorder.begin_call(call_attention_mask(arguments), call_phase(arguments))

    def __enter__(self):
        if self._active:
            raise RuntimeError(f"this {type(self).__name__} is already active; create a new one for a nested block")
        owner = getattr(self.model, "_activation_sparsity_owner", None)
        if self.sparsifies and owner is not None:
            raise RuntimeError(f"the model is already sparsified by an active {type(owner).__name__}; nesting "
                               "would apply two masks: leave the outer block first")
        try:
            self.add(self.model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True))
            self.install()
        except BaseException:
            self.remove()
            raise
        self._active = True
        if self.sparsifies:
            self.model._activation_sparsity_owner = self
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.uninstall()
        if getattr(self.model, "_activation_sparsity_owner", None) is self:
            del self.model._activation_sparsity_owner
        self._active = False

    def __exit__(self, exc_type, exc, tb) -> None:
        self.remove()


class SiteHooks(ModelHooks):
    """A hook at every chosen (layer, site) of the site table; subclasses set ``transform``."""

    def __init__(self, model: nn.Module, sites="intermediate", layers=None,
                 recorder: SparsityRecorder | None = None):
        super().__init__(model, recorder)
        self.locations = site_module_names(model, sites, layers)
        seen: dict[int, tuple[int, str]] = {}
        for key, (name, _) in self.locations.items():
            module_id = id(model.get_submodule(name))
            if module_id in seen and seen[module_id][1] == key[1]:
                raise ValueError(f"module {name} is shared between layers {seen[module_id][0]} and {key[0]}; "
                                 "per-layer hooks cannot tell them apart")
            seen[module_id] = key

    def transform(self, layer: int, site: str, tensor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _output_hook(self, layer, site, module, args, output):
        return self.transform(layer, site, output)

    def _input_hook(self, layer, site, module, args):
        return (self.transform(layer, site, args[0]),) + tuple(args[1:])

    def install(self) -> None:
        for (layer, site), (name, tensor) in self.locations.items():
            module = self.model.get_submodule(name)
            if tensor == "output":
                self.add(module.register_forward_hook(partial(self._output_hook, layer, site)))
            else:
                self.add(module.register_forward_pre_hook(partial(self._input_hook, layer, site)))


class Sparsifier(SiteHooks):
    """Sparsify FFN ``sites`` of ``layers`` per token with a rule, recording kept/real counts.

    >>> with Sparsifier(model, "intermediate", rule="topp", value=0.9) as sp:
    ...     model(input_ids, attention_mask=attention_mask)
    >>> sp.recorder.rows()

    ``criterion`` (``common.core.criteria.Criterion``) chooses another score and selection than
    the magnitude with ``rule``; a criterion that needs calibrated quantities (thresholds, column
    norms, modes, rotations) reads them from ``calibration`` (``common.core.calibration``). The
    gate score at the intermediate site reads the layer's act(gate) of the same forward, kept by
    a hook of this object on the gate's module.
    """

    def __init__(self, model: nn.Module, sites="intermediate", rule: str = "topp", value: float = 1.0,
                 power: float = 1.0, layers=None, recorder: SparsityRecorder | None = None,
                 criterion: Criterion | None = None, calibration=None):
        if criterion is None:
            criterion = Criterion("magnitude", rule)
        elif rule not in ("topp", criterion.selection):
            raise ValueError(f"rule {rule!r} and criterion {criterion.name} name two selections; give the criterion "
                             "alone")
        criterion.check_value(value, power)
        criterion.check_sites(sites)
        super().__init__(model, sites, layers, recorder)
        self.criterion, self.calibration = criterion, calibration
        self.rule, self.value, self.power = criterion.selection, float(value), float(power)
        if criterion.needs:
            if calibration is None:
                raise ValueError(f"criterion {criterion.name} needs {', '.join(criterion.needs)}: pass calibration= "
                                 "(common.core.calibration.calibrate, or the calibration step of common.evaluation)")
            calibration.check_covers(self.locations)
        self._states: dict[tuple[int, str], LayerState] = {}
        self._gates: dict[int, torch.Tensor] = {}

    def _keep_gate_output(self, layer: int, module, args, output) -> None:
        self._gates[layer] = output

    def _keep_gate_input(self, layer: int, module, args) -> None:
        self._gates[layer] = args[0]

    def install(self) -> None:
        layers = sorted({layer for layer, site in self.locations if site == "intermediate"})
        if self.criterion.score == "gate" and layers:  # before the site hooks: the gate site's dense tensor
            for (layer, _), (name, tensor) in site_module_names(self.model, "gate", layers).items():
                module = self.model.get_submodule(name)
                if tensor == "output":
                    self.add(module.register_forward_hook(partial(self._keep_gate_output, layer)))
                else:
                    self.add(module.register_forward_pre_hook(partial(self._keep_gate_input, layer)))
        super().install()

    def uninstall(self) -> None:
        self._gates.clear()

    def _state(self, layer: int, site: str, tensor: torch.Tensor) -> LayerState:
        """The calibrated quantities of (layer, site) in the tensor's device and dtype (made once)."""
        state = self._states.get((layer, site))
        if state is None or (state.column_norms is not None and state.column_norms.dtype != tensor.dtype):
            state = self.calibration.state(layer, site) if self.calibration is not None else LayerState()
            if state.column_norms is not None:
                state.column_norms = state.column_norms.to(tensor.device, tensor.dtype)
            if state.rotation is not None:
                state.rotation = state.rotation.to(tensor.device, rotation_dtype(tensor.dtype))
            check_state(self.criterion, state, f"layer {layer}, site {site}")
            self._states[(layer, site)] = state
        return state

    def transform(self, layer: int, site: str, tensor: torch.Tensor) -> torch.Tensor:
        mask = None
        if not self.criterion.is_rule:
            state = self._state(layer, site, tensor)
            state.gate = self._gates.pop(layer, None) if site == "intermediate" and self.criterion.score == "gate" \
                else None
            if self.criterion.score == "gate" and site == "intermediate" and state.gate is None:
                raise RuntimeError(f"the gate score at layer {layer} found no act(gate) of this forward: the gate "
                                   "module ran outside the MLP's call or not at all")
            sparse, kept, mask = apply_criterion(tensor, self.criterion, self.value, state, self.power,
                                                 want_mask=self.recorder.needs_masks)
            state.gate = None
        elif self.recorder.needs_masks:  # the boolean mask only for observers that read it
            a, threshold = keep_threshold(tensor, self.rule, self.value, self.power)
            sparse, kept = zero_below(tensor, a, threshold)
            mask = ((a >= threshold) | (kept.reshape(-1, 1) == NONFINITE)).reshape(tensor.shape)
        else:  # the counts come with the zeroing
            sparse, kept = sparsify_and_count(tensor, self.rule, self.value, self.power)
        self.recorder.record(layer, site, tensor, mask, kept=kept)
        return sparse


class ActivationCapture(SiteHooks):
    """Observe FFN site activations without changing them.

    With ``keep=True`` the real-token activations are kept per (layer, site) as a list of
    ``[tokens, D]`` tensors on the model's device (one per forward). Observers such as
    ``EffectiveRank`` get every tensor either way.
    """

    sparsifies = False

    def __init__(self, model: nn.Module, sites="intermediate", layers=None,
                 recorder: SparsityRecorder | None = None, keep: bool = True):
        super().__init__(model, sites, layers, recorder)
        self.keep = keep
        self.activations: dict[tuple[int, str], list[torch.Tensor]] = {}

    def transform(self, layer: int, site: str, tensor: torch.Tensor) -> torch.Tensor:
        self.recorder.record(layer, site, tensor, None)
        if self.keep and self.recorder.enabled:
            valid = self.recorder.valid_for(tensor)
            rows = tensor.detach().reshape(-1, tensor.shape[-1])
            if valid is not None:
                rows = rows[valid.reshape(-1)]
            self.activations.setdefault((layer, site), []).append(rows)
        return tensor
