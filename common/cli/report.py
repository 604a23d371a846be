"""Read finished result folders (nothing is evaluated), and write the findings page.

    python -m common.cli.report tables FOLDER [FOLDER ...]
    python -m common.cli.report search-vs-grid SEARCH_FOLDER GRID_FOLDER
    python -m common.cli.report models GRID_A GRID_B [--json FILE]
    python -m common.cli.report criteria FOLDER [FOLDER ...] [--json FILE] [--figure PATH]
    python -m common.cli.report replicates GRID OTHER_GRID [...]
    python -m common.cli.report leave-out COUNT GRID [...]
    python -m common.cli.report flips GRID [MAX_SPARSITY]
    python -m common.cli.report item-estimate GRID [TARGET_HALFWIDTH]
    python -m common.cli.report cell-time BEFORE AFTER
    python -m common.cli.report findings [--results DIR] [--check]

Each subcommand has its own --help; docs/reading-results.md explains every reading.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from common.cli.flags import run_main
from common.evaluation.tasks import PERPLEXITY_TASKS

READINGS = {
    "tables": "the Markdown tables of each folder: critical sparsity, isotonic readings, McNemar, site orderings "
              "(dense sweeps); expert sparsity per layer (MoE studies)",
    "search-vs-grid": "a search's crossings against the full grid's, per site, and whether each lies within one "
                      "grid step",
    "models": "two models swept on the same items: critical sparsities side by side and the curves at the same "
              "measured sparsity; --json writes the comparison for the findings page",
    "criteria": "each criterion (--criterion) against magnitude top-p at the same site and measured sparsity, "
                "paired over the items (answer KL, perplexity ratio, accuracy), each criterion's PPL-1% and accuracy "
                "crossings, and its cost per cell; the baseline may come from another folder of the same model and "
                "items; --json writes the comparison",
    "replicates": "grids of one model on the same items that differ only in rounding: each site's crossing against "
                  "the first grid's, within one grid step or not",
    "leave-out": "each grid's crossing read again with every set of COUNT (1-3) grid values left out",
    "flips": "per site, the share of items whose answer differs from dense along the grid, and how many still "
             "differ at the next value",
    "item-estimate": "what an item-planned sweep to +-TARGET_HALFWIDTH (default 0.05) would cost, read from a grid",
    "cell-time": "two stores of one sweep: summed cell time per site on the cells both hold, and how far the "
                 "scores moved",
    "findings": "write results/README.md and its figures from the committed summary files (never edit it by hand)",
}


class OneLineParser(argparse.ArgumentParser):
    """Argument errors in one line (exit status 2) that point to --help."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see: python -m common.cli.report --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command's parser; positionals are taken as given and checked by ``run`` (one-line errors)."""
    parser = OneLineParser(prog="python -m common.cli.report", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="READING", parser_class=OneLineParser)
    commands.required = True

    def add(name: str, *positionals: tuple[str, str, str, str]) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=READINGS[name], description=READINGS[name])
        for dest, metavar, nargs, text in positionals:
            sub.add_argument(dest, metavar=metavar, nargs=nargs, help=text)
        return sub

    add("tables", ("folders", "FOLDER", "*", "finished result folders (with critical.json or experts.json)"))
    add("search-vs-grid", ("folders", "FOLDER", "*", "a search folder (with search.json), then a finished grid folder"))
    add("models", ("folders", "GRID", "*", "two finished grid folders of two models on the same items (cells "
                   "needed)")).add_argument("--json", type=Path, default=None, metavar="FILE",
                                            help="also write the comparison there, e.g. "
                                                 "results/dense_sweep/A-vs-B/small-grid/comparison.json")
    criteria = add("criteria", ("folders", "FOLDER", "*", "finished sweep folders with criteria (cells needed); magnitude "
                     "top-p in one of them"))
    criteria.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the comparison there")
    criteria.add_argument("--figure", type=Path, default=None, metavar="PATH",
                          help="also draw answer KL against measured sparsity of every criterion, the baseline "
                               "included, as PATH.png and PATH.pdf (folders of one model)")
    add("replicates", ("folders", "GRID", "*", "two or more finished grid folders, the first the reference"))
    add("leave-out", ("count", "COUNT", "?", "how many grid values to leave out at a time: 1, 2 or 3"),
        ("folders", "GRID", "*", "finished grid folders"))
    add("flips", ("folders", "GRID", "*", "a finished grid folder (cells needed)"),
        ("max_sparsity", "MAX_SPARSITY", "?", "highest measured sparsity read (default 0.45)"))
    add("item-estimate", ("folders", "GRID", "*", "a finished grid folder (cells needed)"),
        ("halfwidth", "TARGET_HALFWIDTH", "?", "target half-width in sparsity (default 0.05)"))
    add("cell-time", ("folders", "FOLDER", "*", "two sweep folders (each with its cells/): before, after"))
    findings = add("findings")
    findings.add_argument("--results", type=Path, default=Path("results"),
                          help="the results folder holding the committed summary files (default: results)")
    findings.add_argument("--output", type=Path, default=None,
                          help="write README.md and figures/ here instead (default: the --results folder)")
    findings.add_argument("--check", action="store_true",
                          help="write nothing; exit 1 if the page in --results is not the one its data give")
    return parser


