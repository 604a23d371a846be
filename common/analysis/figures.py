"""Seaborn figures shared by the studies; every figure is written as PNG and PDF."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

sns.set_theme(style="whitegrid", context="paper")


def save_figure(fig, path_without_suffix: str | Path) -> list[Path]:
    """Write ``fig`` as .png and .pdf; returns the paths."""
    base = Path(path_without_suffix)
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = [base.with_suffix(".png"), base.with_suffix(".pdf")]
    fig.tight_layout()
    for path in paths:
        fig.savefig(path, dpi=150)
    plt.close(fig)
    return paths


def heatmap(frame: pd.DataFrame, index: str, columns: str, values: str, title: str, path: str | Path,
            cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None,
            annotate: bool = False, fmt: str = ".2f") -> list[Path]:
    """Pivot ``frame`` to index x columns and draw it (e.g. layer x step)."""
    table = frame.pivot_table(index=index, columns=columns, values=values, aggfunc="mean")
    width = min(2 + 0.35 * table.shape[1], 16)
    fig, ax = plt.subplots(figsize=(max(width, 5), 1.5 + 0.35 * table.shape[0]))
    sns.heatmap(table, ax=ax, cmap=cmap, vmin=vmin, vmax=vmax, annot=annotate, fmt=fmt,
                cbar_kws={"label": values.replace("_", " ")})
    ax.set_title(title)
    ax.set_xlabel(columns.replace("_", " "))
    ax.set_ylabel(index.replace("_", " "))
    return save_figure(fig, path)


def lines(frame: pd.DataFrame, x: str, y: str, hue: str | None, title: str, path: str | Path,
          xlabel: str | None = None, ylabel: str | None = None, hline: float | None = None,
          marker: str = "o", errorbar=None, logy: bool = False) -> list[Path]:
    """One line per ``hue`` value of y against x."""
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.lineplot(data=frame, x=x, y=y, hue=hue, marker=marker, ax=ax, errorbar=errorbar)
    if logy:
        ax.set_yscale("log")
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1)
    ax.set_title(title)
    ax.set_xlabel(xlabel or x.replace("_", " "))
    ax.set_ylabel(ylabel or y.replace("_", " "))
    return save_figure(fig, path)


def bars(frame: pd.DataFrame, x: str, y: str, hue: str | None, title: str, path: str | Path,
         ylabel: str | None = None) -> list[Path]:
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.barplot(data=frame, x=x, y=y, hue=hue, ax=ax)
    ax.set_title(title)
    ax.set_ylabel(ylabel or y.replace("_", " "))
    return save_figure(fig, path)
