"""Synthetic sweeps with a known critical sparsity, for testing and calibrating the search without a
model (``common.analysis.calibration``).

A task of ``items`` items: each item the dense model gets right (probability ``accuracy``)
breaks at a sparsity drawn from a logistic distribution (centre ``centre``, scale ``scale``)
folded at 0 (a draw below 0 counts as its absolute value), so the expected curve starts at 1 and
falls continuously, without an atom of items that all break at one sparsity. A ``fragile`` share
of the items breaks instead at a sparsity uniform on [0, 1]: the slow, nearly straight decline
of real curves before their cliff (a 99% crossing on that stretch moves far with a little noise,
as it does in real sweeps). Besides, at
sparsity s each item's outcome is replaced with probability ``noise * s`` by a chance guess
(``chance``), drawn afresh for every rule value, which makes sample curves non-monotone. With
``persistence`` > 0 that share of the draws (whether an item is guessed, and its guess) is the
item's own, the same at every rule value, as in real sweeps: there a median of 59-76% of the
items whose answer differs from dense at one grid value differ at the next one too (float32
SmolLM2-135M, per site; ``common.analysis.flips``), because the masks of
neighbouring values differ little (``persistence`` 0: independent draws, which pool away in the
isotonic fit; persistent ones make bumps that span several grid values). The rule
value maps to measured sparsity as ``0.95 (1 - value) ** 0.35`` (top-p like: fast near 1). The
expected normalized score has a closed form, so its crossing is known.
A ``replicate`` other than 0 keeps the items (dense answers and break points) and draws the
chance guesses afresh: the same sweep measured again with other rounding, as a second device or
precision does to a real one (its persistent draws too: they come from the rounding, not the items).
"""

from __future__ import annotations

import math
import zlib

import numpy as np
from scipy.optimize import brentq


CHANCE = 0.25  # a guess's chance of being right, by default (four choices)


def sparsity_of(value: float) -> float:
    return 0.95 * (1.0 - value) ** 0.35


class SyntheticSweep:
    def __init__(self, tasks: int = 4, items: int = 30, accuracy: float = 0.5, centre: float = 0.6,
                 scale: float = 0.06, noise: float = 0.1, chance: float = CHANCE, seed: int = 0, replicate: int = 0,
                 persistence: float = 0.0, fragile: float = 0.0):
        rng = np.random.default_rng(seed)
        self.accuracy, self.centre, self.scale, self.noise, self.chance, self.seed, self.replicate = (
            accuracy, centre, scale, noise, chance, seed, replicate)
        self.persistence, self.fragile = persistence, fragile
        self.dense = [(rng.random(items) < accuracy).astype(float) for _ in range(tasks)]
        for d in self.dense:
            d[0] = 1.0  # a dense score above 0
        self.breaks = [np.abs(rng.logistic(centre, scale, items)) for _ in range(tasks)]
        if fragile:
            early = np.random.default_rng([seed, zlib.crc32(b"fragile")])
            for breaks in self.breaks:
                uniform, which = early.random(items), early.random(items) < fragile
                breaks[which] = uniform[which]
        self.calls: list[float] = []
        self.own_draws = None  # per task: each item's own (when, what) guess draws, for this replicate
        if persistence:
            own = np.random.default_rng([self.seed, zlib.crc32(b"persistent"), replicate])
            self.own_draws = [(own.random(items), own.random(items)) for _ in range(tasks)]

    def replica(self) -> "SyntheticSweep":
        """The same items with the next replicate's chance guesses."""
        return SyntheticSweep(len(self.dense), self.dense[0].size, self.accuracy, self.centre, self.scale, self.noise,
                              self.chance, self.seed, self.replicate + 1, self.persistence, self.fragile)

    def items(self, value: float) -> list[np.ndarray]:
        s = sparsity_of(value)
        stream = [self.seed, zlib.crc32(f"{value:.6f}".encode())] + ([self.replicate] if self.replicate else [])
        rng = np.random.default_rng(stream)
        out = []
        for t, (dense, breaks) in enumerate(zip(self.dense, self.breaks)):
            kept = dense * (breaks > s)
            when, what = rng.random(dense.size), rng.random(dense.size)
            if self.own_draws is not None:
                own = rng.random(dense.size) < self.persistence
                when, what = np.where(own, self.own_draws[t][0], when), np.where(own, self.own_draws[t][1], what)
            out.append(np.where(when < self.noise * s, (what < self.chance).astype(float), kept))
        return out

    def evaluate(self, value: float) -> tuple[float, list[np.ndarray]]:
        self.calls.append(value)
        return sparsity_of(value), self.items(value)

    def expected(self, s: float) -> float:
        """Expected normalized score at sparsity s (population, not this sample): a dense-correct
        item survives while its folded break point |L| exceeds s, P(L > s) + P(L < -s), or, if
        fragile, while its uniform break point does, 1 - s."""
        survive = (1.0 / (1.0 + math.exp((s - self.centre) / self.scale))
                   + 1.0 / (1.0 + math.exp((s + self.centre) / self.scale)))
        survive = (1 - self.fragile) * survive + self.fragile * max(0.0, 1.0 - s)
        r = self.noise * s
        return (1 - r) * survive + r * self.chance / self.accuracy

    def true_crossing(self, threshold: float = 0.99) -> float:
        """Where the expected curve (1 at sparsity 0) crosses ``threshold``."""
        return brentq(lambda s: self.expected(s) - threshold, 0.0, 0.95)
