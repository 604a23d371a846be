"""Criteria: each score by hand, dense at sparsity 0 on every dense row of the site table, the
weighted score's consumer matrices, non-finite rows, refusals in one line, the calibration math."""

from __future__ import annotations

import math

import pytest
import torch

from common.core.calibration import (calibrate, column_norms, consumer_weights, layer_mode, pca_rotation,
                                     score_quantile)
from common.core.criteria import NAMED, Criterion, LayerState, apply_criterion, parse_criterion
from common.core.hooks import ActivationCapture, Sparsifier
from common.core.rules import NONFINITE
from common.core.sites import ARCHITECTURES
from tests.tiny_models import tiny_model, tiny_model_for_row

DENSE_ROWS = [row.name for row in ARCHITECTURES if not row.is_moe]


def _apply(x, criterion, value, **state):
    return apply_criterion(torch.tensor(x), criterion, value, LayerState(**state))


def test_each_score_equals_a_hand_computation():
    # magnitude, top-k 1 of 3: the largest |x|
    out, kept, _ = _apply([[1.0, -2.0, 3.0]], Criterion("magnitude", "topk"), 0.34)
    assert out.tolist() == [[0.0, 0.0, 3.0]] and kept.tolist() == [1]
    # weighted: |x| * column norms = [3, 2, 1.5]: the first entry wins, not the largest |x|
    out, kept, _ = _apply([[1.0, -2.0, 3.0]], Criterion("weighted", "topk"), 0.34,
                          column_norms=torch.tensor([3.0, 1.0, 0.5]))
    assert out.tolist() == [[1.0, 0.0, 0.0]] and kept.tolist() == [1]
    # centred, mode 1: |x - 1| = [0.1, 2, 2, 0.1]; threshold 0.5 keeps the middle two, the rest become 1
    x = torch.tensor([[1.1, 3.0, -1.0, 0.9]])
    out, kept, mask = apply_criterion(x, Criterion("centred", "threshold"), 0.5, LayerState(threshold=0.5, mode=1.0),
                                      want_mask=True)
    assert out.tolist() == [[1.0, 3.0, -1.0, 1.0]] and kept.tolist() == [2]
    assert mask.tolist() == [[False, True, True, False]]
    weight = torch.tensor([[0.5, -1.0, 2.0, 0.25], [1.0, 1.0, -3.0, 0.5]])  # the fill is the bias W m added back
    torch.testing.assert_close(out @ weight.T, (mask * (x - 1.0)) @ weight.T + weight.sum(dim=1))
    # rotated by 45 degrees: x Q = [1.5 / sqrt 2, -0.5 / sqrt 2]; top-1 keeps the first coordinate and
    # rotates it back: the projection of x on (1, 1) / sqrt 2
    c = math.sqrt(0.5)
    rotation = torch.tensor([[c, -c], [c, c]])
    out, kept, mask = apply_criterion(torch.tensor([[1.0, 0.5]]), Criterion("rotated", "topk"), 0.5,
                                      LayerState(rotation=rotation), want_mask=True)
    torch.testing.assert_close(out, torch.tensor([[0.75, 0.75]]))
    assert kept.tolist() == [1] and mask.tolist() == [[True, False]]
    # gate: the intermediate entries ranked by |act(gate)| = [3, 0.1, 0.2]; threshold 0.15 drops the second
    out, kept, _ = _apply([[0.5, 2.0, -1.0]], Criterion("gate", "threshold"), 0.5, threshold=0.15,
                          gate=torch.tensor([[3.0, -0.1, 0.2]]))
    assert out.tolist() == [[0.5, 0.0, -1.0]] and kept.tolist() == [2]


def test_named_criteria_and_names():
    assert {name: (parse_criterion(name).score, parse_criterion(name).selection) for name in NAMED} == NAMED
    assert parse_criterion("teal").name == "teal" and parse_criterion("magnitude").name == "magnitude-topp"
    assert parse_criterion("weighted", rule="maxp") == Criterion("weighted", "maxp")
    assert parse_criterion("rotated-threshold").needs == ("rotation", "threshold")
    assert Criterion("magnitude", "topk").is_rule and not Criterion("magnitude", "threshold").is_rule


