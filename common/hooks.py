"""Hooks at FFN sites, as context managers addressed by module names (baukit style).

``SiteHooks`` installs one hook per (layer, site) from the site table plus a root pre-hook
that hands each model call's attention mask and generation phase to the recorder; all hooks
are removed on exit, also when the body raises. ``Sparsifier`` zeroes the entries outside the
rule's keep-mask and records the counts; ``ActivationCapture`` leaves activations unchanged and
only feeds observers (and, optionally, keeps the real-token activations).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from .recorder import SparsityRecorder
from .rules import keep_mask, validate_rule
from .sites import site_module_names


def _call_phase(args: tuple, kwargs: dict) -> str | None:
    """'prefill' / 'decode' when the call carries a KV cache (generation), else None."""
    cache = kwargs.get("past_key_values")
    if cache is None:
        return None
    try:
        return "decode" if cache.get_seq_length() > 0 else "prefill"
    except (AttributeError, TypeError):
        return "prefill"


def _call_attention_mask(args: tuple, kwargs: dict) -> torch.Tensor | None:
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]
    return mask if isinstance(mask, torch.Tensor) else None


class SiteHooks:
    """Base context manager: a hook at every chosen (layer, site); subclasses set ``transform``."""

    def __init__(self, model: nn.Module, sites="intermediate", layers=None,
                 recorder: SparsityRecorder | None = None):
        self.model = model
        self.locations = site_module_names(model, sites, layers)
        self.recorder = recorder if recorder is not None else SparsityRecorder()
        self._handles: list = []
        seen: dict[int, tuple[int, str]] = {}
        for key, (name, _) in self.locations.items():
            module_id = id(model.get_submodule(name))
            if module_id in seen and seen[module_id][1] == key[1]:
                raise ValueError(f"module {name} is shared between layers {seen[module_id][0]} and {key[0]}; "
                                 "per-layer hooks cannot tell them apart")
            seen[module_id] = key

    def transform(self, layer: int, site: str, tensor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ---- hook bodies -----------------------------------------------------------------------
    def _root_pre_hook(self, module, args, kwargs):
        self.recorder.begin_call(_call_attention_mask(args, kwargs), _call_phase(args, kwargs))

    def _output_hook(self, layer, site, module, args, output):
        return self.transform(layer, site, output)

    def _input_hook(self, layer, site, module, args):
        return (self.transform(layer, site, args[0]),) + tuple(args[1:])

    # ---- context manager -------------------------------------------------------------------
    def __enter__(self):
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True))
            for (layer, site), (name, tensor) in self.locations.items():
                module = self.model.get_submodule(name)
                if tensor == "output":
                    handle = module.register_forward_hook(partial(self._output_hook, layer, site))
                else:
                    handle = module.register_forward_pre_hook(partial(self._input_hook, layer, site))
                self._handles.append(handle)
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.remove()


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
        mask = keep_mask(tensor, self.rule, self.value, self.power)
        self.recorder.record(layer, site, tensor, mask)
        return tensor.masked_fill(~mask, 0)


class ActivationCapture(SiteHooks):
    """Observe FFN site activations without changing them.

    With ``keep=True`` the real-token activations are kept per (layer, site) as a list of
    ``[tokens, D]`` tensors on the model's device (one per forward). Observers such as
    ``EffectiveRank`` get every tensor either way.
    """

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
