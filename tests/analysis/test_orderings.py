"""Sites compared at the same measured sparsity: the per-item answer KL by hand, interpolation on
evaluated points, identical sites undecided, a clearly worse site decided in either order."""

import math

import numpy as np
import pytest

from common.analysis.orderings import choice_kl_items, compare_models, compare_sites, site_curve
from common.analysis.report import tidy_table
from common.evaluation.store import ResultStore
from common.evaluation.sweep import DENSE, SweepRunner, SweepSpec

TASKS = ["bb_general_knowledge", "bb_social_iqa", "fables_ppl"]
GRID = [1.0, 0.9, 0.8, 0.7, 0.6]
ITEMS = 400


class SiteCurveRunner(SweepRunner):
    """Cells from known curves per site: at rule value v, measured sparsity 1 - v; the first
    ``keep[site][v]`` share of the dense-correct items stay correct; every item's answer
    log-likelihoods drift by ``drift[site][v]`` (so the answer KL grows with it); perplexity
    documents lose ``drift`` nats each."""

    def __init__(self, spec, store, keep, drift):
        super().__init__(lm=None, spec=spec, store=store, task_manager=None, verbose=False)
        self.keep, self.drift = keep, drift

    def _evaluate(self, site, value, task, items=None):
        keep = 1.0 if site == DENSE else self.keep[site][value]
        drift = 0.0 if site == DENSE else self.drift[site][value]
        sparsity = {} if site == DENSE else {site: {"element_weighted": 1 - value, "mean_over_layers": 1 - value,
                                                          "per_layer": {"0": 1 - value}}}
        if task == "fables_ppl":
            docs = [{"doc_id": i, "loglikelihood": -50.0 - drift * (1 + i % 3), "words": 40} for i in range(ITEMS)]
            return {"metrics": {"word_perplexity": 1.0}, "items": docs, "seconds": 1.0, "sparsity": sparsity}
        metric = self.spec.metric_for(task)
        correct_dense = ITEMS // 2
        correct = round(correct_dense * keep)
        items = [{"doc_id": i, metric: float(i < correct), "gold": 0,
                  "choice_logliks": [-1.0 - drift * (i % 5), -2.0, -2.5]} for i in range(ITEMS)]
        return {"metrics": {metric: correct / ITEMS}, "items": items, "seconds": 1.0, "sparsity": sparsity}


def _study(tmp_path, keep, drift):
    spec = SweepSpec(model="synthetic", sites=list(keep), tasks=TASKS, grid=list(GRID), limit=ITEMS)
    runner = SiteCurveRunner(spec, ResultStore(tmp_path / "store"), keep, drift)
    runner.run_grid()
    return runner.store, spec, tidy_table(runner.store, spec, iterations=20)


def _curve(top):
    return {v: 1.0 - top * (1.0 - v) / 0.4 for v in GRID}  # 1 at v = 1, 1 - top at v = 0.6


def test_choice_kl_per_item_by_hand():
    dense = [{"choice_logliks": [-1.0, -2.0]}, {"choice_logliks": [0.0, 0.0, 0.0]}, {"loglikelihood": -3.0}]
    sparse = [{"choice_logliks": [-2.0, -1.0]}, {"choice_logliks": [0.0, 0.0, 0.0]}, {"loglikelihood": -4.0}]
    kl = choice_kl_items(sparse, dense)
    p = np.array([1, math.exp(-1)]) / (1 + math.exp(-1))
    assert kl[0] == pytest.approx(float((p * np.log(p / p[::-1])).sum()))
    assert kl[1] == 0.0 and math.isnan(kl[2])


def test_identical_sites_are_never_decided(tmp_path):
    keep = {"input": _curve(0.3), "intermediate": _curve(0.3)}
    drift = {site: {v: 1 - v for v in GRID} for site in keep}
    store, spec, frame = _study(tmp_path, keep, drift)
    rows = compare_sites(store, spec, frame, "input", "intermediate", iterations=200)
    assert {r["measure"] for r in rows} == {"accuracy", "choice_kl", "perplexity"}
    for r in rows:
        assert r["difference"] == 0.0 and r["interval"] == [0.0, 0.0] and not r["decided"] and r["better"] is None


