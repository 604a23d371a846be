"""The documentation holds: every relative link in README.md, docs/ and results/ resolves (anchors
included), the README's example commands run as written on the embedded defaults with a small
limit, and the findings page is the one its committed files give, byte for byte."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from common.analysis.findings import render, slug, write_page

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted(RESULTS.rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEAVY = {"experiments/dense_sweep.py", "experiments/moe_experts.py"}  # minutes even at --limit 1


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [m.group(1) for m in LINK.finditer(text)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = []
    for link in _links(page):
        if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(link)
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(link)
    assert not broken, f"{page.relative_to(REPO)}: broken links {broken}"


def test_readme_and_findings_page_stay_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 150
    assert len((RESULTS / "README.md").read_text().splitlines()) <= 300


def readme_commands() -> list[str]:
    """The README's example commands: lines of its bash blocks that run a study on its embedded
    default (no --model) or a reading (the first set-up command runs the LLaDA study too)."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("python ") and "--model" not in line]


def _case(command: str):
    script = shlex.split(command)[1]
    marks = [pytest.mark.slow] if script in HEAVY else []
    return pytest.param(command, marks=marks, id=command)


def test_the_readme_shows_one_example_per_study():
    scripts = {shlex.split(c)[1] for c in readme_commands()}
    assert {"experiments/llada_jaccard.py", "experiments/dense_sweep.py", "experiments/moe_experts.py"} <= scripts


def _committed(path: Path) -> bool:
    """A results path whose summary files are there (a folder with only cells is a run in progress)."""
    return path.is_file() or any(p.name != "store.json" for p in path.glob("*.json"))


@pytest.mark.parametrize("command", [_case(c) for c in readme_commands()])
def test_readme_example_runs_as_written(command, tmp_path):
    arguments = shlex.split(command)[1:]
    if arguments[0].startswith("experiments/"):
        arguments += ["--limit", "1", "--output", str(tmp_path / "out")]  # a small limit, out of the repository
    elif arguments[:3] == ["-m", "common.cli.report", "findings"]:
        arguments += ["--output", str(tmp_path / "page")]
    missing = [a for a in arguments if a.startswith("results/") and not _committed(REPO / a)]
    if missing:
        pytest.skip(f"{', '.join(missing)} is not committed yet")
    run = subprocess.run([sys.executable, *arguments], capture_output=True, text=True, cwd=REPO, timeout=1200,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    if arguments[0].startswith("experiments/"):
        assert "results: " in run.stdout and any((tmp_path / "out").glob("*.json"))


def test_the_findings_page_is_the_one_its_committed_files_give(tmp_path):
    page = render(RESULTS)
    assert page.text == (RESULTS / "README.md").read_text(), \
        "results/README.md is not current: run python -m common.cli.report findings"
    write_page(page, tmp_path)
    committed = {p.name: p.read_bytes() for p in (RESULTS / "figures").glob("*.png")}
    drawn = {p.name: p.read_bytes() for p in (tmp_path / "figures").glob("*.png")}
    assert set(committed) == set(drawn), "results/figures/ is not current: run python -m common.cli.report findings"
    assert committed == drawn, "a figure differs from the one its data give: run python -m common.cli.report findings"


def test_committed_results_stay_small():
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "results"], capture_output=True,
                            text=True, cwd=REPO)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    sizes = [(REPO / name).stat().st_size for name in listed.stdout.splitlines() if (REPO / name).is_file()]
    assert sum(sizes) < 5 * 2**20, f"results/ would commit {sum(sizes) / 2**20:.1f} MB"
