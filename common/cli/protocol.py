"""The dense sweep's protocols: ``quick`` (the default, minutes on two CPU cores) and ``paper`` (every
grid value on every item, the paper's protocol), and the lines a quick sweep leads with.

``quick`` spends its evaluations on the readings that decide at a few hundred items: the PPL-1%
critical sparsity per site (a noise-aware search on the perplexity ratio, every task scored at
each value it evaluates) and the sites compared by answer KL at the same measured sparsity; the
accuracy crossing is read off the same points, with its band and a plain statement of whether the
item count decides it. ``paper`` is the full grid of the paper on every item of the suite. Flags
given explicitly (``--sites``, ``--limit``, ``--grid``, ``--search``, ``--budget``) win over a
protocol's defaults; the first lines printed say what a protocol left out.
"""

from __future__ import annotations

import math

from common.analysis.critical import band_bounds
from common.analysis.search import QUICK_BUDGET
from common.core.sites import SITES

PROTOCOLS = {
    "quick": {"sites": ["intermediate", "input"], "limit": 50, "search": True, "lead": "ppl", "budget": QUICK_BUDGET},
    "paper": {"sites": list(SITES), "limit": 0, "search": False, "lead": "accuracy", "budget": None},
}
DEFAULT_PROTOCOL = "quick"
# flags that choose how values are spent: given explicitly, the protocol's search is not applied
GRID_FLAGS = {"search", "grid", "target_halfwidth", "stop_below", "stop_after", "targets"}
DECIDED_WIDTH = 0.1  # an accuracy crossing counts as decided when its band is closed and at most this wide


def apply_protocol(args, explicit: set[str]) -> dict:
    """Fill the flags the user did not give (``explicit``: the names given on the command line) from
    ``args.protocol``'s defaults, and set ``args.lead``; returns those defaults. An explicit
    ``--search`` keeps the accuracy-led search (and its budget); the quick protocol's own search
    follows PPL-p%."""
    chosen = PROTOCOLS[args.protocol]
    for name in ("sites", "limit"):
        if name not in explicit:
            setattr(args, name, chosen[name])
    criteria = [c for c in (getattr(args, "criterion", None) or []) if c != "magnitude"]
    if not explicit & GRID_FLAGS and not criteria:  # the grid's own flags, and other criteria, ask for the grid
        args.search = chosen["search"]
    args.lead = chosen["lead"] if args.search and "search" not in explicit else "accuracy"
    if args.lead == "ppl" and "budget" not in explicit:
        args.budget = chosen["budget"]
    return chosen


def explicit_flags(parser, argv: list[str]) -> set[str]:
    """The destinations of the options present in ``argv`` (``--sites`` -> ``sites``)."""
    given = set()
    for action in parser._actions:
        if any(arg == option or arg.startswith(option + "=") for arg in argv for option in action.option_strings):
            given.add(action.dest)
    return given


def offline_items(tasks: list[str]) -> dict[str, int]:
    """Items (documents) per task of the offline suites (tasks outside them are not counted)."""
    from common.evaluation.tasks import DATA, MULTIPLE_CHOICE_TASKS, PERPLEXITY_TASKS

    files = {**{name: file for name, (file, _) in MULTIPLE_CHOICE_TASKS.items()}, **PERPLEXITY_TASKS}
    return {task: sum(1 for line in (DATA / files[task]).read_text().splitlines() if line.strip())
            for task in tasks if task in files}


def announce(args, tasks: list[str]) -> None:
    """Say before any model loads which protocol runs and what it leaves out of the paper's."""
    missing = left_out(args, offline_items(tasks))
    plan = ("noise-aware search led by PPL-1%, every task scored at each value" if args.search and args.lead == "ppl"
            else "noise-aware search" if args.search else "grid")
    print(f"protocol {args.protocol}: sites {', '.join(args.sites)}; "
          f"{'every item' if not args.limit else f'the first {args.limit} items per task'}; {plan}"
          + (f". Left out: {'; '.join(missing)}" if missing else ""))


