"""Sparse decoding against its byte ideal: in decode order, beside two baselines, on an idle machine.

For each dtype, thread count, scope and target sparsity, per-layer thresholds on |x| are
calibrated on a few fables (TEAL style), then three variants run side by side in this process:

* ``torch``: the model's own layers (``nn.Linear`` on the model's layout): what a user has;
* ``kernel0``: the same sparse products at sparsity 0 (every threshold 0): what sparsity alone buys;
* ``sparse``: the sparse products at the calibrated thresholds.

Scopes: ``input`` (gate and up read the kept FFN inputs' rows), ``intermediate`` (down reads the
kept rows), ``gate`` (CATS: the gate dense, each kept neuron's up row and down column bundled and
read once) and ``all_linear`` (the inputs of q/k/v, o, gate/up and down in every layer; the LM
head dense).

Two measurements per setting:

* **decode order**: one decode token's matrices in the model's order, every layer in turn (q/k/v,
  o, gate/up, down, then the LM head), on inputs captured from a dense greedy decode (cycling over
  ``--stream-tokens`` tokens), so the caches see what a decode step reads; one matrix cycled alone
  is never timed. Each round runs the three variants in rotated order; medians with their
  interquartile spread. The scope's part is timed apart from the rest of the stream: the matrices
  it sparsifies, [W_g; W_u] at ``input``, W_d at ``intermediate``, every decoder matrix at
  ``all_linear``, and the whole MLP at ``gate`` (the dense gate and the bundle, against gate/up and
  down); its byte ideal counts the same matrices.
* **whole step**: three greedy decodes (dense, kernel at 0, sparse) of the transformers model,
  advanced one token each in turn; per-step times and ratios.

Before each round the 1-minute load average is read; above ``--max-load`` the script waits (at
most ``--idle-wait`` seconds per setting), then warns and records the round as busy.

The ideal is bytes read: dense bytes over the bytes the sparse variant read, at the sparsity it
measured while running. Share of the ideal saving realized = (base - sparse) / (base - ideal),
against each baseline. The whole step's byte ideal counts every decoder matrix and the LM head
(embeddings are a row lookup); the time that is neither linear layers nor LM head is the dense
step minus the torch decode-order stream.

``--quality`` adds, for the all-linear scope, the perplexity ratio on fables (sparse over dense, word
level as the study's fables_ppl, and token level), the answer KL on the multiple-choice suite
(KL(dense || sparse) over each item's answer choices) and greedy agreement with dense, at each
sparsity (small item counts by default). Without it greedy agreement is still reported.

    python benchmarks/bench_sparse_decode.py --model smollm2-135m --dtypes float32 bfloat16 --threads 1 2 --quality
    python benchmarks/bench_sparse_decode.py --model smollm2-135m --scopes all_linear --sparsities 0.5

Writes ``summary.json``, ``rows.csv`` and ``share_of_ideal.png`` (+ .pdf) under ``--output``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from device_timing import device_seconds, synchronize

SCOPES = ("input", "intermediate", "gate", "all_linear")
DEFAULT_SPARSITIES = [0.3, 0.4, 0.5, 0.7, 0.9]
VARIANTS = ("torch", "kernel0", "sparse")
# decode-order categories: each linear input group of a layer (q/k/v, o, gate/up, down), the bundled
# MLP of the gate scope, and the LM head
GROUP_CATEGORIES = {"attention": "attention", "attention_output": "attention_output", "input": "gate_up",
                    "intermediate": "down"}
STREAM_GROUPS = ("attention", "attention_output", "gate_up", "down", "bundle", "head")
SCOPE_CATEGORIES = {"input": ("gate_up",), "intermediate": ("down",), "gate": ("gate_up", "down", "bundle"),
                    "all_linear": ("attention", "attention_output", "gate_up", "down")}
QUALITY_TOKENS = 256  # tokens per fable (at most) for the perplexity ratio
PROMPT = ("A fox, just at the time of the grapes harvest, was walking by a vineyard when he saw a bunch of "
          "ripe grapes hanging from a high branch. He said to himself:")


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias, hub id or local HF directory")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], help="float32 and/or bfloat16 (float16 on GPU)")
    parser.add_argument("--threads", nargs="+", type=int, default=[1], help="CPU thread counts (torch.set_num_threads)")
    parser.add_argument("--scopes", nargs="+", default=list(SCOPES), choices=SCOPES)
    parser.add_argument("--sparsities", nargs="*", type=float, default=DEFAULT_SPARSITIES)
    parser.add_argument("--critical", nargs="*", default=None, metavar="SCOPE=SPARSITY",
                        help="also measure each scope at its critical sparsity (SCOPE=SPARSITY; wins over --summary)")
    parser.add_argument("--summary", type=Path, default=None,
                        help="a dense sweep's critical.json: measure the input, intermediate and gate scopes at their "
                             "sites' PPL-1%% critical sparsity (the isotonic crossing; the gate site's is CATS's)")
    parser.add_argument("--rounds", type=int, default=15, help="timed decode-order rounds (each: the three variants)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds / steps first")
    parser.add_argument("--stream-tokens", type=int, default=8, help="decode tokens whose inputs feed the stream")
    parser.add_argument("--tokens", type=int, default=16, help="decoded tokens per timed whole-step run")
    parser.add_argument("--repeats", type=int, default=2, help="whole-step runs per setting")
    parser.add_argument("--kernel", default="auto", help="auto (the fused CPU kernel) or a torch gather name")
    parser.add_argument("--calibration-docs", type=int, default=8, help="fables used to calibrate the thresholds")
    parser.add_argument("--calibration-tokens", type=int, default=128, help="tokens per calibration fable (at most)")
    parser.add_argument("--max-load", type=float, default=None,
                        help="1-minute load average counted as idle (default: threads + 0.5)")
    parser.add_argument("--idle-wait", type=float, default=120.0,
                        help="seconds a setting may wait in all for an idle machine before it records busy rounds")
    parser.add_argument("--cache-sweep-mib", type=int, default=512, help="largest buffer of the read-bandwidth sweep")
    parser.add_argument("--quality", action="store_true",
                        help="perplexity ratio and answer KL beside the speed (all_linear scope)")
    parser.add_argument("--quality-docs", type=int, default=8, help="fables for the perplexity ratio")
    parser.add_argument("--quality-items", type=int, default=12, help="items per multiple-choice task for answer KL")
    parser.add_argument("--output", type=Path, default=None, help="default results/sparse_decode/<model>")
    parser.add_argument("--figure", type=Path, default=None, help="also write the figure here (path without suffix)")
    parser.add_argument("--replot", type=Path, default=None, metavar="SUMMARY_JSON",
                        help="only redraw the figure of an earlier run's summary.json (to --figure, or beside it)")
    return parser.parse_args(argv)


def check_arguments(args) -> None:
    for name in ("rounds", "tokens", "repeats", "stream_tokens", "calibration_docs", "quality_docs", "quality_items"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.idle_wait < 0 or args.cache_sweep_mib < 1:
        raise ValueError("--warmup and --idle-wait must be >= 0, --cache-sweep-mib >= 1")
    if any(t < 1 for t in args.threads):
        raise ValueError("--threads: give counts of at least 1")
    for value in args.sparsities:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"--sparsities {value}: give fractions in [0, 1)")


def critical_sparsities(args) -> dict[str, float]:
    """Scope -> critical sparsity: --critical wins over --summary (each site's PPL-p% isotonic crossing,
    the reading that decides at a few hundred items); ``--critical`` with no value measures none."""
    if args.critical is not None and not args.critical:
        return {}
    critical = {}
    if args.summary is not None:
        if not args.summary.is_file():
            raise ValueError(f"--summary {args.summary} does not exist; give a dense sweep's critical.json")
        for entry in json.loads(args.summary.read_text())["critical"]:
            ppl = next((part for key, part in entry.items() if key.startswith("ppl_")), None)
            crossing = ((ppl or {}).get("isotonic") or {}).get("crossing")
            if crossing is not None and (ppl["isotonic"].get("status") == "crossed"):
                critical[entry["site"]] = float(crossing)
    for item in args.critical or []:
        scope, _, value = item.partition("=")
        try:
            critical[scope] = float(value)
        except ValueError:
            raise ValueError(f"--critical {item!r}: write SCOPE=SPARSITY, e.g. intermediate=0.66") from None
    return {scope: value for scope, value in critical.items() if scope in args.scopes}


# ---- the machine ----------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


class LoadGate:
    """Reads the load average before each round; waits (within a budget per setting) for an idle
    machine, and records the rounds it could not get one for."""

    def __init__(self, max_load: float, budget_s: float):
        self.max_load, self.budget_s = max_load, budget_s
        self.loads: list[float] = []
        self.busy = 0
        self.waited_s = 0.0

    def before_round(self) -> None:
        load = load_average()
        if load is None:
            return
        while load > self.max_load and self.waited_s < self.budget_s:
            pause = min(2.0, self.budget_s - self.waited_s)
            time.sleep(pause)
            self.waited_s += pause
            load = load_average()
        self.loads.append(load)
        self.busy += load > self.max_load

    def record(self, what: str) -> dict:
        if self.busy:
            message = (f"machine busy during {what}: 1-minute load average up to {max(self.loads):.2f} > "
                       f"{self.max_load:.2f} in {self.busy} of {len(self.loads)} rounds after waiting "
                       f"{self.waited_s:.0f} s; these timings are recorded as busy")
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        return {"max_load": self.max_load, "load_min": min(self.loads, default=None),
                "load_max": max(self.loads, default=None), "busy_rounds": self.busy, "rounds": len(self.loads),
                "waited_s": self.waited_s}


def bandwidth_sweep(largest_mib: int) -> dict:
    """Read bandwidth of ``buffer.sum()`` over buffers of 1 MiB up to ``largest_mib`` (doubling):
    the effective cache is the largest buffer still read 1.3x faster than the largest one (the
    memory's rate), which on a virtual machine is often far from what lscpu reports."""
    sizes, rates = [], []
    size = 1
    while size <= largest_mib:
        buffer = torch.ones(size * 2 ** 18)  # float32: size MiB
        repeats = max(3, min(200, (1 << 30) // buffer.nbytes))
        buffer.sum()
        start = time.perf_counter()
        for _ in range(repeats):
            buffer.sum()
        rates.append(buffer.nbytes * repeats / (time.perf_counter() - start) / 1e9)
        sizes.append(size)
        del buffer
        size *= 2
    memory = rates[-1]
    cached = [s for s, r in zip(sizes, rates) if r >= 1.3 * memory]
    return {"mib": sizes, "read_gb_per_s": rates, "memory_gb_per_s": memory,
            "effective_cache_mib": max(cached) if cached else None}


# ---- model inputs ---------------------------------------------------------------------------------

def fables(count: int) -> list[str]:
    from common.evaluation.tasks import DATA, PERPLEXITY_TASKS

    lines = (DATA / PERPLEXITY_TASKS["fables_ppl"]).read_text().splitlines()[:count]
    return [json.loads(line)["text"] for line in lines]


def token_batches(tokenizer, texts, max_tokens: int, device) -> list[torch.Tensor]:
    return [tokenizer(text, return_tensors="pt", truncation=True, max_length=max_tokens)["input_ids"].to(device)
            for text in texts]


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


@torch.no_grad()
def decode_inputs(model, prompt_ids: torch.Tensor, tokens: int) -> dict:
    """Per decode token, the inputs of each layer's attention (q/k/v), attention output (o), MLP
    (gate/up) and down projection, and of the LM head, from a dense greedy decode after the prompt:
    {key: [token rows [1, D]]}."""
    from common.execution.thresholds import LinearInputCapture

    stream = GreedyStream(model, prompt_ids)
    head_inputs = []
    handle = model.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: head_inputs.append(args[0].detach().reshape(-1, args[0].shape[-1])[-1:]))
    try:
        with LinearInputCapture(model, list(GROUP_CATEGORIES)) as capture:
            for _ in range(tokens):
                stream.step()
    finally:
        handle.remove()
    inputs = {key: rows for key, rows in capture.activations.items()}
    inputs[("head",)] = head_inputs
    return inputs


# ---- the decode-order stream ----------------------------------------------------------------------

@dataclass
class Part:
    """One step of the decode-order stream: a category, what runs, the key of its input."""

    category: str
    run: Callable
    key: tuple


def _torch_linears(linears):
    return lambda x: [linear(x) for linear in linears]


def build_stream(model, scope: str, thresholds, kernel) -> tuple[list[Part], list]:
    """The decode-order stream of ``scope``: per layer q/k/v, o, gate/up and down, then the LM head;
    the scope's matrices as sparse products at ``thresholds`` (None: the model's own layers), every
    other matrix through the model's own layers; and the sparse products (whose counts give the
    bytes read). At ``gate`` the sparse variants run the bundled MLP (dense gate, kept neurons' up
    rows and down columns) as one part in place of gate/up and down."""
    from common.core.sites import layer_list_path, linear_module_names, site_module_names
    from common.execution import GateBundle, SparseProduct

    count = len(model.get_submodule(layer_list_path(model)))
    linears = {group: linear_module_names(model, group) for group in GROUP_CATEGORIES}
    mlps = {layer: name for (layer, _), (name, _) in site_module_names(model, "input").items()}
    sparsified = {"input": ("input",), "intermediate": ("intermediate",), "gate": (),
                  "all_linear": tuple(GROUP_CATEGORIES)}[scope] if thresholds is not None else ()
    parts, products = [], []
    for layer in range(count):
        if thresholds is not None and scope == "gate":
            mlp = model.get_submodule(mlps[layer])
            bundle = GateBundle(mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn,
                                thresholds.values["gate"][layer], kernel)
            groups = ("attention", "attention_output")
        else:
            bundle, groups = None, tuple(GROUP_CATEGORIES)
        for group in groups:
            modules = [model.get_submodule(name) for name in linears[group][layer]]
            run = _torch_linears(modules)
            if group in sparsified:
                run = SparseProduct(modules, thresholds.values[group][layer], kernel)
                products.append(run)
            parts.append(Part(GROUP_CATEGORIES[group], run, (layer, group)))
        if bundle is not None:
            products.append(bundle)
            parts.append(Part("bundle", bundle, (layer, "input")))
    parts.append(Part("head", model.get_output_embeddings(), ("head",)))
    return parts, products


def category_bytes(model) -> dict[str, int]:
    """Weight bytes one decode token reads per stream category (matrices only; the bundle's are
    counted under gate/up and down, the matrices it replaces)."""
    from common.core.sites import linear_module_names

    def size(module):
        return sum(p.numel() * p.element_size() for p in module.parameters() if p.dim() >= 2)

    out = {category: sum(size(model.get_submodule(name)) for names in linear_module_names(model, group).values()
                         for name in names)
           for group, category in GROUP_CATEGORIES.items()}
    out["bundle"] = 0
    out["head"] = size(model.get_output_embeddings())
    return out


def run_stream(parts: list[Part], inputs: dict, token: int, device) -> dict[str, float]:
    """Seconds per category of one pass over the stream on decode token ``token``'s inputs."""
    seconds = dict.fromkeys(STREAM_GROUPS, 0.0)
    synchronize(device)
    for part in parts:
        rows = inputs[part.key]
        x = rows[token % len(rows)]
        start = time.perf_counter()
        part.run(x)
        synchronize(device)
        seconds[part.category] += time.perf_counter() - start
    return seconds


def summary_of(values: list[float]) -> dict:
    """Median and interquartile spread (seconds -> milliseconds)."""
    ordered = sorted(values)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {"median_ms": 1e3 * statistics.median(ordered), "p25_ms": 1e3 * quartiles[0],
            "p75_ms": 1e3 * quartiles[2]}


def share_of_ideal(base_s: float, sparse_s: float, bytes_dense: float, bytes_sparse: float) -> float | None:
    """(base - sparse) / (base - ideal), the ideal being base * bytes_sparse / bytes_dense."""
    saving = 1.0 - bytes_sparse / bytes_dense
    return None if saving <= 0 else (1.0 - sparse_s / base_s) / saving


@torch.no_grad()
def measure_stream(model, scope, thresholds, zero, inputs, args, gate: LoadGate, device) -> dict:
    """Decode order: the three variants in rotated order per round; medians, spreads, shares."""
    from common.execution.swap import skipped_bytes

    streams = {"torch": build_stream(model, scope, None, args.kernel)[0]}
    streams["kernel0"], _ = build_stream(model, scope, zero, args.kernel)
    streams["sparse"], products = build_stream(model, scope, thresholds, args.kernel)
    tokens = len(inputs[("head",)])
    for round_ in range(args.warmup):
        for name in VARIANTS:
            run_stream(streams[name], inputs, round_, device)
    for product in products:
        product.reset_counts()
    times = {name: [] for name in VARIANTS}
    for round_ in range(args.rounds):
        gate.before_round()
        shift = round_ % len(VARIANTS)
        for name in VARIANTS[shift:] + VARIANTS[:shift]:
            times[name].append(run_stream(streams[name], inputs, round_ % tokens, device))
    sizes = category_bytes(model)
    scope_bytes = sum(sizes[c] for c in SCOPE_CATEGORIES[scope])
    stream_bytes = sum(sizes.values())
    skipped = skipped_bytes(products) / args.rounds
    seen = sum(p.seen for p in products)
    out = {"entry_sparsity": 1.0 - sum(p.kept for p in products) / seen if seen else 0.0,
           "scope_bytes_skipped": skipped / scope_bytes, "scope_bytes": scope_bytes, "stream_bytes": stream_bytes,
           "scope_ideal_speedup": scope_bytes / (scope_bytes - skipped),
           "stream_ideal_speedup": stream_bytes / (stream_bytes - skipped)}
    for name in VARIANTS:
        scope_s = [sum(t[c] for c in SCOPE_CATEGORIES[scope]) for t in times[name]]
        total_s = [sum(t.values()) for t in times[name]]
        out[f"scope_{name}"] = summary_of(scope_s)
        out[f"stream_{name}"] = summary_of(total_s)
        out[f"head_{name}_ms"] = 1e3 * statistics.median(t["head"] for t in times[name])
    for base in ("torch", "kernel0"):
        for what, dense_bytes in (("scope", scope_bytes), ("stream", stream_bytes)):
            base_ms, sparse_ms = out[f"{what}_{base}"]["median_ms"], out[f"{what}_sparse"]["median_ms"]
            out[f"{what}_speedup_vs_{base}"] = base_ms / sparse_ms
            out[f"{what}_share_vs_{base}"] = share_of_ideal(base_ms, sparse_ms, dense_bytes, dense_bytes - skipped)
    return out


# ---- the whole decode step ------------------------------------------------------------------------

def execution(model, scope: str, thresholds, kernel):
    from common.execution import SparseFFNExecution, SparseLinearExecution

    if scope == "all_linear":
        return SparseLinearExecution(model, thresholds=thresholds, kernel=kernel)
    return SparseFFNExecution(model, scope, thresholds=thresholds, kernel=kernel)


def decode_weight_bytes(model) -> int:
    """Weight bytes one decode step reads: every matrix of the decoder plus the LM head (the input
    embedding is a row lookup; a tied LM head is counted once, as the head)."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters()
                if p.dim() >= 2 and p is not embedding and p is not head)
    return total + head.numel() * head.element_size()


def _open_stream(model, executor, prompt_ids):
    if executor is None:
        return GreedyStream(model, prompt_ids)
    with executor:
        return GreedyStream(model, prompt_ids)


def _step(stream, executor) -> float:
    if executor is None:
        return stream.step()
    with executor:  # re-entry reuses the packed weights: a few attribute swaps, untimed
        return stream.step()


def measure_step(model, scope, thresholds, zero, prompt_ids, args, gate: LoadGate) -> dict:
    """The transformers decode step: dense, kernel at 0 and sparse advanced one token each in turn."""
    executors = {"torch": None, "kernel0": execution(model, scope, zero, args.kernel),
                 "sparse": execution(model, scope, thresholds, args.kernel)}
    steps = {name: [] for name in VARIANTS}
    agreement = []
    for repeat in range(args.repeats):
        streams = {name: _open_stream(model, executors[name], prompt_ids) for name in VARIANTS}
        for _ in range(args.warmup if repeat == 0 else 0):
            for name in VARIANTS:
                _step(streams[name], executors[name])
        executors["sparse"].reset_counts()
        for token in range(args.tokens):
            gate.before_round()
            shift = token % len(VARIANTS)
            for name in VARIANTS[shift:] + VARIANTS[:shift]:
                steps[name].append(_step(streams[name], executors[name]))
        dense, sparse = streams["torch"].tokens[-args.tokens:], streams["sparse"].tokens[-args.tokens:]
        agreement.append(sum(a == b for a, b in zip(dense, sparse)) / args.tokens)
    skipped = executors["sparse"].skipped_weight_bytes() / args.tokens  # the last repeat's timed steps
    total = decode_weight_bytes(model)
    out = {"decode_sparsity": {k: v["pooled"] for k, v in executors["sparse"].sparsity().items()},
           "nonfinite_rows": sum(v["nonfinite_rows"] for v in executors["sparse"].sparsity().values()),
           "step_bytes": total, "step_ideal_speedup": total / (total - skipped),
           "greedy_agreement": statistics.mean(agreement)}
    for name in VARIANTS:
        out[f"step_{name}"] = summary_of(steps[name])
    for base in ("torch", "kernel0"):
        ratios = [b / s for b, s in zip(steps[base], steps["sparse"])]
        out[f"step_speedup_vs_{base}"] = statistics.median(ratios)
        out[f"step_share_vs_{base}"] = share_of_ideal(out[f"step_{base}"]["median_ms"],
                                                      out["step_sparse"]["median_ms"], total, total - skipped)
    return out


# ---- quality --------------------------------------------------------------------------------------

@torch.no_grad()
def fables_nll(model, batches) -> float:
    """Summed next-token negative log-likelihood over the fables (nats)."""
    total = 0.0
    for ids in batches:
        logits = model(input_ids=ids).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
    return total


def choice_items(per_task: int) -> list[tuple[str, list[str]]]:
    """(prompt, choices) of the first items of each task of the small multiple-choice suite."""
    from common.evaluation.tasks import DATA, SMALL_TASKS

    items = []
    for file, template in SMALL_TASKS.values():
        for line in (DATA / file).read_text().splitlines()[:per_task]:
            item = json.loads(line)
            items.append((template.replace("{{query}}", item["query"]), list(item["choices"])))
    return items


@torch.no_grad()
def choice_logliks(model, tokenizer, items, device) -> list[dict]:
    """Per item, the log-likelihood of each answer (" " + choice after the prompt)."""
    out = []
    for prompt, choices in items:
        context = tokenizer(prompt)["input_ids"]
        scores = []
        for choice in choices:
            full = tokenizer(prompt + " " + choice)["input_ids"]
            ids = torch.tensor([full], device=device)
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            start = max(len(context), 1) - 1
            targets = ids[0, start + 1:]
            scores.append(float(logprobs[start:start + len(targets)].gather(-1, targets[:, None]).sum()))
        out.append({"choice_logliks": scores})
    return out


def measure_quality(model, tokenizer, thresholds, reference, batches, items, device) -> dict:
    import numpy as np

    from common.analysis.orderings import choice_kl_items
    from common.execution import SparseLinearExecution

    with SparseLinearExecution(model, thresholds=thresholds):
        nll = fables_nll(model, batches)
        logliks = choice_logliks(model, tokenizer, items, device)
    kl = choice_kl_items(logliks, reference["logliks"])
    # word perplexity (the study's fables_ppl metric) and token perplexity, sparse over dense
    return {"perplexity_ratio": math.exp((nll - reference["nll"]) / reference["words"]),
            "token_perplexity_ratio": math.exp((nll - reference["nll"]) / reference["tokens"]),
            "answer_kl": float(np.nanmean(kl))}


# ---- the run ----------------------------------------------------------------------------------------

def settings_of(args, critical) -> list[tuple[str, float, str]]:
    settings = [(scope, s, "range") for scope in args.scopes for s in args.sparsities]
    return settings + [(scope, value, "critical") for scope, value in critical.items()]


def run_dtype(dtype, args, device, critical, environment) -> list[dict]:
    from tqdm import tqdm

    from common.execution.thresholds import capture_activations, thresholds_from_activations
    from common.models.loading import load_causal_lm

    model, tokenizer = load_causal_lm(args.model, dtype=dtype, device=str(device))
    prompt_ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"].to(device)
    calibration_ids = token_batches(tokenizer, fables(args.calibration_docs), args.calibration_tokens, device)
    calibration = capture_activations(model, calibration_ids, ["all_linear", "gate"])
    zero = thresholds_from_activations(calibration, 0.0)
    inputs = decode_inputs(model, prompt_ids, args.stream_tokens)
    reference = None
    if args.quality and "all_linear" in args.scopes:
        texts = fables(args.quality_docs)
        quality_ids = token_batches(tokenizer, texts, QUALITY_TOKENS, device)
        items = choice_items(args.quality_items)
        words = sum(len(tokenizer.decode(ids[0], skip_special_tokens=True).split()) for ids in quality_ids)
        reference = {"nll": fables_nll(model, quality_ids), "tokens": sum(ids.shape[1] - 1 for ids in quality_ids),
                     "words": words, "logliks": choice_logliks(model, tokenizer, items, device)}
    quality_cache: dict[float, dict] = {}
    rows = []
    name = str(dtype).replace("torch.", "")
    for threads in args.threads:
        if device.type == "cpu":
            torch.set_num_threads(threads)
        key = f"{threads}"
        if device.type == "cpu" and key not in environment["cache_sweep"]:
            environment["cache_sweep"][key] = bandwidth_sweep(args.cache_sweep_mib)
        max_load = args.max_load if args.max_load is not None else threads + 0.5
        for scope, target, kind in tqdm(settings_of(args, critical), desc=f"{name}, {threads} thread(s)"):
            thresholds = thresholds_from_activations(calibration, target)
            gate = LoadGate(max_load, args.idle_wait)
            row = {"dtype": name, "threads": threads, "scope": scope, "target_sparsity": target, "kind": kind}
            row.update(measure_stream(model, scope, thresholds, zero, inputs, args, gate, device))
            row.update(measure_step(model, scope, thresholds, zero, prompt_ids, args, gate))
            row["other_ms"] = row["step_torch"]["median_ms"] - row["stream_torch"]["median_ms"]
            row["other_share_of_step"] = row["other_ms"] / row["step_torch"]["median_ms"]
            row.update(gate.record(f"{name}, {threads} thread(s), {scope} at {target:.2f}"))
            if reference is not None and scope == "all_linear":
                if target not in quality_cache:
                    quality_cache[target] = measure_quality(model, tokenizer, thresholds, reference, quality_ids,
                                                            items, device)
                row.update(quality_cache[target])
            rows.append(row)
    del model
    return rows


def flat(row: dict) -> dict:
    """One CSV row: nested summaries spread into columns."""
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def figure(rows: list[dict], title: str, path: Path) -> list[Path]:
    import pandas as pd
    import seaborn as sns

    import common.analysis.figures  # noqa: F401  (the project's seaborn theme and Agg backend)
    from matplotlib import pyplot as plt

    long = []
    for row in rows:
        for base in ("torch", "kernel0"):
            share = row.get(f"scope_share_vs_{base}")
            if share is not None:
                long.append({"scope": row["scope"], "sparsity": row["entry_sparsity"], "share": share,
                             "baseline": "torch's linear" if base == "torch" else "kernel at sparsity 0",
                             "setting": f"{row['dtype']}, {row['threads']} thread(s)"})
    if not long:
        return []
    grid = sns.relplot(data=pd.DataFrame(long), x="sparsity", y="share", hue="baseline", style="setting",
                       col="scope", kind="line", marker="o", height=3.4, aspect=1.0, errorbar=None)
    for ax in grid.axes.flat:
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.axhline(0.0, color="black", linestyle=":", linewidth=1)
    grid.set_axis_labels("sparsity of the scope's inputs while running", "share of the ideal saving (decode order)")
    grid.figure.suptitle(title, y=1.03)
    paths = [path.with_suffix(".png"), path.with_suffix(".pdf")]
    path.parent.mkdir(parents=True, exist_ok=True)
    for target in paths:
        grid.figure.savefig(target, dpi=150, bbox_inches="tight")
    plt.close(grid.figure)
    return paths


def replot(summary_path: Path, path: Path | None) -> None:
    if not summary_path.is_file():
        raise ValueError(f"--replot {summary_path} does not exist; give a summary.json this script wrote")
    summary = json.loads(summary_path.read_text())
    setup = summary["setup"]
    title = f"{setup['model']}, {setup['device']}, {setup['cpu']}, batch 1"
    print(*figure(summary["rows"], title, path or summary_path.parent / "share_of_ideal"))


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def print_table(rows: list[dict]) -> None:
    print("| dtype | threads | scope | target | sparsity | bytes skipped | scope ms torch / k0 / sparse | "
          "share vs torch | share vs k0 | scope ideal | step ms dense / sparse | step speed-up | step ideal | "
          "other ms | PPL ratio | answer KL | greedy | busy |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        quality = (f"{r['perplexity_ratio']:.3f} | {r['answer_kl']:.4f}" if "perplexity_ratio" in r else "- | -")
        print(f"| {r['dtype']} | {r['threads']} | {r['scope']} | {r['target_sparsity']:.2f} | "
              f"{r['entry_sparsity']:.3f} | {r['scope_bytes_skipped']:.3f} | {r['scope_torch']['median_ms']:.1f} / "
              f"{r['scope_kernel0']['median_ms']:.1f} / {r['scope_sparse']['median_ms']:.1f} | "
              f"{_percent(r['scope_share_vs_torch'])} | "
              f"{_percent(r['scope_share_vs_kernel0'])} | {r['scope_ideal_speedup']:.2f}x | "
              f"{r['step_torch']['median_ms']:.1f} / {r['step_sparse']['median_ms']:.1f} | "
              f"{r['step_speedup_vs_torch']:.2f}x | {r['step_ideal_speedup']:.2f}x | {r['other_ms']:.1f} | {quality} | "
              f"{r['greedy_agreement']:.2f} | {r['busy_rounds']}/{r['rounds']} |")


def main(argv=None) -> None:
    args = parse_arguments(argv)
    if args.replot is not None:
        return replot(args.replot, args.figure)
    from common.cli.flags import check_device, check_output_folder, parse_dtype
    from common.evaluation.store import atomic_write_json, write_csv
    from common.execution import sparse_gemv

    check_arguments(args)
    device = torch.device(check_device(args.device))
    dtypes = [parse_dtype(name) or torch.float32 for name in args.dtypes]
    critical = critical_sparsities(args)
    output = check_output_folder(args.output or Path("results/sparse_decode") / Path(args.model).name)
    environment = {"cpu": cpu_model(), "cache_sweep": {}, "kernel_instructions": sparse_gemv.instruction_set(),
                   "load_at_start": load_average(), "cores": os.cpu_count()}
    rows = []
    for dtype in dtypes:
        rows += run_dtype(dtype, args, device, critical, environment)
    setup = {"model": args.model, "device": str(device), "cpu": environment["cpu"], "dtypes": args.dtypes,
             "threads": args.threads, "scopes": args.scopes, "rounds": args.rounds, "warmup": args.warmup,
             "stream_tokens": args.stream_tokens, "tokens": args.tokens, "repeats": args.repeats,
             "kernel": args.kernel, "critical": critical, "python": sys.version.split()[0],
             "torch": torch.__version__,
             "calibration": f"first {args.calibration_docs} fables, at most {args.calibration_tokens} tokens each",
             "quality": {"fables": args.quality_docs, "items_per_task": args.quality_items} if args.quality else None}
    atomic_write_json(output / "summary.json", {"setup": setup, "environment": environment, "rows": rows})
    write_csv(output / "rows.csv", [flat(row) for row in rows])
    title = f"{args.model}, {device.type}, {environment['cpu']}, batch 1"
    figure(rows, title, output / "share_of_ideal")
    if args.figure is not None:
        figure(rows, title, args.figure)
    for threads, sweep in environment["cache_sweep"].items():
        print(f"{environment['cpu']}, {threads} thread(s): memory read {sweep['memory_gb_per_s']:.1f} GB/s, "
              f"effective cache {sweep['effective_cache_mib']} MiB (read-bandwidth sweep); kernel "
              f"{environment['kernel_instructions']}")
    print_table(rows)
    busy = sum(row["busy_rounds"] for row in rows)
    if busy:
        print(f"WARNING: {busy} timed rounds ran on a busy machine (load above --max-load); see busy_rounds")
    print(f"wrote {output}")


if __name__ == "__main__":
    from common.cli.flags import run_main

    run_main(main)
