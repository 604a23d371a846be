"""Extract the offline task suites from the BIG-bench release (Apache-2.0) into common/evaluation/task_data/.

    # pip download of this sdist fails while preparing metadata (a direct-URL dependency);
    # fetch the file itself from PyPI and check its hash:
    curl -o /tmp/bb/bigbench-1.0.0.tar.gz https://files.pythonhosted.org/packages/95/f8/\
c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/bigbench-1.0.0.tar.gz
    # sha256 1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2
    tar xzf /tmp/bb/bigbench-1.0.0.tar.gz -C /tmp/bb
    python scripts/build_task_suite.py /tmp/bb/bigbench-1.0.0/bigbench/benchmark_tasks            # both suites
    python scripts/build_task_suite.py BENCHMARK_TASKS --probe smollm2-135m --limit 200           # candidate probe

Two suites:

* ``small`` (task_data/*.jsonl): the first N items of four tasks in the file's order, for CI
  and quick runs;
* ``full`` (task_data/full/*.jsonl): every item of those four tasks plus the candidates on
  which both SmolLM2-135M and Gemma-3-270M passed the dense probe (``--probe``: float32, the
  first 200 items, verdicts by ``judge``, rows in results/task_suite/suite_probe.csv), at most
  ``FULL_CAP`` items per task. Each full file is a permutation seeded by the task name, so
  every prefix of it is a uniform random sample of the task (items can be added later without
  rescoring the ones already scored, and the probe's 200 items are the file's first 200).

Items whose target scores do not mark exactly one choice as correct (score 1, all others 0)
have no gold answer and are rejected (counted in the build log). The perplexity task
concatenates the fables of ``understanding_fables`` (Aesop, public domain).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "common" / "evaluation" / "task_data"
PROBE_CSV = Path(__file__).resolve().parents[1] / "results" / "task_suite" / "suite_probe.csv"
FULL_CAP = 3000
# timedial's items are long dialogues (~1 kB each): fewer of them keeps the repository small.
TASK_CAPS = {"timedial": 1500}

# small suite: task -> first N items. Chosen because SmolLM2-135M and Gemma-3-270M score clearly
# above chance on them; strategyqa, misconceptions, sports_understanding, anachronisms, odd_one_out,
# hyperbaton, winowhy and others were tried and left out (both models sit at chance there).
SMALL = {"social_iqa": 300, "movie_recommendation": 300, "general_knowledge": 70, "emoji_movie": 100}

# Candidates for the full suite: name -> BIG-bench task folders pooled into it (subtasks with
# hundreds of choices, such as abstract_narrative_understanding/99_distractors, are left out).
CANDIDATES = {
    "goal_step_wikihow": ["goal_step_wikihow/goal_inference", "goal_step_wikihow/step_inference",
                          "goal_step_wikihow/step_ordering"],
    "timedial": ["timedial"],
    "vitaminc_fact_verification": ["vitaminc_fact_verification"],
    "multiemo_en": ["multiemo/all_sentence_en"],
    "abstract_narrative_understanding": ["abstract_narrative_understanding/4_distractors"],
    "question_selection": ["question_selection"],
    "intent_recognition": ["intent_recognition"],
    "bbq_lite_disambig": [f"bbq_lite_json/{c}_disambig" for c in (
        "age", "disability_status", "gender_identity", "nationality", "physical_appearance", "race_ethnicity",
        "religion", "ses", "sexual_orientation")],
    "social_support": ["social_support"],
    "fact_checker_fever": ["fact_checker/fever"],
    "epistemic_reasoning": ["epistemic_reasoning"],
    "winowhy": ["winowhy"],
    "strategyqa": ["strategyqa"],
    "hyperbaton": ["hyperbaton"],
    "date_understanding": ["date_understanding"],
    "logical_deduction": ["logical_deduction/three_objects", "logical_deduction/five_objects",
                          "logical_deduction/seven_objects"],
    "disambiguation_qa": ["disambiguation_qa"],
    "analogical_similarity": ["analogical_similarity"],
}
# Candidates kept in the full suite: both models above chance in the probe (see ``judge``).
FULL_EXTRA = ["goal_step_wikihow", "bbq_lite_disambig", "timedial", "date_understanding"]

# hyperbaton's input lists both sentences ("a " ... " b " ... "); we score the sentences themselves.
HYPERBATON = re.compile(r'a " (.+?) " b " (.+?) "')


def gold_index(target_scores: dict) -> int | None:
    """Index of the single correct choice, or None when the scores do not mark exactly one (no gold)."""
    scores = list(target_scores.values()) if isinstance(target_scores, dict) else []
    if not scores or any(s not in (0, 1) for s in scores) or sum(s == 1 for s in scores) != 1:
        return None
    return scores.index(1)


def bigbench_prompt(task: dict, text: str) -> str:
    """The prompt BIG-bench itself builds for a zero-shot item (its default Q:/A: prefixes), stripped."""
    prefix = task.get("task_prefix", "")
    before = task.get("example_input_prefix", "\nQ: ")
    after = task.get("example_output_prefix", "\nA: ")
    return f"{prefix}{before}{text}{after}".strip()


def items_from_task(task_dir: Path, prompt_style: str, source: str | None = None,
                    first: int | None = None) -> tuple[list[dict], int]:
    """(items, rejected) of one BIG-bench task folder (its first ``first`` examples), in the file's order.

    ``prompt_style`` "plain" keeps the input (after the task prefix) for a per-task template;
    "bigbench" builds BIG-bench's own prompt, scored as is.
    """
    task = json.loads((task_dir / "task.json").read_text())
    source = source or task_dir.name
    items, rejected = [], 0
    for index, example in enumerate(task.get("examples", [])[:first]):
        gold = gold_index(example.get("target_scores"))
        if gold is None:
            rejected += 1
            continue
        choices = list(example["target_scores"])
        text = example["input"].strip()
        if task_dir.name == "hyperbaton":
            sentences = HYPERBATON.search(text).groups()
            choices, query = [s[0].upper() + s[1:] + "." for s in sentences], ""
            gold = 0 if example["target_scores"]["a"] == 1 else 1
        elif prompt_style == "bigbench":
            query = bigbench_prompt(task, text)
        else:
            prefix = task.get("task_prefix", "").strip()
            query = f"{prefix}\n{text}" if prefix else text
        items.append({"query": query, "choices": choices, "gold": gold, "source": f"{source}#{index}"})
    return items, rejected


def full_task_items(root: Path, name: str, folders: list[str], prompt_style: str, cap: int = FULL_CAP):
    """(items, rejected) of one full-suite task: its folders pooled, permuted by a seed from the name, capped."""
    items, rejected = [], 0
    for folder in folders:
        found, bad = items_from_task(root / folder, prompt_style, source=folder)
        items += found
        rejected += bad
    if not items:
        raise ValueError(f"task {name}: no item with a gold answer in {', '.join(folders)}; check the folder names")
    random.Random(name).shuffle(items)
    return items[:cap], rejected


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def fables(task_dir: Path) -> list[dict]:
    task = json.loads((task_dir / "task.json").read_text())
    seen, docs = set(), []
    for example in task["examples"]:
        text = example["input"].split("What is the moral")[0].strip()
        if text and text not in seen:
            seen.add(text)
            docs.append({"text": text})
    return docs


def build_small(root: Path, out: Path) -> None:
    for name, limit in SMALL.items():
        items, _ = items_from_task(root / name, "plain", first=limit)
        write_jsonl(out / f"{name}.jsonl", [{k: i[k] for k in ("query", "choices", "gold")} for i in items])
        print(f"small {name}: {len(items)} items")
    write_jsonl(out / "fables.jsonl", fables(root / "understanding_fables"))


def full_specs(extra: list[str]) -> list[tuple[str, list[str], str]]:
    """(name, BIG-bench folders, prompt style) of the full suite: the small tasks, then ``extra`` candidates."""
    return [(name, [name], "plain") for name in SMALL] + [(name, CANDIDATES[name], "bigbench") for name in extra]


def build_full(root: Path, out: Path, specs: list[tuple[str, list[str], str]], cap: int = FULL_CAP) -> dict:
    """Write ``out``/<task>.jsonl for each (name, folders, prompt style); return {task: (items, rejected)}."""
    counts = {}
    for name, folders, style in specs:
        items, rejected = full_task_items(root, name, folders, style, min(cap, TASK_CAPS.get(name, cap)))
        write_jsonl(out / f"{name}.jsonl", items)
        counts[name] = (len(items), rejected)
        print(f"full {name}: {len(items)} items ({rejected} rejected: no single gold answer)")
    print(f"full suite: {sum(n for n, _ in counts.values())} items in {len(counts)} tasks")
    return counts


def primary_metric(items: list[dict]) -> str:
    """acc for label tasks (every item offers the same choices: length normalization would only
    favour the shorter labels), acc_norm when the choices are free text of varying length."""
    return "acc" if len({tuple(sorted(i["choices"])) for i in items}) == 1 else "acc_norm"


def chance_p_value(correct: int, choices: list[int]) -> float:
    """One-sided p-value of >= ``correct`` right answers when guessing (item i right w.p. 1/choices[i]).

    Exact Poisson-binomial tail, so tasks that pool subtasks with different numbers of choices
    are tested against their own chance level.
    """
    dist = [1.0]
    for c in choices:
        q = 1.0 / c
        dist = [(dist[k] if k < len(dist) else 0.0) * (1 - q) + (dist[k - 1] * q if k > 0 else 0.0)
                for k in range(len(dist) + 1)]
    return float(min(1.0, sum(dist[correct:])))


def probe(root: Path, model_name: str, tasks: list[str], limit: int, batch_size: int, alpha: float = 0.01) -> None:
    """Dense float32 accuracy of ``model_name`` on the first ``limit`` items of each candidate.

    Rows go to results/task_suite/suite_probe.csv (one per model and task, replaced when rerun).
    """
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    from common.evaluation.bridge import SparseHFLM
    from common.evaluation.tasks import _yaml_for_multiple_choice
    from common.models.loading import load_causal_lm

    model, tokenizer = load_causal_lm(model_name, dtype=torch.float32)
    lm = SparseHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, sites=None)
    work = Path(tempfile.mkdtemp(prefix="suite_probe_"))
    for name in tasks:
        items, _ = full_task_items(root, name, CANDIDATES[name], "bigbench")
        items = items[:limit]
        write_jsonl(work / f"{name}.jsonl", items)
        (work / f"probe_{name}.yaml").write_text(_yaml_for_multiple_choice(f"probe_{name}", work / f"{name}.jsonl",
                                                                           "{{query}}"))
        manager = TaskManager(include_path=str(work), include_defaults=False)
        out = lm_eval.simple_evaluate(model=lm, tasks=[f"probe_{name}"], task_manager=manager, log_samples=True,
                                      bootstrap_iters=0, verbosity="ERROR")
        samples = sorted(out["samples"][f"probe_{name}"], key=lambda s: s["doc_id"])
        row = {"model": model_name, "task": name, "items": len(samples)}
        for m in ("acc", "acc_norm"):
            row[m] = round(sum(s[m] for s in samples) / len(samples), 4)
        row.update(judge(row, [items[s["doc_id"]] for s in samples], alpha))
        print(row, flush=True)
        _save_probe_row(row)


def judge(row: dict, items: list[dict], alpha: float = 0.01) -> dict:
    """Chance level, primary metric, p-values and the verdict of one probe row (``acc``, ``acc_norm``, ``items``).

    Above chance means p < ``alpha`` against guessing (exact, per-item number of choices) and, for
    label tasks, also against the best constant answer (one-sided binomial at the share of the
    most frequent gold label): a model that always answers "True" must not pass a task that is
    45% "True".
    """
    from scipy.stats import binomtest

    choices = [len(i["choices"]) for i in items]
    metric = primary_metric(items)
    out = {"chance": round(sum(1 / c for c in choices) / len(choices), 4), "metric": metric}
    for m in ("acc", "acc_norm"):
        out[f"p_{m}"] = f"{chance_p_value(int(round(float(row[m]) * len(items))), choices):.2e}"
    p_constant = None
    if metric == "acc":
        golds = [i["choices"][i["gold"]] for i in items]
        majority = max(golds.count(g) for g in set(golds)) / len(golds)
        correct = int(round(float(row[metric]) * len(items)))
        p_constant = binomtest(correct, len(items), majority, alternative="greater").pvalue
        out["majority"] = round(majority, 4)
    out["p_constant"] = "" if p_constant is None else f"{p_constant:.2e}"
    out["above_chance"] = bool(float(out[f"p_{metric}"]) < alpha and (p_constant is None or p_constant < alpha))
    return out


def rejudge(root: Path, limit: int, alpha: float = 0.01) -> None:
    """Recompute the verdicts of every row of the probe CSV from its stored accuracies."""
    with PROBE_CSV.open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        items = full_task_items(root, row["task"], CANDIDATES[row["task"]], "bigbench")[0][: int(row["items"])]
        row.update(judge(row, items, alpha))
    _write_probe_rows(rows)


def _save_probe_row(row: dict) -> None:
    rows = []
    if PROBE_CSV.is_file():
        with PROBE_CSV.open() as f:
            rows = [r for r in csv.DictReader(f) if (r["model"], r["task"]) != (row["model"], row["task"])]
    rows.append({k: str(v) for k, v in row.items()})
    _write_probe_rows(rows)


PROBE_COLUMNS = ["model", "task", "items", "chance", "majority", "metric", "acc", "acc_norm", "p_acc", "p_acc_norm",
                 "p_constant", "above_chance"]


def _write_probe_rows(rows: list[dict]) -> None:
    PROBE_CSV.parent.mkdir(parents=True, exist_ok=True)
    tmp = PROBE_CSV.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PROBE_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (r["model"] != "smollm2-135m", r["model"], r["task"])))
    tmp.replace(PROBE_CSV)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark_tasks", type=Path, help="bigbench/benchmark_tasks of the extracted sdist")
    parser.add_argument("--out", type=Path, default=DATA, help="task_data folder to write (default: the package's)")
    parser.add_argument("--probe", metavar="MODEL", help="probe the candidates with this model instead of building")
    parser.add_argument("--tasks", nargs="*", help="candidates to probe (default: all)")
    parser.add_argument("--limit", type=int, default=200, help="items per candidate in the probe")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="probe batch; the logits are batch x tokens x vocabulary floats (Gemma-3: 262k words, "
                             "so 16 timedial dialogues of ~1k tokens need ~17 GB)")
    parser.add_argument("--rejudge", action="store_true", help="recompute the probe CSV's verdicts and exit")
    args = parser.parse_args()
    if not (args.benchmark_tasks / "social_iqa" / "task.json").is_file():
        parser.error(f"{args.benchmark_tasks} is not BIG-bench's benchmark_tasks folder (no social_iqa/task.json)")
    unknown = [t for t in args.tasks or [] if t not in CANDIDATES]
    if unknown:
        parser.error(f"unknown candidate(s) {', '.join(unknown)}; choose from {', '.join(CANDIDATES)}")
    if args.rejudge:
        rejudge(args.benchmark_tasks, args.limit)
        return
    if args.probe:
        probe(args.benchmark_tasks, args.probe, args.tasks or list(CANDIDATES), args.limit, args.batch_size)
        return
    build_small(args.benchmark_tasks, args.out)
    build_full(args.benchmark_tasks, args.out / "full", full_specs(FULL_EXTRA))


if __name__ == "__main__":
    sys.exit(main())
