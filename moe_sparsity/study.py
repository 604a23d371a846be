"""The expert-wise study: the model's critical threshold, then each expert's measured sparsity.

One global rule value for every expert (the paper's protocol). The sweep (grid or search) runs
through the shared runner and store; at the critical value of each site (grid reading of the
task-average curve) every expert's sparsity over the tokens routed to it is read from the cells,
per task and pooled over tasks, and summarized per layer: min, mean, max and standard deviation
over the experts that received tokens (unrouted experts are counted separately).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from common.analysis import figures as plots
from common.evaluation.store import ResultStore, atomic_write_json, write_csv
from common.evaluation.sweep import SweepSpec
from common.evaluation.tasks import PERPLEXITY_TASKS

POOLED = "all tasks"


def expert_frame(store: ResultStore, spec: SweepSpec, site: str, value: float) -> pd.DataFrame:
    """Per (task, layer, site, expert) counts at one rule value, plus the pooled-over-tasks rows."""
    rows = []
    for task in spec.tasks:
        if task in PERPLEXITY_TASKS:
            continue
        result = store.get(spec.key(site, value, task))
        if result is None or "experts" not in result:
            continue
        rows += [{**r, "task": task} for r in result["experts"]]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    pooled = frame.groupby(["layer", "site", "expert"], as_index=False)[["kept", "counted", "routed_tokens"]].sum()
    frame = pd.concat([frame, pooled.assign(task=POOLED)], ignore_index=True)
    routed = frame.counted > 0
    frame["sparsity"] = (1 - frame.kept / frame.counted.where(routed)).astype(float)
    return frame


def layer_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (task, site, layer): min / mean / max / std of expert sparsity over routed experts."""
    routed = frame[frame.counted > 0]
    stats = routed.groupby(["task", "site", "layer"]).sparsity.agg(["min", "mean", "max", "std"]).reset_index()
    counts = frame.groupby(["task", "site", "layer"]).apply(
        lambda g: pd.Series({"experts_routed": int((g.counted > 0).sum()),
                             "experts_unrouted": int((g.counted == 0).sum())}), include_groups=False).reset_index()
    return stats.merge(counts, on=["task", "site", "layer"])


def write_expert_study(store: ResultStore, spec: SweepSpec, critical: list[dict], output: Path,
                       value_override: float | None = None) -> dict:
    """Expert tables and figures at each site's critical value (or at ``value_override``);
    ``experts.json`` holds them per site with the run's provenance."""
    out = {}
    for entry in critical:
        site = entry["site"]
        curve = entry.get("task_average_curve") or {}
        value = value_override if value_override is not None else curve.get("grid_value")
        if value is None:
            print(f"{site}: no evaluated value keeps {curve.get('status', 'the threshold')}; "
                  "pass --critical-value to report experts at a chosen value")
            continue
        frame = expert_frame(store, spec, site, value)
        if frame.empty:
            print(f"{site}: no evaluated cells at p={value}; add it to --grid (or leave --critical-value out)")
            continue
        summary = layer_summary(frame)
        write_csv(output / f"experts_{site}.csv", frame.to_dict("records"))
        write_csv(output / f"expert_layers_{site}.csv", summary.to_dict("records"))
        pooled = summary[summary.task == POOLED]
        out[site] = {"critical_value": value, "critical_sparsity": curve,
                     "per_layer_pooled": pooled.drop(columns=["task", "site"]).to_dict("records"),
                     "inter_task_std_of_layer_mean": float(
                         summary[summary.task != POOLED].groupby("layer")["mean"].std().mean())}
        _figures(frame, summary, site, value, spec.model, output / "figures")
    atomic_write_json(output / "experts.json", {"sites": out, "provenance": store.provenance})
    return out


def _figures(frame, summary, site, value, model, folder: Path) -> None:
    pooled = summary[summary.task == POOLED]
    long = pooled.melt(id_vars=["layer"], value_vars=["min", "mean", "max"], var_name="over experts",
                       value_name="sparsity")
    plots.lines(long, "layer", "sparsity", "over experts", f"{model}: expert sparsity per layer, {site}, p={value}",
                folder / f"expert_minmeanmax_{site}")
    plots.heatmap(frame[frame.task == POOLED], "layer", "expert", "sparsity",
                  f"{model}: expert sparsity at the critical value ({site}, p={value})", folder / f"expert_heatmap_{site}",
                  vmin=0, vmax=1)
    routed = frame[(frame.task == POOLED) & (frame.counted > 0)]
    fig, ax = plots.plt.subplots(figsize=(6, 4))
    plots.sns.scatterplot(data=routed, x="routed_tokens", y="sparsity", hue="layer", ax=ax, s=14)
    ax.set_xscale("log")
    ax.set_title(f"{model}: expert sparsity vs routed tokens ({site})")
    plots.save_figure(fig, folder / f"expert_sparsity_vs_tokens_{site}")
    per_task = summary[summary.task != POOLED]
    plots.lines(per_task, "layer", "mean", "task", f"{model}: mean expert sparsity per layer and task ({site})",
                folder / f"expert_task_spread_{site}", ylabel="mean expert sparsity")