def _calibration(model, criterion, site, target=0.0, seed=1, tokens=24, documents=6):
    """Every quantity ``criterion`` needs at ``site``, from random-token documents."""
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randint(3, 100, (1, tokens), generator=generator) for _ in range(documents)]
    parts = []
    for base in ("input", "intermediate") if site == "all_inputs" else (site,):
        read = "gate" if criterion.score == "gate" and base == "intermediate" else base
        with ActivationCapture(model, read, keep=True) as capture, torch.no_grad():
            for ids in batches:
                model(input_ids=ids)
        activations = {(layer, base): torch.cat(rows) for (layer, _), rows in capture.activations.items()}
        weights = consumer_weights(model, base) if criterion.score == "weighted" else None
        parts.append(calibrate(criterion, activations, [target], weights)[0])
    for part in parts[1:]:
        for table in ("thresholds", "column_norms", "modes", "rotations"):
            getattr(parts[0], table).update(getattr(part, table))
    return parts[0]


@pytest.mark.parametrize("row", DENSE_ROWS)
def test_rotation_and_centring_equal_the_dense_model_at_sparsity_zero(row):
    """x Q Q^T and the mode fill change nothing at sparsity 0 (float32, within 1e-5), at every
    site every score is defined at, on every dense row of the site table."""
    model = tiny_model_for_row(row).float()
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    for score in ("rotated", "centred", "weighted", "gate"):
        for site in [s for s in ("input", "intermediate", "all_inputs") if s != "all_inputs" or score != "gate"]:
            if score == "gate" and site == "input":
                continue
            for criterion, value in ((Criterion(score, "threshold"), 0.0), (Criterion(score, "topk"), 1.0)):
                calibration = _calibration(model, criterion, site)
                with torch.no_grad(), Sparsifier(model, site, criterion=criterion, value=value,
                                                 calibration=calibration) as sparse:
                    logits = model(input_ids=ids).logits
                torch.testing.assert_close(logits, dense, rtol=0, atol=1e-5, msg=f"{row} {criterion.name} {site}")
                rows = sparse.recorder.rows()
                assert sum(r["kept"] for r in rows) == sum(r["counted"] for r in rows)  # nothing dropped


@pytest.mark.parametrize("site, scaled", [("input", "gate_proj"), ("input", "up_proj"), ("intermediate", "down_proj")])
def test_weighted_score_reads_the_matrix_that_consumes_the_site(site, scaled):
    """Column 0 of the matrix that reads the site (gate or up for the input, down for the
    intermediate) made 1e4 times larger: the weighted score keeps entry 0 of every token, alone.
    Reading another matrix (or gate without up) would keep other entries."""
    model = tiny_model("llama")
    consumers = consumer_weights(model, site)
    assert [w.data_ptr() for w in consumers[(0, site)]] == [getattr(model.model.layers[0].mlp, name).weight.data_ptr()
                                                            for name in ({"input": ("gate_proj", "up_proj"),
                                                                          "intermediate": ("down_proj",)}[site])]
    with torch.no_grad():
        for layer in model.model.layers:
            getattr(layer.mlp, scaled).weight[:, 0] *= 1e4
    criterion = Criterion("weighted", "topk")
    calibration = calibrate(criterion, None, weights=consumer_weights(model, site))[0]
    width = model.config.hidden_size if site == "input" else model.config.intermediate_size
    masks = []

    class Masks:
        def observe(self, layer, site_, context, tensor, mask, valid):
            masks.append(mask)

    with torch.no_grad(), Sparsifier(model, site, criterion=criterion, value=1.5 / width,
                                     calibration=calibration) as sparse:
        sparse.recorder.observers.append(Masks())
        model(input_ids=torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(2)))
    assert masks and all(bool(m[..., 0].all()) and int(m.sum(-1).max()) == 1 for m in masks)


