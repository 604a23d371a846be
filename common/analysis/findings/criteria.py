"""The criteria finding: which criterion keeps most of the model at equal measured sparsity, against
magnitude top-p, paired over the items; read from each model's committed criteria comparison
(``report criteria --json``), with each criterion's evaluation time against magnitude top-p from the
side-by-side benchmark (``bench_eval_overhead.py --criteria``) where it ran."""

from __future__ import annotations

from pathlib import Path

from common.analysis.claims import CLAIMS, rival_tally, rival_verdict, sparsity_verdict
from common.analysis.findings import figures as draw
from common.analysis.findings.page import Section, data_line, interval, load_json, median_ratio, not_measured, \
    number, reading
from common.analysis.findings.sources import COMMANDS, CRITERIA, CRITERIA_ALL_INPUTS, CRITERIA_COST, DENSE_MODELS, \
    criteria_comparisons

SHOWN_LEVELS = (0.3, 0.5, 0.7)


def _kl_rows(comparison: dict) -> list[dict]:
    return [r for r in comparison["comparisons"] if r["measure"] == "choice_kl"]


def verdicts(comparison: dict) -> dict[tuple[str, str], dict]:
    """(site, criterion) -> answer-KL comparisons against the baseline: decided better, decided worse, total."""
    out: dict[tuple[str, str], dict] = {}
    for row in _kl_rows(comparison):
        entry = out.setdefault((row["site"], row["criteria"][0]), {"better": 0, "worse": 0, "levels": 0})
        entry["levels"] += 1
        if row["decided"]:
            entry["better" if row["better"] == row["criteria"][0] else "worse"] += 1
    return out


def keeps_most(comparison: dict, site: str) -> tuple[str, bool]:
    """The criterion that moves the answers least at ``site`` (most decided wins, then lowest mean
    difference), and whether its lead over the baseline is decided at every level it reaches."""
    rows = [r for r in _kl_rows(comparison) if r["site"] == site]
    scores: dict[str, list] = {comparison["baseline"]: [0, 0.0, 1]}
    for row in rows:
        name = row["criteria"][0]
        entry = scores.setdefault(name, [0, 0.0, 0])
        entry[0] += 1 if row["decided"] and row["better"] == name else -1 if row["decided"] else 0
        entry[1] += row["difference"]
        entry[2] += 1
    best = max(scores, key=lambda n: (scores[n][0], -scores[n][1] / max(scores[n][2], 1)))
    decided = best != comparison["baseline"] and scores[best][0] == scores[best][2] and scores[best][2] > 0
    return best, decided


def studied(comparison: dict, *sites: str) -> str:
    """The criteria a model's study compared at ``sites``, in the order of the full list (``CRITERIA``),
    as its command names them."""
    found = {r["criteria"][0] for r in comparison["comparisons"] if r["site"] in sites}
    return " ".join(name for name in CRITERIA.split() if name in found)


def measured_cost(summary: dict | None) -> dict[tuple[str, str], dict]:
    """(site, criterion) -> its evaluation time over magnitude top-p's (``median_ratio``), from a
    ``bench_eval_overhead.py --criteria`` summary (empty without one)."""
    if not summary:
        return {}
    return {(row["site"], name): median_ratio(seconds, row["sparse_seconds"])
            for row in summary["rows"] for name, seconds in row.get("criteria_seconds", {}).items()}


def _cost_line(summary: dict, model: str) -> str:
    setup = summary["setup"]
    load = setup.get("load_average_at_start")
    return (f"Cost ({model}): one evaluation of {setup['task']} ({setup['limit']} items) with the criterion at target "
            f"{number(setup['target'], 1)} over the same with magnitude top-p at p = {setup['value']:g}, alternated in one "
            f"run ({setup['repeats']} repeats, median, [range of the paired ratios]), {setup['dtype']}, "
            f"{setup['threads']} thread(s)"
            + (f", 1-minute load {load[0]:.2f} at the start" if load else "") + ". A calibrated threshold compares where "
            "a per-token top-p sorts; LaRoSA adds two D x D products per token and site (into the rotated basis and "
            "back).")


