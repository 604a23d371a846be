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


@pytest.mark.parametrize("row", [row.name for row in ARCHITECTURES if not row.is_moe])
def test_every_dense_row_names_the_linear_layers_that_read_each_input(row):
    """The linears of a group read exactly the tensor its FFN site records (input, intermediate),
    and q/k/v share one input: captured by hooks on a tiny model, not read from the table."""
    from common.core.hooks import ActivationCapture
    from common.core.sites import LINEAR_INPUTS, linear_module_names

    model = tiny_model_for_row(row)
    seen = {}

    def remember(name, module, args):
        seen[name] = args[0].detach().clone()

    names = {group: linear_module_names(model, group) for group in LINEAR_INPUTS}
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: remember(n, m, a))
               for group in names.values() for layer_names in group.values() for n in layer_names]
    ids = torch.randint(1, 90, (1, 6))
    with torch.no_grad(), ActivationCapture(model, ["input", "intermediate"]) as capture:
        model(ids)
    for handle in handles:
        handle.remove()
    for layer in names["input"]:
        for group in ("input", "intermediate"):
            site = capture.activations[(layer, group)][0]
            for name in names[group][layer]:
                assert isinstance(model.get_submodule(name), torch.nn.Linear)
                assert torch.equal(seen[name].reshape(site.shape), site), (group, name)
        q, k, v = names["attention"][layer]
        assert torch.equal(seen[q], seen[k]) and torch.equal(seen[q], seen[v])
        (o,) = names["attention_output"][layer]
        assert seen[o].shape[-1] == model.get_submodule(o).in_features


def test_an_unknown_linear_group_is_refused_in_one_line():
    from common.core.sites import linear_module_names

    with pytest.raises(ValueError, match="unknown linear input group 'mlp'"):
        linear_module_names(tiny_model_for_row("llama"), "mlp")