@pytest.mark.parametrize("name", list(NAMED) + ["magnitude-topp", "weighted-maxp", "rotated-topp", "centred-topk"])
def test_nonfinite_rows_pass_through_under_every_score(name):
    criterion = parse_criterion(name)
    x = torch.tensor([[0.5, -2.0, 1.0, 0.25], [1.0, float("nan"), 2.0, 0.1], [float("inf"), 1.0, 0.0, 3.0]])
    state = LayerState(threshold=0.6, column_norms=torch.ones(4), mode=0.0, rotation=torch.eye(4),
                       gate=x.clone() if criterion.score == "gate" else None)
    value = 0.5 if criterion.calibrated else (0.5 if criterion.selection == "topk" else 0.6)
    out, kept, mask = apply_criterion(x, criterion, value, state, want_mask=True)
    assert kept[1:].tolist() == [NONFINITE, NONFINITE] and bool(mask[1:].all())
    assert torch.equal(out[1:].isnan(), x[1:].isnan()) and torch.equal(out[1:].nan_to_num(), x[1:].nan_to_num())
    assert 0 < kept[0] < 4


def test_an_inapplicable_pair_is_refused_in_one_line():
    model = tiny_model("llama")
    for name, site in (("cats", "input"), ("cats", "all_inputs"), ("larosa", "gate"), ("wina", "up"),
                       ("scap", "gate")):
        with pytest.raises(ValueError) as refused:
            Sparsifier(model, site, criterion=parse_criterion(name), value=0.5)
        assert f"criterion {name} does not apply at" in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(ValueError, match="needs threshold") as refused:
        Sparsifier(model, "input", criterion=Criterion("magnitude", "threshold"), value=0.5)
    assert "\n" not in str(refused.value)
    with pytest.raises(ValueError, match="target sparsity in \\[0, 1\\)"):
        Criterion("magnitude", "threshold").check_value(1.0)
    with pytest.raises(ValueError, match="power q=2 applies to the magnitude score only"):
        Criterion("weighted", "topp").check_value(0.5, 2.0)
    with pytest.raises(ValueError, match="unknown criterion 'wnia'"):
        parse_criterion("wnia")


def test_calibration_math_by_hand():
    values = torch.arange(1.0, 101.0)
    assert score_quantile(values, 0.25) == 26.0 and score_quantile(values, 0.0) == 0.0
    assert score_quantile(values, 0.999) == math.inf
    up = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    gate = torch.tensor([[0.0, 2.0], [0.0, 2.0]])
    assert column_norms([up, gate]).tolist() == [5.0, 3.0]  # sqrt(9 + 16), sqrt(1 + 4 + 4)
    generator = torch.Generator().manual_seed(0)
    skewed = torch.cat([torch.randn(20000, 8, generator=generator) * 0.3 + 1.5,
                        torch.rand(5000, 8, generator=generator) * 8 - 4])  # a peak at 1.5 over a wide floor
    assert layer_mode(skewed) == pytest.approx(1.5, abs=0.05)
    rows = torch.randn(500, 6, generator=generator) @ torch.randn(6, 6, generator=generator)
    rotation = pca_rotation(rows)
    torch.testing.assert_close(rotation.T @ rotation, torch.eye(6), rtol=0, atol=1e-6)
    rotated = rows @ rotation  # the coordinates are uncorrelated (second moments diagonal)
    moment = rotated.T @ rotated
    assert (moment - torch.diag(moment.diagonal())).abs().max() < 1e-3 * moment.diagonal().max()


def test_calibrated_thresholds_are_quantiles_of_the_score_the_hook_ranks_by():
    rows = torch.tensor([[1.0, -4.0], [2.0, 0.5], [-3.0, 8.0]])
    norms = torch.tensor([2.0, 0.5])
    [half] = calibrate(Criterion("weighted", "threshold"), {(0, "input"): rows}, [0.5],
                       {(0, "input"): [torch.diag(norms)]})
    assert half.thresholds[(0, "input")] == 4.0  # scores 2, 2, 4, 0.25, 6, 4: three of six below 4
    state = half.state(0, "input")
    _, kept, _ = apply_criterion(rows, Criterion("weighted", "threshold"), 0.5, state)
    assert int(kept.sum()) == 3