def criteria(results: Path) -> Section:
    title = "Which criterion keeps most at equal sparsity"
    found = criteria_comparisons(results)
    if not found:
        command = COMMANDS["criteria"].format(model=DENSE_MODELS[0], criteria=CRITERIA)
        return Section(title, None, not_measured(command))
    claims, lines, panels = [], [], []
    for model, comparison in found.items():
        baseline = comparison["baseline"]
        rows = _kl_rows(comparison)
        crossings = {(r["site"], r["criterion"] or baseline): r for r in comparison["critical"]}
        sites = list(dict.fromkeys([r["site"] for r in rows] + [s for s, name in crossings if name != baseline]))
        by_level = {(r["site"], r["criteria"][0], r["level"]): r for r in rows}
        counts = verdicts(comparison)
        timing = load_json(results / CRITERIA_COST.format(model=model) / "summary.json")
        cost = measured_cost(timing)
        site_claims = []
        for site in sites:
            best, decided = keeps_most(comparison, site)
            site_claims.append(f"{best} at {site}" + ("" if decided or best == baseline else " (not decided at every "
                                                       "sparsity)"))
        claims.append(f"on {model}, the criterion that moves the answers least is " + ", ".join(site_claims))
        lines += [f"**{model}**: answer KL (nats) of each criterion minus {baseline} at the same measured "
                  "sparsity, with its 95% paired interval; 'decided' counts the sparsities where that interval "
                  f"excludes 0 (better / worse than {baseline}); PPL-1% is the criterion's own critical sparsity; "
                  f"cost is its evaluation time over {baseline}'s.", "",
                  "| site | criterion | PPL-1% [95% interval] | "
                  + " | ".join(f"KL at {number(level, 1)}" for level in SHOWN_LEVELS)
                  + " | decided better / worse | cost |", "|---|---|---|" + "---|" * len(SHOWN_LEVELS) + "---|---|"]
        for site in sites:
            names = [baseline] + sorted({r["criteria"][0] for r in rows if r["site"] == site})
            for name in names:
                cells = []
                for level in SHOWN_LEVELS:
                    row = by_level.get((site, name, level))
                    cells.append("-" if row is None else f"{row['difference']:+.3f} {interval(row['interval'])}")
                if name == baseline:
                    cells = ["0 (baseline)"] * len(SHOWN_LEVELS)
                verdict = counts.get((site, name))
                spend = cost.get((site, name))
                lines.append(f"| {site} | {name} | {reading(crossings.get((site, name), {}).get('ppl'))} | "
                             + " | ".join(cells) + " | "
                             + ("-" if verdict is None else f"{verdict['better']} / {verdict['worse']} of "
                                                            f"{verdict['levels']}")
                             + " | " + ("1 (baseline)" if name == baseline and cost else "-" if spend is None
                                        else f"{number(spend['ratio'], 2)}x {interval([spend['low'], spend['high']], 2)}")
                             + " |")
        lines.append("")
        if timing:
            lines += [_cost_line(timing, model), ""]
        panels.append({"model": model, "baseline": baseline, "sites": sites, "rows": rows})
    lines += claims_table(found)
    claim = "At equal measured sparsity, " + "; ".join(claims) + "."
    timed = [m for m in found if (results / CRITERIA_COST.format(model=m) / "summary.json").is_file()]
    folders = [folder for comparison in found.values() for folder in comparison["folders"]]
    commands = [COMMANDS["criteria"].format(model=model, criteria=studied(comparison, "input", "intermediate"))
                for model, comparison in found.items()]
    commands += [COMMANDS["criteria_all_inputs"].format(model=model) for model, comparison in found.items()
                 if any(CRITERIA_ALL_INPUTS in folder for folder in comparison["folders"])]
    lines += data_line(folders + [CRITERIA_COST.format(model=m) for m in timed],
                       "\n".join(commands + [COMMANDS["criteria_cost"].format(model=m) for m in timed]))
    return Section(title, claim, lines, {"criteria.png": lambda path: draw.criteria(panels, path)})


def _claim_reading(claim, comparison: dict, site: str) -> str | None:
    """One site's reading of a claim on one model: the number read and the verdict (None: not swept)."""
    if claim.rival is None:
        entry = next((r for r in comparison["critical"] if r["site"] == site and r["criterion"] == claim.criterion),
                     None)
        if entry is None:
            return None
        verdict = sparsity_verdict(claim, entry.get("accuracy"), comparison["threshold"])
        return f"{site} {reading(entry.get('accuracy'))}: {verdict or 'not read'}"
    swept = {r["criterion"] for r in comparison["critical"] if r["site"] == site}
    if not {claim.criterion, claim.rival} <= swept:
        return None
    rows = [r for r in comparison.get("rivals", []) if r["site"] == site and r["measure"] == "accuracy"
            and r["criteria"] == [claim.criterion, claim.rival]]
    if not rows:
        return f"{site}: -"
    better, worse = rival_tally(rows)
    shown_at = 0.5 if claim.at is None else claim.at
    shown = next((r for r in rows if abs(r["level"] - shown_at) < 1e-9), max(rows, key=lambda r: r["level"]))
    return (f"{site} {shown['difference']:+.3f} {interval(shown['interval'])} at {number(shown['level'], 1)}, "
            f"better / worse at {better} / {worse} of {len(rows)}: "
            f"{rival_verdict(rows, claim.at) or f'not read at {number(claim.at, 1)}'}")


def claims_table(found: dict[str, dict]) -> list[str]:
    """Each published claim beside what is read here, per model and site, with its verdict."""
    threshold = next(iter(found.values()))["threshold"]
    lines = ["**Published claims** (each on its authors' models and tasks) beside these models. A sparsity claim is "
             f"read against the criterion's own accuracy crossing at {100 * (1 - threshold):g}% loss [95% interval]: "
             "holds where the interval lies above the claimed sparsity, does not hold where it lies below (a claim "
             "at a larger loss is then not read; 'small loss' is read as this one, and TEAL's model-wide claim at the "
             "FFN sites), cannot tell where it spans it. A claim over a rival is read "
             "against their paired difference in task-average accuracy (a share of dense) at equal measured "
             "sparsity, counted at every sparsity both reach and shown at the one the claim names (else 0.5): holds "
             "where the criterion is decided better at the named sparsity, or where none is named at some sparsity "
             "and worse at none. '-': the two are not compared paired in this model's comparison.", "",
             "| criterion | claim | model | reading by site |", "|---|---|---|---|"]
    for claim in CLAIMS:
        for model, comparison in found.items():
            sites = list(dict.fromkeys(r["site"] for r in comparison["critical"]))
            readings = [text for text in (_claim_reading(claim, comparison, site) for site in sites) if text]
            if readings:
                lines.append(f"| {claim.criterion} | {claim.text} | {model} | {'; '.join(readings)} |")
    return lines + ["", "What each criterion computes: "
                    "[docs/dense-sweep.md](../docs/dense-sweep.md#criteria-which-entries-to-keep).", ""]
