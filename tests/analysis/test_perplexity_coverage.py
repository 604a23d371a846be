"""The PPL-p% reading and the checks of its intervals' coverage, on hand-made and synthetic documents."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from common.analysis.search import COARSE_VALUES, QUICK_BUDGET
from common.analysis.perplexity_coverage import (SyntheticPerplexitySweep, coverage, perplexity_reading,
                                                 ppl_threshold, resampled_coverage, split_half_agreement,
                                                 sweep_documents)


def test_the_reading_crosses_where_the_perplexity_ratio_does_by_hand():
    # two documents of 10 words; losses per word 0, 0.005, 0.02 nats at sparsity 0, 0.2, 0.4:
    # ratio = exp(-loss): 1, 0.995012, 0.980199; 1/1.01 = 0.990099 is crossed at
    # 0.2 + 0.2 * (0.995012 - 0.990099) / (0.995012 - 0.980199) = 0.26634
    dense = np.array([-30.0, -40.0])
    words = np.array([10.0, 10.0])
    sparse = [dense, dense - 0.005 * words, dense - 0.02 * words]
    reading = perplexity_reading([0.0, 0.2, 0.4], sparse, dense, words, ppl_threshold(1.0), iterations=50)
    expected = 0.2 + 0.2 * (math.exp(-0.005) - 1 / 1.01) / (math.exp(-0.005) - math.exp(-0.02))
    assert reading["status"] == "crossed" and reading["crossing"] == pytest.approx(expected, abs=1e-9)
    assert reading["interval"][0] <= reading["crossing"] <= reading["interval"][1]  # identical documents: no spread


def test_a_synthetic_sweep_of_many_documents_crosses_at_its_known_truth():
    sweep = SyntheticPerplexitySweep(documents=20000, noise=0.0, seed=3)
    truth = sweep.true_crossing(1.0)
    assert truth == pytest.approx((math.log(1.01) / 0.25) ** (1 / 2.5))
    s = np.linspace(0.2, 0.35, 16)
    reading = perplexity_reading(s, [sweep.logliks(x) for x in s], sweep.dense, sweep.words, ppl_threshold(1.0),
                                 iterations=20)
    assert reading["crossing"] == pytest.approx(truth, abs=0.003)


@pytest.mark.parametrize("protocol", ["grid", "search"])
def test_coverage_counts_the_sweeps_whose_interval_holds_the_truth(protocol):
    row = coverage(protocol, sweeps=12, documents=120, iterations=200)
    assert row["sweeps"] == 12 and 0.75 <= row["band_coverage"] <= 1 and 0.6 <= row["bootstrap_coverage"] <= 1
    assert row["median_error"] < 0.02 and row["band_median_width"] > 0
    if protocol == "grid":
        assert row["median_values"] == 26
    else:  # the coarse pass, then placed values until converged or the budget is spent
        assert len(COARSE_VALUES) <= row["median_values"] <= QUICK_BUDGET


def _documents(count=160, seed=0):
    sweep = SyntheticPerplexitySweep(documents=count, seed=seed)
    sparsity = np.linspace(0.0, 0.6, 13)
    return sparsity, np.array([sweep.logliks(s) for s in sparsity]), sweep.dense, sweep.words


def test_the_double_bootstrap_truth_is_the_crossing_of_every_document():
    sparsity, sparse, dense, words = _documents()
    full = perplexity_reading(sparsity, sparse, dense, words, ppl_threshold(1.0), iterations=10)
    row = resampled_coverage(sparsity, sparse, dense, words, documents=60, draws=20, iterations=200)
    assert row["truth"] == pytest.approx(full["crossing"]) and row["documents"] == 60
    assert 0.5 <= row["band_coverage"] <= 1


def test_split_halves_agree_within_their_combined_widths_more_often_than_one_holds_the_other():
    sparsity, sparse, dense, words = _documents(200, seed=5)
    row = split_half_agreement(sparsity, sparse, dense, words, splits=30, iterations=200)
    assert row["splits"] == 30 and row["documents_per_half"] == 100
    for reading in ("bootstrap", "band"):
        assert row[f"{reading}_agree"] >= row[f"{reading}_holds_other"] - 0.1
        assert 0.4 <= row[f"{reading}_holds_other"] <= 1


def test_a_sweep_folder_gives_its_documents_sorted_by_sparsity(tmp_path):
    import pandas as pd

    from common.evaluation.store import ResultStore, write_csv
    from common.evaluation.sweep import DENSE, SweepSpec

    spec = SweepSpec(model="m", sites=["input"], tasks=["fables_ppl"], grid=[1.0, 0.9, 0.8])
    store = ResultStore(tmp_path)
    docs = lambda shift: [{"doc_id": i, "loglikelihood": -10.0 * (i + 1) - shift, "words": 5 + i} for i in range(3)]
    store.put(spec.key(DENSE, 1.0, "fables_ppl"), {"items": docs(0.0)})
    rows = []
    for value, sparsity, shift in ((0.8, 0.4, 2.0), (0.9, 0.2, 0.5)):
        store.put(spec.key("input", value, "fables_ppl"), {"items": docs(shift)})
        rows.append({"site": "input", "task": "fables_ppl", "value": value, "measured_sparsity": sparsity})
    write_csv(tmp_path / "tidy.csv", rows)
    (tmp_path / "critical.json").write_text(json.dumps({"spec": spec.as_dict()}))
    sparsity, sparse, dense, words = sweep_documents(tmp_path, "input")
    assert sparsity.tolist() == [0.2, 0.4]
    assert sparse[:, 0].tolist() == [-10.5, -12.0] and dense.tolist() == [-10.0, -20.0, -30.0]
    assert words.tolist() == [5.0, 6.0, 7.0]
    with pytest.raises(ValueError, match="no fables_ppl cells of site 'gate'"):
        sweep_documents(tmp_path, "gate")
    with pytest.raises(ValueError, match="not a finished sweep folder"):
        sweep_documents(tmp_path / "nothing", "input")
