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
