"""The LLaDA temporal study: per-step sparsity and Jaccard while denoising, one record per prompt.

Prompts denoise in left-padded batches (padding is excluded from masks, sparsity and Jaccard,
so every prompt gets what it would get alone). Each prompt is a cell of the result store
(resumable); the aggregate tables and figures are rebuilt from all finished cells at the end:

* ``per_step_layer.csv``: step x layer: consecutive / drift Jaccard (generated, all; per token
  and flattened), sparsity;
* ``per_step.csv`` (Figure 7a), ``per_layer.csv`` (Figure 7b), ``summary.json``;
* heatmaps layer x step of consecutive and drift Jaccard and sparsity, Jaccard per step,
  consecutive Jaccard per layer, sparsity per step per layer (Figure 6b);
* with ``reuse``: ``mask_reuse.csv`` and its figure;
* with ``paper_compat``: every prompt also runs the released code's flattened top-p;
  ``computations.csv`` (both computations, step x layer) and ``computations_per_step``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from common.analysis import figures as plots
from common.core.criteria import Criterion
from common.core.hooks import Sparsifier
from common.core.recorder import SparsityRecorder
from common.core.stats import summarize
from common.evaluation.provenance import environment
from common.evaluation.store import ResultStore, atomic_write_json, write_csv

from .generation import check_sampling, check_schedule, generate, model_mask_id
from .jaccard import MEASURES, StepJaccard
from .paper_compat import PAPER_COMPAT_RULES, FlattenedSparsifier
from .reuse import check_reuse_values, generate_with_reuse_probe

PER_TOKEN, PAPER_COMPAT = "per_token", "paper_compat"


@dataclass
class JaccardStudy:
    """What to run: the site and rule, and the denoising schedule.

    ``batch_size`` prompts denoise together (results do not depend on it); ``paper_compat``
    adds a second run of every prompt with the released code's computation (``paper_compat.py``).
    """

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
    batch_size: int = 8
    paper_compat: bool = False
    dtype: str | None = None  # set by run_study from the model (part of the cell key)
    device_type: str | None = None
    # A criterion other than the magnitude score (common.core.criteria; ``rule`` is its selection,
    # ``threshold`` with a target sparsity as the value) and, where it reads calibration text, the
    # corpus (set by run_study). Neither joins the key at its default, so old cells stay valid.
    score: str = "magnitude"
    calibration: str | None = None

    def criterion(self) -> Criterion:
        return Criterion(self.score, self.rule)

    def validate(self) -> None:
        criterion = self.criterion()
        criterion.check_value(self.value, self.power)
        check_sampling(self.temperature, self.cfg_scale)
        criterion.check_sites(self.site)
        check_schedule(self.steps, self.gen_length, self.block_length)
        check_reuse_values(self.reuse)
        if self.dump_every < 0:
            raise ValueError(f"--dump-every must be >= 0 (0 = no dumps, k = every k-th step), got {self.dump_every}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.paper_compat and (self.rule not in PAPER_COMPAT_RULES or not criterion.is_rule):
            raise ValueError(f"--paper-compat reproduces the released top-p; use --rule topp, not criterion "
                             f"{criterion.name}")
        if self.reuse and not criterion.is_rule:
            raise ValueError(f"the mask-reuse experiment reuses magnitude masks; give --reuse with no value for "
                             f"criterion {criterion.name}")

    def check_length(self, max_positions: int | None) -> None:
        """Refuse a generation longer than the model's positions (before allocating anything)."""
        if max_positions is not None and self.gen_length > max_positions:
            raise ValueError(f"--gen-length {self.gen_length} exceeds the model's {max_positions} positions; "
                             f"give at most {max_positions}")

    def key(self, prompt: str, computation: str = PER_TOKEN) -> dict:
        excluded = ("reuse", "dump_every", "batch_size", "paper_compat")
        fields = {k: v for k, v in asdict(self).items() if k not in excluded}
        if fields["score"] == "magnitude":
            del fields["score"]
        if fields["calibration"] is None:
            del fields["calibration"]
        key = {**fields, "prompt_sha": hashlib.sha1(prompt.encode()).hexdigest()[:16]}
        return key if computation == PER_TOKEN else {**key, "computation": computation}

    def generate_kwargs(self) -> dict:
        return dict(steps=self.steps, gen_length=self.gen_length, block_length=self.block_length,
                    temperature=self.temperature, cfg_scale=self.cfg_scale, remasking=self.remasking)


