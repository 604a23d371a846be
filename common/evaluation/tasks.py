"""The offline task suites: real BIG-bench items shipped in ``common/evaluation/task_data`` as lm-eval tasks.

Two suites, built by ``scripts/build_task_suite.py``:

* ``small`` (``--tasks offline`` or ``small``): 769 items of four tasks (``bb_*``), for CI and
  quick runs;
* ``full`` (``--tasks full``): every item of those four tasks plus the tasks on which both
  SmolLM2-135M and Gemma-3-270M score clearly above chance, at most 3,000 items per task
  (``full_*``, files in ``task_data/full``). Each full file is a seeded permutation of its task,
  so its first n items are a uniform sample (``--limit n`` and item planning rely on that).

lm-eval resolves ``data_files`` against the working directory, so the YAML configs are written
at run time (idempotently) into a folder of the cache with absolute paths to the shipped data;
``task_manager()`` and the CLI wrapper point lm-eval at it with ``include_path``.

Items come from BIG-bench (Apache-2.0); Social IQa items are CC-BY-4.0 (Sap et al. 2019); the
fables are Aesop (public domain). See
``common/evaluation/task_data/LICENSES.md``.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from common.evaluation.store import atomic_write_text
from common.models.hub import hub_reachable
from common.models.loading import cache_dir

DATA = Path(__file__).parent / "task_data"

QUESTION = "Question: {{query}}\nAnswer:"
# name -> (data file under DATA, prompt template). Choices are scored as " " + choice after the prompt.
SMALL_TASKS = {
    "bb_social_iqa": ("social_iqa.jsonl", QUESTION),
    "bb_movie_recommendation": ("movie_recommendation.jsonl", "Find a movie similar to {{query}}"),
    "bb_general_knowledge": ("general_knowledge.jsonl", QUESTION),
    "bb_emoji_movie": ("emoji_movie.jsonl", "{{query}}\nAnswer:"),
}
# The full suite: the four small tasks with every item (same prompts), and tasks whose items
# carry BIG-bench's own zero-shot prompt in ``query`` (scored as is).
# Added tasks and their primary metric (acc_norm: free-text choices of varying length).
FULL_ADDED = {"goal_step_wikihow": "acc_norm", "bbq_lite_disambig": "acc_norm", "timedial": "acc_norm",
              "date_understanding": "acc_norm"}
FULL_TASKS = {f"full_{name[3:]}": (f"full/{file}", template) for name, (file, template) in SMALL_TASKS.items()}
FULL_TASKS.update({f"full_{name}": (f"full/{name}.jsonl", "{{query}}") for name in FULL_ADDED})
MULTIPLE_CHOICE_TASKS = {**SMALL_TASKS, **FULL_TASKS}
PERPLEXITY_TASKS = {"fables_ppl": "fables.jsonl"}
OFFLINE_SUITE = list(SMALL_TASKS)
FULL_SUITE = list(FULL_TASKS)
PERPLEXITY_TASK = "fables_ppl"
# The paper's nine tasks (lm-eval names; need the dataset hub) and their metric.
PAPER_TASKS = ["arc_easy", "arc_challenge", "piqa", "boolq", "hellaswag", "winogrande", "lambada_standard", "sciq",
               "triviaqa"]
# Named suites for --tasks; "offline" is the historical name of "small".
SUITES = {"offline": OFFLINE_SUITE + [PERPLEXITY_TASK], "small": OFFLINE_SUITE + [PERPLEXITY_TASK],
          "full": FULL_SUITE + [PERPLEXITY_TASK], "paper": PAPER_TASKS}
# Social IQa answers differ in length: its length-normalized accuracy is the informative one
# for small models (SmolLM2-135M: acc 0.29 at chance, acc_norm 0.43). The added tasks of the
# full suite: acc for label tasks (the same choices for every item), acc_norm otherwise.
PRIMARY_METRIC = {"triviaqa": "exact_match", "fables_ppl": "word_perplexity", "bb_social_iqa": "acc_norm",
                  "full_social_iqa": "acc_norm", **{f"full_{name}": metric for name, metric in FULL_ADDED.items()}}


def primary_metric(task: str) -> str:
    return PRIMARY_METRIC.get(task, "acc")


def _yaml_header(name: str, data_file: Path, output_type: str) -> list[str]:
    return [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
            f"    test: {json.dumps(str(data_file))}", "test_split: test", f"output_type: {output_type}"]


def _yaml_for_multiple_choice(name: str, data_file: Path, template: str) -> str:
    return "\n".join(_yaml_header(name, data_file, "multiple_choice") + [
        f"doc_to_text: {json.dumps(template)}",
        "doc_to_target: \"{{gold}}\"",
        "doc_to_choice: \"{{choices}}\"",
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
        "",
    ])


def _yaml_for_perplexity(name: str, data_file: Path) -> str:
    return "\n".join(_yaml_header(name, data_file, "loglikelihood_rolling") + [
        "doc_to_text: \"\"",
        "doc_to_target: \"{{text}}\"",
        "metric_list:",
        "  - metric: word_perplexity",
        "  - metric: byte_perplexity",
        "  - metric: bits_per_byte",
        "metadata:",
        "  version: 1.0",
        "",
    ])


def offline_task_dir() -> Path:
    """Write (or refresh) the YAML configs of the offline suite; return the include path.

    One folder per installed copy of the data (keyed by its path), so two checkouts sharing a
    cache never rewrite each other's absolute paths.
    """
    key = hashlib.sha256(str(DATA.resolve()).encode()).hexdigest()[:12]
    folder = cache_dir() / "lm_eval_tasks" / key
    folder.mkdir(parents=True, exist_ok=True)
    for name, (file, template) in MULTIPLE_CHOICE_TASKS.items():
        _write_if_changed(folder / f"{name}.yaml", _yaml_for_multiple_choice(name, DATA / file, template))
    for name, file in PERPLEXITY_TASKS.items():
        _write_if_changed(folder / f"{name}.yaml", _yaml_for_perplexity(name, DATA / file))
    return folder


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)  # a shard starting beside this one never reads half a config


def task_manager(include_defaults: bool = False):
    """An lm-eval TaskManager that knows the offline suite (and the built-in tasks if asked)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(offline_task_dir()), include_defaults=include_defaults)


