"""The findings page's figures: small PNGs drawn from the committed summary files, with the
intervals and bands the page cites drawn where it cites them. Same data, same bytes (fixed style,
no PNG metadata)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.analysis.palette import criterion_colors, criterion_order  # noqa: E402

STYLE = {"figure.dpi": 100, "savefig.dpi": 100, "font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8,
         "legend.fontsize": 7, "xtick.labelsize": 7, "ytick.labelsize": 7, "axes.grid": True, "grid.alpha": 0.3,
         "font.family": "DejaVu Sans", "svg.hashsalt": "findings", "path.simplify": False}
COLORS = plt.get_cmap("tab10").colors


@contextmanager
def figure(path: Path, rows: int, columns: int, height: float = 2.6, width: float = 4.2):
    """A grid of axes in the page's fixed style, saved to ``path`` as PNG on exit."""
    with matplotlib.style.context("default"), matplotlib.rc_context(STYLE):
        fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
        yield fig, axes
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", metadata={"Software": None})
        plt.close(fig)


def _intervals(ax, sites: list[str], readings: dict, xlabel: str, title: str) -> None:
    """One row per site: the band (thin), the 95% bootstrap interval (thick) and the crossing (dot)."""
    for row, site in enumerate(sites):
        part = readings.get(site)
        if not part:
            continue
        band = part.get("band")
        if band:
            high = band[1] if band[1] is not None else 1.0
            ax.plot([band[0], high], [row, row], color="grey", linewidth=1.2, label="band" if row == 0 else None)
        low, high = part["interval"]
        ax.plot([low, high], [row, row], color=COLORS[0], linewidth=4, solid_capstyle="butt",
                label="95% bootstrap interval" if row == 0 else None)
        ax.plot([part["crossing"]], [row], "o", color="black", markersize=4, label="crossing" if row == 0 else None)
    ax.set_yticks(range(len(sites)), sites)
    ax.set_ylim(-0.6, len(sites) - 0.4)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend(loc="best")


def _differences(ax, rows: list[dict], k: int, count: int, label: str, color: tuple) -> None:
    """One curve of paired differences against measured sparsity with their 95% intervals, the
    k-th of ``count`` shifted slightly so that overlapping intervals stay readable."""
    rows = sorted(rows, key=lambda r: r["level"])
    x = np.array([r["level"] for r in rows]) + (k - count / 2) * 0.006
    y = np.array([r["difference"] for r in rows])
    error = np.array([[r["difference"] - r["interval"][0], r["interval"][1] - r["difference"]] for r in rows]).T
    ax.errorbar(x, y, yerr=error, marker="o", markersize=3, capsize=2, color=color, label=label)


def dense_sites(panels: list[dict], path: Path) -> None:
    """Per model: PPL-1% crossings with interval and band; answer KL of every site against the best."""
    with figure(path, len(panels), 2) as (fig, axes):
        for (left, right), panel in zip(axes, panels):
            sites = list(panel["ppl"])
            _intervals(left, sites, panel["ppl"], "measured sparsity", f"{panel['model']}: PPL-1% critical sparsity")
            others = list(dict.fromkeys(r["other"] for r in panel["kl"]))
            for k, other in enumerate(others):
                rows = [r for r in panel["kl"] if r["other"] == other]
                _differences(right, rows, k, len(others), other, COLORS[(k + 1) % 10])
            right.axhline(0, color="black", linewidth=0.8)
            right.set_xlabel("measured sparsity")
            right.set_ylabel(f"answer KL: site - {panel['best']} (nats)")
            right.set_title(f"{panel['model']}: answer KL, site - {panel['best']} [95%]")
            if others:
                right.legend(loc="upper left")


