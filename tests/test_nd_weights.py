"""N-D weights in a low-rank group: MoE experts ``(E, m, n)`` as stacks of matrices, conv weights as
``out x (in * kh * kw)``, anything else refused by name (engine side; issue 12)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_state, feed, roundtrip
from torch import nn

import lowrank_optim as lro
from lowrank_optim.state import StateStore

SEED_FREE = ("galore_adamw", "galore_adafactor", "fira", "online_subspace_descent", "dct_adamw")


def _grads(shape: tuple[int, ...], steps: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


def _run(name: str, params: list[torch.Tensor], grads: list[list[torch.Tensor]], **kw) -> torch.optim.Optimizer:
    opt = lro.create_optimizer(name, [{"params": params, "rank": 3, "update_proj_gap": 2, **kw}], lr=1e-2)
    feed(opt, params, grads)
    return opt


@pytest.mark.parametrize("name", SEED_FREE)
def test_experts_step_like_separate_matrices(name: str) -> None:
    """A (E, m, n) weight steps exactly as E separate (m, n) weights (projectors that draw nothing at random)."""
    e, m, n = 3, 12, 10
    w0 = torch.randn(e, m, n)
    grads = _grads((e, m, n), 5)
    experts = nn.Parameter(w0.clone())
    _run(name, [experts], [[g] for g in grads])
    mats = [nn.Parameter(w0[i].clone()) for i in range(e)]
    _run(name, mats, [[g[i] for i in range(e)] for g in grads])
    for i in range(e):
        assert torch.equal(experts.detach()[i], mats[i].detach()), i


@pytest.mark.parametrize("name", SEED_FREE)
def test_conv_steps_as_the_flattened_matrix(name: str) -> None:
    """A conv weight (out, in, kh, kw) steps exactly as the matrix out x (in*kh*kw), contiguous or not."""
    shape = (6, 4, 3, 3)
    w0 = torch.randn(shape)
    grads = _grads(shape, 5)
    conv = nn.Parameter(w0.clone())
    _run(name, [conv], [[g] for g in grads])
    last = nn.Parameter(w0.clone().to(memory_format=torch.channels_last))
    _run(name, [last], [[g.to(memory_format=torch.channels_last)] for g in grads])
    flat = nn.Parameter(w0.reshape(6, -1).clone())
    _run(name, [flat], [[g.reshape(6, -1)] for g in grads])
    assert torch.equal(conv.detach().reshape(6, -1), flat.detach())
    assert torch.equal(last.detach().reshape(6, -1), flat.detach())
    assert last.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("state_dtype", ["fp32", "bf16", "8bit"])
def test_state_bytes_closed_form(state_dtype: str) -> None:
    """Experts: E times one (m, n) matrix's state; conv: the state of the (out, in*kh*kw) matrix."""
    experts = nn.Parameter(torch.randn(4, 96, 80))
    conv = nn.Parameter(torch.randn(80, 16, 3, 3))
    opt = _run("galore_adamw", [experts, conv], [[torch.randn(4, 96, 80), torch.randn(80, 16, 3, 3)]],
               state_dtype=state_dtype)
    store = StateStore(state_dtype)
    r = 3
    # std side: (96, 80) projects the right -> basis (80, r), moments (96, r); (80, 144) the left -> (80, r), (r, 144)
    per_expert = 80 * r * 4 + 2 * store.bytes_for(96 * r)
    conv_bytes = 80 * r * 4 + 2 * store.bytes_for(r * 144)
    assert opt.state_bytes() == 4 * per_expert + conv_bytes
    st = opt.state[experts]
    assert len(st["matrices"]) == 4 and all("projector" in s for s in st["matrices"])
    assert "projector" in opt.state[conv]


@pytest.mark.parametrize("name", lro.available_optimizers())
def test_every_preset_resumes_bit_exactly_with_experts_and_conv(name: str) -> None:
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(3, 12, 10)), nn.Parameter(torch.randn(8, 4, 3, 3)),
              nn.Parameter(torch.randn(12, 10)), nn.Parameter(torch.randn(10))]
    grads = [[torch.randn_like(p) for p in params] for _ in range(7)]

    def make(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
        return lro.create_optimizer(name, [{"params": ps[:3], "rank": 3, "update_proj_gap": 2},
                                           {"params": ps[3:]}], lr=1e-2)

    def run(ps: list[nn.Parameter], opt: torch.optim.Optimizer, gs: list[list[torch.Tensor]]) -> None:
        feed(opt, ps, gs)

    opt = make(params)
    run(params, opt, grads[:4])
    assert params[0] in opt.state and "matrices" in opt.state[params[0]]
    params2 = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = make(params2)
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    assert_same_state(opt, opt2)
    run(params, opt, grads[4:])
    run(params2, opt2, grads[4:])
    for p, q in zip(params, params2, strict=True):
        assert torch.equal(p, q)
    assert_same_state(opt, opt2)


def test_experts_train_a_tiny_moe_layer() -> None:
    """Expert weights carry projector state and the loss goes down."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 16, 12) * 0.3)
    x = torch.randn(4, 32, 16)
    y = torch.randn(4, 32, 12)
    opt = lro.GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 5}], lr=3e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (torch.bmm(x, w) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(s["projector"]["basis"].shape == (12, 4) for s in opt.state[w]["matrices"])


def test_other_nd_tensors_are_refused_by_name() -> None:
    w5 = nn.Parameter(torch.randn(2, 2, 3, 3, 3))
    with pytest.raises(ValueError, match=r"parameter 1 of shape \(2, 2, 3, 3, 3\).*nd_layout"):
        lro.GaLoreAdamW([{"params": [nn.Parameter(torch.randn(4, 4)), w5], "rank": 2}])
    with pytest.raises(ValueError, match="nd_layout"):
        lro.GaLoreAdamW([{"params": [w5], "rank": 2, "nd_layout": "tensor"}])
    # explicit layouts see any N-D tensor as matrices; a plain group keeps it plain
    opt = lro.GaLoreAdamW([{"params": [w5], "rank": 2, "nd_layout": "conv"}])
    w5.grad = torch.randn_like(w5)
    opt.step()
    assert opt.state[w5]["projector"]["basis"].shape[0] in (2, 54)
    conv1d = nn.Parameter(torch.randn(6, 4, 5))
    opt = lro.GaLoreAdamW([{"params": [conv1d], "rank": 2, "nd_layout": "conv"}])
    conv1d.grad = torch.randn_like(conv1d)
    opt.step()
    assert "matrices" not in opt.state[conv1d] and opt.state[conv1d]["exp_avg"].shape == (2, 20)
