"""The dense-grid findings: which site is sparsest by PPL-1% and answer KL (and two models side by
side), and what accuracy can and cannot decide; read from each grid's ``critical.json`` and
``tidy.csv``."""

from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path

import pandas as pd

from common.analysis.findings import figures as draw
from common.analysis.findings.page import Section, data_line, interval, load_json, not_measured, number, reading
from common.analysis.findings.sources import COMMANDS, DENSE_MODELS, GRID_VARIANT, dense_grids
from common.evaluation.tasks import PERPLEXITY_TASKS


def ppl_reading(entry: dict) -> dict | None:
    """The isotonic PPL-p% reading of a critical.json site entry."""
    part = next((v.get("isotonic") for k, v in sorted(entry.items()) if k.startswith("ppl_")), None)
    return part if part and "crossing" in part else None


def accuracy_reading(entry: dict) -> dict | None:
    part = entry.get("task_average_curve", {}).get("isotonic")
    return part if part and "crossing" in part else None


def disjoint(a: list, b: list) -> bool:
    """Two intervals that do not overlap (an open end never does)."""
    high_a, high_b = (math.inf if x[1] is None else x[1] for x in (a, b))
    return a[0] > high_b or b[0] > high_a


def wins(orderings: list[dict], measure: str) -> dict[str, list[dict]]:
    """site -> the decided comparisons of ``measure`` it wins."""
    out: dict[str, list[dict]] = {}
    for row in orderings:
        if row["measure"] == measure and row["decided"]:
            out.setdefault(row["better"], []).append(row)
    return out


def against(orderings: list[dict], site: str, measure: str) -> list[dict]:
    """``site``'s comparisons of ``measure`` with every other site, oriented as other - site."""
    out = []
    for row in orderings:
        if row["measure"] != measure or site not in row["sites"]:
            continue
        flip = row["sites"][0] == site
        other = row["sites"][1] if flip else row["sites"][0]
        low, high = row["interval"]
        out.append({"other": other, "level": row["level"], "difference": -row["difference"] if flip else row["difference"],
                    "interval": [-high, -low] if flip else [low, high], "decided": row["decided"],
                    "site_better": row["better"] == site})
    return out


