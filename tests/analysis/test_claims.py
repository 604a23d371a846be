"""A published claim is read against the measurement the way the findings page says: a sparsity claim
against the criterion's accuracy crossing interval, a claim over a rival against their paired
comparisons."""

import pytest

from common.analysis.claims import CLAIMS, RIVALS, Claim, rival_verdict, sparsity_verdict

AT_ONE_PERCENT = Claim("x", "40% at small loss", sparsity=0.40)
AT_TWO_PERCENT = Claim("x", "50% at 2% loss", sparsity=0.50, loss=0.02)


@pytest.mark.parametrize("claim, interval, verdict", [
    (AT_ONE_PERCENT, [0.41, 0.55], "holds"),
    (AT_ONE_PERCENT, [0.40, None], "holds"),  # an open upper end: the curve never fell below the threshold
    (AT_ONE_PERCENT, [0.10, 0.39], "does not hold"),
    (AT_ONE_PERCENT, [0.10, 0.45], "cannot tell"),
    (AT_TWO_PERCENT, [0.55, 0.60], "holds"),  # already above it at the smaller loss
    (AT_TWO_PERCENT, [0.10, 0.30], "cannot tell: below it at 1% loss, 2% not read"),
])
def test_a_sparsity_claim_is_read_against_the_crossing_interval(claim, interval, verdict):
    assert sparsity_verdict(claim, {"crossing": sum(i or 1 for i in interval) / 2, "interval": interval}, 0.99) == verdict


def test_a_sparsity_claim_without_a_crossing_is_not_read():
    assert sparsity_verdict(AT_ONE_PERCENT, None, 0.99) is None
    assert sparsity_verdict(AT_ONE_PERCENT, {"status": "not crossed"}, 0.99) is None


def _row(decided, better):
    return {"criteria": ["wina", "teal"], "decided": decided, "better": better}


@pytest.mark.parametrize("rows, verdict", [
    ([_row(True, "wina"), _row(False, None)], "holds"),
    ([_row(True, "teal"), _row(False, None)], "does not hold"),
    ([_row(True, "wina"), _row(True, "teal")], "mixed"),
    ([_row(False, None), _row(False, None)], "cannot tell"),
    ([], None),
])
def test_a_claim_over_a_rival_is_read_against_the_paired_comparisons(rows, verdict):
    assert rival_verdict(rows) == verdict


def test_a_claim_that_names_a_sparsity_is_read_there_only():
    rows = [{**_row(True, "wina"), "level": 0.6}, {**_row(False, None), "level": 0.4}]
    assert rival_verdict(rows) == "holds" and rival_verdict(rows, at=0.4) == "cannot tell"
    assert rival_verdict(rows, at=0.3) is None


def test_the_rivals_are_the_criteria_the_claims_name():
    assert RIVALS == {"scap": ("cats",), "wina": ("teal",), "larosa": ("teal",)}
    assert all(c.sparsity is not None or c.rival is not None for c in CLAIMS)
