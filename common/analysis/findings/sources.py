"""What each finding reads and the command that writes it: the committed folders under ``results/``
(``results/<study>/<model>/<variant>/``) and their commands, shown on the page."""

from __future__ import annotations

import json
from pathlib import Path

GRID_VARIANT = "small-grid"  # every item of the offline suite, the paper grid with its early stop
CRITERIA_VARIANT = "criteria"  # every item of the offline suite, every criterion at input and intermediate
CRITERIA = "teal cats scap wina larosa"  # magnitude top-p, their baseline, is the grid's
DENSE_MODELS = ("smollm2-135m", "gemma3-270m")  # expected on the page; any other model's grid is picked up too
LLADA = "llada_jaccard/tiny-llada-chars/paper-compat"
MOE = "moe_experts/moefied-smollm2-135m/small-30"
SHARED_CONTEXT = "shared_context/smollm2-135m/cpu"
EVAL_OVERHEAD = "eval_overhead/smollm2-135m/cpu"
DECODE = "sparse_decode/smollm2-135m/cpu"

COMMANDS = {
    "dense": "\n".join(f"python experiments/dense_sweep.py --model {{model}} --protocol paper --sites input "
                       f"intermediate --tasks small --limit 0 --stop-below 0.9 --dtype bfloat16 --output "
                       f"results/dense_sweep/{{model}}/{GRID_VARIANT} --shard {k}/2 &" for k in (1, 2)) + "\nwait",
    "criteria": "\n".join(f"python experiments/dense_sweep.py --model {{model}} --protocol paper --sites input "
                          f"intermediate --criterion {CRITERIA} --targets 0.1 0.2 0.3 0.5 0.7 --tasks small --limit 0 --dtype bfloat16 --output "
                          f"results/dense_sweep/{{model}}/{CRITERIA_VARIANT} --shard {k}/2 &" for k in (1, 2))
                + f"\nwait\npython -m common.cli.report criteria results/dense_sweep/{{model}}/{CRITERIA_VARIANT} "
                  f"results/dense_sweep/{{model}}/{GRID_VARIANT} --json results/dense_sweep/{{model}}/{CRITERIA_VARIANT}/comparison.json",
    "models": ("python -m common.cli.report models results/dense_sweep/{a}/" + GRID_VARIANT
               + " results/dense_sweep/{b}/" + GRID_VARIANT + " --json results/dense_sweep/{a}-vs-{b}/" + GRID_VARIANT
               + "/comparison.json"),
    "llada": ("python experiments/llada_jaccard.py --paper-compat --dtype float32 --output results/" + LLADA),
    "moe": "python experiments/moe_experts.py --dtype bfloat16 --output results/" + MOE,
    "shared_context": ("python benchmarks/bench_shared_context.py --model smollm2-135m --limit 40 --dtype float32 "
                       "--threads 1 --repeats 3 --output results/" + SHARED_CONTEXT),
    "eval_overhead": ("python benchmarks/bench_eval_overhead.py --model smollm2-135m --limit 100 --dtype float32 "
                      "--threads 1 --repeats 3 --compare-torch-path --output results/" + EVAL_OVERHEAD),
    "decode": ("python benchmarks/bench_sparse_decode.py --model smollm2-135m --dtypes float32 bfloat16 --threads 1 2 "
               "--sparsities 0.3 0.5 0.7 --rounds 10 "
               "--quality --summary results/dense_sweep/smollm2-135m/" + GRID_VARIANT + "/critical.json --output results/"
               + DECODE),
}


def dense_grids(results: Path) -> dict[str, Path]:
    """model -> its every-item grid folder, for the folders with a critical.json and a tidy.csv
    (the expected models first, then any other model's grid)."""
    found = {folder.parent.name: folder for folder in sorted((results / "dense_sweep").glob(f"*/{GRID_VARIANT}"))}
    order = [m for m in DENSE_MODELS if m in found] + [m for m in found if m not in DENSE_MODELS]
    return {model: found[model] for model in order
            if (found[model] / "critical.json").is_file() and (found[model] / "tidy.csv").is_file()}


def criteria_comparisons(results: Path) -> dict[str, dict]:
    """model -> its committed criteria comparison (``report criteria --json``), the expected models first."""
    found = {path.parent.parent.name: path for path in
             sorted((results / "dense_sweep").glob(f"*/{CRITERIA_VARIANT}/comparison.json"))}
    order = [m for m in DENSE_MODELS if m in found] + [m for m in found if m not in DENSE_MODELS]
    return {model: json.loads(found[model].read_text()) for model in order}
