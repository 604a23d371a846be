"""The LLaDA and MoE findings: mask stability across denoising steps, and the spread of expert
sparsity within a layer."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from common.analysis.findings import figures as draw
from common.analysis.findings.page import Section, data_line, interval, load_json, not_measured, number, reading, share
from common.analysis.findings.sources import COMMANDS, LLADA, MOE


def llada(results: Path) -> Section:
    title = "LLaDA: how stable the FFN masks are across denoising steps"
    folder = results / LLADA
    summary = load_json(folder / "summary.json")
    if summary is None or "computations" not in summary or not (folder / "computations.csv").is_file():
        return Section(title, None, not_measured(COMMANDS["llada"]))
    table = pd.read_csv(folder / "computations.csv")
    study = summary["study"]
    definitions = {"per_token": ("per token", "generated"), "paper_compat": ("as the released code computes it",
                                                                            "flat_all")}
    stats, curves = {}, {}
    for computation, (label, positions) in definitions.items():
        rows = table[(table.computation == computation) & (table.step > 0)]
        layers = rows.groupby("layer")[f"consecutive_jaccard_{positions}"].mean()
        last = rows[rows.step == rows.step.max()].groupby("layer")[f"drift_jaccard_{positions}"].mean()
        head = summary["computations"][computation]
        stats[computation] = {"consecutive": head[f"mean_consecutive_jaccard_{positions}"],
                              "consecutive_layers": (layers.min(), layers.max()),
                              "drift": head[f"final_drift_jaccard_{positions}"], "drift_layers": (last.min(), last.max()),
                              "sparsity": head["sparsity_per_site"][study["site"]]["element_weighted"]}
        curves[label] = rows[["step", "layer", f"consecutive_jaccard_{positions}", f"drift_jaccard_{positions}"]].rename(
            columns={f"consecutive_jaccard_{positions}": "consecutive", f"drift_jaccard_{positions}": "drift"})
    token, paper = stats["per_token"], stats["paper_compat"]
    claim = (f"From one denoising step to the next the FFN masks overlap with Jaccard {number(token['consecutive'])} "
             f"per token ({number(paper['consecutive'])} as the released code computes it); from the first step to "
             f"the last, {number(token['drift'])} ({number(paper['drift'])}).")
    lines = [f"The embedded character-level LLaDA ({summary['prompts']} prompts, {study['steps']} steps, "
             f"{study['site']} site, top-p {study['value']:g}, {study.get('dtype', '?')}). Per token: one top-p per "
             "token, J averaged over the generated positions. As released: one top-p over the flattened [tokens x D] "
             "activations of the sequence, J of the whole sequence's (token, neuron) sets. Ranges are over the "
             "layers.", "",
             "| computation | sparsity | consecutive J [range over layers] | drift J at the last step [range] |",
             "|---|---|---|---|"]
    for computation, (label, _) in definitions.items():
        s = stats[computation]
        lines.append(f"| {label} | {number(s['sparsity'])} | {number(s['consecutive'])} "
                     f"{interval(s['consecutive_layers'])} | {number(s['drift'])} {interval(s['drift_layers'])} |")
    reuse = {row["reuse"]: row for row in summary.get("mask_reuse", [])}
    if 1 in reuse:
        lines += ["", f"Stable is not reusable: reusing a step's masks for the next step (r = 1) changes "
                  f"{share(reuse[1]['generated_tokens_changed'])} of the generated tokens (mean KL "
                  f"{reuse[1]['kl_recomputed_vs_reused']:.1e} from the recomputed logits)."]
    lines += data_line([LLADA], COMMANDS["llada"])
    return Section(title, claim, lines, {"llada_steps.png": lambda path: draw.llada_steps(curves, path)})


def moe(results: Path) -> Section:
    title = "MoE: how far experts of one layer differ in sparsity"
    folder = results / MOE
    experts, critical = load_json(folder / "experts.json"), load_json(folder / "critical.json")
    if not experts or not experts.get("sites") or critical is None:
        return Section(title, None, not_measured(COMMANDS["moe"]))
    lines, panels, claims = [], {}, []
    for site, entry in experts["sites"].items():
        layers = entry["per_layer_pooled"]
        widest = max(layers, key=lambda r: r["max"] - r["min"])
        spans = [r["max"] - r["min"] for r in layers]
        curve = entry.get("critical_sparsity") or {}
        claims.append(f"at the critical value the experts of one layer span {number(min(spans))} to "
                      f"{number(max(spans))} in sparsity ({site} site), while tasks move a layer's mean expert "
                      f"sparsity by a standard deviation of {number(entry['inter_task_std_of_layer_mean'], 4)}")
        lines += [f"**{site}**: critical value p = {entry['critical_value']:g} (the grid point of the task-average "
                  f"curve, measured sparsity {number(curve.get('grid'))}; isotonic crossing "
                  f"{reading(curve.get('isotonic'))}). Widest layer: {widest['layer']}, experts from "
                  f"{number(widest['min'])} to {number(widest['max'])}. {len(layers)} layers; "
                  f"{sum(r.get('experts_unrouted', 0) for r in layers)} expert(s) received no token.", ""]
        panels[site] = layers
    spec = critical.get("spec", {})
    lines.append(f"Model {spec.get('model', '?')}, {spec.get('dtype', '?')}, the first {spec.get('limit')} items "
                 "of each task; one rule value for every expert (the paper's protocol).")
    lines += data_line([MOE], COMMANDS["moe"])
    claim = "; ".join(claims) + "."
    return Section(title, claim[0].upper() + claim[1:], lines,
                   {"moe_experts.png": lambda path: draw.moe_experts(panels, path)})
