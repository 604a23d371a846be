"""Dense sweeps through lm-eval: one store cell per (model, site, rule, power, value, task).

The dense baseline is one cell per task (site "dense"), evaluated once and reused. Every cell
keeps lm-eval's metrics, per-item scores and answer log-likelihoods (for paired bootstrap
intervals and the continuous fidelity measures) and the measured sparsity per layer. Cells are
written atomically, so an interrupted sweep resumes where it stopped and ``--shard K/N``
processes can share one store. The noise-aware search for a site's critical point instead of
the full grid (in the analysis layer) evaluates its cells through ``SweepRunner.cell``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm

from common.core.sites import expand_sites
from common.evaluation.store import ResultStore, in_shard
from common.evaluation.tasks import PERPLEXITY_TASKS, primary_metric

DENSE = "dense"
PAPER_DENSE_GRID = [1.0, 0.995, 0.99, 0.985, 0.98, 0.975, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91, 0.90, 0.85,
                    0.80, 0.75, 0.70, 0.65, 0.60, 0.50, 0.40, 0.30, 0.20, 0.10, 0.0]  # rule values (top-p p)
PAPER_MOE_GRID = [1.0, 0.99, 0.98, 0.97, 0.95, 0.92, 0.90, 0.75, 0.50]


@dataclass
class SweepSpec:
    """What one sweep evaluates."""

    model: str
    sites: list[str]
    tasks: list[str]
    rule: str = "topp"
    power: float = 1.0
    grid: list[float] = field(default_factory=lambda: list(PAPER_DENSE_GRID))
    limit: int | None = None
    layers: list[int] | None = None
    metric: str | None = None  # None: each task's primary metric (common.evaluation.tasks.PRIMARY_METRIC)
    dtype: str = "float32"  # part of every key: one store never mixes precisions
    device_type: str = "cpu"

    def key(self, site: str, value: float, task: str) -> dict:
        dense = site == DENSE
        return {"model": self.model, "site": site, "rule": "none" if dense else self.rule,
                "power": 1.0 if dense else float(self.power), "value": 1.0 if dense else round(float(value), 6),
                "task": task, "limit": self.limit, "layers": None if dense else self.layers,
                "dtype": self.dtype, "device_type": self.device_type}

    def matches(self) -> dict:
        """The key fields shared by every cell of this sweep (to select them in a store)."""
        return {"model": self.model, "rule": self.rule, "power": float(self.power), "limit": self.limit,
                "dtype": self.dtype, "device_type": self.device_type}

    def metric_for(self, task: str) -> str:
        if task in PERPLEXITY_TASKS or self.metric is None:
            return primary_metric(task)
        return self.metric

    def as_dict(self) -> dict:
        return asdict(self)


def _items_from_samples(samples: list[dict], task: str) -> list[dict]:
    """Per-item record: doc id, metric values, and (multiple choice) the answers' log-likelihoods."""
    items = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        item = {"doc_id": sample["doc_id"]}
        for metric in ("acc", "acc_norm", "exact_match"):
            if metric in sample:
                item[metric] = float(sample[metric])
        if task in PERPLEXITY_TASKS:
            loglik, words = sample["word_perplexity"]
            item["loglikelihood"], item["words"] = float(loglik), int(words)
            item["bytes"] = int(sample["byte_perplexity"][1])
        else:
            responses = sample.get("filtered_resps") or sample.get("resps")
            item["choice_logliks"] = [float(r[0] if isinstance(r, (list, tuple)) else r) for r in responses]
            item["gold"] = int(sample["target"]) if str(sample["target"]).lstrip("-").isdigit() else None
        items.append(item)
    return items


class SweepRunner:
    """Evaluates cells through a ``SparseHFLM`` and stores them."""

    def __init__(self, lm, spec: SweepSpec, store: ResultStore, task_manager, shard: tuple[int, int] = (0, 1),
                 verbose: bool = True):
        self.lm, self.spec, self.store, self.task_manager, self.shard = lm, spec, store, task_manager, shard
        self.verbose = verbose
        self.evaluations = 0
        for site in spec.sites:
            expand_sites(site)

    # ---- one cell -----------------------------------------------------------------------------
    def cell(self, site: str, value: float, task: str) -> dict:
        """The cell's result, evaluating it only if the store does not have it yet."""
        key = self.spec.key(site, value, task)
        result = self.store.get(key)
        if result is None:
            result = self._evaluate(site, value, task)
            self.store.put(key, result)
            self.evaluations += 1
        return result

    def _evaluate(self, site: str, value: float, task: str) -> dict:
        import lm_eval

        if site == DENSE:
            self.lm.set_sparsification(None)
        else:
            self.lm.set_sparsification(site, self.spec.rule, value, self.spec.power, self.spec.layers)
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        start = time.perf_counter()
        output = lm_eval.simple_evaluate(model=self.lm, tasks=[task], task_manager=self.task_manager,
                                         limit=self.spec.limit, log_samples=True, bootstrap_iters=0,
                                         verbosity="ERROR")
        seconds = time.perf_counter() - start
        metrics = {name.split(",")[0]: value for name, value in output["results"][task].items()
                   if isinstance(value, (int, float)) and "stderr" not in name}
        stats = self.lm.sparsity_statistics()
        result = {"metrics": metrics, "items": _items_from_samples(output["samples"][task], task),
                  "sparsity": stats["summary"], "seconds": seconds}
        if "experts" in stats:  # MoE: per (layer, site, expert) counts
            result["experts"] = [{k: r[k] for k in ("layer", "site", "expert", "kept", "counted", "routed_tokens")}
                                 for r in stats["experts"]]
        return result

    # ---- grid ----------------------------------------------------------------------------------
    def grid_cells(self, shard: tuple[int, int] | None = None) -> list[tuple[str, float, str]]:
        """The grid's cells that belong to ``shard`` (default: this runner's shard)."""
        cells = [(DENSE, 1.0, task) for task in self.spec.tasks]
        cells += [(site, value, task) for site in self.spec.sites for value in self.spec.grid for task in self.spec.tasks]
        return [c for c in cells if in_shard(self.spec.key(*c), shard or self.shard)]

    def missing_cells(self) -> dict[int, int]:
        """Shard index -> number of grid cells not in the store yet (all shards)."""
        missing: dict[int, int] = {}
        for cell in self.grid_cells(shard=(0, 1)):
            key = self.spec.key(*cell)
            if not self.store.has(key):
                index = next(i for i in range(self.shard[1]) if in_shard(key, (i, self.shard[1])))
                missing[index] = missing.get(index, 0) + 1
        return missing

    def run_grid(self) -> None:
        cells = self.grid_cells()
        todo = [c for c in cells if not self.store.has(self.spec.key(*c))]
        if len(todo) < len(cells) and self.verbose:
            print(f"resuming: {len(cells) - len(todo)} of {len(cells)} cells already in {self.store.root}")
        for site, value, task in tqdm(todo, desc="cells", unit="cell", disable=not self.verbose):
            self.cell(site, value, task)


def perplexity(items: list[dict]) -> float:
    """Word perplexity of a perplexity-task cell from its per-document log-likelihoods and word counts."""
    return float(np.exp(-sum(i["loglikelihood"] for i in items) / sum(i["words"] for i in items)))


def measured_sparsity(result: dict, site: str) -> float:
    """Element-weighted measured sparsity of a site in a cell (all_inputs pools its two sites)."""
    summary = result["sparsity"].get(site)
    if summary is None:
        raise KeyError(f"cell has no sparsity statistics for site {site!r}")
    return float(summary["element_weighted"])