def accuracy(panels: list[dict], path: Path) -> None:
    """Per model: the task-average accuracy curves and the 99% line; each site's crossing, interval and band."""
    with figure(path, len(panels), 2) as (fig, axes):
        for (left, right), panel in zip(axes, panels):
            for k, (site, (x, y)) in enumerate(panel["curves"].items()):
                order = np.argsort(x)
                left.plot(np.asarray(x)[order], np.asarray(y)[order], marker="o", markersize=2.5, linewidth=1,
                          color=COLORS[k % 10], label=site)
            left.axhline(panel["threshold"], color="black", linestyle="--", linewidth=0.8)
            left.set_ylim(0.8, 1.05)
            left.set_xlabel("measured sparsity")
            left.set_ylabel("normalized accuracy, task average")
            left.set_title(f"{panel['model']}: accuracy along the grid")
            left.legend(loc="lower left")
            sites = list(panel["readings"])
            right.set_xlim(0, 1)
            _intervals(right, sites, panel["readings"], "measured sparsity",
                       f"{panel['model']}: 99% crossing, interval and band")


def llada_steps(curves: dict, path: Path) -> None:
    """Consecutive and drift Jaccard per step, each computation's mean over layers, the layers' range shaded."""
    with figure(path, 1, 2) as (fig, axes):
        for ax, measure, title in ((axes[0][0], "consecutive", "consecutive J(A_t, A_t-1)"),
                                   (axes[0][1], "drift", "drift J(A_t, A_1)")):
            for k, (label, frame) in enumerate(curves.items()):
                by_step = frame.groupby("step")[measure]
                steps = np.array(sorted(frame.step.unique()))
                ax.fill_between(steps, by_step.min().loc[steps], by_step.max().loc[steps], color=COLORS[k],
                                alpha=0.2, linewidth=0)
                ax.plot(steps, by_step.mean().loc[steps], color=COLORS[k], linewidth=1.2, label=label)
            ax.set_xlabel("denoising step")
            ax.set_ylabel("Jaccard")
            ax.set_title(f"{title}; shaded: range over layers")
            ax.legend(loc="lower left")


def moe_experts(panels: dict, path: Path) -> None:
    """Per site: each layer's mean expert sparsity, the range over its experts shaded."""
    with figure(path, 1, len(panels), width=6.0) as (fig, axes):
        for ax, (site, layers) in zip(axes[0], panels.items()):
            layer = np.array([r["layer"] for r in layers])
            ax.fill_between(layer, [r["min"] for r in layers], [r["max"] for r in layers], color=COLORS[0], alpha=0.25,
                            linewidth=0, label="min to max over the layer's experts")
            ax.plot(layer, [r["mean"] for r in layers], color=COLORS[0], marker="o", markersize=2.5, label="mean")
            ax.set_xlabel("layer")
            ax.set_ylabel("expert sparsity")
            ax.set_title(f"expert sparsity per layer at the critical value ({site})")
            ax.legend(loc="upper left")


def sweep_cost(data: dict, path: Path) -> None:
    """Seconds per item and value per site (box: interquartile range); speed-ups and overheads with ranges."""
    parts = [key for key in ("cell", "ratios") if key == "cell" and "cell" in data
             or key == "ratios" and ("shared" in data or "overhead" in data)]
    with figure(path, 1, len(parts)) as (fig, axes):
        for ax, part in zip(axes[0], parts):
            if part == "cell":
                sites = list(data["cell"])
                ax.boxplot([data["cell"][s] for s in sites], showfliers=False, widths=0.5)
                ax.set_xticks(range(1, len(sites) + 1), sites)
                ax.set_ylabel("s per item and value")
                ax.set_title("grid cell time per multiple-choice item")
                continue
            bars = [(f"shared: {r['site']}", r) for r in data.get("shared", [])]
            bars += [(f"mask: {r['site']}", r) for r in data.get("overhead", [])]
            x = np.arange(len(bars))
            values = np.array([r["ratio"] for _, r in bars])
            error = np.array([[r["ratio"] - r["low"], r["high"] - r["ratio"]] for _, r in bars]).T
            # ecolor named in full: bar's default "k" is a colour code that seaborn's theme (imported by
            # the sweep figures) redefines for the whole process.
            ax.bar(x, values, yerr=error, capsize=3, ecolor="black",
                   color=[COLORS[0] if n.startswith("shared") else COLORS[1] for n, _ in bars])
            ax.axhline(1, color="black", linewidth=0.8)
            ax.set_xticks(x, [n for n, _ in bars], rotation=30, ha="right")
            ax.set_ylabel("x")
            ax.set_title("shared-context speed-up; sparse / dense time (range)")


