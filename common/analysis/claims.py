"""What each criterion's paper claims, as rows, and how a claim is read against this toolkit's
measurements: a critical-sparsity claim against the criterion's own accuracy crossing with its 95%
interval, a claim of more accuracy than a rival criterion against the paired comparison of the two
at equal measured sparsity. Adding a claim is adding a row."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Claim:
    criterion: str
    text: str  # as its paper states it, on the authors' models and tasks
    sparsity: float | None = None  # a critical-sparsity claim: at least this sparsity ...
    loss: float | None = None  # ... within this accuracy loss (share of dense); None: "small"
    rival: str | None = None  # an equal-sparsity claim: more accuracy than this criterion ...
    at: float | None = None  # ... at this sparsity, where the claim names one (else at any)


CLAIMS = (
    Claim("teal", "40-50% model-wide at small loss (TEAL)", sparsity=0.40),
    Claim("cats", "about 50% FFN at 1-2% loss (CATS)", sparsity=0.50, loss=0.02),
    Claim("scap", "48.5% FFN at -1.5% (SCAP)", sparsity=0.485, loss=0.015),
    Claim("scap", "more accuracy than CATS at equal sparsity (SCAP: 48.5% against CATS's 33.3%)", rival="cats"),
    Claim("wina", "up to +2.94 points over TEAL at equal sparsity (WINA)", rival="teal"),
    Claim("larosa", "+1.77 points over TEAL at 40% (LaRoSA)", rival="teal", at=0.4),
)

# criterion -> the criteria its papers claim to beat (compared paired by ``report criteria``)
RIVALS: dict[str, tuple[str, ...]] = {name: tuple(c.rival for c in CLAIMS if c.criterion == name and c.rival)
                                      for name in dict.fromkeys(c.criterion for c in CLAIMS if c.rival)}


def sparsity_verdict(claim: Claim, accuracy: dict | None, threshold: float) -> str | None:
    """holds / does not hold / cannot tell, of a critical-sparsity claim, from the criterion's
    accuracy crossing at loss 1 - ``threshold`` (``{"crossing", "interval"}``; None: not read).
    A crossing is at least as high at a larger loss: an interval above the claim decides it at any
    larger loss too, one below it decides nothing for a claim made at a larger loss."""
    if not accuracy or "interval" not in accuracy:
        return None
    low, high = accuracy["interval"]
    high = math.inf if high is None else high
    if low >= claim.sparsity:
        return "holds"
    if high < claim.sparsity:
        ours = 1 - threshold
        if claim.loss is None or claim.loss <= ours + 1e-9:
            return "does not hold"
        return f"cannot tell: below it at {100 * ours:g}% loss, {100 * claim.loss:g}% not read"
    return "cannot tell"


def rival_tally(rows: list[dict]) -> tuple[int, int]:
    """(sparsities where the criterion is decided better, where decided worse) than its rival."""
    return (sum(r["decided"] and r["better"] == r["criteria"][0] for r in rows),
            sum(r["decided"] and r["better"] == r["criteria"][1] for r in rows))


def rival_verdict(rows: list[dict], at: float | None = None) -> str | None:
    """holds / does not hold / mixed / cannot tell, of an equal-sparsity claim, from the paired
    accuracy comparisons of the criterion against its rival at one site: at the sparsity ``at``
    where the claim names one, else at every sparsity both reach (None: not compared there)."""
    if at is not None:
        rows = [r for r in rows if abs(r["level"] - at) < 1e-9]
    if not rows:
        return None
    better, worse = rival_tally(rows)
    if better and worse:
        return "mixed"
    return "holds" if better else "does not hold" if worse else "cannot tell"
