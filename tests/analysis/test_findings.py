"""The findings page on small hand-made summary files: every finding reads its committed files, a
missing one reads "not measured yet" with its command, a new folder is picked up as soon as its
files exist, the same files give the same bytes, and ``report models --json`` writes what the page
reads."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from common.analysis import findings
from common.analysis.findings import render, write_page
from common.evaluation.store import ResultStore
from common.evaluation.sweep import DENSE, SweepRunner, SweepSpec

REPO = Path(__file__).resolve().parents[2]
SITES = ["input", "intermediate"]
LEVELS = [0.1, 0.2, 0.3]
GRID = [1.0, 0.95, 0.9, 0.8, 0.7]


def write_grid(results: Path, model: str, ppl: dict[str, float], accuracy: dict[str, float]) -> Path:
    """A dense grid's critical.json and tidy.csv: two sites, two tasks and the fables; intermediate
    has the lower answer KL at every level (decided), accuracy decides nothing."""
    folder = results / "dense_sweep" / model / findings.GRID_VARIANT
    folder.mkdir(parents=True)
    entries = []
    for site in SITES:
        a, p = accuracy[site], ppl[site]
        entries.append({"site": site, "task_average_curve": {
            "grid": a, "interpolated": a, "status": "crossed", "grid_value": 0.9,
            "isotonic": {"crossing": a, "status": "crossed", "interval": [a - 0.1, a + 0.2], "band": [0.0, a + 0.3]}},
            "mcnemar": {"value": 0.9, "pooled": {"dense_only_correct": 7, "sparse_only_correct": 5, "p_value": 0.77}},
            "ppl_1pct_fables_ppl": {"grid": p, "interpolated": p, "status": "crossed",
                                    "isotonic": {"crossing": p, "status": "crossed", "interval": [p - 0.02, p + 0.03],
                                                 "band": [p - 0.04, None]}}})
    orderings = [{"sites": SITES, "measure": "choice_kl", "level": level, "a": 0.2 * level, "b": 0.05 * level,
                  "difference": 0.15 * level, "interval": [0.1 * level, 0.2 * level], "decided": True,
                  "better": "intermediate"} for level in LEVELS]
    orderings += [{"sites": SITES, "measure": "accuracy", "level": level, "a": 0.99, "b": 0.98, "difference": 0.01,
                   "interval": [-0.02, 0.04], "decided": False, "better": None} for level in LEVELS]
    spec = {"model": model, "sites": SITES, "tasks": ["bb_a", "bb_b", "fables_ppl"], "grid": GRID, "limit": None,
            "dtype": "bfloat16"}
    (folder / "critical.json").write_text(json.dumps({"spec": spec, "threshold": 0.99, "critical": entries,
                                                      "orderings": orderings, "provenance": {"threads": 1}}))
    rows = []
    for site in SITES:
        for k, value in enumerate(GRID):
            for task in ("bb_a", "bb_b", "fables_ppl"):
                rows.append({"model": model, "task": task, "site": site, "value": value,
                             "measured_sparsity": 0.1 * k, "normalized": [1.0, 0.995, 0.985, 0.97, 0.9][k],
                             "seconds": 2.0 + k, "dense_seconds": 2.0, "items": 20})
    pd.DataFrame(rows).to_csv(folder / "tidy.csv", index=False)
    return folder


def write_llada(results: Path) -> None:
    folder = results / findings.LLADA
    folder.mkdir(parents=True)
    rows = []
    for computation, positions, base in (("per_token", "generated", 0.9), ("paper_compat", "flat_all", 0.95)):
        for step in range(4):
            for layer in range(2):
                rows.append({"computation": computation, "step": step, "layer": layer, "site": "intermediate",
                             f"consecutive_jaccard_{positions}": base + 0.01 * layer,
                             f"drift_jaccard_{positions}": base - 0.1 * step - 0.02 * layer})
    pd.DataFrame(rows).to_csv(folder / "computations.csv", index=False)
    head = {"per_token": {"mean_consecutive_jaccard_generated": 0.905, "final_drift_jaccard_generated": 0.59,
                          "sparsity_per_site": {"intermediate": {"element_weighted": 0.48}}},
            "paper_compat": {"mean_consecutive_jaccard_flat_all": 0.955, "final_drift_jaccard_flat_all": 0.64,
                             "sparsity_per_site": {"intermediate": {"element_weighted": 0.51}}}}
    (folder / "summary.json").write_text(json.dumps({
        "study": {"site": "intermediate", "value": 0.9, "steps": 4, "dtype": "float32"}, "prompts": 2,
        "computations": head, "mask_reuse": [{"reuse": 1, "generated_tokens_changed": 0.25,
                                              "kl_recomputed_vs_reused": 0.003}]}))


def write_moe(results: Path) -> None:
    folder = results / findings.MOE
    folder.mkdir(parents=True)
    layers = [{"layer": k, "min": 0.40, "mean": 0.45, "max": 0.50 + 0.1 * k, "std": 0.02, "experts_routed": 4,
               "experts_unrouted": 0} for k in range(3)]
    (folder / "experts.json").write_text(json.dumps({"sites": {"intermediate": {
        "critical_value": 0.9, "critical_sparsity": {"grid": 0.47, "isotonic": {"crossing": 0.5, "interval": [0.3, 0.6]}},
        "per_layer_pooled": layers, "inter_task_std_of_layer_mean": 0.0034}}}))
    (folder / "critical.json").write_text(json.dumps({"spec": {"model": "moefied", "dtype": "bfloat16", "limit": 30}}))


def write_benchmarks(results: Path) -> None:
    for name, summary in (
            (findings.SHARED_CONTEXT, {"setup": {"model": "m", "dtype": "float32", "threads": 1}, "rows": [
                {"site": "dense", "path": "per-request", "wall_seconds": [4.0, 4.2, 4.4]},
                {"site": "dense", "path": "shared", "wall_seconds": [2.0, 2.0, 2.0]}]}),
            (findings.EVAL_OVERHEAD, {"setup": {"model": "m", "dtype": "float32", "threads": 1, "kernel": "fused"},
                                      "rows": [{"site": "intermediate", "dense_seconds": [10.0, 10.0, 10.0],
                                                "sparse_seconds": [11.0, 11.5, 12.0]}]}),
            (findings.DECODE.format(model="smollm2-135m"), {"setup": {"model": "m", "device": "cpu", "cpu": "a CPU"}, "rows": [
                {"scope": scope, "dtype": "float32", "threads": 1, "kind": kind, "target_sparsity": target,
                 "entry_sparsity": target, "step_torch": {"median_ms": 100.0, "p25_ms": 98.0, "p75_ms": 103.0},
                 "step_sparse": {"median_ms": 100.0 / speedup, "p25_ms": 95.0 / speedup, "p75_ms": 104.0 / speedup},
                 "step_speedup_vs_torch": speedup, "step_ideal_speedup": 1.2, "scope_speedup_vs_torch": speedup + 0.1,
                 "scope_ideal_speedup": 1.5, "scope_share_vs_torch": share, "busy_rounds": 0}
                for scope, kind, target, speedup, share in (("input", "range", 0.3, 1.02, 0.2),
                                                            ("input", "critical", 0.45, 1.08, 0.4),
                                                            ("intermediate", "critical", 0.66, 0.97, None))]})):
        (results / name).mkdir(parents=True)
        (results / name / "summary.json").write_text(json.dumps(summary))


def write_criteria(results: Path, model: str) -> None:
    """A criteria comparison as ``report criteria --json`` writes it: at the intermediate site wina
    has the lower answer KL at every level (decided), teal is never decided; both cost a little more."""
    folder = results / "dense_sweep" / model / findings.CRITERIA_VARIANT
    folder.mkdir(parents=True)
    rows = [{"criteria": [name, "magnitude"], "site": "intermediate", "measure": "choice_kl", "level": level,
             "a": 0.1, "b": 0.1 - difference, "difference": difference, "decided": decided,
             "interval": [difference - 0.01, difference + 0.01] if decided else [-0.02, 0.02],
             "better": ("wina" if difference < 0 else "magnitude") if decided else None}
            for level in (0.3, 0.5, 0.7)
            for name, difference, decided in (("wina", -0.05, True), ("teal", 0.004, False))]
    critical = [{"site": "intermediate", "criterion": name,
                 "accuracy": None if name != "teal" else {"crossing": 0.3, "interval": [0.2, 0.35]},
                 "ppl": {"crossing": crossing, "interval": [crossing - 0.05, crossing + 0.05]}}
                for name, crossing in (("magnitude", 0.35), ("wina", 0.42), ("teal", 0.33))]
    cost = [{"criterion": name, "site": "intermediate", "cells": 5, "median_seconds": 3.0, "sparse_over_dense": 1.1,
             "over_baseline": ratio} for name, ratio in (("magnitude", 1.0), ("wina", 1.04), ("teal", 1.02))]
    rivals = [{"criteria": ["wina", "teal"], "site": "intermediate", "measure": "accuracy", "level": level,
               "difference": difference, "interval": interval, "decided": interval[0] > 0,
               "better": "wina" if interval[0] > 0 else None}
              for level, difference, interval in ((0.3, 0.01, [-0.01, 0.03]), (0.5, 0.04, [0.01, 0.07]))]
    (folder / "comparison.json").write_text(json.dumps({"baseline": "magnitude", "comparisons": rows, "rivals": rivals,
                                                        "critical": critical, "cost": cost}))
    (folder / "critical.json").write_text(json.dumps({"threshold": 0.99}))
    timing = results / findings.CRITERIA_COST.format(model=model)
    timing.mkdir(parents=True)
    (timing / "summary.json").write_text(json.dumps({
        "setup": {"task": "bb_social_iqa", "limit": 100, "value": 0.9, "target": 0.5, "repeats": 3,
                  "dtype": "float32", "threads": 1, "load_average_at_start": [0.2, 0.3, 0.3]},
        "rows": [{"site": "intermediate", "dense_seconds": [9.0] * 3, "sparse_seconds": [10.0] * 3,
                  "criteria_seconds": {"wina": [10.4, 10.3, 10.6], "teal": [9.0, 9.5, 9.2]}}]}))


def test_every_finding_without_data_names_its_command(tmp_path):
    page = render(tmp_path)
    assert page.figures == {} and len(page.text.splitlines()) <= 300
    assert page.text.count("Not measured yet: run") == 6  # the cost section names each of its three parts
    for command in ("python experiments/dense_sweep.py --model smollm2-135m", "--model gemma3-270m",
                    findings.COMMANDS["llada"], findings.COMMANDS["moe"],
                    findings.COMMANDS["decode"].format(model="smollm2-135m", sparsities="0.3 0.5 0.7 0.9",
                                                     threads="1 2"),
                    findings.COMMANDS["shared_context"], findings.COMMANDS["eval_overhead"]):
        assert command in page.text, command


def test_the_findings_read_the_committed_files(tmp_path):
    write_grid(tmp_path, "smollm2-135m", ppl={"input": 0.16, "intermediate": 0.35},
               accuracy={"input": 0.19, "intermediate": 0.09})
    write_llada(tmp_path)
    write_moe(tmp_path)
    write_benchmarks(tmp_path)
    write_criteria(tmp_path, "smollm2-135m")
    page = render(tmp_path)
    text = page.text
    assert "Not measured yet" not in text and len(text.splitlines()) <= 300
    assert ("**At equal measured sparsity, on smollm2-135m, the criterion that moves the answers least is wina at "
            "intermediate.**") in text
    assert ("| intermediate | wina | 0.420 [0.370, 0.470] | -0.050 [-0.060, -0.040] | -0.050 [-0.060, -0.040] | "
            "-0.050 [-0.060, -0.040] | 3 / 0 of 3 | 1.04x [1.03, 1.06] |") in text
    assert "| intermediate | magnitude | 0.350 [0.300, 0.400] |" in text and "| 1 (baseline) |" in text
    assert "| 0 / 0 of 3 | 0.92x [0.90, 0.95] |" in text
    assert "magnitude top-p at p = 0.9, alternated in one run (3 repeats" in text and "load 0.20 at the start" in text
    assert "--model smollm2-135m --protocol paper --sites input intermediate --criterion teal wina --targets" in text
    assert "results/criteria_cost/smollm2-135m/cpu" in text and findings.COMMANDS["criteria_cost"].format(
        model="smollm2-135m") in text
    assert "| intermediate | teal | 0.330 [0.280, 0.380] | +0.004 [-0.020, 0.020] |" in text and "| 0 / 0 of 3 |" in text
    assert ("| teal | 40-50% model-wide at small loss (TEAL) | smollm2-135m | intermediate 0.300 [0.200, 0.350]: "
            "does not hold |") in text
    assert ("| wina | up to +2.94 points over TEAL at equal sparsity (WINA) | smollm2-135m | intermediate +0.040 "
            "[0.010, 0.070] at 0.5, better / worse at 1 / 0 of 2: holds |") in text
    assert "| larosa |" not in text and "| cats |" not in text  # claims of criteria not swept get no row
    assert ("**By PPL-1% the sparsest FFN site is intermediate on smollm2-135m (0.350 [0.330, 0.380]); by answer KL "
            "the site that moves the answers least is intermediate on smollm2-135m (3 of 3 comparisons decided).**"
            ) in text
    assert "| input | 0.160 [0.140, 0.190] | [0.120, open) | +0.030 [0.020, 0.040] |" in text
    assert "gemma3-270m: not measured yet: run\n\n```bash\npython experiments/dense_sweep.py --model gemma3-270m" in text
    assert ("a site's 99%-accuracy crossing is known only to within 0.300 in sparsity (the widths of the 95% "
            "intervals); at equal sparsity accuracy decides 0 of 3 site comparisons, answer KL 3 of 3") in text
    assert "| intermediate | 0.090 [-0.010, 0.290] | [0.000, 0.390] | p = 0.9: 7 / 5, 0.77 |" in text
    assert "McNemar's test of sparse against dense correctness gives p = 0.77" in text
    assert ("the FFN masks overlap with Jaccard 0.905 per token (0.955 as the released code computes it); from the "
            "first step to the last, 0.590 (0.640)") in text
    assert "| per token | 0.480 | 0.905 [0.900, 0.910] | 0.590 [0.580, 0.600] |" in text  # ranges over layers
    assert "changes 25% of the generated tokens" in text
    assert "experts of one layer span 0.100 to 0.300 in sparsity (intermediate site)" in text and "0.0034" in text
    assert "dense 2.10x [2.00, 2.20]" in text and "intermediate 1.15x [1.10, 1.20]" in text
    assert ("In decode, on smollm2-135m (a CPU, float32, 1 thread(s)), the input site at its PPL-1% critical "
            "sparsity 0.45 makes a step 1.08x as fast "
            "(ideal 1.20x) and its own layers 1.18x (ideal 1.50x, 40% of the ideal saving against torch, - against the "
            "kernel at sparsity 0); the intermediate site at its PPL-1% critical sparsity 0.66 makes a step 0.97x") in text
    assert ("| input | float32, 1 | 0.450 | 100.0 [98.0, 103.0] | 92.6 [88.0, 96.3] | 1.08x | 1.20x | 1.18x | 1.50x | "
            "40% / - | - |") in text
    assert "| intermediate | float32, 1 | 0.660 |" in text and "| 0.97x | 1.20x | 1.07x | 1.50x | - / - | - |" in text
    assert "| input | float32, 1 | 0.300 |" not in text  # a range row is in the data, not on the page
    assert "--model smollm2-135m --dtypes float32 bfloat16 --threads 1 --sparsities 0.3 --rounds" in text  # as run
    assert set(page.figures) == {"dense_sites.png", "accuracy.png", "criteria.png", "llada_steps.png",
                                 "moe_experts.png", "sweep_cost.png", "decode.png"}
    for name in page.figures:
        assert f"](figures/{name})" in text


def test_a_second_model_and_its_comparison_are_picked_up(tmp_path):
    write_grid(tmp_path, "smollm2-135m", ppl={"input": 0.16, "intermediate": 0.35},
               accuracy={"input": 0.19, "intermediate": 0.09})
    write_grid(tmp_path, "gemma3-270m", ppl={"input": 0.22, "intermediate": 0.36},
               accuracy={"input": 0.29, "intermediate": 0.61})
    text = render(tmp_path).text
    assert "intermediate on smollm2-135m (0.350 [0.330, 0.380]) and intermediate on gemma3-270m" in text
    assert findings.COMMANDS["models"].format(a="smollm2-135m", b="gemma3-270m") in text
    name = "dense_sweep/smollm2-135m-vs-gemma3-270m/small-grid/comparison.json"
    (tmp_path / name).parent.mkdir(parents=True)
    curves = [{"site": "input", "measure": "choice_kl", "level": level, "difference": 0.01, "interval": [0.005, 0.02],
               "decided": level > 0.1, "better": "gemma3-270m" if level > 0.1 else None} for level in LEVELS]
    critical = [{"site": site, "accuracy": {"readings": [None, None], "verdict": None},
                 "ppl": {"readings": [None, None], "verdict": "undecided (intervals overlap)"}} for site in SITES]
    (tmp_path / name).write_text(json.dumps({"models": ["smollm2-135m", "gemma3-270m"], "curves": curves,
                                             "critical": critical}))
    text = render(tmp_path).text
    assert ("answer KL at the same measured sparsity is lower for smollm2-135m at 0 and for gemma3-270m at 2 of 3 "
            "(site, sparsity) comparisons") in text and "overlap on 2 of 2 sites" in text
    assert f"[`results/{name}`]({name})" in text


def test_each_model_s_decode_benchmark_gets_its_table_and_row_of_panels(tmp_path):
    write_benchmarks(tmp_path)
    smollm2 = json.loads((tmp_path / findings.DECODE.format(model="smollm2-135m") / "summary.json").read_text())
    gemma = tmp_path / findings.DECODE.format(model="gemma3-270m")
    gemma.mkdir(parents=True)
    rows = [dict(r, dtype=dtype, step_speedup_vs_torch=0.5 * r["step_speedup_vs_torch"])
            for r in smollm2["rows"] for dtype in ("float32", "bfloat16")]
    (gemma / "summary.json").write_text(json.dumps({"setup": {"model": "g", "device": "cpu", "cpu": "another CPU"},
                                                    "rows": rows}))
    page = render(tmp_path)
    text = page.text
    assert ("In decode, on smollm2-135m (a CPU, float32, 1 thread(s)), the input site at its PPL-1% critical sparsity "
            "0.45 makes a step 1.08x as fast") in text
    assert ("; on gemma3-270m (another CPU, float32, 1 thread(s)), the input site at its PPL-1% critical sparsity "
            "0.45 makes a step 0.54x as fast") in text
    assert "**smollm2-135m** on a CPU:" in text and "**gemma3-270m** on another CPU:" in text
    assert text.index("**smollm2-135m** on a CPU:") < text.index("**gemma3-270m** on another CPU:")
    assert "| input | bfloat16, 1 | 0.450 |" in text.split("**gemma3-270m**")[1]
    assert "results/sparse_decode/gemma3-270m/cpu" in text and "--model gemma3-270m --dtypes" in text
    page.figures["decode.png"](tmp_path / "decode.png")
    assert (tmp_path / "decode.png").stat().st_size > 10_000


def test_the_page_and_its_figures_are_the_same_bytes_from_the_same_files(tmp_path):
    results = tmp_path / "results"
    write_grid(results, "smollm2-135m", ppl={"input": 0.16, "intermediate": 0.35},
               accuracy={"input": 0.19, "intermediate": 0.09})
    write_llada(results)
    (results / "figures").mkdir()
    (results / "figures" / "stale.png").write_bytes(b"old")
    write_page(render(results), results)
    assert not (results / "figures" / "stale.png").exists()
    first = {p.name: p.read_bytes() for p in (results / "figures").iterdir()}
    assert set(first) == {"dense_sites.png", "accuracy.png", "llada_steps.png", "sweep_cost.png"}
    assert all(len(data) < 150_000 for data in first.values())
    write_page(render(results), tmp_path / "again")
    assert (tmp_path / "again" / "README.md").read_bytes() == (results / "README.md").read_bytes()
    assert {p.name: p.read_bytes() for p in (tmp_path / "again" / "figures").iterdir()} == first


def test_the_figures_do_not_depend_on_what_the_process_drew_before(tmp_path):
    """The page drawn by the command (a fresh process) and in a process where the sweep figures'
    seaborn theme is set (it redefines colour codes such as "k" process-wide) are the same bytes."""
    import common.analysis.figures  # noqa: F401  (sets the seaborn theme)

    results = tmp_path / "results"
    write_grid(results, "smollm2-135m", ppl={"input": 0.16, "intermediate": 0.35},
               accuracy={"input": 0.19, "intermediate": 0.09})
    write_benchmarks(results)
    write_criteria(results, "smollm2-135m")
    write_page(render(results), tmp_path / "here")
    run = _report("findings", "--results", str(results), "--output", str(tmp_path / "fresh"))
    assert run.returncode == 0, run.stderr
    here, fresh = ({p.name: p.read_bytes() for p in (tmp_path / d / "figures").iterdir()} for d in ("here", "fresh"))
    assert set(here) == {"dense_sites.png", "accuracy.png", "criteria.png", "sweep_cost.png", "decode.png"}
    assert here == fresh


def _report(*args):
    return subprocess.run([sys.executable, "-m", "common.cli.report", *args], capture_output=True, text=True,
                          cwd=REPO)


def test_findings_check_says_when_the_page_is_stale(tmp_path):
    write_llada(tmp_path)
    assert _report("findings", "--results", str(tmp_path)).returncode == 0
    assert _report("findings", "--results", str(tmp_path), "--check").returncode == 0
    drawn = next((tmp_path / "figures").glob("*.png"))
    current = drawn.read_bytes()
    drawn.write_bytes(current[:-1])  # the page's text is current, one of its figures is not
    figure = _report("findings", "--results", str(tmp_path), "--check")
    assert figure.returncode == 1 and drawn.name in figure.stderr and figure.stderr.count("\n") == 1
    drawn.write_bytes(current)
    write_moe(tmp_path)
    stale = _report("findings", "--results", str(tmp_path), "--check")
    assert stale.returncode == 1 and "run python -m common.cli.report findings" in stale.stderr
    missing = _report("findings", "--results", str(tmp_path / "none"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "is not a folder" in missing.stderr


class CurveRunner(SweepRunner):
    """Cells from a known curve: at rule value v, sparsity 1 - v, the first ``keep(v)`` of the
    dense-correct items stay correct and the answers' log-likelihoods drift by ``drift * (1 - v)``."""

    items = 200

    def __init__(self, spec, store, loss, drift):
        super().__init__(lm=None, spec=spec, store=store, task_manager=None, verbose=False)
        self.loss, self.drift = loss, drift

    def _evaluate(self, site, value, task, items=None):
        lost, drift = (0.0, 0.0) if site == DENSE else (self.loss * (1 - value), self.drift * (1 - value))
        sparsity = {} if site == DENSE else {site: {"element_weighted": 1 - value, "mean_over_layers": 1 - value,
                                                    "per_layer": {"0": 1 - value}}}
        if task == "fables_ppl":
            docs = [{"doc_id": i, "loglikelihood": -50.0 - 10 * drift * (1 + i % 3), "words": 40}
                    for i in range(self.items)]
            return {"metrics": {"word_perplexity": 1.0}, "items": docs, "seconds": 1.0, "sparsity": sparsity}
        metric = self.spec.metric_for(task)
        correct = round(self.items // 2 * (1 - lost))
        items = [{"doc_id": i, metric: float(i < correct), "gold": 0,
                  "choice_logliks": [-1.0 - drift * (i % 5), -2.0, -2.5]} for i in range(self.items)]
        return {"metrics": {metric: correct / self.items}, "items": items, "seconds": 1.0, "sparsity": sparsity}


def test_report_models_writes_the_comparison_the_page_reads(tmp_path):
    from common.analysis.report import write_report

    folders = []
    for model, loss, drift in (("small", 0.5, 3.0), ("large", 0.05, 0.5)):
        spec = SweepSpec(model=model, sites=["intermediate"], tasks=["bb_social_iqa", "fables_ppl"],
                         grid=[1.0, 0.9, 0.8, 0.7, 0.6], limit=CurveRunner.items)
        runner = CurveRunner(spec, ResultStore(tmp_path / model), loss, drift)
        runner.run_grid()
        write_report(runner.store, spec, runner.store.root, iterations=50)
        folders.append(str(runner.store.root))
    target = tmp_path / "small-vs-large.json"
    run = _report("models", *folders, "--json", str(target))
    assert run.returncode == 0, run.stderr
    comparison = json.loads(target.read_text())
    assert comparison["models"] == ["small", "large"] and comparison["critical"][0]["site"] == "intermediate"
    kl = [r for r in comparison["curves"] if r["measure"] == "choice_kl"]
    assert kl and all(r["decided"] and r["better"] == "large" for r in kl)
    assert "| intermediate | choice_kl |" in run.stdout and f"written: {target}" in run.stdout
    mixed = _report("criteria", *folders, "--figure", str(tmp_path / "kl"))
    assert mixed.returncode == 2 and mixed.stderr.count("\n") == 1 and "--figure draws one model" in mixed.stderr
    assert not (tmp_path / "kl.png").exists()


@pytest.mark.parametrize("args, message", [(["leave-out", "4"], "leave-out needs how many grid values"),
                                           (["tables"], "tables: name finished result folders"),
                                           (["flips"], "flips needs a finished sweep folder"),
                                           (["nope"], "invalid choice")])
def test_bad_readings_are_one_line(args, message):
    bad = _report(*args)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and message in bad.stderr