def decode(panels: list[dict], path: Path) -> None:
    """One row per model, one panel per dtype and thread count: the whole step's speed-up over dense
    (bars: the interquartile ranges of the two step times combined) and its ideal (dashed), against
    the sparsity measured while running."""
    settings = [list(dict.fromkeys((r["dtype"], r["threads"]) for r in panel["rows"])) for panel in panels]
    with figure(path, len(panels), max(len(s) for s in settings), width=3.4) as (fig, axes):
        for row_axes, panel, mine in zip(axes, panels, settings):
            for ax, (dtype, threads) in zip(row_axes, mine):
                _decode_panel(ax, [r for r in panel["rows"] if (r["dtype"], r["threads"]) == (dtype, threads)])
                ax.set_title(f"{panel['model']}, {dtype}, {threads} thread(s)")
            for ax in row_axes[len(mine):]:
                ax.set_visible(False)


def _decode_panel(ax, rows: list[dict]) -> None:
    for k, scope in enumerate(dict.fromkeys(r["scope"] for r in rows)):
        points = sorted((r for r in rows if r["scope"] == scope), key=lambda r: r["entry_sparsity"])
        x = np.array([r["entry_sparsity"] for r in points])
        y = np.array([r["step_speedup_vs_torch"] for r in points])
        low = np.array([r["step_torch"]["p25_ms"] / r["step_sparse"]["p75_ms"] for r in points])
        high = np.array([r["step_torch"]["p75_ms"] / r["step_sparse"]["p25_ms"] for r in points])
        ax.errorbar(x, y, yerr=[np.clip(y - low, 0, None), np.clip(high - y, 0, None)], color=COLORS[k],
                    marker="o", markersize=3, capsize=2, label=scope)
        ax.plot(x, [r["step_ideal_speedup"] for r in points], color=COLORS[k], linestyle="--", linewidth=1)
    ax.axhline(1, color="black", linewidth=0.8)
    ax.set_xlabel("sparsity while running")
    ax.set_ylabel("step speed-up (dashed: ideal)")
    ax.legend(loc="upper left")


def criteria(panels: list[dict], path: Path) -> None:
    """Per model and site: each criterion's answer KL minus the baseline's at the same measured
    sparsity, with its 95% paired interval (0: as good as magnitude top-p; below 0: keeps more). A
    criterion keeps its colour in every panel and figure (``palette``)."""
    columns = max(len(panel["sites"]) for panel in panels)
    names = criterion_order(r["criteria"][0] for panel in panels for r in panel["rows"])
    colors = criterion_colors(names)
    with figure(path, len(panels), columns, height=2.8, width=3.6) as (fig, axes):
        for row_axes, panel in zip(axes, panels):
            for ax, site in zip(row_axes, panel["sites"]):
                for k, name in enumerate(names):
                    rows = [r for r in panel["rows"] if r["site"] == site and r["criteria"][0] == name]
                    if rows:
                        _differences(ax, rows, k, len(names), name, colors[name])
                ax.axhline(0, color="black", linewidth=0.8)
                ax.set_xlabel("measured sparsity")
                ax.set_ylabel(f"answer KL - {panel['baseline']} (nats)")
                ax.set_title(f"{panel['model']}, {site} [95%]")
                ax.legend(loc="lower left")
            for ax in row_axes[len(panel["sites"]):]:
                ax.set_visible(False)