def _finished_sweeps(folders: list[Path]) -> bool:
    return bool(folders) and all((f / "critical.json").is_file() and (f / "tidy.csv").is_file() for f in folders)


def _number(text: str | None, default: float) -> float:
    if text is None:
        return default
    try:
        return float(text)
    except ValueError:
        return math.nan


def _split_trailing_number(folders: list[str], number: str | None) -> tuple[list[Path], str | None]:
    """``flips`` and ``item-estimate`` take FOLDER [NUMBER]: argparse gives a lone number to the folder."""
    names = list(folders) + ([number] if number is not None else [])
    if len(names) >= 2 and not Path(names[-1]).exists():
        return [Path(n) for n in names[:-1]], names[-1]
    return [Path(n) for n in names], None


def run(args: argparse.Namespace, label: str | None = None) -> int:
    """Run one reading; a user error raises ValueError with a one-line message that names ``label``
    (the subcommand, or the old script's flag). Returns the exit status."""
    from common.analysis import tables

    label = args.command if label is None else label
    folders = [Path(f) for f in getattr(args, "folders", None) or []]
    if args.command == "findings":
        return _findings(args)
    if args.command == "leave-out":
        if args.count not in {"1", "2", "3"}:
            raise ValueError(f"{label} needs how many grid values to leave out at a time (1, 2 or 3) before the "
                             f"folders; got {args.count}")
        if not _finished_sweeps(folders):
            raise ValueError(f"{label} needs one or more finished sweep folders (with critical.json and tidy.csv) "
                             "after the count")
        tables.leave_out_table(int(args.count), folders)
    elif args.command == "replicates":
        if len(folders) < 2 or not _finished_sweeps(folders):
            raise ValueError(f"{label} needs two or more finished sweep folders (with critical.json and tidy.csv), "
                             "the first the reference grid")
        specs = [json.loads((f / "critical.json").read_text())["spec"] for f in folders]
        same = {"model", "rule", "limit", "metric", "power", "layers"}
        scoring = [sorted(t for t in spec["tasks"] if t not in PERPLEXITY_TASKS) for spec in specs]
        if any({k: s.get(k) for k in same} != {k: specs[0].get(k) for k in same} for s in specs) or any(
                t != scoring[0] for t in scoring):
            raise ValueError(f"{label} compares grids of one model, rule and item set (the same model, rule, tasks "
                             "and --limit); these differ")
        tables.replicates_table(folders)
    elif args.command == "flips":
        folders, text = _split_trailing_number(getattr(args, "folders", []), args.max_sparsity)
        if len(folders) != 1 or not _finished_sweeps(folders):
            raise ValueError(f"{label} needs a finished sweep folder (with critical.json and tidy.csv); got "
                             f"{' '.join(map(str, folders)) or 'none'}")
        max_sparsity = _number(text, 0.45)
        if not 0 < max_sparsity <= 1:
            raise ValueError(f"{label}' highest measured sparsity must be a number in (0, 1], e.g. 0.45; got {text}")
        tables.flips_table(folders[0], max_sparsity)
    elif args.command == "cell-time":
        if len(folders) != 2 or not all((f / "cells").is_dir() for f in folders):
            raise ValueError(f"{label} needs two sweep folders (each with a cells/ folder)")
        tables.cell_time_tables(*folders)
    elif args.command == "models":
        if len(folders) != 2 or not _finished_sweeps(folders):
            raise ValueError(f"{label} needs two finished sweep folders (with critical.json and tidy.csv)")
        comparison = tables.model_comparison(*folders)
        tables.models_tables(*folders, comparison=comparison)
        if getattr(args, "json", None) is not None:
            from common.evaluation.store import atomic_write_json

            atomic_write_json(args.json, comparison)
            print(f"written: {args.json}")
    elif args.command == "criteria":
        if not _finished_sweeps(folders):
            raise ValueError(f"{label} needs one or more finished sweep folders (with critical.json and tidy.csv)")
        models = tables.criteria_models(folders)
        if getattr(args, "figure", None) is not None and len(models) > 1:
            raise ValueError(f"{label} --figure draws one model; these folders hold {', '.join(sorted(models))}: "
                             "give the folders of one model")
        comparison = tables.criteria_comparison(folders)
        tables.criteria_tables(comparison)
        if getattr(args, "json", None) is not None:
            from common.evaluation.store import atomic_write_json

            atomic_write_json(args.json, comparison)
            print(f"written: {args.json}")
        if getattr(args, "figure", None) is not None:
            for path in tables.criteria_figure(folders, args.figure):
                print(f"written: {path}")
    elif args.command == "item-estimate":
        folders, text = _split_trailing_number(getattr(args, "folders", []), args.halfwidth)
        if len(folders) != 1 or not (folders[0] / "critical.json").is_file():
            raise ValueError(f"{label} needs a finished sweep folder (with critical.json); got "
                             f"{' '.join(map(str, folders)) or 'none'}")
        halfwidth = _number(text, 0.05)
        if not 0 < halfwidth < 1:
            raise ValueError(f"{label}'s target half-width must be a number in (0, 1), e.g. 0.05; got {text}")
        tables.item_estimate(folders[0], halfwidth)
    elif args.command == "search-vs-grid":
        if len(folders) != 2 or not (folders[0] / "search.json").is_file() or not _finished_sweeps(folders[1:]):
            raise ValueError(f"{label} needs a search folder (with search.json) and a finished grid folder (with "
                             "critical.json and tidy.csv)")
        tables.search_vs_grid(*folders)
    else:
        empty = [f for f in folders if not any((f / name).is_file() for name in ("experts.json", "critical.json"))]
        if not folders or empty:
            named = f" (not one: {', '.join(map(str, empty))})" if empty else ""
            raise ValueError(f"{label + ': ' if label else ''}name finished result folders (with critical.json or "
                             f"experts.json){named}")
        for folder in folders:
            if (folder / "experts.json").is_file():
                tables.moe_tables(folder)
            if (folder / "critical.json").is_file():
                tables.dense_tables(folder)
    return 0