def test_a_clearly_worse_site_loses_in_either_order(tmp_path):
    keep = {"input": _curve(0.4), "intermediate": _curve(0.05)}
    drift = {"input": {v: 3 * (1 - v) for v in GRID}, "intermediate": {v: 0.5 * (1 - v) for v in GRID}}
    store, spec, frame = _study(tmp_path, keep, drift)
    forward = compare_sites(store, spec, frame, "input", "intermediate", levels=(0.2, 0.3), iterations=200)
    backward = compare_sites(store, spec, frame, "intermediate", "input", levels=(0.2, 0.3), iterations=200)
    for a, b in zip(forward, backward):
        assert a["decided"] and b["decided"]
        assert a["better"] == b["better"] == "intermediate"
        assert a["difference"] == pytest.approx(-b["difference"])
    accuracy = [r for r in forward if r["measure"] == "accuracy"]
    # normalized accuracy at sparsity 0.2: 1 - 0.4 * 0.2 / 0.4 = 0.8 against 1 - 0.05 * 0.5 = 0.975
    assert accuracy[0]["a"] == pytest.approx(0.8, abs=0.01) and accuracy[0]["b"] == pytest.approx(0.975, abs=0.01)


def test_curves_interpolate_through_evaluated_points_and_skip_levels_outside(tmp_path):
    keep = {"input": _curve(0.4), "intermediate": _curve(0.2)}
    drift = {site: {v: 1 - v for v in GRID} for site in keep}
    store, spec, frame = _study(tmp_path, keep, drift)
    sparsity, curves = site_curve(store, spec, frame, "input", "accuracy", iterations=50)
    assert sorted(np.round(sparsity, 6)) == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    at = dict(zip(np.round(sparsity, 6), curves[0]))
    assert at[0.3] == pytest.approx(round(200 * keep["input"][0.7]) / 200)
    assert curves.shape == (51, 5)
    rows = compare_sites(store, spec, frame, "input", "intermediate", levels=(0.3, 0.45), iterations=50)
    assert {r["level"] for r in rows} == {0.3}  # 0.45 lies beyond both curves' last point (0.4)


