"""lm-eval bridge: ``SparseHFLM``, an HFLM that sparsifies FFN sites around its model calls.

Registered as ``sparse-hf``. Model arguments: ``sites`` (``+``-separated, e.g.
``input+intermediate``), ``rule``, ``value``, ``power``, ``layers`` (``+``-separated indices,
default all) and ``stats_file`` (a JSON written after each request type with the measured
sparsity). Hooks are installed only around ``_model_call`` / ``_model_generate``, in the style
of lm-eval's own ``SteeredModel``.

Real tokens only. lm-eval right-pads loglikelihood batches with id 0 and passes no attention
mask, so counts from a ``_model_call`` are held per token and committed row by row when
lm-eval slices each row to its real length (``_select_cont_toks`` receives that length).
Calls that are never sliced, such as the automatic batch-size probe, are discarded.
Generation passes an attention mask, which the hooks read directly; prefill and decode
statistics are kept apart.
"""

from __future__ import annotations

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from common.core.hooks import Sparsifier
from common.core.recorder import SparsityRecorder
from common.core.rules import validate_rule
from common.core.sites import detect_architecture, expand_sites, resolve_layers
from common.core.stats import summarize
from common.evaluation.store import atomic_write_json


def split_arg(value) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [v for v in str(value).replace(",", "+").split("+") if v]


class _PerTokenKept:
    """Observer holding the kept count of every token of the last call, until rows are committed."""

    def __init__(self):
        self.kept: dict[tuple[int, str], torch.Tensor] = {}
        self.width: dict[tuple[int, str], int] = {}

    def observe(self, layer, site, context, tensor, mask, valid) -> None:
        if mask is not None:
            self.kept[(layer, site)] = mask.sum(dim=-1)
            self.width[(layer, site)] = mask.shape[-1]

    def commit_row(self, row: int, length: int, recorder: SparsityRecorder) -> None:
        for (layer, site), kept in self.kept.items():
            recorder.add_counts(layer, site, kept[row, :length].sum(), length * self.width[(layer, site)], {})


class _PerTokenExpertKept:
    """MoE variant: kept counts per routed (token, slot) and the slot's expert, per layer and site."""

    def __init__(self, sequence_length: int, num_experts: int):
        self.length, self.num_experts = sequence_length, num_experts
        self.calls: dict[tuple[int, str], list] = {}

    def __call__(self, layer, site, kept_slots, selected, top_k_index, width) -> None:
        if selected is None:
            selected = torch.ones_like(top_k_index, dtype=torch.bool)
        entry = self.calls.get((layer, site))
        if entry is None:  # eager reports one expert at a time: accumulate the slots
            self.calls[(layer, site)] = [kept_slots * selected, selected.clone(), top_k_index, width]
        else:
            entry[0] = entry[0] + kept_slots * selected
            entry[1] = entry[1] | selected

    def commit_row(self, row: int, length: int, recorder: SparsityRecorder) -> None:
        start = row * self.length
        for (layer, site), (kept, selected, top_k_index, width) in self.calls.items():
            span = slice(start, start + length)
            experts = top_k_index[span].reshape(-1)
            weight = selected[span].reshape(-1).long()
            zeros = torch.zeros(self.num_experts, dtype=torch.long, device=experts.device)
            routed = zeros.index_add(0, experts, weight)
            recorder.add_expert_counts(layer, site, zeros.index_add(0, experts, kept[span].reshape(-1).long() * weight),
                                       routed * width, routed, {})


