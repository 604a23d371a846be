"""One colour per criterion, the same in every figure, so that a reader who learnt TEAL's colour on
one figure finds it again on the next."""

from __future__ import annotations

from collections.abc import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# magnitude top-p (the baseline) and the published criteria keep fixed slots of matplotlib's tab10
CRITERION_ORDER = ("magnitude-topp", "teal", "cats", "scap", "wina", "larosa")
COLORS = plt.get_cmap("tab10").colors


def criterion_order(names: Iterable[str]) -> list[str]:
    """The names in legend order: the known criteria in ``CRITERION_ORDER``, then the others sorted."""
    return sorted(set(names), key=lambda name: (CRITERION_ORDER.index(name) if name in CRITERION_ORDER
                                                else len(CRITERION_ORDER), name))


def criterion_colors(names: Iterable[str]) -> dict[str, tuple]:
    """Colour of each name: the fixed slot of a known criterion, then the free slots in sorted order
    of the other names (cycling after ten)."""
    names = sorted(set(names))
    free = range(len(CRITERION_ORDER), len(COLORS))
    others = [name for name in names if name not in CRITERION_ORDER]
    colors = {name: COLORS[CRITERION_ORDER.index(name)] for name in names if name in CRITERION_ORDER}
    colors.update({name: COLORS[free[k % len(free)]] for k, name in enumerate(others)})
    return colors
