"""How far to trust the PPL-p% reading's intervals: their coverage where the crossing is known.

The PPL-p% critical sparsity is the isotonic crossing of the perplexity ratio (dense perplexity
over sparse, per evaluated rule value) with ``1 / (1 + p / 100)``. It comes with two 95%
intervals (``perplexity_reading``): the paired bootstrap over documents (the curve refitted on
every resample) and the band (where the curve shifted down and up by 1.96 standard deviations of
its resamples crosses). Neither was derived for a crossing read off a handful of points, so both
are measured here:

* ``SyntheticPerplexitySweep``: documents drawn from a population with a closed-form expected
  ratio, so the true crossing is known; each document's loss rises with sparsity by its own
  sensitivity (lognormal, fitted to a real sweep's spread) plus rounding noise. ``coverage`` runs
  a protocol (the full grid, or the noise-aware search) on many seeded sweeps and counts how often
  each interval holds the truth.
* ``resampled_coverage``: a real sweep's documents as the population (the truth is the crossing
  of all of them at every evaluated value); each draw takes a sample of documents with
  replacement and asks whether its intervals hold that truth (a double bootstrap).
* ``split_half_agreement``: the documents split into two disjoint halves, each read on its own,
  many times: how often one half's interval holds the other's crossing (a calibrated 95%
  interval holds an independent replicate's estimate in about 83% of splits, not 95%), and how
  often the two crossings differ by less than the two half-widths combined (about 95%).

An honest 95% interval covers the truth in about 95 of 100 sweeps; the one the sweep leads with
is the one that does (``docs/statistics.md``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from common.analysis.critical import (bootstrap_indices, isotonic_crossing, isotonic_interval, perplexity_curves,
                                      resampled_band)
from common.analysis.search import COARSE_VALUES, DEFAULT_WIDTH, QUICK_BUDGET, noise_aware_search
from common.analysis.synthetic import sparsity_of
from common.evaluation.sweep import PAPER_DENSE_GRID

READINGS = ("bootstrap", "band")


def ppl_threshold(ppl_percent: float) -> float:
    """The perplexity-ratio threshold of PPL-p%: dense / sparse perplexity at least 1 / (1 + p/100)."""
    return 1.0 / (1.0 + ppl_percent / 100.0)


def perplexity_reading(sparsity, sparse_logliks, dense_logliks, words, threshold: float, iterations: int = 1000,
                       seed: int = 0) -> dict:
    """The PPL reading of one curve: the isotonic crossing of the perplexity ratio, the 95% paired
    bootstrap interval over documents and the band. ``sparse_logliks`` is [points, documents]."""
    sparse_logliks = np.asarray(sparse_logliks, dtype=float)
    curve = perplexity_curves(sparse_logliks, dense_logliks, words)
    crossing, status = isotonic_crossing(sparsity, curve, threshold)
    resampled = perplexity_curves(sparse_logliks, dense_logliks, words,
                                  bootstrap_indices(sparse_logliks.shape[1], iterations, seed))
    low, high = isotonic_interval(sparsity, resampled, threshold)
    band = resampled_band(sparsity, curve, resampled, threshold)
    return {"crossing": crossing, "status": status, "interval": [low, high], "band": list(band)}


def _holds(interval, value: float) -> bool:
    low, high = interval
    return bool(math.isfinite(value) and low <= value <= (math.inf if high is None else high))


def _half_width(interval, crossing: float) -> float:
    low, high = interval
    high = math.inf if high is None else high
    return max(crossing - low, high - crossing)


# ---- synthetic documents with a known crossing ------------------------------------------------

class SyntheticPerplexitySweep:
    """``documents`` documents whose loss per word rises with sparsity ``s`` as ``c_d * a * s**k``,
    ``c_d`` lognormal with mean 1 and log-spread ``spread`` (how differently documents react), word
    counts lognormal around ``words``, plus independent rounding noise of relative size ``noise``
    per document and value. The expected log perplexity ratio is ``a * s**k`` (sensitivity and
    length independent), so PPL-p% crosses at ``(ln(1 + p/100) / a) ** (1/k)``.
    Rule values map to sparsity as in ``common.analysis.synthetic`` (top-p like)."""

    def __init__(self, documents: int = 189, scale: float = 0.25, power: float = 2.5, spread: float = 0.6,
                 noise: float = 0.2, words: float = 250.0, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.scale, self.power, self.noise, self.seed = scale, power, noise, seed
        self.sensitivity = rng.lognormal(-spread ** 2 / 2, spread, documents)
        self.words = np.maximum(1.0, np.round(rng.lognormal(math.log(words), 0.4, documents)))
        self.dense = -3.0 * self.words  # dense log-likelihoods: only differences matter
        self.calls: list[float] = []

    def logliks(self, sparsity: float) -> np.ndarray:
        """The documents' log-likelihoods at ``sparsity`` (rounding noise drawn per value)."""
        loss = self.sensitivity * self.scale * sparsity ** self.power
        rng = np.random.default_rng([self.seed, int(round(sparsity * 1e6))])
        loss = loss * (1.0 + self.noise * rng.standard_normal(loss.size))
        return self.dense - loss * self.words

    def evaluate(self, value: float) -> tuple[float, list[np.ndarray]]:
        self.calls.append(value)
        s = sparsity_of(value)
        return s, [self.logliks(s)]

    def true_crossing(self, ppl_percent: float = 1.0) -> float:
        return (math.log(1.0 + ppl_percent / 100.0) / self.scale) ** (1.0 / self.power)


