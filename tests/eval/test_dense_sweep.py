"""lm-eval bridge, sweep store and resume, critical sparsity, and the dense_sweep script."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.analysis.critical import band_bounds, bootstrap_critical, critical_sparsity, paired_bootstrap_ratio
from common.evaluation.bridge import SparseHFLM
from common.evaluation.store import ResultStore, parse_shard
from common.evaluation.sweep import SweepRunner, SweepSpec, evaluate_task
from common.evaluation.tasks import task_manager
from outputs import assert_no_nan
from script_calls import run_script, run_scripts
from tiny_models import char_tokenizer, save_tiny_llama, tiny_model

REPO = Path(__file__).resolve().parents[2]
TASKS = ["bb_general_knowledge", "fables_ppl"]


@pytest.fixture(scope="module")
def manager():
    return task_manager()


def _evaluate(lm, manager, tasks=("bb_general_knowledge",), limit=12):
    import lm_eval

    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                   log_samples=True, bootstrap_iters=0, verbosity="ERROR")


def _logliks(output, task):
    return [[r[0] for r in s["filtered_resps"]] for s in sorted(output["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.parametrize("chosen", [{"limit": 5}, {"samples": [2, 3, 4, 5]}])
def test_evaluate_task_equals_simple_evaluate(manager, chosen):
    """The sweep's lm-eval call (no environment report) gives lm-eval's own results, item by item."""
    import lm_eval

    lm = SparseHFLM(pretrained=tiny_model("llama"), tokenizer=char_tokenizer(), batch_size=4, sites="intermediate",
                    value=0.8)
    for task in TASKS:
        selection = {"samples": {task: chosen["samples"]}} if "samples" in chosen else chosen
        ours = evaluate_task(lm, task, manager, **selection)
        reference = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, log_samples=True,
                                            bootstrap_iters=0, verbosity="ERROR", **selection)
        assert ours["results"][task] == reference["results"][task]
        responses = [[(s["doc_id"], s["filtered_resps"]) for s in output["samples"][task]] for output in (ours, reference)]
        assert responses[0] == responses[1] and len(responses[0]) == len(chosen.get("samples", range(5)))


def test_bridge_at_p_one_equals_plain_hflm(manager):
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = tiny_model("llama"), char_tokenizer()
    plain = _evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), manager)
    for shared in (False, True):
        sparse_lm = SparseHFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, sites="all_inputs", value=1.0,
                               shared_context=shared)
        sparse = _evaluate(sparse_lm, manager)
        ours, reference = _logliks(sparse, "bb_general_knowledge"), _logliks(plain, "bb_general_knowledge")
        if shared:  # other batch shapes: float32 rounding only
            assert [len(x) for x in ours] == [len(x) for x in reference]
            assert np.allclose(np.concatenate(ours), np.concatenate(reference), atol=1e-5, rtol=0)
        else:  # the same forwards as plain lm-eval: identical
            assert ours == reference
        assert sparse["results"]["bb_general_knowledge"]["acc,none"] == plain["results"]["bb_general_knowledge"]["acc,none"]
        assert set(sparse_lm.sparsity_statistics()["summary"]) == {"input", "intermediate", "all_inputs"}


def test_bridge_statistics_exclude_padding_and_the_batch_size_probe(manager):
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    counts = {}
    for batch_size in ("1", "6", "auto:1"):
        lm = SparseHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_batch_size=8,
                        sites="intermediate", value=0.7)
        _evaluate(lm, manager, tasks=TASKS, limit=6)
        rows = lm.recorder.rows()
        counts[batch_size] = {r["layer"]: (r["kept"], r["counted"]) for r in rows}
    width = model.config.intermediate_size
    for layer in counts["1"]:
        unpadded_kept, unpadded_counted = counts["1"][layer]
        assert unpadded_counted % width == 0
        for batch_size in ("6", "auto:1"):
            kept, counted = counts[batch_size][layer]
            assert counted == unpadded_counted  # padded positions and the probe are not counted
            assert abs(kept - unpadded_kept) <= 0.001 * unpadded_kept  # same tokens; float noise may flip ties


def test_bridge_writes_statistics_file(manager, tmp_path):
    lm = SparseHFLM(pretrained=tiny_model("llama"), tokenizer=char_tokenizer(), batch_size=4, sites="up+gate",
                    value=0.8, layers="1", stats_file=str(tmp_path / "stats.json"))
    _evaluate(lm, manager, limit=4)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["sites"] == ["up", "gate"] and stats["layers"] == [1]
    assert list(stats["summary"]["up"]["per_layer"]) == ["1"]


def test_bridge_rejects_bad_arguments():
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        SparseHFLM(pretrained=tiny_model("llama"), tokenizer=char_tokenizer(), sites="up", value=1.2)
    with pytest.raises(ValueError, match="unknown FFN site"):
        SparseHFLM(pretrained=tiny_model("llama"), tokenizer=char_tokenizer(), sites="mlp", value=0.5)


def test_sweep_resumes_without_redoing_cells_and_shards_partition(manager, tmp_path):
    lm = SparseHFLM(pretrained=tiny_model("llama"), tokenizer=char_tokenizer(), batch_size=4)
    spec = SweepSpec(model="tiny", sites=["intermediate"], tasks=TASKS, grid=[1.0, 0.7, 0.4], limit=3)
    store = ResultStore(tmp_path / "store")
    runner = SweepRunner(lm, spec, store, manager, verbose=False)
    real_evaluate = runner._evaluate
    calls = []

    def dying(*cell):
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed in the middle of the fourth cell
        calls.append(cell)
        return real_evaluate(*cell)

    runner._evaluate = dying
    with pytest.raises(KeyboardInterrupt):
        runner.run_grid()
    finished = sorted(p.name for p in store.cells.glob("*.json"))
    assert len(finished) == 3
    stamps = {p.name: p.stat().st_mtime_ns for p in store.cells.glob("*.json")}
    restarted = SweepRunner(lm, spec, store, manager, verbose=False)
    redone = []
    restarted._evaluate = lambda *cell: redone.append(cell) or real_evaluate(*cell)
    restarted.run_grid()
    assert len(redone) == 2 + 2 * 3 - 3  # 8 cells in all, 3 were finished
    assert not set(redone) & set(calls)
    assert all(p.stat().st_mtime_ns == stamps[p.name] for p in store.cells.glob("*.json") if p.name in stamps)
    shards = [SweepRunner(lm, spec, store, manager, shard=(k, 3), verbose=False).grid_cells() for k in range(3)]
    assert sorted(c for s in shards for c in s) == sorted(restarted.grid_cells())
    assert sum(len(s) for s in shards) == len(restarted.grid_cells())


def _check_stop(found: dict, width: float, budget: int) -> None:
    """The reason a search gives for stopping is borne out by its own numbers."""
    values = [p["value"] for p in found["points"]]
    reasons = {
        "converged": lambda: (found["interval"][1] - found["interval"][0] <= width
                              and found["bracket"][1] - found["bracket"][0] <= width
                              and (found.get("band") is None or (found["band"][1] is not None
                                                                 and found["band"][1] - found["band"][0] <= width))),
        "budget": lambda: found["new_values"] == budget,
        "all_above": lambda: found["status"] == "all_above" and 0.0 in values,
        "never_reached": lambda: found["status"] == "never_reached" and 1.0 in values,
        "no_room": lambda: found["status"] == "crossed" and found["new_values"] < budget,
    }
    assert found["stopped"] in reasons and reasons[found["stopped"]](), found
    assert found["new_values"] <= budget


def test_search_evaluates_few_values_and_the_report_reads_them_the_same_way(manager, tmp_path):
    from common.analysis.critical import isotonic_crossing
    from common.analysis.report import write_report
    from common.analysis.search import run_search, searched_values

    lm = SparseHFLM(pretrained=tiny_model("llama"), tokenizer=char_tokenizer(), batch_size=4)
    spec = SweepSpec(model="tiny", sites=["intermediate"], tasks=["bb_general_knowledge", "fables_ppl"], limit=4)
    grid = list(spec.grid)
    runner = SweepRunner(lm, spec, ResultStore(tmp_path), manager, verbose=False)
    [result] = run_search(runner, threshold=0.99, width=0.25, budget=4, ppl_percent=1.0, iterations=50)
    assert spec.grid == grid  # the search returns its values, the spec stays as it was
    accuracy_values = {p["value"] for p in result["points"]}
    ppl = result["ppl"]["fables_ppl"]
    ppl_values = {p["value"] for p in ppl["points"]}
    assert all(0 <= point["normalized"] < 10 for point in result["points"] + ppl["points"])  # defined (dense acc > 0)
    assert result["new_values"] == len(accuracy_values) <= 4 and accuracy_values <= ppl_values
    assert ppl["new_values"] == len(ppl_values - accuracy_values)
    # every accuracy value costs both tasks, a perplexity-only value one cell, dense one cell per task
    assert result["cells_evaluated"] == 2 * len(accuracy_values) + len(ppl_values - accuracy_values) + 2
    for found in (result, ppl):
        _check_stop(found, 0.25, 4)
        crossing, status = isotonic_crossing([p["sparsity"] for p in found["points"]],
                                             [p["normalized"] for p in found["points"]], found["threshold"])
        assert (found["crossing"], found["status"]) == (pytest.approx(crossing), status)
    assert searched_values([result]) == {"intermediate": {"scoring": sorted(accuracy_values, reverse=True),
                                                          "perplexity": sorted(ppl_values, reverse=True)}}
    # the report of the searched values reads them the same way: same crossings, same bootstrap intervals
    summary = write_report(runner.store, spec, tmp_path / "report", iterations=50,
                           values=searched_values([result]))
    [entry] = summary["critical"]
    assert entry["tasks"]["bb_general_knowledge"]["points"] == len(accuracy_values)
    isotonic = entry["task_average_curve"]["isotonic"]
    assert isotonic["crossing"] == pytest.approx(result["crossing"])
    assert isotonic["interval"] == pytest.approx(result["interval"])
    ppl_entry = entry["ppl_1pct_fables_ppl"]
    assert ppl_entry["interpolated"] == pytest.approx(ppl["critical"]["interpolated"])
    assert ppl_entry["isotonic"]["crossing"] == pytest.approx(ppl["crossing"])
    assert ppl_entry["isotonic"]["interval"] == pytest.approx(ppl["interval"])
    # and the same bands: the search's from its own fit, the report's from its own resamples
    assert isotonic["band"] == pytest.approx(result["band"])
    assert ppl_entry["isotonic"]["band"] == pytest.approx(ppl["band"])
    # McNemar at the grid reading's value, counted a second way from the stored items
    mcnemar = entry["mcnemar"]
    assert mcnemar["value"] == entry["task_average_curve"]["grid_value"]
    cell = runner.store.get(spec.key("intermediate", mcnemar["value"], "bb_general_knowledge"))
    sparse = [i["acc"] for i in cell["items"]]
    dense = [i["acc"] for i in runner.store.get(spec.key("dense", 1.0, "bb_general_knowledge"))["items"]]
    assert mcnemar["pooled"]["dense_only_correct"] == sum(d == 1 and s == 0 for s, d in zip(sparse, dense))
    assert mcnemar["pooled"]["sparse_only_correct"] == sum(d == 0 and s == 1 for s, d in zip(sparse, dense))
    # a report without values reads the spec's grid only: here the one value 1.0 of the search's values
    one = SweepSpec(model="tiny", sites=["intermediate"], tasks=spec.tasks, grid=[1.0], limit=4)
    [grid_entry] = write_report(runner.store, one, tmp_path / "grid_report", iterations=20)["critical"]
    assert 1.0 in accuracy_values and grid_entry["tasks"]["bb_general_knowledge"]["points"] == 1


def test_critical_sparsity_on_hand_made_curves():
    crossed = critical_sparsity([0.0, 0.2, 0.4, 0.6], [1.0, 0.995, 0.98, 0.9], values=[1.0, 0.9, 0.8, 0.7])
    assert crossed.status == "crossed" and crossed.grid == 0.2 and crossed.grid_value == 0.9
    assert crossed.interpolated == pytest.approx(0.2 + 0.2 * (0.995 - 0.99) / (0.995 - 0.98))
    never = critical_sparsity([0.1, 0.3], [0.95, 0.9])
    assert (never.status, never.grid, never.interpolated) == ("never_reached", 0.0, 0.0)
    above = critical_sparsity([0.1, 0.3], [1.0, 0.999])
    assert (above.status, above.grid, above.interpolated) == ("all_above", 0.3, 0.3)
    # non-monotone: a dip below 99% and a noisy recovery; the highest passing point counts
    bumpy = critical_sparsity([0.0, 0.1, 0.2, 0.3, 0.4], [1.0, 0.98, 1.0, 0.97, 0.9])
    assert bumpy.grid == 0.2 and 0.2 < bumpy.interpolated < 0.3
    unsorted = critical_sparsity([0.4, 0.0, 0.2], [0.9, 1.0, 0.995])
    assert unsorted.grid == 0.2


def test_paired_bootstrap_is_paired():
    dense = np.array([1, 0] * 50, dtype=float)
    assert paired_bootstrap_ratio(dense, dense) == (1.0, 1.0)  # identical items: no spread at all
    worse = dense.copy()
    worse[:10] = 0
    low, high = paired_bootstrap_ratio(worse, dense)
    assert low < 0.9 < high < 1.0
    scores = [dense, worse, np.zeros(100)]
    low, high = bootstrap_critical([0.0, 0.3, 0.6], scores, dense)
    assert 0.0 <= low <= high <= 0.6


def test_offline_task_configs_point_at_this_checkouts_data(tmp_path, monkeypatch):
    from common.evaluation import tasks

    monkeypatch.setenv("ACTIVATION_SPARSITY_CACHE", str(tmp_path))
    folder = tasks.offline_task_dir()
    text = (folder / "bb_social_iqa.yaml").read_text()
    assert json.dumps(str(tasks.DATA / "social_iqa.jsonl")) in text
    # another copy of the data (a second checkout) gets its own folder in the same cache
    monkeypatch.setattr(tasks, "DATA", tmp_path / "other_checkout" / "task_data")
    other = tasks.offline_task_dir()
    assert other != folder and other.parent == folder.parent
    assert (folder / "bb_social_iqa.yaml").read_text() == text


def test_parse_shard():
    assert parse_shard("2/4") == (1, 4) and parse_shard(None) == (0, 1)
    with pytest.raises(ValueError, match="K/N"):
        parse_shard("5/4")


def _run(*args, env=None):
    return run_script("dense_sweep.py", *args, env=env)


def test_dense_sweep_script_end_to_end_and_resume(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "tiny")
    out = tmp_path / "out"
    args = ["--model", str(model_dir), "--sites", "intermediate", "input", "--grid", "1.0", "0.5", "--limit", "4",
            "--tasks", "bb_general_knowledge", "fables_ppl", "--dtype", "float32", "--output", str(out),
            "--bootstrap", "50", "--effective-rank"]
    first = _run(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "critical sparsity (task-average curve)" in first.stdout
    summary = json.loads((out / "critical.json").read_text())
    assert {c["site"] for c in summary["critical"]} == {"intermediate", "input"}
    assert summary["spec"]["dtype"] == "float32" and summary["provenance"]["dtype"] == "float32"
    assert summary["provenance"]["libraries"]["lm_eval"] and len(summary["store_commits"]) == 1
    cell = json.loads(next((out / "cells").glob("*.json")).read_text())
    assert cell["key"]["dtype"] == "float32" and cell["provenance"]["libraries"]["torch"]
    assert (out / "tidy.csv").read_text().count("\n") == 1 + 2 * 2 * 2
    for figure in ("curve_average.png", "layer_sparsity_input.pdf", "critical_sparsity.png", "effective_rank.png",
                   "fidelity_choice_kl.png", "fidelity_gold_loglik.pdf"):
        assert (out / "figures" / figure).is_file(), figure
    assert_no_nan(out)
    second = _run(*args)
    assert second.returncode == 0 and "resuming: 10 of 10 cells" in second.stdout
    search_args = args[args.index("--limit"):]  # same limit, tasks, dtype, output; the search instead of the grid
    searched = _run("--model", str(model_dir), "--sites", "input", "--search", "--resolution", "0.5",
                    "--budget", "5", *search_args)
    assert searched.returncode == 0, searched.stderr[-2000:]
    [search] = json.loads((out / "search.json").read_text())
    for label, found in [("input: search", search), ("PPL-1% on fables_ppl", search["ppl"]["fables_ppl"])]:
        low, high = found["interval"]
        assert found["band"][0] <= found["crossing"]  # the band on the search's own points, printed after the interval
        assert (f"{label}: crossing={found['crossing']:.3f} [{low:.3f}, {high:.3f}] band {band_bounds(found['band'])} "
                f"({found['status']}), "
                f"stopped: {found['stopped']} after {found['values_evaluated']} values") in searched.stdout
        _check_stop(found, 0.5, 5)
    summary = json.loads((out / "critical.json").read_text())
    [entry] = summary["critical"]
    assert entry["task_average_curve"]["isotonic"]["crossing"] == pytest.approx(search["crossing"])
    assert "isotonic=" in searched.stdout and "McNemar p=" in searched.stdout
    # sites split over two shards: the first to finish waits, the second writes every site's search and report
    import shutil

    sharded = tmp_path / "sharded"
    shutil.copytree(out, sharded, ignore=shutil.ignore_patterns("search.json", "critical.json"))
    shard_args = ["--model", str(model_dir), "--sites", "intermediate", "input", "--search", "--resolution", "0.5",
                  "--budget", "5", *search_args[:search_args.index("--output")], "--output", str(sharded),
                  "--bootstrap", "50"]
    first_shard = _run(*shard_args, "--shard", "2/2")
    assert first_shard.returncode == 0, first_shard.stderr[-2000:]
    assert "the search of intermediate (other shards) is not finished yet" in first_shard.stdout
    assert not (sharded / "search.json").exists() and not (sharded / "critical.json").exists()
    second_shard = _run(*shard_args, "--shard", "1/2")
    assert second_shard.returncode == 0, second_shard.stderr[-2000:]
    both = json.loads((sharded / "search.json").read_text())
    assert [r["site"] for r in both] == ["intermediate", "input"]
    assert both[1]["crossing"] == pytest.approx(search["crossing"])  # the same search, its cells reused
    assert {c["site"] for c in json.loads((sharded / "critical.json").read_text())["critical"]} == {"intermediate",
                                                                                                   "input"}


def test_dense_sweep_script_bad_input(tmp_path):
    (tmp_path / "a-file").write_text("x")
    first = [(["--model", "no-such-alias"], "error: unknown model 'no-such-alias'"),
             (["--model", "smollm2-135m", "--tasks", "arc_easy"], "need the dataset hub but HF_DATASETS_OFFLINE=1"),
             (["--grid", "1.0", "1.3"], "outside [0, 1]")]
    search = [(["--search", *flags], "error: " + message)  # refused at once, before any model is loaded
              for flags, message in [(["--resolution", "-1"], "--resolution"), (["--resolution", "0"], "--resolution"),
                                     (["--resolution", "nan"], "--resolution"), (["--budget", "1"], "--budget"),
                                     (["--threshold", "1.5"], "--threshold"), (["--spread", "-0.5"], "--spread")]]
    settings = [(["--limit", "-1"], "expected 0 or more"), (["--batch-size", "abc"], "invalid --batch-size"),
                (["--dtype", "float8"], "unknown --dtype"), (["--power", "nan"], "expected a finite"),
                (["--output", str(tmp_path / "a-file")], "is a file"),
                (["--target-halfwidth", "0"], "--target-halfwidth is a half-width"),
                (["--target-halfwidth", "0.05", "--search"], "--target-halfwidth plans items"),
                (["--max-items", "0"], "expected 1 or more"),
                (["--stop-below", "0.995"], "--stop-below must be in"),
                (["--stop-below", "0.9", "--search"], "--stop-below ends a grid sweep"),
                (["--memory-fraction", "1.5"], "--memory-fraction must be in (0, 1]"),
                (["--memory-fraction", "0.5", "--device", "cpu"], "--memory-fraction limits GPU memory")] + (
        [] if torch.cuda.is_available() else [(["--device", "cuda"], "CUDA is not available")])
    cases = first + search + settings
    results = run_scripts([("dense_sweep.py", argv) for argv, _ in cases])
    for (argv, message), result in zip(cases, results):
        assert result.returncode == 2 and message in result.stderr, (argv, result.stderr[-1000:])
        assert "Traceback" not in result.stderr and "error" in result.stderr.strip().splitlines()[-1]
    for (argv, message), result in zip(first[:1] + search, results[:1] + results[len(first):]):
        assert result.stderr.strip().startswith(message) and len(result.stderr.strip().splitlines()) == 1, argv


def test_missing_cells_name_the_unfinished_shards(manager, tmp_path):
    lm = SparseHFLM(pretrained=tiny_model("llama"), tokenizer=char_tokenizer(), batch_size=4)
    spec = SweepSpec(model="tiny", sites=["intermediate"], tasks=TASKS[:1], grid=[1.0, 0.7, 0.4, 0.2], limit=2)
    store = ResultStore(tmp_path / "store")
    first = SweepRunner(lm, spec, store, manager, shard=(0, 2), verbose=False)
    first.run_grid()
    missing = first.missing_cells()
    others = SweepRunner(lm, spec, store, manager, shard=(1, 2), verbose=False).grid_cells()
    assert set(missing) == ({1} if others else set()) and sum(missing.values()) == len(others)
    SweepRunner(lm, spec, store, manager, shard=(1, 2), verbose=False).run_grid()
    assert first.missing_cells() == {}


def test_lm_eval_command_line_with_sparse_hf(tmp_path):
    import os

    model_dir = save_tiny_llama(tmp_path / "tiny")
    stats = tmp_path / "stats.json"
    result = subprocess.run(
        [sys.executable, "-m", "common.cli.lm_eval", "run", "--model", "sparse-hf", "--model_args",
         f"pretrained={model_dir},sites=input+intermediate,value=0.8,stats_file={stats}",
         "--tasks", "bb_general_knowledge", "--limit", "4", "--batch_size", "4"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bb_general_knowledge" in result.stdout
    summary = json.loads(stats.read_text())["summary"]
    assert 0 < summary["all_inputs"]["element_weighted"] < 1


def test_memory_safe_batch_sizes():
    from common.evaluation.bridge import memory_safe_batch

    gib = 1024 ** 3
    assert memory_safe_batch(16, 331, 262144, 24 * gib) == 4  # Gemma 3's vocabulary on this machine
    assert memory_safe_batch(16, 331, 49152, 24 * gib) == 16  # SmolLM2's: unchanged
    assert memory_safe_batch(16, 10 ** 6, 262144, 24 * gib) == 1  # never below one


def test_lm_eval_path_in_memory_safe_slices_gives_the_same_loglikelihoods(manager, monkeypatch):
    import common.evaluation.bridge as bridge

    model = tiny_model("llama")
    batches = []
    model.register_forward_pre_hook(lambda module, args, kwargs: batches.append(
        (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[0]), with_kwargs=True)
    outputs = {}
    for memory in (None, 1):
        if memory is not None:  # one row's logits exceed a quarter of "memory": batches of one
            monkeypatch.setattr(bridge, "device_memory", lambda device: memory)
        batches.clear()
        lm = SparseHFLM(pretrained=model, tokenizer=char_tokenizer(), batch_size=4, sites="intermediate", value=0.8)
        outputs[memory] = _evaluate(lm, manager, tasks=["fables_ppl"], limit=5)
        outputs[memory, "batches"] = max(batches)
    assert outputs[None, "batches"] > 1 and outputs[1, "batches"] == 1
    for a, b in zip(*(sorted(outputs[m]["samples"]["fables_ppl"], key=lambda s: s["doc_id"]) for m in (None, 1))):
        assert a["filtered_resps"][0] == pytest.approx(b["filtered_resps"][0], rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("shared_context", [True, False])
def test_running_out_of_device_memory_scores_again_at_fewer_rows(manager, shared_context):
    """A forward of more than 9 rows (one item's choices fit) fails halfway through the model with the
    error CUDA raises: the bridge forgets that pass's counts, halves its batch size and scores again.
    Log-likelihoods equal an unconstrained run's; so do the sparsity counts, which the failed passes
    would inflate. lm-eval's path batches requests (16 -> 8 rows); the shared path batches contexts,
    whose continuation pass holds all their choices, so it comes down to one context (two items'
    choices are more than 9 rows)."""
    model = tiny_model("llama")
    max_rows = {"value": None}

    def out_of_memory(module, args, kwargs):  # on the second layer: the first has counted already
        hidden = kwargs.get("hidden_states") if kwargs.get("hidden_states") is not None else args[0]
        if max_rows["value"] is not None and hidden.shape[0] > max_rows["value"]:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    model.model.layers[1].register_forward_pre_hook(out_of_memory, with_kwargs=True)
    outputs, statistics = {}, {}
    for rows in (None, 9):
        max_rows["value"] = rows
        lm = SparseHFLM(pretrained=model, tokenizer=char_tokenizer(), batch_size=16, sites="intermediate", value=0.8,
                        shared_context=shared_context)
        if rows is None:
            outputs[rows] = _evaluate(lm, manager, tasks=TASKS, limit=6)
        else:
            with pytest.warns(UserWarning, match="out of device memory at batch size 16"):
                outputs[rows] = _evaluate(lm, manager, tasks=TASKS, limit=6)
            assert lm._batch_cap == (1 if shared_context else 8)
        statistics[rows] = lm.sparsity_statistics()
    for task in TASKS:
        responses = [[np.ravel([r[0] if isinstance(r, (list, tuple)) else r for r in s["filtered_resps"]])
                      for s in sorted(outputs[rows]["samples"][task], key=lambda s: s["doc_id"])] for rows in (None, 9)]
        assert len(responses[0]) == len(responses[1]) == 6
        for a, b in zip(*responses):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-4)
    assert statistics[9] == statistics[None] and statistics[None]["summary"]


def test_out_of_memory_at_one_row_is_raised(manager):
    model = tiny_model("llama")
    model.model.layers[1].register_forward_pre_hook(
        lambda module, args: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory (simulated)")))
    lm = SparseHFLM(pretrained=model, tokenizer=char_tokenizer(), batch_size=4, sites="intermediate", value=0.8)
    with pytest.warns(UserWarning), pytest.raises(torch.OutOfMemoryError):
        _evaluate(lm, manager, limit=2)
    assert lm._batch_cap == 1
