"""The studies take the criteria end to end: the dense sweep with two criteria writes both readings and
the comparison (and the report command reads it), the LLaDA study's Jaccard of a calibrated
criterion's masks, and pairs that do not apply refused before any model loads."""

import json
import subprocess
import sys
from pathlib import Path

from common.analysis.palette import criterion_colors
from outputs import assert_no_nan
from script_calls import run_script, run_scripts
from tiny_models import save_tiny_llama

REPO = Path(__file__).resolve().parents[2]


def _run(script, *args, cache):
    return run_script(script, *args, env={"ACTIVATION_SPARSITY_CACHE": str(cache)})


def test_dense_sweep_with_two_criteria_writes_both_and_the_comparison(tmp_path, monkeypatch):
    model_dir = save_tiny_llama(tmp_path / "tiny")
    out = tmp_path / "out"
    args = ["--model", str(model_dir), "--sites", "intermediate", "input", "--criterion", "magnitude", "cats",
            "--grid", "1.0", "0.8", "0.5", "--targets", "0.0", "0.3", "0.6", "--limit", "4",
            "--tasks", "bb_general_knowledge", "fables_ppl", "--dtype", "float32", "--output", str(out),
            "--bootstrap", "50"]
    result = _run("dense_sweep.py", *args, cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "criterion cats runs at intermediate only (not at input" in result.stdout
    summary = json.loads((out / "critical.json").read_text())
    assert [(c["site"], c["criterion"]) for c in summary["critical"]] == [
        ("intermediate", "magnitude-topp"), ("input", "magnitude-topp"), ("intermediate", "cats")]
    assert [s["score"] for s in summary["criteria_specs"]] == ["gate"]
    criteria = summary["criteria"]
    assert criteria["baseline"] == "magnitude-topp"
    compared = {(row["site"], row["criteria"][0], row["measure"]) for row in criteria["comparisons"]}
    assert {("intermediate", "cats", measure) for measure in ("accuracy", "choice_kl", "perplexity")} <= compared
    assert all(row["criteria"] == ["cats", "magnitude-topp"] for row in criteria["comparisons"])
    assert {(c["site"], c["criterion"]) for c in criteria["critical"]} >= {("intermediate", "cats")}
    assert {(c["criterion"], c["site"]) for c in criteria["cost"]} == {
        ("cats", "intermediate"), ("magnitude-topp", "intermediate"), ("magnitude-topp", "input")}
    assert (out / "figures" / "criteria_choice_kl.png").is_file()
    assert "intermediate (cats): critical sparsity" in result.stdout and "PPL-1%" in result.stdout
    cells = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    calibrated = [c for c in cells if c["key"].get("score") == "gate"]
    assert len(calibrated) == 3 * 2 and all(c["key"]["rule"] == "threshold" and c["key"]["calibration"]
                                            for c in calibrated)
    assert all(c["result"]["calibration"]["provenance"]["intermediate"]["corpus"] == c["key"]["calibration"]
               for c in calibrated)
    rows = (out / "tidy.csv").read_text().splitlines()
    assert rows[0].split(",")[3] == "criterion" and len(rows) == 1 + (2 * 3 + 3) * 2
    assert_no_nan(out)
    report = subprocess.run([sys.executable, "-m", "common.cli.report", "criteria", str(out), "--json",
                             str(tmp_path / "criteria.json")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "| intermediate | cats |" in report.stdout and "| intermediate: cats | choice_kl |" in report.stdout
    assert json.loads((tmp_path / "criteria.json").read_text())["comparisons"]
    again = _run("dense_sweep.py", *args, cache=tmp_path / "cache")  # every cell reused, calibration not needed
    assert again.returncode == 0 and "resuming" in again.stdout

    # a folder without magnitude top-p takes its baseline from another folder, in the comparison and the figure
    alone = tmp_path / "cats-alone"
    cats = [a if a != str(out) else str(alone) for a in args]
    cats[cats.index("magnitude"):cats.index("magnitude") + 1] = []
    assert _run("dense_sweep.py", *cats, cache=tmp_path / "cache").returncode == 0
    from common.analysis.tables import criteria_comparison

    paired = [r for r in criteria_comparison([alone, out])["comparisons"] if r["folders"][0] == str(alone)]
    assert paired and all(r["criteria"] == ["cats", "magnitude-topp"] and r["folders"] == [str(alone), str(out)]
                          for r in paired)  # alone's cats against out's magnitude top-p (out's own cats: apart)
    drawn = _criteria_figure([alone, out], tmp_path / "kl", monkeypatch)
    colors = criterion_colors(["magnitude-topp", "cats"])
    assert drawn == {"intermediate": [("magnitude-topp", colors["magnitude-topp"]), ("cats", colors["cats"])],
                     "input": [("magnitude-topp", colors["magnitude-topp"])]}


def _criteria_figure(folders, path, monkeypatch):
    """Per panel (site): the (label, colour) of each line ``tables.criteria_figure`` draws."""
    from common.analysis import figures, tables

    drawn = {}

    def capture(fig, where):
        for ax in fig.axes:
            drawn[ax.get_title().split(", ")[-1]] = [(line.get_label(), tuple(line.get_color()[:3]))
                                                     for line in ax.get_lines()]
        return []

    monkeypatch.setattr(figures, "save_figure", capture)
    tables.criteria_figure(folders, path, iterations=20)
    return drawn


def test_pairs_that_do_not_apply_are_refused_before_any_model_loads(tmp_path):
    cases = [
        ("dense_sweep.py", ["--criterion", "cats", "--sites", "input"], "criterion cats does not apply at input"),
        ("dense_sweep.py", ["--criterion", "wnia"], "unknown criterion 'wnia'"),
        ("dense_sweep.py", ["--criterion", "teal", "--search"], "--search and --target-halfwidth choose"),
        ("dense_sweep.py", ["--criterion", "teal", "--targets", "1.0"], "--targets are target sparsities"),
        ("dense_sweep.py", ["--criterion", "teal", "teal"], "names teal more than once"),
        ("moe_experts.py", ["--criterion", "wina", "--sites", "input"], "does not apply to fused MoE experts"),
        ("llada_jaccard.py", ["--criterion", "cats", "--site", "input"], "criterion cats does not apply at input")]
    results = run_scripts([(script, ["--model", "no-such-model-is-loaded", *flags]) for script, flags, _ in cases],
                          env={"ACTIVATION_SPARSITY_CACHE": str(tmp_path / "cache")})
    for (script, flags, message), result in zip(cases, results):
        assert result.returncode == 2, (flags, result.stderr[-1000:])
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, (flags, result.stderr)


def test_llada_study_measures_the_jaccard_of_a_calibrated_criterions_masks(tmp_path):
    out = tmp_path / "llada"
    result = _run("llada_jaccard.py", "--criterion", "teal", "--value", "0.5", "--limit", "2", "--steps", "8",
                  "--gen-length", "16", "--block-length", "8", "--output", str(out), cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["study"]["rule"] == "threshold" and summary["study"]["calibration"].startswith("calibration-")
    assert summary["provenance"]["calibration"]["target"] == 0.5
    assert 0.3 < summary["sparsity_per_site"]["intermediate"]["element_weighted"] < 0.7
    assert 0 < summary["mean_consecutive_jaccard_generated"] <= 1
    assert "mask_reuse" not in summary  # reuse is for the magnitude masks only
