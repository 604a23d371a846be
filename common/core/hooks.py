"""Hooks at FFN sites, as context managers addressed by module names (baukit style).

``ModelHooks`` is the lifecycle every hook set shares (the MoE package's expert sparsifier
included): a root pre-hook that hands each model call's attention mask and generation phase to
the recorder, hooks removed on exit, also when the body raises. ``SiteHooks`` adds one hook per
(layer, site) from the site table. ``Sparsifier`` zeroes the entries outside the
rule's keep-mask and records the counts; ``ActivationCapture`` leaves activations unchanged and
only feeds observers (and, optionally, keeps the real-token activations).
"""

from __future__ import annotations

import inspect
from functools import lru_cache, partial

import torch
import torch.nn as nn

from common.core.recorder import SparsityRecorder
from common.core.rules import NONFINITE, keep_threshold, sparsify_and_count, validate_rule, zero_below
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
    """

    def __init__(self, model: nn.Module, sites="intermediate", rule: str = "topp", value: float = 1.0,
                 power: float = 1.0, layers=None, recorder: SparsityRecorder | None = None):
        validate_rule(rule, value, power)
        super().__init__(model, sites, layers, recorder)
        self.rule, self.value, self.power = rule, float(value), float(power)

    def transform(self, layer: int, site: str, tensor: torch.Tensor) -> torch.Tensor:
        mask = None
        if self.recorder.needs_masks:  # the boolean mask only for observers that read it
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