def _findings(args: argparse.Namespace) -> int:
    """Write (or with --check, compare) the findings page and its figures."""
    from common.analysis.findings import render, write_page

    if not args.results.is_dir():
        raise ValueError(f"findings: {args.results} is not a folder; run from the repository root or give --results")
    page = render(args.results)
    if args.check:
        current = args.results / "README.md"
        if not current.is_file() or current.read_text() != page.text:
            print(f"{current} is not the page its data give: run python -m common.cli.report findings",
                  file=sys.stderr)
            return 1
        stale = _stale_figures(page, args.results / "figures")
        if stale:
            print(f"{', '.join(stale)} in {args.results / 'figures'} differ from the figures their data give: "
                  "run python -m common.cli.report findings", file=sys.stderr)
            return 1
        print(f"{current} and its figures are current")
        return 0
    written = write_page(page, args.output or args.results)
    print(f"written: {written}")
    return 0


def _stale_figures(page, folder: Path) -> list[str]:
    """The page's figures that are missing from ``folder`` or differ from a fresh drawing, and PNGs
    there that no finding draws."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        stale = []
        for name, draw_figure in page.figures.items():
            draw_figure(Path(scratch) / name)
            here = folder / name
            if not here.is_file() or here.read_bytes() != (Path(scratch) / name).read_bytes():
                stale.append(name)
    return stale + sorted(p.name for p in folder.glob("*.png") if p.name not in page.figures)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    status = [0]

    def reading() -> None:
        status[0] = run(args)

    run_main(reading)
    sys.exit(status[0])


if __name__ == "__main__":
    main()