def grid_protocol(sweep, threshold: float, grid: Sequence[float] = PAPER_DENSE_GRID, iterations: int = 1000,
                  seed: int = 0) -> dict:
    """The reading of the full grid (every value evaluated on every document)."""
    points = [sweep.evaluate(v) for v in grid]
    sparsity = [p[0] for p in points]
    return {**perplexity_reading(sparsity, [p[1][0] for p in points], sweep.dense, sweep.words, threshold,
                                 iterations, seed), "values": len(points)}


def search_protocol(sweep, threshold: float, budget: int = QUICK_BUDGET, width: float = DEFAULT_WIDTH,
                    iterations: int = 1000, seed: int = 0) -> dict:
    """The reading of the noise-aware search on the perplexity ratio, as a quick sweep runs it: a
    coarse pass, then at most ``budget`` values placed where they shrink the interval most."""
    def curves(items, indices):
        return perplexity_curves(items[0], sweep.dense, sweep.words, None if indices is None else indices[0])

    found = noise_aware_search(sweep.evaluate, curves, threshold, width, budget, coarse=COARSE_VALUES,
                               iterations=iterations, seed=seed,
                               band=lambda s, items, curve, resampled: resampled_band(s, curve, resampled, threshold))
    return {"crossing": found["crossing"], "status": found["status"], "interval": found["interval"],
            "band": found["band"], "values": found["values_evaluated"]}


def coverage(protocol: str = "grid", sweeps: int = 100, documents: int = 189, ppl_percent: float = 1.0,
             iterations: int = 1000, **population) -> dict:
    """How often each interval of a protocol (``grid`` or ``search``) holds the true crossing over
    ``sweeps`` seeded synthetic sweeps; with the median error and interval widths."""
    threshold = ppl_threshold(ppl_percent)
    run = {"grid": grid_protocol, "search": search_protocol}[protocol]
    rows = []
    for seed in range(sweeps):
        sweep = SyntheticPerplexitySweep(documents, seed=seed, **population)
        truth = sweep.true_crossing(ppl_percent)
        reading = run(sweep, threshold, iterations=iterations, seed=seed)
        rows.append({"truth": truth, **reading})
    return {"protocol": protocol, "documents": documents, "sweeps": sweeps, **population,
            **_summary(rows, lambda row: row["truth"])}


def _summary(rows: list[dict], truth) -> dict:
    """Coverage, median absolute error and median width of each reading over ``rows``."""
    out = {"median_error": float(np.median([abs(r["crossing"] - truth(r)) for r in rows]))}
    if all("values" in r for r in rows):
        out["median_values"] = float(np.median([r["values"] for r in rows]))
    for reading, key in zip(READINGS, ("interval", "band")):
        out[f"{reading}_coverage"] = float(np.mean([_holds(r[key], truth(r)) for r in rows]))
        widths = [(r[key][1] if r[key][1] is not None else math.inf) - r[key][0] for r in rows]
        out[f"{reading}_median_width"] = float(np.median(widths))
    return out


# ---- a real sweep's documents as the population ----------------------------------------------

