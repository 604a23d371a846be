"""Realized against ideal decode speed-up of sparse FFNs: greedy decode at batch 1, dense and sparse side by side.

For each FFN site that can skip weight reads (intermediate, input), each keep rule (per-token
top-p, the study's rule; fixed per-layer thresholds, TEAL style) and each target sparsity (a
range, plus the site's critical sparsity), the rule is calibrated on a few fables to reach the
target, then dense and sparse run side by side in this process (warm-up first, same dtype and
threads):

* end to end: a dense and a sparse greedy decode of ``--tokens`` tokens after a fixed prompt
  (prefill not timed), advanced one step each in turn, so that load changes on a shared machine
  hit both alike; the speed-up is the median of the per-step time ratios over the repeats;
* FFN alone: every layer's FFN on one decode token's inputs (captured from a dense decode),
  dense / sparse / mask-only loops in turn, median of the per-round ratios;
* the mask's own cost: the keep rule plus the kept-index extraction, on the same inputs;
* ideal speed-up: weight bytes read per token by the dense path over those read by the sparse
  path (the rows of dropped entries skipped), i.e. decode as pure weight streaming.

    python benchmarks/bench_sparse_decode.py --model smollm2-135m --tokens 32 --repeats 3
    python benchmarks/bench_sparse_decode.py --model gemma3-270m --device cuda --dtype bfloat16
    python benchmarks/bench_sparse_decode.py --summary results/dense_sweep/smollm2-135m/critical.json

Writes ``summary.json``, ``rows.csv`` and the figure ``speedup.png`` (+ .pdf) under ``--output``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from device_timing import device_seconds

DEFAULT_SPARSITIES = [0.3, 0.5, 0.7, 0.9]
# Task-average critical sparsity (interpolated, paper grid) of the study's dense sweeps.
REPORTED_CRITICAL = {
    "smollm2-135m": {"intermediate": 0.664, "input": 0.450},
    "gemma3-270m": {"intermediate": 0.659, "input": 0.594},
}
PROMPT = ("A fox, just at the time of the grapes harvest, was walking by a vineyard when he saw a bunch of "
          "ripe grapes hanging from a high branch. He said to himself:")


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias, hub id or local HF directory")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--tokens", type=int, default=32, help="decoded tokens per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed dense/sparse pairs per setting")
    parser.add_argument("--ffn-repeats", type=int, default=20, help="timed dense/sparse pairs of the FFN-only loop")
    parser.add_argument("--sites", nargs="+", default=["intermediate", "input"])
    parser.add_argument("--modes", nargs="+", default=["topp", "threshold"], choices=["topp", "threshold"])
    parser.add_argument("--sparsities", nargs="*", type=float, default=DEFAULT_SPARSITIES)
    parser.add_argument("--critical", nargs="*", default=None, metavar="SITE=SPARSITY",
                        help="critical sparsity per site (default: the report's values for the two real models)")
    parser.add_argument("--summary", type=Path, default=None,
                        help="a dense sweep's critical.json: take each site's task-average critical sparsity from it")
    parser.add_argument("--kernel", default="embedding_bag", help="gather-GEMV kernel (common.execution.GATHER_GEMV)")
    parser.add_argument("--calibration-docs", type=int, default=8, help="fables used to calibrate the rules")
    parser.add_argument("--calibration-tokens", type=int, default=128, help="tokens per calibration fable (at most)")
    parser.add_argument("--output", type=Path, default=None, help="default results/sparse_decode/<model>")
    parser.add_argument("--figure", type=Path, default=None, help="also write the figure here (path without suffix)")
    parser.add_argument("--replot", type=Path, default=None, metavar="SUMMARY_JSON",
                        help="only redraw the figure of an earlier run's summary.json (to --figure, or beside it)")
    return parser.parse_args(argv)


def critical_sparsities(args, sites) -> dict[str, float]:
    """Site -> critical sparsity: --critical wins over --summary, which wins over the report's values."""
    critical = dict(REPORTED_CRITICAL.get(args.model, {}))
    if args.summary is not None:
        if not args.summary.is_file():
            raise ValueError(f"--summary {args.summary} does not exist; give a dense sweep's critical.json")
        for entry in json.loads(args.summary.read_text())["critical"]:
            if "task_average_curve" in entry:
                critical[entry["site"]] = float(entry["task_average_curve"]["interpolated"])
    for item in args.critical or []:
        site, _, value = item.partition("=")
        try:
            critical[site] = float(value)
        except ValueError:
            raise ValueError(f"--critical {item!r}: write SITE=SPARSITY, e.g. intermediate=0.66") from None
    return {site: value for site, value in critical.items() if site in sites}


