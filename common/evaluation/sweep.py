"""Dense sweeps through lm-eval: one store cell per (model, site, rule, power, value, task).

A criterion other than the magnitude score (``common.core.criteria``) adds its score to the key,
and one that reads calibration text adds the corpus; the rule field holds the criterion's
selection (``threshold`` for a calibrated one, whose value is the target sparsity). Keys of the
magnitude score are the keys they always were, so existing stores stay valid.

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

from common.core.criteria import SELECTIONS, Criterion
from common.core.sites import expand_sites
from common.evaluation.progress import CellClock, duration
from common.evaluation.store import ResultStore, in_shard
from common.evaluation.tasks import PERPLEXITY_TASKS, primary_metric

DENSE = "dense"
PAPER_DENSE_GRID = [1.0, 0.995, 0.99, 0.985, 0.98, 0.975, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91, 0.90, 0.85,
                    0.80, 0.75, 0.70, 0.65, 0.60, 0.50, 0.40, 0.30, 0.20, 0.10, 0.0]  # rule values (top-p p)
PAPER_MOE_GRID = [1.0, 0.99, 0.98, 0.97, 0.95, 0.92, 0.90, 0.75, 0.50]
ESTIMATE_AFTER = {2, 5, 10, 20, 40, 80, 160, 320, 640, 1280}  # cells after which a run prints its estimate again


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
    # Early stop of the grid (None: the full grid): a site's remaining (lower) values are skipped once
    # its task-average normalized score has stayed below ``stop_below`` for ``stop_after`` values in a
    # row. Not part of the key: a skipped cell is simply never evaluated.
    stop_below: float | None = None
    stop_after: int = 2
    # The criterion's score (common.core.criteria.SCORES; ``rule`` is its selection) and, for a
    # criterion that reads calibration text, the corpus (common.evaluation.calibration.corpus_id).
    score: str = "magnitude"
    calibration: str | None = None

    def criterion(self) -> Criterion:
        return Criterion(self.score, self.rule)

    @property
    def criterion_name(self) -> str:
        return self.criterion().name

    def key(self, site: str, value: float, task: str, items: tuple[int, int] | None = None) -> dict:
        """A cell's key; ``items`` = (start, stop): the cell holds exactly those items of the task
        (item-planned sweeps, whose cells ignore ``limit``), else the first ``limit`` items. The
        score and the calibration corpus join the key only where they are not the default."""
        dense = site == DENSE
        key = {"model": self.model, "site": site, "rule": "none" if dense else self.rule,
               "power": 1.0 if dense else float(self.power), "value": 1.0 if dense else round(float(value), 6),
               "task": task, "limit": None if items else self.limit, "layers": None if dense else self.layers,
               "dtype": self.dtype, "device_type": self.device_type}
        if items is not None:
            key["items"] = [int(items[0]), int(items[1])]
        if not dense and self.score != "magnitude":
            key["score"] = self.score
        if not dense and self.calibration is not None:
            key["calibration"] = self.calibration
        return key

    def matches(self) -> dict:
        """The key fields shared by every cell of this sweep (to select them in a store; a field
        that is None also matches keys without it)."""
        return {"model": self.model, "rule": self.rule, "power": float(self.power), "limit": self.limit,
                "dtype": self.dtype, "device_type": self.device_type,
                "score": None if self.score == "magnitude" else self.score, "calibration": self.calibration}

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


def grid_values(spec: SweepSpec) -> list[float]:
    """The grid's values, densest first (the highest for top-p and top-k, the lowest for max-p
    and calibrated thresholds): the order the early stop walks them in."""
    return sorted(set(spec.grid), reverse=SELECTIONS[spec.rule].denser == "higher")


def task_average(store: ResultStore, spec: SweepSpec, site: str, value: float) -> float | None:
    """Task-average normalized score (mean over scoring tasks of sparse / dense primary metric) of
    one grid value from the store; None while a cell it needs is missing. Tasks whose dense score
    is 0 are left out, as in the report."""
    ratios = []
    for task in spec.tasks:
        if task in PERPLEXITY_TASKS:
            continue
        dense, sparse = store.get(spec.key(DENSE, 1.0, task)), store.get(spec.key(site, value, task))
        if dense is None or sparse is None:
            return None
        metric = spec.metric_for(task)
        if dense["metrics"][metric]:
            ratios.append(sparse["metrics"][metric] / dense["metrics"][metric])
    return float(np.mean(ratios)) if ratios else None


def stop_point(values: list[float], average, stop_below: float, stop_after: int) -> dict | None:
    """The early-stop rule on a curve walked densest value first: where the task-average normalized
    score (``average(value)``, None while unknown) has stayed below ``stop_below`` for ``stop_after``
    values in a row; None while it has not (or a value it needs is unknown)."""
    below = []
    for position, value in enumerate(values):
        score = average(value)
        if score is None:
            return None
        below = below + [(value, score)] if score < stop_below else []
        if len(below) >= stop_after:
            return {"last_value": value, "skipped_values": values[position + 1:],
                    "below": [{"value": v, "task_average": a} for v, a in below],
                    "rule": f"task-average normalized score below {stop_below:g} for {stop_after} grid values in a row"}
    return None


def early_stop(store: ResultStore, spec: SweepSpec, site: str) -> dict | None:
    """Where the early stop ends ``site``'s grid, read from the store: the last value evaluated, the
    values skipped and the scores that stopped it; None while it has not stopped (or is off)."""
    if spec.stop_below is None:
        return None
    return stop_point(grid_values(spec), lambda value: task_average(store, spec, site, value), spec.stop_below,
                      spec.stop_after)


class SweepRunner:
    """Evaluates cells through a ``SparseHFLM`` and stores them."""

    def __init__(self, lm, spec: SweepSpec, store: ResultStore, task_manager, shard: tuple[int, int] = (0, 1),
                 verbose: bool = True, patience: float | None = None, poll: float = 5.0, calibrate=None):
        self.lm, self.spec, self.store, self.task_manager, self.shard = lm, spec, store, task_manager, shard
        self.verbose = verbose
        # ``calibrate(site, value)``: the Calibration a cell of the spec's criterion needs (None: the
        # magnitude rule, which needs none); see common.evaluation.calibration.Calibrator
        self.calibrate = calibrate
        if calibrate is None and spec.criterion().needs:
            raise ValueError(f"criterion {spec.criterion_name} needs calibration; pass calibrate= (a "
                             "common.evaluation.calibration.Calibrator)")
        self.evaluations = 0
        # how long a shard ahead of the others waits for a new cell from them before going on alone
        # (None: twice its longest cell so far, at least a minute); ``poll``: how often it looks
        self.patience, self.poll = patience, poll
        self._longest_cell, self._others_quiet_at = 0.0, None
        self.clock = CellClock()  # seconds of the cells this runner evaluated, by task
        self.expected: list[str] = []  # the task of every cell this run expects to evaluate (for its estimate)
        self._at_most = False  # a search may stop before it has evaluated every expected cell
        for site in spec.sites:
            expand_sites(site)

    # ---- one cell -----------------------------------------------------------------------------
    def cell(self, site: str, value: float, task: str, items: tuple[int, int] | None = None) -> dict:
        """The cell's result, evaluating it only if the store does not have it yet; ``items`` =
        (start, stop) scores exactly those items of the task (see ``SweepSpec.key``)."""
        key = self.spec.key(site, value, task, items)
        result = self.store.get(key)
        if result is None:
            start = time.monotonic()
            result = self._evaluate(site, value, task, items)
            self._longest_cell = max(self._longest_cell, time.monotonic() - start)
            self.store.put(key, result)
            self.evaluations += 1
            self.clock.add(task, time.monotonic() - start)
            if task in self.expected:
                self.expected.remove(task)
            if self.verbose and self.evaluations in ESTIMATE_AFTER:
                tqdm.write(f"{self.evaluations} cells evaluated; {self.estimate_line()}")
        return result

    def expect(self, tasks: list[str], at_most: bool = False) -> None:
        """Announce the cells this run will evaluate (one task name per cell) and keep them for the
        estimate, refreshed as cells finish."""
        self.expected, self._at_most = list(tasks), at_most
        if self.verbose:
            print(f"{'at most ' if at_most else ''}{len(tasks)} cells to evaluate in this process; the wall-time "
                  "estimate follows its first cells")

    def estimate_line(self) -> str:
        """'about 12 min left for 40 cells' from the mean time of the finished cells of each task."""
        return (f"about {duration(self.clock.estimate(self.expected))} left for "
                f"{'at most ' if getattr(self, '_at_most', False) else ''}{len(self.expected)} cells "
                f"(from {self.clock.cells} cells: " + ", ".join(
                    f"{task} {sum(t) / len(t):.0f} s" for task, t in self.clock.seconds.items()) + " per cell)")

    def _evaluate(self, site: str, value: float, task: str, items: tuple[int, int] | None = None) -> dict:
        calibration = None
        if site == DENSE:
            self.lm.set_sparsification(None)
        elif self.spec.criterion().is_rule:
            self.lm.set_sparsification(site, self.spec.rule, value, self.spec.power, self.spec.layers)
        else:
            calibration = self.calibrate(site, value) if self.calibrate is not None else None
            self.lm.set_sparsification(site, self.spec.rule, value, self.spec.power, self.spec.layers,
                                       criterion=self.spec.criterion(), calibration=calibration)
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        start = time.perf_counter()
        chosen = {"samples": {task: list(range(*items))}} if items else {"limit": self.spec.limit}
        output = evaluate_task(self.lm, task, self.task_manager, **chosen)
        seconds = time.perf_counter() - start
        metrics = {name.split(",")[0]: value for name, value in output["results"][task].items()
                   if isinstance(value, (int, float)) and "stderr" not in name}
        stats = self.lm.sparsity_statistics()
        result = {"metrics": metrics, "items": _items_from_samples(output["samples"][task], task),
                  "sparsity": stats["summary"], "seconds": seconds}
        if calibration is not None:  # the thresholds and modes it read, and where they came from
            result["calibration"] = calibration.summary()
            if hasattr(self.calibrate, "provenance"):
                result["calibration"]["provenance"] = self.calibrate.provenance(site)
        if "experts" in stats:  # MoE: per (layer, site, expert) counts
            result["experts"] = [{k: r[k] for k in ("layer", "site", "expert", "kept", "counted", "routed_tokens")}
                                 for r in stats["experts"]]
        return result

    # ---- grid ----------------------------------------------------------------------------------
    def planned_values(self, site: str) -> list[float]:
        """The grid values of ``site`` the sweep evaluates (all of them, or up to the early stop)."""
        stop = early_stop(self.store, self.spec, site)
        values = grid_values(self.spec)
        return values if stop is None else values[:values.index(stop["last_value"]) + 1]

    def grid_cells(self, shard: tuple[int, int] | None = None) -> list[tuple[str, float, str]]:
        """The grid's cells that belong to ``shard`` (default: this runner's shard), without those the
        early stop skipped."""
        cells = [(DENSE, 1.0, task) for task in self.spec.tasks]
        cells += [(site, value, task) for site in self.spec.sites for value in self.planned_values(site)
                  for task in self.spec.tasks]
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
        """Evaluate this shard's grid cells, densest value first per site.

        With the early stop, a site ends once the store (this shard's and other shards' cells)
        shows the stop condition. A shard does not run more than ``spec.stop_after`` values ahead
        of the values every shard has finished for a site (so a faster shard does not sweep a
        site's grid past the stop before the slower one has shown it): it turns to another site,
        and when no site may advance it waits while the other shards keep adding cells, going on
        alone only once none has come for ``patience`` seconds (they are done, stopped or never
        started).
        """
        def mine(cells):
            return [c for c in cells if in_shard(self.spec.key(*c), self.shard)]

        values = grid_values(self.spec)
        dense = mine([(DENSE, 1.0, task) for task in self.spec.tasks])
        todo = {site: [mine([(site, value, task) for task in self.spec.tasks]) for value in values]
                for site in self.spec.sites}
        planned = self.grid_cells()
        done = sum(self.store.has(self.spec.key(*c)) for c in planned)
        if done and self.verbose:
            print(f"resuming: {done} of {len(planned)} cells already in {self.store.root}")
        self.expect([cell[2] for cell in planned if not self.store.has(self.spec.key(*cell))])
        total = len(dense) + sum(len(cells) for per_value in todo.values() for cells in per_value)
        with tqdm(total=total, desc="cells", unit="cell", disable=not self.verbose) as progress:
            def advance():
                progress.update()
                if self.clock.cells:
                    progress.set_postfix_str(f"about {duration(self.clock.estimate(self.expected))} left")

            for cell in dense:
                self.cell(*cell)
                advance()
            position = {site: 0 for site in self.spec.sites}
            while True:
                open_sites = []
                for site in self.spec.sites:
                    if position[site] < len(values) and early_stop(self.store, self.spec, site) is not None:
                        skipped = [cell for cells in todo[site][position[site]:] for cell in cells]
                        progress.total -= len(skipped)
                        for cell in skipped:  # not evaluated after all: out of the estimate
                            if cell[2] in self.expected and not self.store.has(self.spec.key(*cell)):
                                self.expected.remove(cell[2])
                        progress.refresh()
                        position[site] = len(values)
                    if position[site] < len(values):
                        open_sites.append(site)
                if not open_sites:
                    return
                ready = [site for site in open_sites if self._finished_values(site) >= position[site] - self.spec.stop_after]
                if not ready and self._others_added_cells():
                    continue  # look again: a value may be finished, or a site stopped
                site = (ready or open_sites)[0]
                for cell in todo[site][position[site]]:
                    self.cell(*cell)
                    advance()
                position[site] += 1

    def _others_added_cells(self) -> bool:
        """Wait for another shard's next cell: True once the store holds a new one, False after
        ``patience`` seconds without one. Once a wait ran out, later ones are skipped until the
        other shards add a cell again (a shard started alone does not wait at every step)."""
        if self.shard[1] == 1:
            return False
        before = self.store.count()
        if before - self.evaluations == self._others_quiet_at:
            return False
        patience = self.patience if self.patience is not None else max(60.0, 2 * self._longest_cell)
        deadline = time.monotonic() + patience
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(self.poll, left))
            if self.store.count() != before:
                return True
        self._others_quiet_at = before - self.evaluations  # the cells not evaluated by this shard
        return False

    def _finished_values(self, site: str) -> int:
        """How many of the site's grid values, densest first, have every task's cell in the store
        (all shards); with the early stop off, the ahead-limit does not apply."""
        if self.spec.stop_below is None:
            return len(self.spec.grid)
        count = 0
        for value in grid_values(self.spec):
            if not all(self.store.has(self.spec.key(site, value, task)) for task in self.spec.tasks):
                break
            count += 1
        return count


def evaluate_task(lm, task: str, task_manager, limit: int | None = None, samples: dict | None = None) -> dict:
    """One task through ``lm_eval.evaluator.evaluate`` with the seeds, few-shot defaults and
    per-item samples of ``lm_eval.simple_evaluate``, without its environment report: that runs
    torch's ``collect_env`` (subprocesses) on every call, 0.2-0.5 s per cell on this CPU and most
    of a small cell's fixed cost, and the store records its own provenance."""
    import random

    import torch
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED
    from lm_eval.evaluator import evaluate

    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)
    torch.manual_seed(DEFAULT_OTHER_SEED)
    loaded = task_manager.load([task])
    for task_obj in loaded["tasks"].values():
        if task_obj.get_config("num_fewshot") is None:
            task_obj.set_config(key="num_fewshot", value=0)
        task_obj.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    return evaluate(lm=lm, task_dict=loaded, limit=limit, samples=samples, bootstrap_iters=0, log_samples=True,
                    verbosity="ERROR")


def perplexity(items: list[dict]) -> float:
    """Word perplexity of a perplexity-task cell from its per-document log-likelihoods and word counts."""
    return float(np.exp(-sum(i["loglikelihood"] for i in items) / sum(i["words"] for i in items)))


def measured_sparsity(result: dict, site: str) -> float:
    """Element-weighted measured sparsity of a site in a cell (all_inputs pools its two sites)."""
    summary = result["sparsity"].get(site)
    if summary is None:
        raise KeyError(f"cell has no sparsity statistics for site {site!r}")
    return float(summary["element_weighted"])
