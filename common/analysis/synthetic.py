"""Synthetic sweeps with a known critical sparsity, for testing and calibrating the search without a
model (``common.analysis.calibration``).

A task of ``items`` items: each item the dense model gets right (probability ``accuracy``)
breaks at a sparsity drawn from a logistic distribution (centre ``centre``, scale ``scale``, at
least 0.01);
besides, at sparsity s each item's outcome is replaced with probability ``noise * s`` by a
chance guess (``chance``), drawn afresh for every rule value, which makes sample curves
non-monotone. The rule value maps to measured sparsity as ``0.95 (1 - value) ** 0.35`` (top-p
like: fast near 1). The expected normalized score has a closed form, so its crossing is known.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
from scipy.optimize import brentq


def sparsity_of(value: float) -> float:
    return 0.95 * (1.0 - value) ** 0.35


class SyntheticSweep:
    def __init__(self, tasks: int = 4, items: int = 30, accuracy: float = 0.5, centre: float = 0.6,
                 scale: float = 0.06, noise: float = 0.1, chance: float = 0.25, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.accuracy, self.centre, self.scale, self.noise, self.chance, self.seed = (
            accuracy, centre, scale, noise, chance, seed)
        self.dense = [(rng.random(items) < accuracy).astype(float) for _ in range(tasks)]
        for d in self.dense:
            d[0] = 1.0  # a dense score above 0
        self.breaks = [np.maximum(rng.logistic(centre, scale, items), 0.01) for _ in range(tasks)]
        self.calls: list[float] = []

    def items(self, value: float) -> list[np.ndarray]:
        s = sparsity_of(value)
        rng = np.random.default_rng([self.seed, zlib.crc32(f"{value:.6f}".encode())])
        out = []
        for dense, breaks in zip(self.dense, self.breaks):
            kept = dense * (breaks > s)
            guess = rng.random(dense.size) < self.noise * s
            out.append(np.where(guess, (rng.random(dense.size) < self.chance).astype(float), kept))
        return out

    def evaluate(self, value: float) -> tuple[float, list[np.ndarray]]:
        self.calls.append(value)
        return sparsity_of(value), self.items(value)

    def expected(self, s: float) -> float:
        """Expected normalized score at sparsity s (population, not this sample)."""
        survive = 1.0 / (1.0 + math.exp((s - self.centre) / self.scale))
        r = self.noise * s
        return (1 - r) * survive + r * self.chance / self.accuracy

    def true_crossing(self, threshold: float = 0.99) -> float:
        return brentq(lambda s: self.expected(s) - threshold, 0.0, 0.95)