def dense_sites(results: Path) -> Section:
    title = "Which FFN site is sparsest: PPL-1% and answer KL"
    grids = dense_grids(results)
    if not grids:
        return Section(title, None, not_measured(*(COMMANDS["dense"].format(model=m) for m in DENSE_MODELS)))
    claims, lines, panels = {"ppl": [], "kl": []}, [], []
    for model, folder in grids.items():
        summary = json.loads((folder / "critical.json").read_text())
        entries = {e["site"]: e for e in summary["critical"]}
        if not entries:
            continue
        ppl = {site: ppl_reading(e) for site, e in entries.items() if ppl_reading(e)}
        orderings = summary.get("orderings", [])
        won = wins(orderings, "choice_kl")
        kl_best = max(entries, key=lambda s: (len(won.get(s, [])), -list(entries).index(s)))
        kl_rows = against(orderings, kl_best, "choice_kl")
        kl_won = [r for r in kl_rows if r["decided"] and r["site_better"]]
        detail = []
        if ppl:
            best = max(ppl, key=lambda s: ppl[s]["crossing"])
            rest = [s for s in ppl if s != best]
            beaten = [s for s in rest if disjoint(ppl[best]["interval"], ppl[s]["interval"])]
            claims["ppl"].append(f"{best} on {model} ({reading(ppl[best])})")
            detail.append(f"by PPL-1% {best} is highest, its interval disjoint from {len(beaten)} of the {len(rest)} "
                          "other sites'")
        if kl_rows:
            claims["kl"].append(f"{kl_best} on {model} ({len(kl_won)} of {len(kl_rows)} comparisons decided)")
            detail.append(f"by answer KL {kl_best} is lower than the other site at {len(kl_won)} of {len(kl_rows)} "
                          f"(site, sparsity) comparisons from {number(min(r['level'] for r in kl_rows), 1)} to "
                          f"{number(max(r['level'] for r in kl_rows), 1)}, each decided by a 95% paired interval "
                          "that excludes 0")
        lines += [f"**{model}** ({items_label(summary['spec'])}, {summary['spec'].get('dtype', '?')}): "
                  + "; ".join(detail) + ".", ""]
        levels = sorted({r["level"] for r in kl_rows})
        middle = levels[len(levels) // 2] if levels else None
        header = "| site | PPL-1% crossing [95% interval] | band |"
        lines += [header + (f" answer KL at sparsity {number(middle, 1)}: site - {kl_best} [95% interval] |"
                            if levels else ""), "|---|---|---|" + ("---|" if levels else "")]
        for site in entries:
            part = ppl.get(site)
            row = f"| {site} | {reading(part)} | {interval(part['band']) if part and 'band' in part else '-'} |"
            if levels:
                kl = next((r for r in kl_rows if r["other"] == site and r["level"] == middle), None)
                row += " - |" if kl is None else f" {kl['difference']:+.3f} {interval(kl['interval'])} |"
            lines.append(row)
        lines.append("")
        panels.append({"model": model, "ppl": ppl, "best": kl_best, "kl": kl_rows})
    lines += _models_lines(results, grids)
    for model in [m for m in DENSE_MODELS if m not in grids]:
        lines += [f"{model}: not measured yet: run", "", "```bash", COMMANDS["dense"].format(model=model), "```", ""]
    claim = "; ".join(part for part in (
        "By PPL-1% the sparsest FFN site is " + " and ".join(claims["ppl"]) if claims["ppl"] else "",
        "by answer KL the site that moves the answers least is " + " and ".join(claims["kl"]) if claims["kl"] else "")
        if part)
    claim = claim[0].upper() + claim[1:] + "." if claim else None
    first = next(iter(grids))
    lines += data_line([f"dense_sweep/{m}/{GRID_VARIANT}" for m in grids], COMMANDS["dense"].format(model=first))
    figures = {"dense_sites.png": lambda path: draw.dense_sites(panels, path)} if panels else {}
    return Section(title, claim, lines, figures)


def items_label(spec: dict) -> str:
    """"every item of 4 multiple-choice tasks and the fables", or "the first 50 items of ..."."""
    choice = [t for t in spec["tasks"] if t not in PERPLEXITY_TASKS]
    items = "every item" if not spec.get("limit") else f"the first {spec['limit']} items"
    fables = " and the fables" if len(choice) < len(spec["tasks"]) else ""
    return f"{items} of {len(choice)} multiple-choice task{'s' if len(choice) != 1 else ''}{fables}"


def span(low: float, high: float, digits: int = 3) -> str:
    """"0.150 to 0.600", or one number where both ends are equal."""
    return number(low, digits) if number(low, digits) == number(high, digits) else \
        f"{number(low, digits)} to {number(high, digits)}"


def _models_lines(results: Path, grids: dict[str, Path]) -> list[str]:
    """Two models on the same items: the answer KL at the same sparsity and PPL-1% side by side,
    from a committed comparison (``report models --json``)."""
    lines = []
    for a, b in combinations(grids, 2):
        name = f"dense_sweep/{a}-vs-{b}/{GRID_VARIANT}/comparison.json"
        comparison = load_json(results / name)
        if comparison is None:
            lines += [f"{a} against {b} at the same sparsity: not measured yet: run "
                      f"`{COMMANDS['models'].format(a=a, b=b)}` (it pairs the items, so it reads the per-item cells, "
                      "which stay out of git: run both grid commands on one machine first)", ""]
            continue
        kl = [r for r in comparison["curves"] if r["measure"] == "choice_kl"]
        decided = {model: sum(r["decided"] and r["better"] == model for r in kl) for model in comparison["models"]}
        ppl = [row for row in comparison["critical"] if row["ppl"]["verdict"] is not None]
        undecided = sum(row["ppl"]["verdict"].startswith("undecided") for row in ppl)
        lines += [f"**{a} against {b}** on the same items: answer KL at the same measured sparsity is lower for "
                  + " and for ".join(f"{model} at {count}" for model, count in decided.items())
                  + f" of {len(kl)} (site, sparsity) comparisons, each decided by a 95% paired interval; the two "
                  f"models' PPL-1% intervals overlap on {undecided} of {len(ppl)} sites "
                  f"([`results/{name}`]({name})).", ""]
    return lines


def accuracy(results: Path) -> Section:
    title = "What accuracy can and cannot decide"
    grids = dense_grids(results)
    if not grids:
        return Section(title, None, not_measured(*(COMMANDS["dense"].format(model=m) for m in DENSE_MODELS)))
    from common.analysis.replicates import grid_curve, leave_values_out

    lines, panels, totals = [], [], {"widths": [], "accuracy": [0, 0], "choice_kl": [0, 0], "items": set()}
    for model, folder in grids.items():
        summary = json.loads((folder / "critical.json").read_text())
        frame = pd.read_csv(folder / "tidy.csv")
        entries = [e for e in summary["critical"] if accuracy_reading(e)]
        if not entries:
            lines += [f"**{model}**: no site has an isotonic reading of the task-average accuracy curve yet.", ""]
            continue
        widths = [high - low for low, high in (accuracy_reading(e)["interval"] for e in entries)
                  if low is not None and high is not None]
        bands = [accuracy_reading(e)["band"] for e in entries if accuracy_reading(e).get("band")]
        tests = [e["mcnemar"]["pooled"]["p_value"] for e in entries if e.get("mcnemar", {}).get("pooled")]
        orderings = summary.get("orderings", [])
        for measure in ("accuracy", "choice_kl"):
            totals[measure][0] += sum(r["decided"] for r in orderings if r["measure"] == measure)
            totals[measure][1] += sum(r["measure"] == measure for r in orderings)
        totals["widths"] += widths
        totals["items"].add(items_label(summary["spec"]))
        moved, curves = 0, {}
        for entry in entries:
            curves[entry["site"]] = curve = grid_curve(frame, entry["site"])
            if len(curve) >= 3:
                left = leave_values_out(curve.index, curve.measured_sparsity, curve.normalized, 1)
                moved += any(not row["within_one_step"] for row in left["left_out"])
        detail = [f"the 99% crossings' 95% intervals are {span(min(widths), max(widths))} wide"] if widths else []
        if bands:
            low, high = min(b[0] for b in bands), max(math.inf if b[1] is None else b[1] for b in bands)
            detail.append(f"their bands reach from {number(low)} to "
                          f"{'an open end' if high == math.inf else number(high)}")
        if tests:
            detail.append(f"at each site's critical value, McNemar's test of sparse against dense correctness gives "
                          f"p = {span(min(tests), max(tests), 2)}")
        detail.append(f"leaving out a single grid value moves the crossing by more than one grid step on {moved} of "
                      f"{len(curves)} sites")
        lines += [f"**{model}** ({items_label(summary['spec'])}): " + "; ".join(detail) + ".", "",
                  "| site | accuracy crossing [95% interval] | band | McNemar at p (lost / gained, p) |",
                  "|---|---|---|---|"]
        for entry in entries:
            part, test = accuracy_reading(entry), entry.get("mcnemar", {})
            pooled = test.get("pooled")
            mc = "-" if not pooled else (f"p = {test['value']:g}: {pooled['dense_only_correct']} / "
                                         f"{pooled['sparse_only_correct']}, {number(pooled['p_value'], 2)}")
            lines.append(f"| {entry['site']} | {reading(part)} | "
                         f"{interval(part['band']) if part.get('band') else '-'} | {mc} |")
        lines.append("")
        panels.append({"model": model, "threshold": summary.get("threshold", 0.99),
                       "curves": {s: (c.measured_sparsity.tolist(), c.normalized.tolist()) for s, c in curves.items()},
                       "readings": {e["site"]: accuracy_reading(e) for e in entries}})
    if not totals["widths"]:
        return Section(title, None, lines + data_line([f"dense_sweep/{m}/{GRID_VARIANT}" for m in grids],
                                                      COMMANDS["dense"].format(model=next(iter(grids)))))
    claim = (f"With {' and '.join(sorted(totals['items']))}, a site's 99%-accuracy crossing is known only to within "
             f"{span(min(totals['widths']), max(totals['widths']))} in sparsity (the widths of the 95% intervals)")
    if totals["accuracy"][1]:
        claim += (f"; at equal sparsity accuracy decides {totals['accuracy'][0]} of {totals['accuracy'][1]} site "
                  f"comparisons, answer KL {totals['choice_kl'][0]} of {totals['choice_kl'][1]}")
    claim += "."
    lines += ["What the interval and the band mean: [docs/statistics.md](../docs/statistics.md)."]
    first = next(iter(grids))
    lines += data_line([f"dense_sweep/{m}/{GRID_VARIANT}" for m in grids], COMMANDS["dense"].format(model=first))
    return Section(title, claim, lines, {"accuracy.png": lambda path: draw.accuracy(panels, path)})
