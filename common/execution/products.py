"""Sparse products: the linear layers that read one input, run over only the kept inputs' weights.

``SparseProduct`` stores the weights of a group of ``nn.Linear`` that share an input (q, k, v; gate
and up; down alone; o alone) once, input-major and fused: ``rows`` [I, O_1 + O_2 + ...], so that
one kept input's weights for every layer of the group are one contiguous row. ``GateBundle`` is
the CATS intermediate: the gate computed densely, and for each neuron whose ``|act(gate)|`` is
kept, its up row and down column stored side by side and read once.

The keep rule is a threshold on ``|x|`` (a float; TEAL style, a comparison per entry) or a mask
function ``[T, D] -> [T, D] bool`` (the study's top-p). A call picks its path:

* the fused CPU kernel (``common.execution.sparse_gemv``) where it applies (CPU, float32 or
  bfloat16, at most ``gather_tokens`` token rows, ``kernel="auto"``);
* the pure-torch gather (``common.execution.kernels``) otherwise, with any token count when a
  gather kernel is named or passed explicitly;
* more than ``gather_tokens`` rows with ``kernel="auto"`` (a prefill): the masked dense product,
  which reads each weight once for all rows instead of once per row.

Every path gives the masked dense product up to float summation order. Token rows whose input
holds a NaN or an infinity are never sparsified: the original linear layers compute them densely
(the NaN propagates as in the dense model), and they are counted in ``nonfinite`` rows, apart
from ``kept`` / ``seen``.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch
import torch.nn as nn

from common.execution import sparse_gemv
from common.execution.kernels import GatherGemv, kept_entries, resolve_kernel
from common.execution.thresholds import magnitude_mask

AUTO = "auto"
GATHER_TOKENS = 4  # token rows up to which "auto" gathers kept rows; beyond, the masked dense product


def threshold_in_dtype(threshold: float, dtype: torch.dtype) -> float:
    """``threshold`` rounded to ``dtype`` as torch rounds a scalar it compares with a tensor of that
    dtype, so the kernel and the torch mask keep the same entries."""
    if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool) or threshold != threshold \
            or threshold < 0:
        raise ValueError(f"threshold {threshold!r} must be a number >= 0 (inf drops everything)")
    return float(torch.tensor(float(threshold), dtype=torch.float32).to(dtype))


def _check_rule(rule) -> None:
    if not (callable(rule) or isinstance(rule, numbers.Real)) or isinstance(rule, bool):
        raise ValueError(f"a keep rule is a threshold on |x| (a number) or a mask function, got {rule!r}")


class _Counts:
    """Kept and seen entries, and the token rows passed through as non-finite (host integers)."""

    def __init__(self):
        self.kept = self.seen = self.nonfinite = 0

    def reset_counts(self) -> None:
        self.kept = self.seen = self.nonfinite = 0

    def _count(self, kept: int, finite_rows: int, width: int, nonfinite_rows: int) -> None:
        self.kept += kept
        self.seen += finite_rows * width
        self.nonfinite += nonfinite_rows


def _resolve(kernel) -> GatherGemv | None:
    """None for ``"auto"`` (the fused kernel where it applies, else embedding_bag), else the gather."""
    return None if isinstance(kernel, str) and kernel == AUTO else resolve_kernel(kernel)


def check_kernel(kernel) -> None:
    """A one-line ValueError for a kernel that is neither ``"auto"``, a gather name nor a function."""
    _resolve(kernel)


class SparseProduct(_Counts):
    """``torch.cat([linear(x) for linear in linears], -1)`` over the kept inputs only.

    ``rule`` is a threshold on ``|x|`` or a mask function. The fused input-major copy of the
    weights is made once here; the linear layers themselves are untouched (they compute the
    non-finite rows).
    """

    def __init__(self, linears: Sequence[nn.Linear], rule, kernel=AUTO, gather_tokens: int = GATHER_TOKENS):
        super().__init__()
        linears = tuple(linears)
        if not linears or not all(isinstance(linear, nn.Linear) for linear in linears):
            raise ValueError("a sparse product needs one or more nn.Linear layers that read the same input")
        if len({linear.in_features for linear in linears}) != 1:
            raise ValueError("the linear layers of one sparse product must read inputs of one width")
        _check_rule(rule)
        self.linears = linears
        self.in_features = linears[0].in_features
        self.splits = [linear.out_features for linear in linears]
        with torch.no_grad():
            weight = torch.cat([linear.weight for linear in linears]) if len(linears) > 1 else linears[0].weight
            self.rows = weight.detach().t().contiguous()  # [I, O]: one input's weights are one row
            biases = [linear.bias for linear in linears]
            self.bias = None if all(b is None for b in biases) else torch.cat(
                [b.detach() if b is not None else weight.new_zeros(n) for b, n in zip(biases, self.splits)])
        self.threshold = None if callable(rule) else threshold_in_dtype(rule, self.rows.dtype)
        self.mask_fn = rule if callable(rule) else None
        self.gather = _resolve(kernel)
        self.gather_tokens = gather_tokens
        self.row_bytes = self.rows.shape[1] * self.rows.element_size()

    @property
    def weight_bytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()

    def _mask(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.mask_fn is not None:
            return self.mask_fn(tokens)
        return magnitude_mask(tokens, self.threshold)

    def dense(self, tokens: torch.Tensor) -> torch.Tensor:
        """The original linear layers on ``tokens`` (the dense model's computation)."""
        outputs = [linear(tokens) for linear in self.linears]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        count = x.numel() // self.in_features
        module = sparse_gemv.kernel() if self.gather is None and count <= self.gather_tokens \
            and sparse_gemv.applies(x, self.rows) else None
        if module is not None:  # the decode path: the kernel takes x's shape as it is (a few microseconds)
            mask = None if self.mask_fn is None else self.mask_fn(x.reshape(-1, self.in_features)).contiguous()
            out, kept, nonfinite = module.sparse_gemv(x, self.rows, self.threshold or 0.0, mask, self.bias)
            if nonfinite:
                index = torch.tensor(nonfinite, device=x.device)
                rows = out.view(-1, out.shape[-1])
                rows[index] = self.dense(x.reshape(-1, self.in_features)[index])
            nonfinite = len(nonfinite)
        else:
            out, kept, nonfinite = self._torch_product(x.reshape(-1, self.in_features))
            out = out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])
        self._count(kept, count - nonfinite, self.in_features, nonfinite)
        return out

    def _torch_product(self, tokens: torch.Tensor):
        finite = torch.isfinite(tokens).all(dim=-1)
        nonfinite = (~finite).nonzero().view(-1)
        mask = self._mask(tokens) & finite.unsqueeze(-1)  # non-finite rows are computed densely below
        if self.gather is None and tokens.shape[0] > self.gather_tokens:  # a prefill: read each weight once
            out = tokens.masked_fill(~mask, 0) @ self.rows
            kept = int(mask.sum())
        else:
            kept_values, kept_index, offsets = kept_entries(tokens, mask)
            kept = kept_index.numel()
            out = (self.gather or resolve_kernel("embedding_bag"))(kept_values, kept_index, offsets, self.rows)
        if self.bias is not None:
            out = out + self.bias
        if nonfinite.numel():  # known on the host: nonzero has synchronized
            out[nonfinite] = self.dense(tokens[nonfinite])
        return out, kept, nonfinite.numel()


