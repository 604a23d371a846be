"""Rule values are checked as finite numbers in range (NaN compares false with everything)."""

from __future__ import annotations

import pytest
import torch

from common.core.rules import keep_mask, validate_rule


@pytest.mark.parametrize("value, power", [(float("nan"), 1.0), (0.9, float("nan")), (0.9, float("inf")),
                                          (-0.1, 1.0), (1.5, 1.0), ("0.9", 1.0), (True, 1.0), (0.9, 0.5)])
def test_bad_values_and_powers_are_one_line_errors(value, power):
    with pytest.raises(ValueError) as error:
        validate_rule("topp", value, power)
    assert "\n" not in str(error.value)


def test_a_one_element_tensor_value_is_a_valid_value():
    x = torch.randn(3, 64)
    validate_rule("topp", torch.tensor(0.9))
    assert torch.equal(keep_mask(x, "topp", torch.tensor(0.9)), keep_mask(x, "topp", 0.9))


def test_numpy_scalars_are_numbers_and_booleans_are_not():
    import numpy as np

    x = torch.randn(3, 64)
    for value in (np.float32(0.9), np.float64(0.9)):
        validate_rule("topp", value)
        assert torch.equal(keep_mask(x, "topp", value), keep_mask(x, "topp", float(value)))
    with pytest.raises(ValueError, match="must be a number"):
        validate_rule("topp", np.bool_(True))


@pytest.mark.parametrize("sites, layers, message", [
    (None, None, "sites must be a site name or a list"),
    ([], None, "no FFN site given"),
    ("intermediate", [], "non-empty list of layer indices"),
    ("intermediate", [True], "layer index True is out of range"),
    ("intermediate", "0", "non-empty list of layer indices"),
])
def test_sparsifier_arguments_that_would_install_nothing_or_the_wrong_thing_are_refused(sites, layers, message):
    from common.core.hooks import Sparsifier
    from tiny_models import tiny_model

    with pytest.raises(ValueError, match=message) as error:
        Sparsifier(tiny_model("llama"), sites, "topp", 0.9, layers=layers)
    assert "\n" not in str(error.value)


def test_numpy_layer_indices_are_layer_indices():
    import numpy as np

    from common.core.sites import resolve_layers
    from tiny_models import tiny_model

    assert resolve_layers(tiny_model("llama"), [np.int64(1), -2]) == [0, 1]