def is_offline_task(name: str) -> bool:
    return name in MULTIPLE_CHOICE_TASKS or name in PERPLEXITY_TASKS


@lru_cache(maxsize=1)
def builtin_task_index() -> dict:
    """lm-eval's own task index (name -> entry with its config), built once: indexing its YAML
    files takes a few seconds, so only runs naming tasks outside the offline suites pay it."""
    from lm_eval.tasks import TaskManager

    return TaskManager().task_index


def task_metrics(name: str) -> set[str] | None:
    """The metrics a scored task reports (None where --metric does not apply: perplexity tasks, and
    built-in tasks whose config does not list its metrics itself)."""
    if name in PERPLEXITY_TASKS:
        return None
    if name in MULTIPLE_CHOICE_TASKS:
        return {"acc", "acc_norm"}
    entry = builtin_task_index().get(name)
    listed = (getattr(entry, "cfg", None) or {}).get("metric_list") if entry is not None else None
    return {m["metric"] for m in listed if isinstance(m, dict) and "metric" in m} if listed else None


def check_tasks(names: list[str]) -> None:
    """Fail early, in one line, for task names lm-eval does not know and for tasks that cannot be
    loaded offline."""
    import difflib
    import os

    unknown_offline = [n for n in names if not is_offline_task(n)]
    if unknown_offline:
        known = builtin_task_index()
        unknown = [n for n in unknown_offline if n not in known]
        if unknown:
            close = difflib.get_close_matches(unknown[0], [*known, *MULTIPLE_CHOICE_TASKS, *SUITES], n=3)
            raise ValueError(f"unknown task {', '.join(unknown)}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                             + f"; give lm-eval task names or a suite: {', '.join(SUITES)}")
    if unknown_offline and os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise ValueError(f"tasks {', '.join(unknown_offline)} need the dataset hub but HF_DATASETS_OFFLINE=1; "
                         "use an offline suite (--tasks small or full) or its tasks, or go online")
    if unknown_offline and not hub_reachable():
        # no retries against an unreachable hub: datasets then reads its local cache or fails at once
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        print(f"the dataset hub cannot be reached: {', '.join(unknown_offline)} load from the local datasets cache "
              "only (run once online to cache them, or use --tasks small or full)")


def resolve_task_names(names: list[str] | None) -> list[str]:
    """Task names with suite names expanded: 'offline' (default) or 'small' = the small suite plus
    its perplexity task, 'full' = the full suite plus the perplexity task, 'paper' = the paper's nine."""
    out: list[str] = []
    for name in names or ["offline"]:
        out += [n for n in SUITES.get(name, [name]) if n not in out]
    return out


def task_size(name: str, manager) -> int:
    """Number of evaluation items of a task (the documents lm-eval scores, before any limit)."""
    from lm_eval.tasks import get_task_dict

    task = get_task_dict([name], manager)[name]
    return len(list(task.eval_docs))