def left_out(args, suite_items: dict[str, int]) -> list[str]:
    """What this run leaves out of the paper's protocol, one phrase each (empty for ``paper``)."""
    out = []
    missing_sites = [s for s in SITES if s not in args.sites]
    if missing_sites:
        out.append(f"sites {', '.join(missing_sites)} (--sites all)")
    if args.limit:
        skipped = {task: total - args.limit for task, total in suite_items.items() if total > args.limit}
        if skipped:
            out.append(f"{sum(skipped.values()):,} of {sum(suite_items.values()):,} items and documents beyond the "
                       f"first {args.limit} per task (--limit 0)")
    if args.search:
        out.append("the paper's 26-value grid (--protocol paper)")
    return out


def print_leading_lines(summary: dict, ppl_percent: float, items_per_task: int | None) -> None:
    """The quick sweep's first lines: PPL-p% per site with the interval that covers, the sites by
    answer KL at the same sparsity, and the accuracy crossing with its band and whether it is decided."""
    critical = summary.get("critical", [])
    ppl_key = next((k for entry in critical for k in entry if k.startswith("ppl_")), None)
    print(f"PPL-{ppl_percent:g}% critical sparsity per site (isotonic crossing; 95% interval: the wider of the "
          "document bootstrap and the band):")
    for entry in critical:
        reading = (entry.get(ppl_key) or {}).get("isotonic") if ppl_key else None
        if not reading:
            print(f"  {entry['site']:>12}: no perplexity task in this run")
            continue
        low, high = covering_interval(reading)
        print(f"  {entry['site']:>12}: {reading['crossing']:.3f} [{low:.3f}, {_end(high)} ({reading['status']})")
    kl = [row for row in summary.get("orderings", []) if row["measure"] == "choice_kl"]
    if kl:
        print("sites at the same measured sparsity, answer KL(dense || sparse) difference a - b [95% interval] "
              "(lower is closer to dense):")
        for pair in sorted({tuple(row["sites"]) for row in kl}):
            rows = [row for row in kl if tuple(row["sites"]) == pair]
            print(f"  {pair[0]} vs {pair[1]}: " + "; ".join(
                f"at {row['level']:g} {row['difference']:+.3g} [{row['interval'][0]:+.3g}, {row['interval'][1]:+.3g}]"
                f" {row['better'] + ' closer' if row['decided'] else 'undecided'}" for row in rows))
    items = f"{items_per_task} items per task" if items_per_task else "every item"
    print(f"accuracy ({items}; {summary.get('threshold', 0.99):g} of the dense task-average score):")
    for entry in critical:
        isotonic = (entry.get("task_average_curve") or {}).get("isotonic")
        if not isotonic:
            continue
        band = isotonic.get("band")
        verdict = accuracy_verdict(band, items)
        print(f"  {entry['site']:>12}: crossing {isotonic['crossing']:.3f}, band "
              f"{band_bounds(band) if band else 'none'}: {verdict}")


def covering_interval(reading: dict) -> tuple[float, float]:
    """The wider of a reading's bootstrap interval and its band (each end the farther one): the
    interval that held the true PPL crossing in the coverage checks (docs/statistics.md)."""
    low, high = reading["interval"]
    band = reading.get("band") or [low, high]
    band_high = math.inf if band[1] is None else band[1]
    return min(low, band[0]), max(high, band_high)


def accuracy_verdict(band, items: str) -> str:
    """Whether an accuracy crossing's band decides it: closed and at most ``DECIDED_WIDTH`` wide."""
    if not band or band[1] is None or band[1] == math.inf or band[1] - band[0] > DECIDED_WIDTH:
        return f"{items} cannot decide it (its band is open or wider than {DECIDED_WIDTH:g}); PPL and answer KL do"
    return "decided"


def _end(value: float) -> str:
    return "open)" if value == math.inf else f"{value:.3f}]"