def calibration_batches(tokenizer, documents: int, max_tokens: int, device) -> list[torch.Tensor]:
    from common.evaluation.tasks import DATA, PERPLEXITY_TASKS

    lines = (DATA / PERPLEXITY_TASKS["fables_ppl"]).read_text().splitlines()[:documents]
    return [tokenizer(json.loads(line)["text"], return_tensors="pt", truncation=True,
                      max_length=max_tokens)["input_ids"].to(device) for line in lines]


class GreedyStream:
    """One greedy decode at batch 1: prefill once, then ``step()`` decodes one token and times it."""

    def __init__(self, model, prompt_ids: torch.Tensor):
        from transformers import DynamicCache

        self.model, self.device = model, prompt_ids.device
        self.cache = DynamicCache(config=model.config)
        with torch.no_grad():
            logits = model(input_ids=prompt_ids, cache=self.cache, use_cache=True).logits
        self.next_id = logits[:, -1].argmax(-1, keepdim=True)
        self.tokens: list[int] = []

    def step(self) -> float:
        """Decode one token; its wall-clock seconds."""
        self.tokens.append(int(self.next_id))
        return device_seconds(self._advance, self.device)

    @torch.no_grad()
    def _advance(self) -> None:
        logits = self.model(input_ids=self.next_id, cache=self.cache, use_cache=True).logits
        self.next_id = logits[:, -1].argmax(-1, keepdim=True)


def paired_decode(model, sparse, prompt_ids: torch.Tensor, tokens: int) -> tuple[list[float], list[float], float]:
    """A dense and a sparse greedy decode advanced step by step in turn, so load changes on a
    shared machine hit both alike. Returns the per-step seconds of each and the fraction of
    positions where the two greedy continuations agree. The sparse counts cover its decode steps."""
    dense_stream = GreedyStream(model, prompt_ids)
    with sparse:
        sparse_stream = GreedyStream(model, prompt_ids)
    sparse.reset_counts()
    dense_steps, sparse_steps = [], []
    for _ in range(tokens):
        dense_steps.append(dense_stream.step())
        with sparse:  # re-entry reuses the packed weights: a few attribute swaps, untimed
            sparse_steps.append(sparse_stream.step())
    agreement = sum(a == b for a, b in zip(dense_stream.tokens, sparse_stream.tokens)) / tokens
    return dense_steps, sparse_steps, agreement


