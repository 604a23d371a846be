"""Every row of the site table is exercised: a row added without a tiny model fails here."""

from __future__ import annotations

import pytest
import torch

from common.core.hooks import Sparsifier
from common.core.sites import ARCHITECTURES, detect_architecture
from tiny_models import tiny_model_for_row


@pytest.mark.parametrize("row", [row.name for row in ARCHITECTURES])
def test_every_row_has_a_tiny_model_that_it_detects_and_hooks(row):
    model = tiny_model_for_row(row)
    assert detect_architecture(model).name == row
    if detect_architecture(model).is_moe:
        return  # fused experts: hooked by moe_sparsity (tests/moe)
    ids = torch.randint(1, 90, (1, 6))
    with torch.no_grad(), Sparsifier(model, ["input", "up", "gate", "intermediate"], "topp", 0.9) as sparsifier:
        model(ids)
    rows = sparsifier.recorder.rows()
    layers = len({r["layer"] for r in rows})
    assert layers >= 2 and {r["site"] for r in rows} == {"input", "up", "gate", "intermediate"}
    assert all(0 < r["kept"] < r["counted"] for r in rows)
