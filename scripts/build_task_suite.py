"""Extract the offline task suite from the BIG-bench sdist (Apache-2.0) into common/evaluation/task_data/.

    pip download --no-deps bigbench==1.0.0 -d /tmp/bb && tar xzf /tmp/bb/bigbench-1.0.0.tar.gz -C /tmp/bb
    python scripts/build_task_suite.py /tmp/bb/bigbench-1.0.0/bigbench/benchmark_tasks

Multiple-choice tasks keep the first N items in the file's order (a fixed, documented subset);
the perplexity task concatenates the fables of ``understanding_fables`` (Aesop, public domain).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "common" / "task_data"
# Chosen because SmolLM2-135M and Gemma-3-270M score clearly above chance on them (README of
# task_data); strategyqa, misconceptions, sports_understanding, anachronisms, odd_one_out,
# hyperbaton, winowhy and others were tried and left out: both models sit at chance there.
MULTIPLE_CHOICE = {"social_iqa": 300, "movie_recommendation": 300, "general_knowledge": 70, "emoji_movie": 100}
# hyperbaton's input lists both sentences ("a " ... " b " ... "); we score the sentences themselves.
HYPERBATON = re.compile(r'a " (.+?) " b " (.+?) "')


def multiple_choice(task_dir: Path, limit: int) -> list[dict]:
    task = json.loads((task_dir / "task.json").read_text())
    prefix = task.get("task_prefix", "").strip()
    items = []
    for example in task["examples"][:limit]:
        if task_dir.name == "hyperbaton":
            sentences = HYPERBATON.search(example["input"]).groups()
            gold = 0 if example["target_scores"]["a"] == 1 else 1
            items.append({"query": "", "choices": [s[0].upper() + s[1:] + "." for s in sentences], "gold": gold})
            continue
        choices = list(example["target_scores"])
        gold = [i for i, c in enumerate(choices) if example["target_scores"][c] == 1]
        if len(gold) != 1:
            continue
        query = example["input"].strip()
        items.append({"query": f"{prefix}\n{query}" if prefix else query, "choices": choices, "gold": gold[0]})
    return items


def fables(task_dir: Path) -> list[dict]:
    task = json.loads((task_dir / "task.json").read_text())
    seen, docs = set(), []
    for example in task["examples"]:
        text = example["input"].split("What is the moral")[0].strip()
        if text and text not in seen:
            seen.add(text)
            docs.append({"text": text})
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark_tasks", type=Path)
    parser.add_argument("--tasks", nargs="*", default=list(MULTIPLE_CHOICE))
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for name in args.tasks:
        items = multiple_choice(args.benchmark_tasks / name, MULTIPLE_CHOICE.get(name, 300))
        (OUT / f"{name}.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
        print(name, len(items))
    docs = fables(args.benchmark_tasks / "understanding_fables")
    (OUT / "fables.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    print("fables", len(docs))


if __name__ == "__main__":
    main()
