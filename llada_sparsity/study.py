"""The LLaDA temporal study: per-step sparsity and Jaccard while denoising, one record per prompt.

Each prompt is a cell of the result store (resumable); the aggregate tables and figures are
rebuilt from all finished cells at the end:

* ``per_step_layer.csv``: step x layer: consecutive / drift Jaccard (generated, all), sparsity;
* ``per_step.csv`` (Figure 7a), ``per_layer.csv`` (Figure 7b), ``summary.json``;
* heatmaps layer x step of consecutive and drift Jaccard and sparsity, Jaccard per step,
  consecutive Jaccard per layer, sparsity per step per layer (Figure 6b);
* with ``reuse``: ``mask_reuse.csv`` and its figure.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from common.analysis import figures as plots
from common.core.hooks import Sparsifier
from common.core.recorder import SparsityRecorder
from common.core.rules import validate_rule
from common.core.sites import expand_sites
from common.core.stats import summarize
from common.evaluation.store import ResultStore, atomic_write_json, write_csv

from .generation import check_schedule, generate
from .jaccard import METRICS, StepJaccard
from .reuse import mask_reuse_experiment


@dataclass
class JaccardStudy:
    """What to run: the site and rule, and the denoising schedule."""

    model: str
    site: str = "intermediate"
    rule: str = "topp"
    value: float = 0.9
    power: float = 1.0
    steps: int = 64
    gen_length: int = 64
    block_length: int = 32
    cfg_scale: float = 0.0
    temperature: float = 0.0
    remasking: str = "low_confidence"
    reuse: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    dump_every: int = 0

    def validate(self) -> None:
        validate_rule(self.rule, self.value, self.power)
        expand_sites(self.site)
        check_schedule(self.steps, self.gen_length, self.block_length)

    def key(self, prompt: str) -> dict:
        fields = {k: v for k, v in asdict(self).items() if k not in ("reuse", "dump_every")}
        return {**fields, "prompt_sha": hashlib.sha1(prompt.encode()).hexdigest()[:16]}

    def generate_kwargs(self) -> dict:
        return dict(steps=self.steps, gen_length=self.gen_length, block_length=self.block_length,
                    temperature=self.temperature, cfg_scale=self.cfg_scale, remasking=self.remasking)


def encode_prompt(tokenizer, text: str, device) -> torch.Tensor:
    ids = tokenizer(text)["input_ids"] if callable(tokenizer) else tokenizer.encode(text)
    if not ids:
        raise ValueError("a prompt encodes to no tokens; remove empty prompts")
    return torch.tensor([ids], dtype=torch.long, device=device)


def run_prompt(model, tokenizer, study: JaccardStudy, prompt: str, dump_dir: Path | None = None) -> dict:
    """One generation with sparsification on; the per-step metrics and the text."""
    device = next(model.parameters()).device
    ids = encode_prompt(tokenizer, prompt, device)
    jaccard = StepJaccard(dump_every=study.dump_every, dump_dir=dump_dir)
    recorder = SparsityRecorder([jaccard])
    jaccard.start_sequence(ids.shape[1])
    with Sparsifier(model, study.site, study.rule, study.value, study.power, recorder=recorder):
        tokens = generate(model, ids, recorder=recorder, **study.generate_kwargs())
    jaccard.finish()
    result = {
        "prompt": prompt,
        "completion": tokenizer.decode(tokens[0, ids.shape[1]:].tolist(), skip_special_tokens=True),
        "jaccard": jaccard.rows(),
        "sparsity": recorder.rows(),
        "recorder_bytes_between_steps": jaccard.stored_bytes(),
    }
    if study.reuse:
        result["mask_reuse"] = mask_reuse_experiment(
            model, ids, study.site, study.rule, study.value, study.power, reuse_values=study.reuse,
            **study.generate_kwargs())
    return result


def run_study(model, tokenizer, study: JaccardStudy, prompts: list[str], output: str | Path) -> dict:
    """Run every unfinished prompt, then aggregate all finished ones into tables and figures."""
    study.validate()
    output = Path(output)
    store = ResultStore(output)
    todo = [p for p in prompts if not store.has(study.key(p))]
    if len(todo) < len(prompts):
        print(f"resuming: {len(prompts) - len(todo)} of {len(prompts)} prompts already done in {output}")
    for prompt in tqdm(todo, desc="prompts", unit="prompt"):
        dump_dir = output / "masks" / study.key(prompt)["prompt_sha"] if study.dump_every else None
        store.put(study.key(prompt), run_prompt(model, tokenizer, study, prompt, dump_dir))
    results = [store.get(study.key(p)) for p in prompts]
    return aggregate(results, study, output)


def aggregate(results: list[dict], study: JaccardStudy, output: Path) -> dict:
    jaccard = pd.DataFrame([row for r in results for row in r["jaccard"]])
    per_step_layer = jaccard.groupby(["step", "layer", "site"], as_index=False)[list(METRICS)].mean()
    per_step = per_step_layer.groupby(["step", "site"], as_index=False)[list(METRICS)].mean()
    later = per_step_layer[per_step_layer.step > 0]
    per_layer = later.groupby(["layer", "site"], as_index=False)[list(METRICS)].mean()
    write_csv(output / "per_step_layer.csv", per_step_layer.to_dict("records"))
    write_csv(output / "per_step.csv", per_step.to_dict("records"))
    write_csv(output / "per_layer.csv", per_layer.to_dict("records"))
    sparsity = summarize([row for r in results for row in r["sparsity"]])
    summary = {
        "study": asdict(study),
        "prompts": len(results),
        "sparsity_per_site": sparsity,
        "mean_consecutive_jaccard_generated": float(later["consecutive_jaccard_generated"].mean()),
        "mean_drift_jaccard_generated": float(later["drift_jaccard_generated"].mean()),
        "final_drift_jaccard_generated": float(per_step["drift_jaccard_generated"].iloc[-1]),
        "recorder_bytes_between_steps": max(r["recorder_bytes_between_steps"] for r in results),
        "examples": [{"prompt": r["prompt"], "completion": r["completion"]} for r in results[:3]],
    }
    figures = _figures(per_step_layer, per_step, per_layer, study, output / "figures")
    if study.reuse:
        reuse = pd.DataFrame([row for r in results for row in r.get("mask_reuse", [])])
        reuse_summary = reuse.groupby("reuse", as_index=False)[
            ["kl_recomputed_vs_reused", "top1_agreement", "generated_tokens_changed"]].mean()
        write_csv(output / "mask_reuse.csv", reuse.to_dict("records"))
        summary["mask_reuse"] = reuse_summary.to_dict("records")
        figures += plots.lines(reuse[reuse.reuse > 0], "step", "kl_recomputed_vs_reused", "reuse",
                               "Logit drift from reusing masks for r steps", output / "figures" / "mask_reuse_kl",
                               ylabel="KL(recomputed || reused)")
    summary["figures"] = [str(p.relative_to(output)) for p in figures if p.suffix == ".png"]
    atomic_write_json(output / "summary.json", summary)
    return summary


def _figures(per_step_layer, per_step, per_layer, study, folder: Path) -> list[Path]:
    label = f"{study.site}, {study.rule} p={study.value}"
    paths = []
    for metric, title in (("consecutive_jaccard_generated", "Consecutive Jaccard J(A_t, A_t-1)"),
                          ("drift_jaccard_generated", "Drift Jaccard J(A_t, A_1)"),
                          ("sparsity_generated", "Sparsity")):
        frame = per_step_layer[per_step_layer.step > 0] if "jaccard" in metric else per_step_layer
        paths += plots.heatmap(frame, "layer", "step", metric, f"{title}, generated positions ({label})",
                               folder / f"heatmap_{metric}", cmap="viridis" if "jaccard" in metric else "rocket_r")
    long = per_step[per_step.step > 0].melt(id_vars=["step"], value_vars=["consecutive_jaccard_generated",
                                                                          "drift_jaccard_generated"],
                                            var_name="measure", value_name="jaccard")
    paths += plots.lines(long, "step", "jaccard", "measure", f"Jaccard per step, mean over layers ({label})",
                         folder / "jaccard_per_step")
    paths += plots.lines(per_layer, "layer", "consecutive_jaccard_generated", None,
                         f"Consecutive Jaccard per layer, mean over steps ({label})", folder / "consecutive_per_layer",
                         ylabel="consecutive Jaccard")
    paths += plots.lines(per_step_layer.assign(layer=per_step_layer.layer.astype(str)), "step",
                         "sparsity_generated", "layer", f"Sparsity per step and layer ({label})",
                         folder / "sparsity_per_step", marker=None)
    return paths


def read_prompts(path: str | None, limit: int | None) -> list[str]:
    """Prompts from a .jsonl file (field "prompt" or "text") or a text file (one per line)."""
    source = Path(path) if path else Path(__file__).parent / "data" / "prompts.jsonl"
    if not source.is_file():
        raise FileNotFoundError(f"prompt file {source} does not exist; pass --prompts with a .txt or .jsonl file")
    if source.suffix == ".jsonl":
        prompts = []
        for line in source.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                prompts.append(record.get("prompt") or record.get("text"))
    else:
        prompts = [line for line in source.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"no prompts found in {source}")
    return prompts[:limit] if limit else prompts