def decode_weight_bytes(model) -> int:
    """Weight bytes one decode step reads: every matrix of the decoder plus the LM head (the input
    embedding is a row lookup; a tied LM head is counted once, as the head)."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters()
                if p.dim() >= 2 and p is not embedding and p is not head)
    return total + head.numel() * head.element_size()


def ffn_weight_bytes(mlps) -> int:
    return sum(p.numel() * p.element_size() for mlp in mlps for p in mlp.parameters())


@torch.no_grad()
def decode_step_inputs(model, prompt_ids, sites) -> dict[tuple[int, str], torch.Tensor]:
    """One decode token's FFN site activations [1, D] per (layer, site), from a dense step."""
    from transformers import DynamicCache

    from common.core.hooks import ActivationCapture

    cache = DynamicCache(config=model.config)
    next_id = model(input_ids=prompt_ids, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    with ActivationCapture(model, sites, keep=True) as capture:
        model(input_ids=next_id, cache=cache, use_cache=True)
    return {key: rows[0] for key, rows in capture.activations.items()}


def measure_setting(model, prompt_ids, execution_kwargs, args, step_inputs, mlps, bytes_decode, bytes_ffn) -> dict:
    """One (site, rule, sparsity) setting: end-to-end and FFN-only timings, ideal speed-ups."""
    from common.execution import SparseFFNExecution
    from common.execution.kernels import kept_entries

    device = prompt_ids.device
    sparse = SparseFFNExecution(model, **execution_kwargs, kernel=args.kernel)
    # end to end: a warm-up decode, then the repeats; per-step pairs, median of the step ratios
    paired_decode(model, sparse, prompt_ids, min(args.tokens, 4))
    dense_steps, sparse_steps, ratios = [], [], []
    for _ in range(args.repeats):
        dense, sparse_, agreement = paired_decode(model, sparse, prompt_ids, args.tokens)
        dense_steps += dense
        sparse_steps += sparse_
        ratios += [d / s for d, s in zip(dense, sparse_)]
    decode_sparsity = {site: v["pooled"] for site, v in sparse.sparsity().items()}  # the last repeat's steps
    skipped_per_token = sparse.skipped_weight_bytes() / args.tokens

    # FFN alone: every layer's FFN on one decode token's inputs, with the packed sparse modules
    layers = sorted(sparse.modules_by_layer)
    modules = [sparse.modules_by_layer[layer] for layer in layers]
    inputs = [step_inputs[(layer, "input")] for layer in layers]

    def dense_ffn():
        return device_seconds(lambda: [mlp(x) for mlp, x in zip(mlps, inputs)], device)

    def sparse_ffn():
        return device_seconds(lambda: [module(x) for module, x in zip(modules, inputs)], device)

    def masks_only():
        def run():
            for layer, module in zip(layers, modules):
                for site, mask_fn in module.masks.items():
                    x = step_inputs[(layer, site)]
                    kept_entries(x, mask_fn(x))
        return device_seconds(run, device)

    with torch.no_grad():
        dense_ffn(), sparse_ffn(), masks_only()
        triples = [(dense_ffn(), sparse_ffn(), masks_only()) for _ in range(args.ffn_repeats)]
        sparse.reset_counts()
        sparse_ffn()
    ffn_skipped = sparse.skipped_weight_bytes()
    ffn_dense_s = statistics.median(t[0] for t in triples)
    ffn_sparse_s = statistics.median(t[1] for t in triples)
    mask_s = statistics.median(t[2] for t in triples)
    ffn_ideal_s = ffn_dense_s * (bytes_ffn - ffn_skipped) / bytes_ffn
    return {
        "decode_sparsity": decode_sparsity,
        "dense_ms_per_token": 1e3 * statistics.median(dense_steps),
        "sparse_ms_per_token": 1e3 * statistics.median(sparse_steps),
        "speedup": statistics.median(ratios), "ideal_speedup": bytes_decode / (bytes_decode - skipped_per_token),
        "ffn_dense_us": 1e6 * ffn_dense_s, "ffn_sparse_us": 1e6 * ffn_sparse_s,
        "ffn_speedup": statistics.median(t[0] / t[1] for t in triples),
        "ffn_ideal_speedup": bytes_ffn / (bytes_ffn - ffn_skipped), "mask_us": 1e6 * mask_s,
        "mask_share_of_sparse_ffn": mask_s / ffn_sparse_s, "greedy_agreement": agreement,
        # where the FFN's gap to the ideal goes: the mask (rule + kept indices), and the products
        # running slower per byte than the dense GEMV
        "ffn_ideal_us": 1e6 * ffn_ideal_s, "ffn_gap_mask_us": 1e6 * mask_s,
        "ffn_gap_products_us": 1e6 * (ffn_sparse_s - mask_s - ffn_ideal_s),
    }


def figure(rows: list[dict], title: str, path: Path) -> list[Path]:
    import pandas as pd
    import seaborn as sns

    import common.analysis.figures  # noqa: F401  (the project's seaborn theme and Agg backend)
    from matplotlib import pyplot as plt

    long = []
    for row in rows:
        for label, key in (("end to end, measured", "speedup"), ("end to end, ideal", "ideal_speedup"),
                           ("FFN alone, measured", "ffn_speedup"), ("FFN alone, ideal", "ffn_ideal_speedup")):
            long.append({"site": row["site"], "rule": row["mode"], "sparsity": row["target_sparsity"],
                         "speed-up": row[key], "what": label})
    grid = sns.relplot(data=pd.DataFrame(long), x="sparsity", y="speed-up", hue="what", style="rule", col="site",
                       kind="line", marker="o", height=3.6, aspect=1.1, errorbar=None)
    for ax in grid.axes.flat:
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    for row in rows:  # the site's critical sparsity
        if row["kind"] == "critical":
            grid.axes_dict[row["site"]].axvline(row["target_sparsity"], color="black", linestyle=":", linewidth=1)
    grid.set_axis_labels("target sparsity", "speed-up over dense")
    grid.figure.suptitle(title, y=1.03)
    paths = [path.with_suffix(".png"), path.with_suffix(".pdf")]
    path.parent.mkdir(parents=True, exist_ok=True)
    for target in paths:  # bbox "tight" keeps the facet grid's legend, which sits outside the axes
        grid.figure.savefig(target, dpi=150, bbox_inches="tight")
    plt.close(grid.figure)
    return paths


def replot(summary_path: Path, path: Path | None) -> None:
    if not summary_path.is_file():
        raise ValueError(f"--replot {summary_path} does not exist; give a summary.json this script wrote")
    summary = json.loads(summary_path.read_text())
    setup = summary["setup"]
    title = f"{setup['model']}, {setup['dtype']}, {setup['device']}, batch 1, {setup['tokens']} tokens"
    print(*figure(summary["rows"], title, path or summary_path.parent / "speedup"))


def main(argv=None) -> None:
    args = parse_arguments(argv)
    if args.replot is not None:
        return replot(args.replot, args.figure)
    from tqdm import tqdm

    from common.cli.flags import check_device, check_output_folder, parse_dtype
    from common.evaluation.store import atomic_write_json, write_csv
    from common.execution import EXECUTION_SITES
    from common.execution.thresholds import (capture_activations, thresholds_from_activations,
                                             topp_value_from_activations)
    from common.models.loading import load_causal_lm
    from common.core.sites import layer_list_path

    for site in args.sites:
        if site not in EXECUTION_SITES:
            raise ValueError(f"--sites {site}: sparse execution covers {', '.join(EXECUTION_SITES)}")
    if args.tokens < 1 or args.repeats < 1 or args.ffn_repeats < 1:
        raise ValueError("--tokens, --repeats and --ffn-repeats must be at least 1")
    for value in args.sparsities:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"--sparsities {value}: give fractions in [0, 1)")
    device = torch.device(check_device(args.device))
    dtype = parse_dtype(args.dtype) or torch.float32
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    critical = critical_sparsities(args, args.sites)
    output = check_output_folder(args.output or Path("results/sparse_decode") / Path(args.model).name)

    model, tokenizer = load_causal_lm(args.model, dtype=dtype, device=str(device))
    prompt_ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"].to(device)
    mlps = [layer.mlp for layer in model.get_submodule(layer_list_path(model))]
    bytes_decode, bytes_ffn = decode_weight_bytes(model), ffn_weight_bytes(mlps)
    calibration = capture_activations(model, calibration_batches(tokenizer, args.calibration_docs,
                                                                 args.calibration_tokens, device), args.sites)
    step_inputs = decode_step_inputs(model, prompt_ids, ["input", "intermediate"])

    settings = [(site, mode, s, "range") for site in args.sites for mode in args.modes for s in args.sparsities]
    settings += [(site, mode, critical[site], "critical") for site in args.sites if site in critical
                 for mode in args.modes]
    rows, calibrated = [], []
    for site, mode, target, kind in tqdm(settings, desc="settings"):
        site_activations = {key: value for key, value in calibration.items() if key[1] == site}
        value = thresholds = None
        if mode == "topp":
            value = topp_value_from_activations(list(site_activations.values()), target)
        else:
            thresholds = thresholds_from_activations(site_activations, target)
        result = measure_setting(model, prompt_ids, {"sites": site, "value": value, "thresholds": thresholds}, args,
                                 step_inputs, mlps, bytes_decode, bytes_ffn)
        rows.append({"site": site, "mode": mode, "target_sparsity": target, "kind": kind, "topp_value": value,
                     "measured_decode_sparsity": result.pop("decode_sparsity")[site], **result})
        calibrated.append(None if thresholds is None else thresholds.as_dict())
    setup = {"model": args.model, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
             "threads": torch.get_num_threads() if device.type == "cpu" else None, "tokens": args.tokens,
             "repeats": args.repeats, "ffn_repeats": args.ffn_repeats, "kernel": args.kernel,
             "prompt_tokens": int(prompt_ids.shape[-1]), "decode_weight_bytes": bytes_decode,
             "ffn_weight_bytes": bytes_ffn, "critical": critical,
             "calibration": f"first {args.calibration_docs} fables, at most {args.calibration_tokens} tokens each"}
    atomic_write_json(output / "summary.json", {"setup": setup, "rows": rows, "calibrated_thresholds": calibrated})
    write_csv(output / "rows.csv", rows)
    table = rows
    title = f"{args.model}, {setup['dtype']}, {device.type}, batch 1, {args.tokens} tokens"
    figure(table, title, output / "speedup")
    if args.figure is not None:
        figure(table, title, args.figure)
    print(f"{title}; decode weights {bytes_decode / 2**20:.0f} MiB/token, FFN {bytes_ffn / 2**20:.0f} MiB")
    print("| site | rule | target | kind | decode sparsity | dense ms/tok | speed-up | ideal | FFN dense ms | "
          "FFN sparse ms | FFN ideal ms | mask ms | FFN speed-up | FFN ideal | greedy agreement |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in table:
        print(f"| {row['site']} | {row['mode']} | {row['target_sparsity']:.3f} | {row['kind']} | "
              f"{row['measured_decode_sparsity']:.3f} | {row['dense_ms_per_token']:.1f} | {row['speedup']:.2f}x | "
              f"{row['ideal_speedup']:.2f}x | {row['ffn_dense_us'] / 1e3:.1f} | {row['ffn_sparse_us'] / 1e3:.1f} | "
              f"{row['ffn_ideal_us'] / 1e3:.1f} | {row['mask_us'] / 1e3:.2f} | {row['ffn_speedup']:.2f}x | "
              f"{row['ffn_ideal_speedup']:.2f}x | {row['greedy_agreement']:.2f} |")
    print(f"wrote {output}")


if __name__ == "__main__":
    from common.cli.flags import run_main

    run_main(main)