def encode_prompts(tokenizer, texts: list[str], device, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded [B, P] token ids and their attention mask (1 = real token)."""
    encoded = []
    for text in texts:
        ids = tokenizer(text)["input_ids"] if callable(tokenizer) else tokenizer.encode(text)
        if not ids:
            raise ValueError("a prompt encodes to no tokens; remove empty prompts")
        encoded.append(list(ids))
    candidates = (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None), 0)
    pad = next(c for c in candidates if c is not None and c != mask_id)
    length = max(len(ids) for ids in encoded)
    tokens = torch.full((len(encoded), length), pad, dtype=torch.long)
    attention = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, ids in enumerate(encoded):
        tokens[row, length - len(ids):] = torch.tensor(ids)
        attention[row, length - len(ids):] = 1
    return tokens.to(device), attention.to(device)


def run_batch(model, tokenizer, study: JaccardStudy, prompts: list[str], computation: str = PER_TOKEN,
              dump_dirs: list[Path | None] | None = None, calibration=None) -> list[dict]:
    """One batched generation with sparsification on; per prompt: the per-step metrics and the text.

    ``per_token``: the toolkit's rule or the study's criterion (with its ``calibration``; and, with
    ``study.reuse``, the mask-reuse experiment); ``paper_compat``: the released code's flattened
    rule. Both measure every set definition.
    """
    device = next(model.parameters()).device
    mask_id = model_mask_id(model)
    ids, attention = encode_prompts(tokenizer, prompts, device, mask_id)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    study.check_length(max_positions)
    if max_positions is not None and ids.shape[1] + study.gen_length > max_positions:
        tqdm.write(f"warning: prompt ({ids.shape[1]} tokens) + generation ({study.gen_length}) is longer than the "
                   f"model's {max_positions} trained positions; RoPE extrapolates beyond them", file=sys.stderr)
    jaccard = StepJaccard(dump_every=study.dump_every)
    recorder = SparsityRecorder([jaccard])
    jaccard.start_batch(ids.shape[1], len(prompts), dump_dirs)
    arguments = (study.site, study.rule, study.value, study.power)
    kwargs = dict(attention_mask=attention, recorder=recorder, **study.generate_kwargs())
    reuse_rows = []
    generations = 2 if computation == PER_TOKEN and study.reuse else 1  # reuse: + the free-running batch
    with tqdm(total=study.steps * generations, desc=f"denoising ({computation}, {len(prompts)} prompts)", unit="step",
              leave=False) as bar:
        progress = [lambda info, x: bar.update(1)]
        if computation == PAPER_COMPAT:
            with FlattenedSparsifier(model, *arguments, recorder=recorder):
                tokens = generate(model, ids, on_step=progress, **kwargs)
        elif study.reuse:
            tokens, reuse_rows = generate_with_reuse_probe(model, ids, *arguments, reuse_values=study.reuse,
                                                           on_step=progress, **kwargs)
        else:
            criterion = None if study.criterion().is_rule else study.criterion()
            with Sparsifier(model, *arguments, recorder=recorder, criterion=criterion, calibration=calibration):
                tokens = generate(model, ids, on_step=progress, **kwargs)
    jaccard.finish()
    jaccard_rows, sparsity_rows = jaccard.rows(), jaccard.sparsity_rows()
    results = []
    for index, prompt in enumerate(prompts):
        def mine(rows):
            return [{k: v for k, v in row.items() if k != "sequence"} for row in rows if row["sequence"] == index]

        result = {
            "prompt": prompt,
            "completion": tokenizer.decode(tokens[index, ids.shape[1]:].tolist(), skip_special_tokens=True),
            "jaccard": mine(jaccard_rows),
            "sparsity": mine(sparsity_rows),
            "recorder_bytes_between_steps": jaccard.stored_bytes(),
            "batch_size": len(prompts),
        }
        if computation == PER_TOKEN and study.reuse:
            result["mask_reuse"] = mine(reuse_rows)
        results.append(result)
    return results


def run_study(model, tokenizer, study: JaccardStudy, prompts: list[str], output: str | Path,
              allow_mixed: bool = False) -> dict:
    """Run every unfinished prompt in batches, then aggregate all finished ones into tables and figures.

    The model's dtype and device type are part of every cell's key (a store never mixes
    precisions); every cell and the summary carry the run's provenance.
    """
    study.validate()
    output = Path(output)
    parameter = next(model.parameters())
    provenance = environment(parameter.dtype, parameter.device)
    study = replace(study, dtype=provenance["dtype"], device_type=parameter.device.type)
    calibration = None
    if not study.criterion().is_rule:  # computed (or read from the cache) before any prompt runs
        from common.evaluation.calibration import Calibrator

        calibrator = Calibrator(model, tokenizer, study.model, study.criterion())
        study = replace(study, calibration=calibrator.corpus_id)
        calibration = calibrator(study.site, study.value)
        provenance["calibration"] = {**calibration.summary(), "provenance": calibrator.provenance(study.site)}
    store = ResultStore(output, provenance=provenance, allow_mixed=allow_mixed)
    computations = (PER_TOKEN, PAPER_COMPAT) if study.paper_compat else (PER_TOKEN,)
    for computation in computations:
        todo = list(dict.fromkeys(p for p in prompts if not store.has(study.key(p, computation))))
        if len(todo) < len(set(prompts)):
            print(f"resuming ({computation}): {len(set(prompts)) - len(todo)} of {len(set(prompts))} prompts "
                  f"already done in {output}")
        todo.sort(key=len)  # similar lengths share a batch: less padding
        batches = [todo[i:i + study.batch_size] for i in range(0, len(todo), study.batch_size)]
        with tqdm(total=len(todo), desc=f"prompts ({computation})", unit="prompt") as progress:
            for batch in batches:
                dump_dirs = None
                if study.dump_every:
                    folder = output / "masks" if computation == PER_TOKEN else output / "masks" / computation
                    dump_dirs = [folder / study.key(p)["prompt_sha"] for p in batch]
                for prompt, result in zip(batch, run_batch(model, tokenizer, study, batch, computation, dump_dirs,
                                                           calibration)):
                    store.put(study.key(prompt, computation), result)
                progress.update(len(batch))
    results = {c: [store.get(study.key(p, c)) for p in prompts] for c in computations}
    return aggregate(results, study, output, {"provenance": provenance, "store_commits": store.commits(),
                                                "store_versions": store.versions()})


def _tables(results: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Per (step, layer), per step and per layer (steps > 0) means over prompts of every measure."""
    columns = ["step", "layer", "site", *MEASURES]  # cells written before a measure existed read as NaN
    jaccard = pd.DataFrame([row for r in results for row in r["jaccard"]]).reindex(columns=columns)
    per_step_layer = jaccard.groupby(["step", "layer", "site"], as_index=False)[list(MEASURES)].mean()
    per_step = per_step_layer.groupby(["step", "site"], as_index=False)[list(MEASURES)].mean()
    later = per_step_layer[per_step_layer.step > 0]
    per_layer = later.groupby(["layer", "site"], as_index=False)[list(MEASURES)].mean()
    return per_step_layer, per_step, per_layer


def _headline(results: list[dict], per_step: pd.DataFrame, per_layer: pd.DataFrame) -> dict:
    later = per_step[per_step.step > 0]
    out = {"sparsity_per_site": summarize([row for r in results for row in r["sparsity"]])}
    for positions in ("generated", "all", "flat_generated", "flat_all"):
        out[f"mean_consecutive_jaccard_{positions}"] = float(later[f"consecutive_jaccard_{positions}"].mean())
        out[f"mean_drift_jaccard_{positions}"] = float(later[f"drift_jaccard_{positions}"].mean())
        out[f"final_drift_jaccard_{positions}"] = float(per_step[f"drift_jaccard_{positions}"].iloc[-1])
        out[f"consecutive_jaccard_{positions}_per_layer"] = per_layer[f"consecutive_jaccard_{positions}"].tolist()
    return out


def aggregate(results: dict[str, list[dict]], study: JaccardStudy, output: Path, extra: dict | None = None) -> dict:
    """Tables, figures and summary.json (with ``extra``, e.g. provenance) from the finished cells."""
    per_token = results[PER_TOKEN]
    per_step_layer, per_step, per_layer = _tables(per_token)
    write_csv(output / "per_step_layer.csv", per_step_layer.to_dict("records"))
    write_csv(output / "per_step.csv", per_step.to_dict("records"))
    write_csv(output / "per_layer.csv", per_layer.to_dict("records"))
    headline = _headline(per_token, per_step, per_layer)
    summary = {
        "study": asdict(study),
        "prompts": len(per_token),
        **headline,
        "recorder_bytes_between_steps": max(r["recorder_bytes_between_steps"] for r in per_token),
        "examples": [{"prompt": r["prompt"], "completion": r["completion"]} for r in per_token[:3]],
        **(extra or {}),
    }
    figures = _figures(per_step_layer, per_step, per_layer, study, output / "figures")
    if study.reuse:
        reuse = pd.DataFrame([row for r in per_token for row in r.get("mask_reuse", [])])
        reuse_summary = reuse.groupby("reuse", as_index=False)[
            ["kl_recomputed_vs_reused", "top1_agreement", "generated_tokens_changed"]].mean()
        write_csv(output / "mask_reuse.csv", reuse.to_dict("records"))
        summary["mask_reuse"] = reuse_summary.to_dict("records")
        figures += plots.lines(reuse[reuse.reuse > 0], "step", "kl_recomputed_vs_reused", "reuse",
                               "Logit drift from reusing masks for r steps", output / "figures" / "mask_reuse_kl",
                               ylabel="KL(recomputed || reused)")
    if PAPER_COMPAT in results:
        compat_step_layer, compat_step, compat_layer = _tables(results[PAPER_COMPAT])
        table = pd.concat([per_step_layer.assign(computation=PER_TOKEN),
                           compat_step_layer.assign(computation=PAPER_COMPAT)])
        write_csv(output / "computations.csv", table[["computation"] + list(per_step_layer.columns)].to_dict("records"))
        summary["computations"] = {PER_TOKEN: {k: v for k, v in headline.items()},
                                   PAPER_COMPAT: _headline(results[PAPER_COMPAT], compat_step, compat_layer)}
        figures += _computations_figure(per_step, compat_step, study, output / "figures" / "computations_per_step")
    summary["figures"] = [str(p.relative_to(output)) for p in figures if p.suffix == ".png"]
    atomic_write_json(output / "summary.json", summary)
    return summary


def _computations_figure(per_token: pd.DataFrame, paper: pd.DataFrame, study, path: Path) -> list[Path]:
    """Consecutive and drift Jaccard per step, each computation with its own set definition."""
    curves = []
    for frame, name, positions in ((per_token, "per-token rule, per-token J (generated)", "generated"),
                                   (paper, "paper-compat: flattened rule, flattened J (all)", "flat_all")):
        later = frame[frame.step > 0]
        for measure in ("consecutive", "drift"):
            curves.append(pd.DataFrame({"step": later.step, "jaccard": later[f"{measure}_jaccard_{positions}"],
                                        "curve": f"{measure}: {name}"}))
    label = f"{study.site}, {study.rule} p={study.value}"
    return plots.lines(pd.concat(curves), "step", "jaccard", "curve",
                       f"Per-token vs paper-compatible computation ({label})", path, marker=None)


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
    """Prompts from a .jsonl file (field "prompt" or "text") or a text file (one per line), UTF-8.

    ``limit``: the first N prompts (None or 0: all).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"--limit must be >= 0 (0 = all prompts), got {limit}")
    source = Path(path) if path else Path(__file__).parent / "data" / "prompts.jsonl"
    if source.is_dir():
        raise ValueError(f"--prompts {source} is a folder; give a .txt (one prompt per line) or .jsonl file")
    if source.exists() and not source.is_file():
        raise ValueError(f"--prompts {source} is not a regular file; give a .txt (one prompt per line) or .jsonl file")
    if not source.is_file():
        raise FileNotFoundError(f"prompt file {source} does not exist; pass --prompts with a .txt or .jsonl file")
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"prompt file {source} is not UTF-8 text (byte {error.start}: {error.reason}); "
                         "save it as UTF-8") from None
    if source.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{source}:{number}: not a JSON object ({error.msg}); write one "
                                 '{"prompt": "..."} per line') from None
            prompt = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f'{source}:{number}: no "prompt" (or "text") string; write one '
                                 '{"prompt": "..."} per line')
            prompts.append(prompt)
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"no prompts found in {source}")
    return prompts[:limit] if limit else prompts


def apply_chat_template(tokenizer, prompts: list[str]) -> list[str]:
    """Prompts wrapped as one user turn in the tokenizer's chat template (instruct models)."""
    if getattr(tokenizer, "chat_template", None) is None or not hasattr(tokenizer, "apply_chat_template"):
        raise ValueError("--chat needs a tokenizer with a chat template, and this model's tokenizer has none; "
                         "drop --chat (base models) or use an instruct checkpoint")
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=False) for p in prompts]
