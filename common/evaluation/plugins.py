"""Where the specialized packages plug into evaluation; this layer never imports them.

A package declares an entry point in the group ``activation_sparsity.plugins`` (see setup.cfg);
importing that module registers what the package adds: lm-eval models (through lm-eval's own
``register_model``), a sparsification backend for an architecture kind (fused experts), model
aliases (``common.models.aliases``). ``load_plugins()`` imports every declared plug-in once.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Protocol

import torch.nn as nn

from common.core.hooks import ModelHooks
from common.core.recorder import SparsityRecorder

ENTRY_POINT_GROUP = "activation_sparsity.plugins"


class PerTokenCounts(Protocol):
    """Kept counts of every token of the last model call, committed row by row once lm-eval
    says how long each row really is (its right padding is never counted)."""

    def commit_row(self, row: int, length: int, recorder: SparsityRecorder) -> None: ...


class SparsificationBackend(Protocol):
    """How an architecture kind is sparsified: the hook set (with a ``common.core.criteria``
    criterion and its calibration where the kind supports it), and its per-token counts."""

    def sparsifier(self, model: nn.Module, sites, rule: str, value: float, power: float, layers,
                   recorder: SparsityRecorder, per_token: PerTokenCounts | None = None, criterion=None,
                   calibration=None) -> ModelHooks: ...

    def per_token_counts(self, model: nn.Module, sequence_length: int) -> PerTokenCounts: ...


_BACKENDS: dict[str, SparsificationBackend] = {}


def register_backend(kind: str, backend: SparsificationBackend) -> None:
    """Make ``backend`` sparsify models of architecture ``kind`` ('dense' or 'fused_experts')."""
    _BACKENDS[kind] = backend


def backend_for(kind: str) -> SparsificationBackend:
    if kind not in _BACKENDS:
        load_plugins()
    if kind not in _BACKENDS:
        raise ValueError(f"no sparsification backend for {kind!r} models is installed; reinstall the toolkit "
                         "(pip install -e .) so its plug-ins are declared")
    return _BACKENDS[kind]


def load_plugins() -> None:
    """Import every plug-in module declared under ``activation_sparsity.plugins`` (idempotent)."""
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()
