"""The cost findings: what a sweep costs (cell time, shared contexts, mask overhead) and decode
speed against the ideal; read from the dense grid's ``tidy.csv`` and the benchmarks' ``summary.json``."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pandas as pd

from common.analysis.findings import figures as draw
from common.analysis.findings.dense import items_label
from common.analysis.findings.page import Section, data_line, interval, load_json, median_ratio, not_measured, \
    number
from common.analysis.findings.sources import COMMANDS, DECODE, DECODE_SETTINGS, DENSE_MODELS, EVAL_OVERHEAD, \
    GRID_VARIANT, SHARED_CONTEXT, decode_summaries, dense_grids
from common.evaluation.tasks import PERPLEXITY_TASKS


def sweep_cost(results: Path) -> Section:
    title = "The cost of a sweep: cell time, shared contexts, mask overhead"
    grids = dense_grids(results)
    shared, overhead = (load_json(results / f / "summary.json") for f in (SHARED_CONTEXT, EVAL_OVERHEAD))
    lines, data, claims, folders = [], {}, [], []
    if grids:
        model, folder = next(iter(grids.items()))
        summary = json.loads((folder / "critical.json").read_text())
        frame = pd.read_csv(folder / "tidy.csv")
        choice = frame[~frame.task.isin(list(PERPLEXITY_TASKS))]
        per_item = choice.assign(per_item=choice.seconds / choice["items"])
        hours = (frame.seconds.sum() + frame.drop_duplicates("task").dense_seconds.sum()) / 3600
        threads = summary.get("provenance", {}).get("threads", "?")
        data["cell"] = {site: per_item[per_item.site == site].per_item.tolist() for site in summary["spec"]["sites"]
                        if (per_item.site == site).any()}
        quartiles = {site: _quartiles(v) for site, v in data["cell"].items()}
        claims.append(f"a {len(summary['spec']['sites'])}-site grid over {items_label(summary['spec'])} took "
                      f"{hours:.1f} hours of cell time")
        lines += [f"**Cell time** ({model}, {items_label(summary['spec'])}, {summary['spec'].get('dtype', '?')}, "
                  f"{threads} thread(s) per process): {len(frame)} cells, {hours:.1f} hours; one multiple-choice item "
                  "at one rule value took "
                  + ", ".join(f"{site} {number(q[1])} s [{number(q[0])}, {number(q[2])}]" for site, q in quartiles.items())
                  + " (median [interquartile range] over cells). Cell times include whatever else ran on the machine; "
                  "the benchmarks below alternate their settings in one process.", ""]
        folders.append(f"dense_sweep/{model}/{GRID_VARIANT}")
    else:
        lines += ["Cell time of the dense grid: not measured yet: run", "", "```bash",
                  COMMANDS["dense"].format(model=DENSE_MODELS[0]), "```", ""]
    if shared:
        setup = shared.get("setup", {})
        data["shared"] = rows = _speedups(shared["rows"], "path", "per-request", "shared", "wall_seconds")
        claims.append("shared contexts score the suite " + ", ".join(f"{number(r['ratio'], 2)}x" for r in rows)
                      + " faster than lm-eval's per-request path")
        lines += [f"**Shared contexts** ({setup.get('model', '?')}, {setup.get('dtype', '?')}, "
                  f"{setup.get('threads', '?')} thread(s)): each multiple-choice context runs once and its choices "
                  "continue its cache; wall time per-request / shared: "
                  + ", ".join(f"{r['site']} {number(r['ratio'], 2)}x [{number(r['low'], 2)}, {number(r['high'], 2)}]"
                              for r in rows) + " (median [range] over repeats), at the same scores.", ""]
        folders.append(SHARED_CONTEXT)
    else:
        lines += ["Shared contexts against lm-eval's per-request path: not measured yet: run", "", "```bash",
                  COMMANDS["shared_context"], "```", ""]
    if overhead:
        setup = overhead.get("setup", {})
        data["overhead"] = rows = [dict(site=r["site"], **median_ratio(r["sparse_seconds"], r["dense_seconds"]))
                                   for r in overhead["rows"]]
        claims.append("a sparsified evaluation costs " + ", ".join(f"{number(r['ratio'], 2)}x" for r in rows)
                      + " the dense one")
        lines += [f"**Mask overhead** ({setup.get('model', '?')}, {setup.get('dtype', '?')}, "
                  f"{setup.get('threads', '?')} thread(s), {setup.get('kernel', '?')}): sparse / dense evaluation "
                  "time " + ", ".join(f"{r['site']} {number(r['ratio'], 2)}x [{number(r['low'], 2)}, "
                                      f"{number(r['high'], 2)}]" for r in rows)
                  + " (median [range] over repeats).", ""]
        folders.append(EVAL_OVERHEAD)
    else:
        lines += ["Mask overhead (sparse against dense evaluation time): not measured yet: run", "", "```bash",
                  COMMANDS["eval_overhead"], "```", ""]
    if folders:
        commands = [c for c, d in ((COMMANDS["dense"].format(model=next(iter(grids), "")), grids),
                                   (COMMANDS["shared_context"], shared), (COMMANDS["eval_overhead"], overhead)) if d]
        lines += ["How the kernels and the shared contexts work: [docs/performance.md](../docs/performance.md)."]
        lines += data_line(folders, "\n".join(commands))
    claim = ("; ".join(claims) + ".") if claims else None
    figures = {"sweep_cost.png": lambda path: draw.sweep_cost(data, path)} if data else {}
    return Section(title, claim[0].upper() + claim[1:] if claim else None, lines, figures)


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def _speedups(rows: list[dict], key: str, before: str, after: str, measure: str) -> list[dict]:
    out = []
    for site in dict.fromkeys(r["site"] for r in rows):
        pair = {r[key]: r for r in rows if r["site"] == site}
        if before in pair and after in pair:
            out.append({"site": site, **median_ratio(pair[before][measure], pair[after][measure])})
    return out


REFERENCE_SETTING = ("float32", 1)  # the setting the targets are stated in: torch's float32 linear is a fair baseline
SHOWN_ALL_LINEAR = 0.5  # every decoder linear sparsified at this target is shown beside the critical rows


def decode(results: Path) -> Section:
    title = "Decode speed against the ideal"
    summaries = decode_summaries(results)
    if not summaries:
        return Section(title, None, not_measured(COMMANDS["decode"].format(model=DENSE_MODELS[0], **DECODE_SETTINGS)))
    claims, lines, panels = [], [], []
    lines += ["Greedy decoding at batch 1, per-layer thresholds calibrated to each target sparsity. The ideal is the "
              "weight bytes a step reads dense over those it reads sparse; the share of the ideal saving is (dense - "
              "sparse) / (dense - ideal) time of the scope's own layers in decode order ([W_g; W_u] at input, W_d at "
              "intermediate, the whole MLP at gate, every decoder linear at all_linear), against torch's dense layers "
              "and against the same kernel at sparsity 0 (what sparsity alone buys). Rows: each site at its PPL-1% "
              f"critical sparsity, and every decoder linear at {SHOWN_ALL_LINEAR}; every other setting is in the data.",
              ""]
    for model, summary in summaries.items():
        setup, rows = summary["setup"], summary["rows"]
        shown = [r for r in rows if r.get("kind") == "critical"
                 or r["scope"] == "all_linear" and r.get("target_sparsity") == SHOWN_ALL_LINEAR] or rows
        reference = [r for r in shown if (r["dtype"], r["threads"]) == REFERENCE_SETTING] or shown
        cpu = setup.get("cpu") or setup["device"]
        claims.append(f"on {model} ({cpu}, {reference[0]['dtype']}, {reference[0]['threads']} thread(s)), "
                      + "; ".join(_decode_claim(row) for row in reference))
        lines += [f"**{model}** on {cpu}:", "",
                  "| scope | dtype, threads | sparsity | step ms: dense [IQR] | sparse [IQR] | step speed-up | ideal | "
                  "layers: speed-up | ideal | share of the ideal saving: vs torch / vs kernel at 0 | PPL ratio |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in shown:
            lines.append(f"| {row['scope']} | {row['dtype']}, {row['threads']} | {number(row['entry_sparsity'])} | "
                         f"{_ms(row['step_torch'])} | {_ms(row['step_sparse'])} | "
                         f"{number(row['step_speedup_vs_torch'], 2)}x | {number(row['step_ideal_speedup'], 2)}x | "
                         f"{number(row['scope_speedup_vs_torch'], 2)}x | {number(row['scope_ideal_speedup'], 2)}x | "
                         f"{_share(row.get('scope_share_vs_torch'))} / {_share(row.get('scope_share_vs_kernel0'))} | "
                         f"{'-' if row.get('perplexity_ratio') is None else number(row['perplexity_ratio'], 2)} |")
        lines.append("")
        panels.append({"model": model, "rows": rows})
    busy = sum(r.get("busy_rounds", 0) for summary in summaries.values() for r in summary["rows"])
    lines += ["Speed-ups: medians of the per-step time ratios (dense and sparse advanced one token each in turn)"
              + (f"; {busy} timed rounds ran on a busy machine" if busy else "; every timed round on an idle machine")
              + ". A share above 100% against torch means the kernel streams faster than torch's own layer (torch's "
              "bfloat16 linear is slow on some CPUs): read the share against the kernel at sparsity 0 for what "
              "sparsity buys. Where the gap goes: "
              "[docs/performance.md](../docs/performance.md#sparse-decoding-against-the-ideal)."]
    lines += data_line([DECODE.format(model=m) for m in summaries],
                       "\n".join(COMMANDS["decode"].format(model=m, **_settings(s["rows"]))
                                 for m, s in summaries.items()))
    claim = "In decode, " + "; ".join(claims) + "."
    return Section(title, claim, lines, {"decode.png": lambda path: draw.decode(panels, path)})


def _settings(rows: list[dict]) -> dict[str, str]:
    """The target sparsities (its rows at critical sparsities aside) and thread counts a decode
    benchmark ran, as its command spells them."""
    return {"sparsities": " ".join(f"{t:g}" for t in sorted({r["target_sparsity"] for r in rows
                                                             if r.get("kind") != "critical"})),
            "threads": " ".join(str(t) for t in sorted({r["threads"] for r in rows}))}


def _decode_claim(row: dict) -> str:
    what = (f"every decoder linear at {number(row['entry_sparsity'], 2)}" if row["scope"] == "all_linear" else
            f"the {row['scope']} site at {'its PPL-1% critical sparsity ' if row.get('kind') == 'critical' else ''}"
            f"{number(row['entry_sparsity'], 2)}")
    return (f"{what} makes a step {number(row['step_speedup_vs_torch'], 2)}x as fast (ideal "
            f"{number(row['step_ideal_speedup'], 2)}x) and its own layers {number(row['scope_speedup_vs_torch'], 2)}x "
            f"(ideal {number(row['scope_ideal_speedup'], 2)}x, {_share(row.get('scope_share_vs_torch'))} of the "
            f"ideal saving against torch, {_share(row.get('scope_share_vs_kernel0'))} against the kernel at "
            "sparsity 0)")


def _share(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _ms(part: dict) -> str:
    return f"{number(part['median_ms'], 1)} {interval([part['p25_ms'], part['p75_ms']], 1)}"
