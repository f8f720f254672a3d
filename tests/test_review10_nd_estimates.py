"""Review 10: shape-only memory estimates of convolution weights equal the live optimizer's state (a 3-D ``Conv1d``
weight is one ``out x (in * k)`` matrix, not ``out`` experts; a 5-D ``Conv3d`` weight is not refused), and a tensor
listed twice in one group is refused by name (the per-matrix and batched paths stepped it differently)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowrank_optim as lro
from lowrank_optim.memory import estimate_state_bytes

RANK = 4


class _ConvNet(nn.Module):
    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.mlp = nn.Linear(16, 12, bias=False)


def _galore_fp32_bytes(m: int, n: int, r: int) -> int:
    """GaLore-AdamW fp32 state of an ``m x n`` matrix: basis ``min(m, n) r`` plus two ``r x max(m, n)`` moments."""
    return 4 * (min(m, n) * r + 2 * r * max(m, n))


@pytest.mark.parametrize("conv", [nn.Conv1d(8, 16, 3, bias=False), nn.Conv2d(8, 16, 3, bias=False),
                                  nn.Conv3d(8, 16, 3, bias=False)], ids=["conv1d", "conv2d", "conv3d"])
def test_conv_estimate_equals_the_live_optimizer(conv: nn.Module) -> None:
    model = _ConvNet(conv)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    est = estimate_state_bytes(shapes, "galore_adamw", rank=RANK, target_modules=["conv", "mlp"], include_conv=True,
                               lr=1e-3)
    out, cols = conv.weight.shape[0], conv.weight[0].numel()
    assert est.per_param["conv.weight"] == _galore_fp32_bytes(out, cols, RANK)
    assert est.per_param["mlp.weight"] == _galore_fp32_bytes(12, 16, RANK)

    groups = lro.param_groups(model, rank=RANK, target_modules=["conv", "mlp"], include_conv=True)
    opt = lro.GaLoreAdamW(groups, lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[model.conv.weight]["exp_avg"].shape == (RANK, cols)
    assert est.total == opt.state_bytes()
    plan = lro.plan_memory(shapes, "galore_adamw", rank=RANK, target_modules=["conv", "mlp"], include_conv=True,
                           state_dtype="fp32")
    assert plan.state["projector bases"] + plan.state["low-rank moments"] == est.total
    assert plan.n_lowrank == 2


def test_conv_estimate_keeps_expert_stacks_as_experts() -> None:
    """A 3-D ``...experts...`` tensor stays ``E`` matrices next to a convolution of the same rank."""
    shapes = {"moe.experts.w": (3, 16, 12), "conv.weight": (16, 8, 3)}
    est = estimate_state_bytes(shapes, "galore_adamw", rank=RANK, target_modules=["conv", "moe"], include_conv=True,
                               lr=1e-3)
    assert est.per_param["moe.experts.w"] == 3 * _galore_fp32_bytes(16, 12, RANK)
    assert est.per_param["conv.weight"] == _galore_fp32_bytes(16, 24, RANK)


@pytest.mark.parametrize("name", ["galore_adamw", "fira", "apollo"])
def test_a_tensor_listed_twice_in_a_group_is_refused(name: str) -> None:
    p, q = nn.Parameter(torch.ones(8, 6)), nn.Parameter(torch.ones(8, 6))
    refused = pytest.raises(ValueError, match=r"parameters 0 and 2 .*\(8, 6\)")
    with pytest.warns(UserWarning, match="duplicate"), refused:
        lro.create_optimizer(name, [{"params": [p, q, p], "rank": 2}], lr=0.1)
    opt = lro.create_optimizer(name, [{"params": [q], "rank": 2}], lr=0.1)
    with pytest.warns(UserWarning, match="duplicate"), pytest.raises(ValueError, match="same tensor"):
        opt.add_param_group({"params": [p, p]})
    assert len(opt.param_groups) == 1  # the refused group is not kept
