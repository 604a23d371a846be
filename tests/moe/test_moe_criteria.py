"""The weighted score on fused experts: each routed row ranked by its own expert's down-projection
column norms, on every backend; the criteria fused experts cannot take are refused in one line."""

import pytest
import torch
import torch.nn.functional as F

from common.core.criteria import Criterion, LayerState, apply_criterion
from moe_sparsity.experts import SUPPORTED_BACKENDS, ExpertSparsifier, expert_calibration, expert_column_norms
from tiny_models import MOE_ARCHITECTURES, tiny_moe

IDS = torch.randint(2, 120, (2, 9), generator=torch.Generator().manual_seed(3))
WEIGHTED = Criterion("weighted", "topk")


def _reference_block(block, hidden, value):
    """A plain loop over tokens and their experts: the intermediate row of expert e ranked by
    |x_i| * ||down_e[:, i]||, the top-k kept."""
    experts = block.experts
    flat = hidden.reshape(-1, hidden.shape[-1])
    _, weights, indices = block.gate(flat)
    out = torch.zeros_like(flat)
    for token in range(flat.shape[0]):
        for slot in range(indices.shape[1]):
            e = int(indices[token, slot])
            gate, up = F.linear(flat[token], experts.gate_up_proj[e]).chunk(2, dim=-1)
            inter = experts.act_fn(gate) * up
            norms = experts.down_proj[e].norm(dim=0)
            sparse, _, _ = apply_criterion(inter[None], WEIGHTED, value, LayerState(column_norms=norms))
            out[token] += weights[token, slot] * F.linear(sparse[0], experts.down_proj[e])
    return out.reshape(hidden.shape)


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
@pytest.mark.parametrize("backend", SUPPORTED_BACKENDS)
def test_weighted_score_reads_each_experts_own_down_projection(arch, backend):
    model = tiny_moe(arch)
    model.set_experts_implementation(backend)
    with torch.no_grad():  # make the experts' column norms differ a lot, so a mix-up shows
        for layer in model.model.layers:
            down = layer.mlp.experts.down_proj
            down.mul_(torch.rand(down.shape[0], 1, down.shape[2], generator=torch.Generator().manual_seed(1)) * 4)
    seen, handles = {}, []
    for layer, block in enumerate(l.mlp for l in model.model.layers):
        handles.append(block.register_forward_pre_hook(lambda m, a, layer=layer: seen.__setitem__((layer, "x"), a[0])))
        handles.append(block.register_forward_hook(lambda m, a, o, layer=layer: seen.__setitem__((layer, "y"), o)))
    with torch.no_grad(), ExpertSparsifier(model, "intermediate", criterion=WEIGHTED, value=0.25,
                                           calibration=expert_calibration(model, WEIGHTED)) as sparsifier:
        model(input_ids=IDS)
    for handle in handles:
        handle.remove()
    for layer, block in enumerate(l.mlp for l in model.model.layers):
        with torch.no_grad():
            expected = _reference_block(block, seen[(layer, "x")], 0.25)
        torch.testing.assert_close(seen[(layer, "y")], expected, atol=1e-5, rtol=0)
    rows = [r for r in sparsifier.recorder.expert_rows() if r["counted"]]
    width = model.model.layers[0].mlp.experts.down_proj.shape[-1]
    assert rows and all(r["kept"] == int(width * 0.25) * r["routed_tokens"] for r in rows)


def test_expert_column_norms_by_hand():
    model = tiny_moe("mixtral")
    norms = expert_column_norms(model)
    down = model.model.layers[1].mlp.experts.down_proj  # [E, H, I]
    torch.testing.assert_close(norms[1][2], down[2].norm(dim=0))


def test_criteria_fused_experts_cannot_take_are_refused_in_one_line():
    model = tiny_moe("olmoe")
    for criterion, site in ((WEIGHTED, "input"), (Criterion("magnitude", "threshold"), "intermediate"),
                            (Criterion("rotated", "topk"), "intermediate"), (Criterion("gate", "topp"), "gate")):
        with pytest.raises(ValueError) as refused:
            ExpertSparsifier(model, site, criterion=criterion, value=0.5)
        assert "does not apply to fused MoE experts" in str(refused.value) and "\n" not in str(refused.value)
