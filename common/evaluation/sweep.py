"""Dense sweeps through lm-eval: one store cell per (model, site, rule, power, value, task).

The dense baseline is one cell per task (site "dense"), evaluated once and reused. Every cell
keeps lm-eval's metrics, per-item scores and answer log-likelihoods (for paired bootstrap
intervals and the continuous fidelity measures) and the measured sparsity per layer. Cells are
written atomically, so an interrupted sweep resumes where it stopped and ``--shard K/N``
processes can share one store. ``search_site`` finds a site's critical point by bisection on
the rule value instead of the full grid.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm

from common.analysis.critical import PAPER_DENSE_GRID, critical_sparsity
from common.core.sites import expand_sites
from common.evaluation.store import ResultStore, in_shard
from common.evaluation.tasks import PERPLEXITY_TASKS, primary_metric

DENSE = "dense"


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

    def key(self, site: str, value: float, task: str) -> dict:
        dense = site == DENSE
        return {"model": self.model, "site": site, "rule": "none" if dense else self.rule,
                "power": 1.0 if dense else float(self.power), "value": 1.0 if dense else round(float(value), 6),
                "task": task, "limit": self.limit, "layers": None if dense else self.layers}

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
    def grid_cells(self) -> list[tuple[str, float, str]]:
        cells = [(DENSE, 1.0, task) for task in self.spec.tasks]
        cells += [(site, value, task) for site in self.spec.sites for value in self.spec.grid for task in self.spec.tasks]
        return [c for c in cells if in_shard(self.spec.key(*c), self.shard)]

    def run_grid(self) -> None:
        cells = self.grid_cells()
        todo = [c for c in cells if not self.store.has(self.spec.key(*c))]
        if len(todo) < len(cells) and self.verbose:
            print(f"resuming: {len(cells) - len(todo)} of {len(cells)} cells already in {self.store.root}")
        for site, value, task in tqdm(todo, desc="cells", unit="cell", disable=not self.verbose):
            self.cell(site, value, task)

    # ---- search --------------------------------------------------------------------------------
    def scoring_tasks(self) -> list[str]:
        return [t for t in self.spec.tasks if t not in PERPLEXITY_TASKS]

    def mean_normalized(self, site: str, value: float) -> tuple[float, float]:
        """(mean measured sparsity, mean normalized score) over the scoring tasks at one value.

        Tasks whose dense score is 0 have no normalized score and are left out (as in the
        task-average curve of the tables); if every task is, the search cannot run.
        """
        sparsities, normalized = [], []
        for task in self.spec.tasks:
            result = self.cell(site, value, task)
            if task in PERPLEXITY_TASKS:
                continue
            metric = self.spec.metric_for(task)
            dense = self.cell(DENSE, 1.0, task)["metrics"][metric]
            if dense:
                normalized.append(result["metrics"][metric] / dense)
                sparsities.append(measured_sparsity(result, site))
        if not normalized:
            raise ValueError(f"the dense model scores 0 on every scoring task ({', '.join(self.scoring_tasks())}), so "
                             "normalized scores are undefined; use more items (--limit) or other tasks")
        return float(np.mean(sparsities)), float(np.mean(normalized))

    def perplexity_ratio(self, site: str, value: float, task: str) -> tuple[float, float]:
        """(measured sparsity, dense perplexity / sparse perplexity) of a perplexity task at one value."""
        result = self.cell(site, value, task)
        dense = self.cell(DENSE, 1.0, task)
        return measured_sparsity(result, site), perplexity(dense["items"]) / perplexity(result["items"])

    def run_search(self, threshold: float = 0.99, resolution: float = 0.01, ppl_percent: float = 1.0) -> list[dict]:
        """Bisect every site of this shard (sites are split across shards, cells are not).

        Afterwards the spec's grid is the set of values the searches evaluated, so the tidy
        table, the per-task critical sparsity and the figures use exactly the measured points.
        """
        sites = [site for index, site in enumerate(self.spec.sites) if index % self.shard[1] == self.shard[0]]
        searches = [self.search_site(site, threshold, resolution, ppl_percent) for site in sites]
        values = {point["value"] for search in searches
                  for part in [search, *search["ppl"].values()] for point in part["points"]}
        self.spec.grid = sorted(values, reverse=True)
        return searches

    def search_site(self, site: str, threshold: float = 0.99, resolution: float = 0.01,
                    ppl_percent: float = 1.0) -> dict:
        """Bisection on the rule value for the lowest value (highest sparsity) keeping >= threshold
        of the task-average normalized score; then, per perplexity task, a second bisection for
        the PPL-p% criterion (reusing the perplexity cells the first one evaluated).

        Assumes the score falls roughly monotonically as the value drops; reports the number of
        new evaluations and the bracketing points.
        """
        before = self.evaluations
        out = {"site": site, **self._bisect(site, lambda v: self.mean_normalized(site, v), threshold, resolution,
                                            "search"), "resolution": resolution, "ppl": {}}
        searched = [point["value"] for point in out["points"]]  # their perplexity cells exist already
        for task in [t for t in self.spec.tasks if t in PERPLEXITY_TASKS]:
            out["ppl"][task] = self._bisect(site, lambda v: self.perplexity_ratio(site, v, task),
                                            1.0 / (1.0 + ppl_percent / 100.0), resolution, f"PPL-{ppl_percent:g}%",
                                            known=searched)
        out["cells_evaluated"] = self.evaluations - before
        return out

    def _bisect(self, site: str, evaluate, threshold: float, resolution: float, label: str, known=()) -> dict:
        """Bracket [lo, hi] of rule values around the threshold crossing of ``evaluate(value)``,
        which returns (measured sparsity, normalized score); 1.0 is dense. ``known`` values are
        evaluated first (cheap when their cells exist) and count in the critical sparsity."""
        points = {}
        # at most: the known values, both ends, then one value per halving of the bracket
        most = len(known) + 2 + max(0, math.ceil(math.log2(1.0 / max(resolution, 1e-6))))
        progress = tqdm(total=most, desc=f"{label} {site}", unit="value", disable=not self.verbose)

        def f(value):
            value = round(value, 6)
            if value not in points:
                points[value] = evaluate(value)
                progress.update(1)
                progress.set_postfix(p=value, normalized=f"{points[value][1]:.3f}")
            return points[value]

        for value in known:
            f(value)
        hi, lo = 1.0, 0.0
        if f(hi)[1] < threshold:
            status = "never_reached"
        elif f(lo)[1] >= threshold:
            status = "all_above"
        else:
            status = "crossed"
            while hi - lo > resolution + 1e-12:
                mid = (hi + lo) / 2
                if f(mid)[1] >= threshold:
                    hi = mid
                else:
                    lo = mid
        progress.close()
        values = sorted(points)
        curve = [points[v] for v in values]
        result = critical_sparsity([c[0] for c in curve], [c[1] for c in curve], threshold, values)
        return {"critical": result.as_dict(), "status": status, "bracket": [lo, hi], "values_evaluated": len(values),
                "points": [{"value": v, "sparsity": points[v][0], "normalized": points[v][1]} for v in values]}


def perplexity(items: list[dict]) -> float:
    """Word perplexity of a perplexity-task cell from its per-document log-likelihoods and word counts."""
    return float(np.exp(-sum(i["loglikelihood"] for i in items) / sum(i["words"] for i in items)))


def measured_sparsity(result: dict, site: str) -> float:
    """Element-weighted measured sparsity of a site in a cell (all_inputs pools its two sites)."""
    summary = result["sparsity"].get(site)
    if summary is None:
        raise KeyError(f"cell has no sparsity statistics for site {site!r}")
    return float(summary["element_weighted"])
