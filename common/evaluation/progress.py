"""How long a sweep will take: the cells it has left, costed from the cells it has finished.

Cells differ by task (a perplexity cell costs several multiple-choice cells), so the estimate
costs each remaining cell at the mean time of the finished cells of its task, or of all tasks
where its task has none yet. A sweep prints the number of cells before it starts, the estimate
once its first cells are done, and refreshes it on its progress bar after every cell.
"""

from __future__ import annotations

from collections import defaultdict


class CellClock:
    """Seconds per finished cell, by task; ``estimate(tasks)`` costs the cells still to run."""

    def __init__(self):
        self.seconds: dict[str, list[float]] = defaultdict(list)

    def add(self, task: str, seconds: float) -> None:
        self.seconds[task].append(float(seconds))

    @property
    def cells(self) -> int:
        return sum(len(times) for times in self.seconds.values())

    def estimate(self, tasks: list[str]) -> float | None:
        """Seconds the cells of ``tasks`` (one entry per remaining cell) should take; None before
        any cell has finished."""
        every = [t for times in self.seconds.values() for t in times]
        if not every:
            return None
        overall = sum(every) / len(every)
        means = {task: sum(times) / len(times) for task, times in self.seconds.items()}
        return sum(means.get(task, overall) for task in tasks)


def duration(seconds: float | None) -> str:
    """'42 s', '7 min', '3.5 h' (or 'unknown' before any cell has finished)."""
    if seconds is None:
        return "unknown"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
