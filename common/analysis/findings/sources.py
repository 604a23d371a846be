"""What each finding reads and the command that writes it: the committed folders under ``results/``
(``results/<study>/<model>/<variant>/``) and their commands, shown on the page."""

from __future__ import annotations

import json
from pathlib import Path

GRID_VARIANT = "small-grid"  # every item of the offline suite, the paper grid with its early stop
CRITERIA_VARIANT = "criteria"  # every item of the offline suite, every criterion at input and intermediate
CRITERIA_ALL_INPUTS = "criteria-all-inputs"  # all_inputs, magnitude top-p in the same run (CATS does not apply;
# LaRoSA's rotation, at twice the cost, is left out there)
CRITERIA = "teal cats scap wina larosa"  # magnitude top-p, their baseline, is the grid's; a study may run fewer
DENSE_MODELS = ("smollm2-135m", "gemma3-270m")  # expected on the page; any other model's grid is picked up too
LLADA = "llada_jaccard/tiny-llada-chars/paper-compat"
MOE = "moe_experts/moefied-smollm2-135m/small-30"
SHARED_CONTEXT = "shared_context/smollm2-135m/cpu"
EVAL_OVERHEAD = "eval_overhead/smollm2-135m/cpu"
CRITERIA_COST = "criteria_cost/{model}/cpu"
DECODE = "sparse_decode/{model}/cpu"
DECODE_SETTINGS = {"sparsities": "0.3 0.5 0.7 0.9", "threads": "1 2"}  # what a new decode benchmark runs


def _two_shards(arguments: str, output: str) -> str:
    """A dense sweep as two ``--shard`` processes side by side, then ``wait``."""
    return "\n".join(f"python experiments/dense_sweep.py {arguments} --output results/{output} --shard {k}/2 &"
                     for k in (1, 2)) + "\nwait"


COMMANDS = {
    "dense": _two_shards("--model {model} --protocol paper --sites input intermediate --tasks small --limit 0 "
                         "--stop-below 0.9 --dtype bfloat16", f"dense_sweep/{{model}}/{GRID_VARIANT}"),
    "criteria": _two_shards("--model {model} --protocol paper --sites input intermediate --criterion {criteria} "
                            "--targets 0.1 0.2 0.3 0.5 0.7 --tasks small --limit 0 --dtype bfloat16",
                            f"dense_sweep/{{model}}/{CRITERIA_VARIANT}")
    + f"\npython -m common.cli.report criteria results/dense_sweep/{{model}}/{CRITERIA_VARIANT} "
      f"results/dense_sweep/{{model}}/{GRID_VARIANT} --json results/dense_sweep/{{model}}/{CRITERIA_VARIANT}/comparison.json",
    "criteria_all_inputs": _two_shards("--model {model} --protocol paper --sites all_inputs --criterion magnitude teal "
                                       "scap wina --grid 0.6 0.7 0.8 0.85 0.9 0.94 0.97 0.985 0.995 1 --targets 0.1 0.2 "
                                       "0.3 0.5 0.7 --tasks small --limit 0 --dtype bfloat16",
                                       f"dense_sweep/{{model}}/{CRITERIA_ALL_INPUTS}")
    + f"\npython -m common.cli.report criteria results/dense_sweep/{{model}}/{CRITERIA_ALL_INPUTS} --json "
      f"results/dense_sweep/{{model}}/{CRITERIA_ALL_INPUTS}/comparison.json",
    "models": ("python -m common.cli.report models results/dense_sweep/{a}/" + GRID_VARIANT
               + " results/dense_sweep/{b}/" + GRID_VARIANT + " --json results/dense_sweep/{a}-vs-{b}/" + GRID_VARIANT
               + "/comparison.json"),
    "llada": ("python experiments/llada_jaccard.py --paper-compat --dtype float32 --output results/" + LLADA),
    "moe": "python experiments/moe_experts.py --dtype bfloat16 --output results/" + MOE,
    "shared_context": ("python benchmarks/bench_shared_context.py --model smollm2-135m --limit 40 --dtype float32 "
                       "--threads 1 --repeats 3 --output results/" + SHARED_CONTEXT),
    "eval_overhead": ("python benchmarks/bench_eval_overhead.py --model smollm2-135m --limit 100 --dtype float32 "
                      "--threads 1 --repeats 3 --compare-torch-path --output results/" + EVAL_OVERHEAD),
    "criteria_cost": ("python benchmarks/bench_eval_overhead.py --model {model} --limit 100 --dtype float32 --threads 1 "
                      "--repeats 3 --criteria " + CRITERIA + " --target 0.5 --output results/" + CRITERIA_COST),
    "decode": ("python benchmarks/bench_sparse_decode.py --model {model} --dtypes float32 bfloat16 --threads {threads} "
               "--sparsities {sparsities} --rounds 10 "
               "--quality --summary results/dense_sweep/{model}/" + GRID_VARIANT + "/critical.json --output results/"
               + DECODE),
}


def expected_first(found: dict) -> dict:
    """``found`` (model -> anything) with the models the page expects first, then the others in
    their order."""
    return {model: found[model] for model in [m for m in DENSE_MODELS if m in found]
            + [m for m in found if m not in DENSE_MODELS]}


def dense_grids(results: Path) -> dict[str, Path]:
    """model -> its every-item grid folder, for the folders with a critical.json and a tidy.csv
    (the expected models first, then any other model's grid)."""
    found = {folder.parent.name: folder for folder in sorted((results / "dense_sweep").glob(f"*/{GRID_VARIANT}"))}
    return {model: folder for model, folder in expected_first(found).items()
            if (folder / "critical.json").is_file() and (folder / "tidy.csv").is_file()}


def decode_summaries(results: Path) -> dict[str, dict]:
    """model -> its decode benchmark's summary.json (``DECODE``), the expected models first."""
    found = {path.relative_to(results).parts[1]: json.loads(path.read_text())
             for path in sorted(results.glob(DECODE.format(model="*") + "/summary.json"))}
    return expected_first(found)


def criteria_comparisons(results: Path) -> dict[str, dict]:
    """model -> its committed criteria comparisons (``report criteria --json`` of each criteria study,
    ``CRITERIA_VARIANT`` and ``CRITERIA_ALL_INPUTS``), merged into one (their sites differ), with the
    folders read under "folders" and the critical threshold of their sweeps; the expected models first.
    A comparison without "rivals" (no criterion swept beside the one its paper claims to beat) adds none."""
    found: dict[str, dict] = {}
    for variant in (CRITERIA_VARIANT, CRITERIA_ALL_INPUTS):
        for path in sorted((results / "dense_sweep").glob(f"*/{variant}/comparison.json")):
            part, merged = json.loads(path.read_text()), found.setdefault(path.parent.parent.name, {})
            if merged and part["baseline"] != merged["baseline"]:
                raise ValueError(f"{path}: baseline {part['baseline']}, not {merged['baseline']} as in "
                                 f"{merged['folders'][0]}; rerun its report criteria")
            threshold = json.loads((path.parent / "critical.json").read_text())["threshold"]
            if merged and threshold != merged["threshold"]:
                raise ValueError(f"{path}: critical threshold {threshold}, not {merged['threshold']} as in "
                                 f"{merged['folders'][0]}; compare studies read at one threshold")
            merged.setdefault("baseline", part["baseline"])
            merged.setdefault("threshold", threshold)
            for key in ("comparisons", "critical", "rivals"):
                merged.setdefault(key, []).extend(part.get(key, []))
            merged.setdefault("folders", []).append(str(path.parent.relative_to(results)))
    return expected_first(found)
