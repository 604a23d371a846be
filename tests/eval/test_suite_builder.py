"""The task-suite builder on a synthetic BIG-bench folder, and the shipped suites' registry."""

import importlib.util
import json
from pathlib import Path

import pytest
from scipy.stats import binomtest

from common.evaluation import tasks

REPO = Path(__file__).resolve().parents[2]


def _builder():
    spec = importlib.util.spec_from_file_location("build_task_suite", REPO / "scripts" / "build_task_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _task(folder: Path, examples: list[dict], **keys) -> None:
    folder.mkdir(parents=True)
    (folder / "task.json").write_text(json.dumps({"name": folder.name, "examples": examples, **keys}))


@pytest.fixture
def bench(tmp_path):
    root = tmp_path / "benchmark_tasks"
    good = [{"input": f"Question {i}?", "target_scores": {f"yes {i}": int(i % 3 == 0), f"no {i}": int(i % 3 != 0)}}
            for i in range(40)]
    no_gold = [{"input": "Two right answers?", "target_scores": {"a": 1, "b": 1}},
               {"input": "Partial credit?", "target_scores": {"a": 0.5, "b": 0}},
               {"input": "None right?", "target_scores": {"a": 0, "b": 0}},
               {"input": "Generative only", "target": "x"}]
    _task(root / "quiz", good[:20] + no_gold + good[20:], task_prefix="Answer the quiz.\n",
          example_input_prefix="\nQ: ", example_output_prefix="\nA: ")
    _task(root / "pooled" / "part_one", good[:15])
    _task(root / "pooled" / "part_two", [{**e, "input": e["input"].replace("Question", "Ask")} for e in good[:10]])
    specs = [("quiz", ["quiz"], "plain"), ("pooled", ["pooled/part_one", "pooled/part_two"], "bigbench")]
    return root, specs


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.jsonl"))}


def test_builder_is_deterministic_and_rejects_items_without_gold(bench, tmp_path, capsys):
    builder = _builder()
    root, specs = bench
    first = builder.build_full(root, tmp_path / "one", specs, cap=1000)
    builder.build_full(root, tmp_path / "two", specs, cap=1000)
    assert _files(tmp_path / "one") == _files(tmp_path / "two") and len(_files(tmp_path / "one")) == 2
    assert first == {"quiz": (40, 4), "pooled": (25, 0)}
    assert "quiz: 40 items (4 rejected: no single gold answer)" in capsys.readouterr().out
    quiz = [json.loads(line) for line in (tmp_path / "one" / "quiz.jsonl").read_text().splitlines()]
    assert not any("right" in item["query"] or "Partial" in item["query"] for item in quiz)
    # every item once, with its gold answer, in a permutation that is not the file's order
    sources = [item["source"] for item in quiz]
    assert sorted(sources) == sorted(f"quiz#{i}" for i in [*range(20), *range(24, 44)])
    assert sources != sorted(sources, key=lambda s: int(s.split("#")[1]))
    for item in quiz:
        i = int(item["query"].split()[-1].rstrip("?"))
        assert item["choices"][item["gold"]] == (f"yes {i}" if i % 3 == 0 else f"no {i}")
        assert item["query"] == f"Answer the quiz.\nQuestion {i}?"  # plain style: prefix and input only


def test_capped_files_are_prefixes_and_bigbench_prompts(bench, tmp_path):
    builder = _builder()
    root, specs = bench
    builder.build_full(root, tmp_path / "all", specs, cap=1000)
    builder.build_full(root, tmp_path / "capped", specs, cap=7)
    for name in ("quiz.jsonl", "pooled.jsonl"):
        whole = (tmp_path / "all" / name).read_text().splitlines()
        assert (tmp_path / "capped" / name).read_text().splitlines() == whole[:7]
    pooled = [json.loads(line) for line in (tmp_path / "all" / "pooled.jsonl").read_text().splitlines()]
    assert {item["source"].split("#")[0] for item in pooled} == {"pooled/part_one", "pooled/part_two"}
    asked = next(item for item in pooled if item["source"] == "pooled/part_two#4")
    assert asked["query"] == "Q: Ask 4?\nA:"  # BIG-bench's default zero-shot prefixes, stripped


def test_builder_rejects_a_task_without_any_gold(tmp_path):
    builder = _builder()
    _task(tmp_path / "bad", [{"input": "x", "target_scores": {"a": 1, "b": 1}}])
    with pytest.raises(ValueError, match="no item with a gold answer"):
        builder.build_full(tmp_path, tmp_path / "out", [("bad", ["bad"], "bigbench")])


def test_chance_p_value():
    builder = _builder()
    for correct, n, choices in [(60, 200, 4), (115, 200, 2), (80, 200, 3)]:
        expected = binomtest(correct, n, 1 / choices, alternative="greater").pvalue
        assert builder.chance_p_value(correct, [choices] * n) == pytest.approx(expected, rel=1e-9)
    # two items, chance 1/2 and 1/4: P(both right) = 1/8, P(at least one) = 1 - 1/2 * 3/4
    assert builder.chance_p_value(2, [2, 4]) == pytest.approx(1 / 8)
    assert builder.chance_p_value(1, [2, 4]) == pytest.approx(1 - 3 / 8)


def test_shipped_suites():
    builder = _builder()
    assert tasks.FULL_SUITE == [f"full_{name}" for name, _, _ in builder.full_specs(builder.FULL_EXTRA)]
    for name, (file, _) in tasks.MULTIPLE_CHOICE_TASKS.items():
        assert (tasks.DATA / file).is_file(), name
    small = tasks.OFFLINE_SUITE + [tasks.PERPLEXITY_TASK]
    assert tasks.resolve_task_names(None) == tasks.resolve_task_names(["offline"]) == small
    assert tasks.resolve_task_names(["small"]) == small
    full = tasks.resolve_task_names(["full"])
    assert full[-1] == tasks.PERPLEXITY_TASK and all(n.startswith("full_") for n in full[:-1])
    assert tasks.resolve_task_names(["bb_general_knowledge", "arc_easy"]) == ["bb_general_knowledge", "arc_easy"]
    assert tasks.resolve_task_names(["paper"]) == tasks.PAPER_TASKS
    items = {}
    for name in full[:-1]:
        rows = [json.loads(line) for line in (tasks.DATA / tasks.MULTIPLE_CHOICE_TASKS[name][0]).read_text().splitlines()]
        assert all(0 <= r["gold"] < len(r["choices"]) for r in rows) and len(rows) <= builder.FULL_CAP
        if name[5:] in builder.FULL_EXTRA:  # added tasks: the metric the probe judged them by
            assert tasks.primary_metric(name) == builder.primary_metric(rows)
        items[name] = rows
    assert sum(len(rows) for rows in items.values()) >= 10_000
    # the small suite's items are all in the full suite, with the same prompt and answer
    for name in tasks.OFFLINE_SUITE:
        full_rows = {(r["query"], tuple(r["choices"]), r["gold"]) for r in items[f"full_{name[3:]}"]}
        small_rows = [json.loads(line) for line in (tasks.DATA / tasks.SMALL_TASKS[name][0]).read_text().splitlines()]
        assert {(r["query"], tuple(r["choices"]), r["gold"]) for r in small_rows} <= full_rows


def test_full_tasks_load_in_lm_eval_with_their_prompts():
    from lm_eval.tasks import get_task_dict

    added = f"full_{_builder().FULL_EXTRA[0]}"
    loaded = get_task_dict(["full_social_iqa", added], tasks.task_manager())
    for name, query_to_prompt in (("full_social_iqa", lambda q: f"Question: {q}\nAnswer:"), (added, lambda q: q)):
        task = loaded[name]
        doc = next(iter(task.test_docs()))
        first = json.loads((tasks.DATA / tasks.MULTIPLE_CHOICE_TASKS[name][0]).read_text().splitlines()[0])
        assert task.doc_to_text(doc) == query_to_prompt(first["query"])
        assert task.doc_to_choice(doc) == first["choices"] and task.doc_to_target(doc) == first["gold"]