class GateBundle(_Counts):
    """The GLU MLP ``down(act(gate(x)) * up(x))`` with the intermediate decided by the gate alone
    (CATS): the gate is computed densely, the neurons with ``|act(gate)|`` kept by ``rule`` are
    the only ones whose up row and down column are read, both from one contiguous bundle row
    ``[W_up[j, :], W_down[:, j]]``. Equals the masked dense MLP with the mask on ``act(gate)``.
    """

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act_fn, rule, kernel=AUTO,
                 gather_tokens: int = GATHER_TOKENS):
        super().__init__()
        _check_rule(rule)
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate, up, down, act_fn
        self.gate = SparseProduct([gate], 0.0, kernel, gather_tokens)  # dense: threshold 0 keeps everything
        self.hidden = down.out_features
        with torch.no_grad():
            self.bundle = torch.cat([up.weight.detach(), down.weight.detach().t()], dim=1).contiguous()  # [I, 2H]
        self.up_bias = None if up.bias is None else up.bias.detach()
        self.down_bias = None if down.bias is None else down.bias.detach()
        self.threshold = None if callable(rule) else threshold_in_dtype(rule, self.bundle.dtype)
        self.mask_fn = rule if callable(rule) else None
        self.gather = _resolve(kernel)
        self.gather_tokens = gather_tokens
        self.in_features = up.out_features  # the width of the keep decision (neurons)
        self.row_bytes = self.bundle.shape[1] * self.bundle.element_size()

    @property
    def weight_bytes(self) -> int:
        return (self.bundle.numel() + self.gate.rows.numel()) * self.bundle.element_size()

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def _mask(self, gate: torch.Tensor) -> torch.Tensor:
        if self.mask_fn is not None:
            return self.mask_fn(gate)
        return magnitude_mask(gate, self.threshold)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        count = tokens.shape[0]
        gate = self.act_fn(self.gate(tokens))
        module = sparse_gemv.kernel() if self.gather is None and count <= self.gather_tokens \
            and sparse_gemv.applies(tokens, self.bundle) else None
        if module is not None:
            mask = None if self.mask_fn is None else self.mask_fn(gate).contiguous()
            out, kept, nonfinite = module.bundled_glu(tokens, gate, self.bundle, self.threshold or 0.0, mask,
                                                      self.up_bias, self.down_bias)
            if nonfinite:
                index = torch.tensor(nonfinite, device=tokens.device)
                out[index] = self.dense(tokens[index])
            nonfinite = len(nonfinite)
        else:
            out, kept, nonfinite = self._torch_product(tokens, gate)
        self._count(kept, count - nonfinite, self.in_features, nonfinite)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.hidden)

    def _torch_product(self, tokens: torch.Tensor, gate: torch.Tensor):
        finite = torch.isfinite(tokens).all(dim=-1) & torch.isfinite(gate).all(dim=-1)
        nonfinite = (~finite).nonzero().view(-1)
        mask = self._mask(gate) & finite.unsqueeze(-1)
        if self.gather is None and tokens.shape[0] > self.gather_tokens:  # a prefill: the masked dense MLP
            hidden = gate.masked_fill(~mask, 0) * self.up_proj(tokens)
            out = self.down_proj(hidden)
            kept = int(mask.sum())
        else:  # one gathered bundle row per kept neuron: its up dot product, then its down axpy
            neuron = mask.reshape(-1).nonzero().view(-1)
            token, index = neuron // mask.shape[1], neuron % mask.shape[1]
            kept = index.numel()
            rows = self.bundle.index_select(0, index).float()  # [K, 2H]; sums in float32, as the kernel
            up = (rows[:, :self.hidden] * tokens.index_select(0, token).float()).sum(dim=-1)
            if self.up_bias is not None:
                up = up + self.up_bias.index_select(0, index).float()
            # rounded as the dense model rounds up(x) and act(gate) * up(x)
            hidden = (gate.reshape(-1).index_select(0, neuron) * up.to(gate.dtype)).float()
            out = torch.zeros(tokens.shape[0], self.hidden, device=tokens.device).index_add_(
                0, token, hidden.unsqueeze(-1) * rows[:, self.hidden:])
            if self.down_bias is not None:
                out = out + self.down_bias.float()
            out = out.to(tokens.dtype)
        if nonfinite.numel():  # known on the host: nonzero has synchronized
            out[nonfinite] = self.dense(tokens[nonfinite])
        return out, kept, nonfinite.numel()