class SparsificationSettings:
    """What an lm-eval model sparsifies, shared by ``sparse-hf`` and ``llada-sparse``.

    Expects ``self.model`` and ``self.recorder``; ``stats_file`` (optional) receives the
    statistics after each request type.
    """

    stats_file: str | None = None

    def set_sparsification(self, sites=None, rule: str = "topp", value: float = 1.0, power: float = 1.0,
                           layers=None) -> None:
        """Change what is sparsified (keeps the loaded model); also resets the statistics."""
        sites = split_arg(sites)
        if sites:
            expand_sites(sites)
            validate_rule(rule, float(value), float(power))
        layer_list = [int(layer) for layer in split_arg(layers)] or None
        if layer_list is not None:
            resolve_layers(self.model, layer_list)
        self.sites, self.rule, self.value, self.power, self.layers = sites, rule, float(value), float(power), layer_list
        self.reset_statistics()

    def reset_statistics(self) -> None:
        self.recorder.reset()

    def sparsity_statistics(self) -> dict:
        """Measured sparsity (real tokens) per site: per layer, mean over layers, element-weighted."""
        rows = self.recorder.rows()
        out = {"sites": self.sites, "rule": self.rule, "value": self.value, "power": self.power,
               "layers": self.layers, "summary": summarize(rows)}
        for phase in sorted({row.get("phase") for row in rows} - {None}):
            out[f"summary_{phase}"] = summarize(rows, phase=phase)
        return out

    def _write_stats(self) -> None:
        if self.stats_file:
            atomic_write_json(self.stats_file, self.sparsity_statistics())


@register_model("sparse-hf")
class SparseHFLM(SparsificationSettings, HFLM):
    """HFLM with per-token FFN sparsification; ``sites=None`` evaluates the dense model."""

    def __init__(self, pretrained, sites=None, rule: str = "topp", value: float = 1.0, power: float = 1.0,
                 layers=None, stats_file: str | None = None, **kwargs):
        super().__init__(pretrained=pretrained, **kwargs)
        self.is_moe = detect_architecture(self.model).is_moe
        if self.is_moe:
            from moe_sparsity.experts import experts_modules

            self.num_experts = next(iter(experts_modules(self.model).values())).num_experts
        self.recorder = SparsityRecorder()
        self.stats_file = stats_file
        self._pending: _PerTokenKept | None = None
        self._pending_row = 0
        self.set_sparsification(sites, rule, value, power, layers)

    def reset_statistics(self) -> None:
        super().reset_statistics()
        self._pending = None

    def _sparsifier(self, recorder: SparsityRecorder, per_token_sink=None):
        if self.is_moe:
            from moe_sparsity.experts import ExpertSparsifier

            return ExpertSparsifier(self.model, self.sites, self.rule, self.value, self.power, self.layers,
                                    recorder, per_token_sink)
        return Sparsifier(self.model, self.sites, self.rule, self.value, self.power, self.layers, recorder)

    # ---- model calls ---------------------------------------------------------------------------
    def _model_call(self, inps, attn_mask=None, labels=None):
        if not self.sites:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        if self.is_moe:
            per_token = _PerTokenExpertKept(inps.shape[1], self.num_experts)
            sparsifier = self._sparsifier(SparsityRecorder(), per_token_sink=per_token)
        else:
            per_token = _PerTokenKept()
            sparsifier = self._sparsifier(SparsityRecorder([per_token]))
        with sparsifier:
            logits = super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        self._pending, self._pending_row = per_token, 0
        return logits

    def _select_cont_toks(self, logits, contlen=None, inplen=None):
        if self._pending is not None and inplen is not None:
            self._pending.commit_row(self._pending_row, inplen, self.recorder)
            self._pending_row += 1
        return super()._select_cont_toks(logits, contlen=contlen, inplen=inplen)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        if not self.sites:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        with self._sparsifier(self.recorder):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    # ---- request types: write statistics after each -----------------------------------------
    def _then_write_stats(self, run, requests, disable_tqdm: bool):
        """Run one request type; drop uncommitted per-token counts and write the statistics after."""
        try:
            return run(requests, disable_tqdm=disable_tqdm)
        finally:
            self._pending = None
            self._write_stats()

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._then_write_stats(super().loglikelihood, requests, disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._then_write_stats(super().loglikelihood_rolling, requests, disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._then_write_stats(super().generate_until, requests, disable_tqdm)

    def sparsity_statistics(self) -> dict:
        out = super().sparsity_statistics()
        if self.is_moe:
            expert_rows = self.recorder.expert_rows()
            out["experts"] = expert_rows
            out["summary"] = summarize(expert_rows)
        return out