def test_report_tables_print_the_orderings_and_search_against_grid(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from common.analysis.report import write_report

    keep = {"input": _curve(0.4), "intermediate": _curve(0.05)}
    drift = {"input": {v: 3 * (1 - v) for v in GRID}, "intermediate": {v: 0.5 * (1 - v) for v in GRID}}
    store, spec, _ = _study(tmp_path, keep, drift)
    summary = write_report(store, spec, store.root, iterations=50)
    rows = [r for r in summary["orderings"] if r["measure"] == "choice_kl"]
    assert rows and all(r["better"] == "intermediate" for r in rows)
    iso = summary["critical"][0]["task_average_curve"]["isotonic"]
    ppl = next(v for k, v in summary["critical"][0].items() if k.startswith("ppl_"))["isotonic"]
    search = {"site": "input", "crossing": iso["crossing"] + 0.01, "interval": iso["interval"], "values_evaluated": 3,
              "band": [0.1, None], "ppl": {"fables_ppl": {**ppl, "values_evaluated": 4}}}
    (tmp_path / "search.json").write_text(json.dumps([search]))
    script = Path(__file__).resolve().parents[2] / "scripts" / "report_tables.py"
    tables = subprocess.run([sys.executable, str(script), str(store.root)], capture_output=True, text=True, check=True)
    assert "| input vs intermediate | choice_kl |" in tables.stdout and "→ intermediate" in tables.stdout
    band = iso["band"]  # the band interval beside the bootstrap one, as critical.json holds it
    assert band[0] <= band[1] and f"| [{band[0]:.3f}, {band[1]:.3f}] |" in tables.stdout
    ppl_band = ppl["band"]  # the perplexity criterion's band: its ratio's resampled deviation
    assert ppl_band[0] <= ppl["crossing"] <= ppl_band[1]
    assert f"band [{ppl_band[0]:.3f}, {ppl_band[1]:.3f}] |" in tables.stdout
    assert f"(the first {ITEMS} items of each task)" in tables.stdout
    every = json.loads((store.root / "critical.json").read_text())
    every["spec"]["limit"] = None  # --limit 0: every item (the key stores no limit)
    (store.root / "critical.json").write_text(json.dumps(every))
    tables = subprocess.run([sys.executable, str(script), str(store.root)], capture_output=True, text=True, check=True)
    assert "(every item of each task)" in tables.stdout and "limit None" not in tables.stdout
    versus = subprocess.run([sys.executable, str(script), "--search-vs-grid", str(tmp_path), str(store.root)],
                            capture_output=True, text=True, check=True)
    line = next(l for l in versus.stdout.splitlines() if l.startswith("| input |"))
    assert "+0.010 | 0.100 | yes |" in line and f"| {len(GRID)} / 3 |" in line and line.rstrip().endswith("| 4 |")
    assert "Within one grid step of the grid: 1 of 1 sites." in versus.stdout
    assert ", band [0.100, open) |" in line  # an open band (stored as null) beside the search's interval
    for args, message in (([], "name finished result folders"), ([str(tmp_path / "none")], "not one: "),
                          (["--search-vs-grid", str(store.root)], "--search-vs-grid needs a search folder"),
                          (["--search-vs-grid", str(store.root), str(tmp_path)], "with search.json")):
        refused = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
        assert refused.returncode == 1 and message in refused.stderr and "Traceback" not in refused.stderr


def _model_study(tmp_path, name, keep, drift):
    spec = SweepSpec(model=name, sites=list(keep), tasks=TASKS, grid=list(GRID), limit=ITEMS)
    runner = SiteCurveRunner(spec, ResultStore(tmp_path / name), keep, drift)
    runner.run_grid()
    return runner.store, spec, tidy_table(runner.store, spec, iterations=20)


def test_two_models_are_compared_site_by_site_on_paired_items(tmp_path, monkeypatch):
    small = _model_study(tmp_path, "small", {"intermediate": _curve(0.4)}, {"intermediate": {v: 3 * (1 - v) for v in GRID}})
    large = _model_study(tmp_path, "large", {"intermediate": _curve(0.05)}, {"intermediate": {v: 0.5 * (1 - v) for v in GRID}})
    rows = compare_models(small, large, levels=(0.2, 0.3), iterations=200)
    assert {r["measure"] for r in rows} == {"accuracy", "choice_kl", "perplexity"} and len(rows) == 6
    for r in rows:
        assert r["models"] == ["small", "large"] and r["site"] == "intermediate"
        assert r["decided"] and r["better"] == "large"
    accuracy = next(r for r in rows if r["measure"] == "accuracy" and r["level"] == 0.2)
    assert accuracy["a"] == pytest.approx(0.8, abs=0.01) and accuracy["b"] == pytest.approx(0.975, abs=0.01)
    # the same curves under another name: paired resamples give an interval of exactly 0 (unpaired would not)
    twin = _model_study(tmp_path, "twin", {"intermediate": _curve(0.4)}, {"intermediate": {v: 3 * (1 - v) for v in GRID}})
    for r in compare_models(small, twin, levels=(0.2, 0.3), iterations=200):
        assert r["difference"] == 0.0 and r["interval"] == [0.0, 0.0] and not r["decided"]
    monkeypatch.setitem(globals(), "ITEMS", ITEMS // 2)  # the runner scores this many items
    fewer = _model_study(tmp_path, "fewer", {"intermediate": _curve(0.4)}, {"intermediate": {v: 0.0 for v in GRID}})
    with pytest.raises(ValueError, match="different items"):
        compare_models(small, fewer)


def test_report_tables_compare_two_model_folders(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from common.analysis.report import write_report

    folders = []
    for name, top, drift in (("small", 0.4, 3.0), ("large", 0.05, 0.5)):
        store, spec, _ = _model_study(tmp_path, name, {"intermediate": _curve(top)},
                                      {"intermediate": {v: drift * (1 - v) for v in GRID}})
        write_report(store, spec, store.root, iterations=50)
        folders.append(str(store.root))
    script = Path(__file__).resolve().parents[2] / "scripts" / "report_tables.py"
    run = subprocess.run([sys.executable, str(script), "--models", *folders], capture_output=True, text=True, check=True)
    lines = run.stdout.splitlines()
    critical = next(line for line in lines if line.startswith("| intermediate |") and "[" in line and "→" not in line)
    assert "large sparser" in critical  # accuracy: 0.05 lost at 0.4 against 0.4 lost; PPL likewise
    kl = next(line for line in lines if line.startswith("| intermediate | choice_kl |"))
    assert kl.count("→ large") == 4  # every level from 0.1 to 0.4 (0.5 lies beyond both curves)
    bad = subprocess.run([sys.executable, str(script), "--models", folders[0]], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error: --models needs two finished sweep folders")