def resampled_coverage(sparsity, sparse_logliks, dense_logliks, words, ppl_percent: float = 1.0,
                       documents: int | None = None, draws: int = 200, iterations: int = 1000,
                       seed: int = 0) -> dict:
    """Double bootstrap: the truth is the crossing of all documents at every point; each draw reads
    ``documents`` documents (default: as many as there are) drawn with replacement, and the
    summary says how often its bootstrap interval and its band hold the truth."""
    sparse, dense, words = (np.asarray(a, dtype=float) for a in (sparse_logliks, dense_logliks, words))
    threshold = ppl_threshold(ppl_percent)
    truth, status = isotonic_crossing(sparsity, perplexity_curves(sparse, dense, words), threshold)
    if status != "crossed":
        raise ValueError(f"the sweep's perplexity curve is {status.replace('_', ' ')}: no crossing to cover")
    count = documents or dense.size
    rng = np.random.default_rng(seed)
    rows = []
    for draw in range(draws):
        pick = rng.integers(0, dense.size, count)
        rows.append(perplexity_reading(sparsity, sparse[:, pick], dense[pick], words[pick], threshold, iterations,
                                       seed + draw + 1))
    return {"truth": truth, "documents": count, "draws": draws, **_summary(rows, lambda row: truth)}


def split_half_agreement(sparsity, sparse_logliks, dense_logliks, words, ppl_percent: float = 1.0,
                         splits: int = 100, iterations: int = 1000, seed: int = 0) -> dict:
    """The documents split at random into two disjoint halves ``splits`` times, each half read on
    its own: per reading, how often a half's interval holds the other half's crossing
    (``*_holds_other``; about 0.83 for a calibrated interval) and how often the two crossings are
    within the two half-widths combined in quadrature (``*_agree``; about 0.95)."""
    sparse, dense, words = (np.asarray(a, dtype=float) for a in (sparse_logliks, dense_logliks, words))
    threshold = ppl_threshold(ppl_percent)
    rng = np.random.default_rng(seed)
    holds = {reading: [] for reading in READINGS}
    agree = {reading: [] for reading in READINGS}
    half = dense.size // 2
    for split in range(splits):
        order = rng.permutation(dense.size)
        a, b = (perplexity_reading(sparsity, sparse[:, part], dense[part], words[part], threshold, iterations,
                                   seed + 2 * split + k) for k, part in enumerate((order[:half], order[half:2 * half])))
        if a["status"] != "crossed" or b["status"] != "crossed":
            continue
        for reading, key in zip(READINGS, ("interval", "band")):
            holds[reading] += [_holds(a[key], b["crossing"]), _holds(b[key], a["crossing"])]
            combined = math.hypot(_half_width(a[key], a["crossing"]), _half_width(b[key], b["crossing"]))
            agree[reading].append(abs(a["crossing"] - b["crossing"]) <= combined)
    used = len(agree["band"])
    if not used:
        raise ValueError("no split crossed the threshold in both halves: too few documents or values")
    return {"splits": used, "documents_per_half": half,
            **{f"{r}_holds_other": float(np.mean(holds[r])) for r in READINGS},
            **{f"{r}_agree": float(np.mean(agree[r])) for r in READINGS}}


def sweep_documents(folder, site: str, task: str = "fables_ppl") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(measured sparsity [points], sparse log-likelihoods [points, documents], dense log-likelihoods
    [documents], words [documents]) of one site's perplexity cells in a finished sweep folder (the
    values its tidy.csv reports, sorted by sparsity)."""
    import json
    from pathlib import Path

    import pandas as pd

    from common.evaluation.store import ResultStore
    from common.evaluation.sweep import DENSE, SweepSpec

    folder = Path(folder)
    if not (folder / "critical.json").is_file() or not (folder / "tidy.csv").is_file():
        raise ValueError(f"{folder} is not a finished sweep folder (no critical.json and tidy.csv); run the sweep first")
    spec = SweepSpec(**json.loads((folder / "critical.json").read_text())["spec"])
    rows = pd.read_csv(folder / "tidy.csv")
    rows = rows[(rows.site == site) & (rows.task == task)].sort_values("measured_sparsity")
    if rows.empty:
        raise ValueError(f"{folder} has no {task} cells of site {site!r}")
    store = ResultStore(folder)
    dense = store.get(spec.key(DENSE, 1.0, task))["items"]
    sparse = [[item["loglikelihood"] for item in store.get(spec.key(site, value, task))["items"]]
              for value in rows.value]
    return (rows.measured_sparsity.to_numpy(), np.asarray(sparse, dtype=float),
            np.array([item["loglikelihood"] for item in dense]), np.array([item["words"] for item in dense], float))
