"""The page's pieces: a finding's section, the page, and how numbers and intervals are printed."""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class Section:
    """One finding: its title, the claim in one sentence (None while not measured), the Markdown
    lines after the figure, and the figures (name -> draw(path))."""

    title: str
    claim: str | None
    lines: list[str]
    figures: dict[str, Callable[[Path], None]] = field(default_factory=dict)


@dataclass
class Page:
    text: str
    figures: dict[str, Callable[[Path], None]]


def number(value, digits: int = 3) -> str:
    """A number as the page prints it ("-" where missing, "open" for an open interval end)."""
    if value is None:
        return "open"
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return f"{value:.{digits}f}"


def interval(pair, digits: int = 3) -> str:
    """``[low, high]``; an open upper end (null in the JSON) reads ``[low, open)``."""
    low, high = pair
    if high is None or high == math.inf:
        return f"[{number(low, digits)}, open)"
    return f"[{number(low, digits)}, {number(high, digits)}]"


def share(value: float) -> str:
    return f"{100 * value:.0f}%"


def reading(part: dict | None) -> str:
    """``crossing [95% interval]`` of an isotonic reading."""
    return "-" if not part or "crossing" not in part else f"{number(part['crossing'])} {interval(part['interval'])}"


def slug(title: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def not_measured(*commands: str) -> list[str]:
    return ["Not measured yet: run", "", "```bash", *commands, "```"]


def data_line(folders: list[str], command: str) -> list[str]:
    return ["", "Data: " + ", ".join(f"[`results/{f}`]({f})" for f in folders) + ". Reproduce:", "", "```bash",
            command, "```"]


def median_ratio(numerator: list[float], denominator: list[float]) -> dict:
    """median(numerator) / median(denominator) of times measured in alternation, and the range of
    the paired ratios over the repeats."""
    paired = [n / d for n, d in zip(numerator, denominator)]
    return {"ratio": statistics.median(numerator) / statistics.median(denominator), "low": min(paired),
            "high": max(paired)}


def load_json(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.is_file() else None
