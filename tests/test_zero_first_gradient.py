"""A first value stored as a reference must not come from an all-zero gradient (issue 11, fault 8b and its kind).

A layer feeding a zero-initialised layer gets an exactly zero gradient on the first step. Three things used to
be fixed from that zero: Fira's norm-growth limiter (stored norm 0, so every later residual was capped at
``1e-8 * 1.01^k``, about 2000 steps to grow back to 1), the projector's subspace (the SVD / selection of a zero
matrix is arbitrary and was kept for a whole period), and GaLore+'s sparse-residual entries (top-k of a zero
score, kept for good).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowrank_optim as lro
from lowrank_optim.engine import PENDING
from lowrank_optim.rules.fira_residual import LIMITER_KEY, limit_norm_growth


class ZeroInit(nn.Module):
    """``attn`` feeds ``mlp``, which starts at zero: ``attn``'s first gradient is exactly zero."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.Linear(32, 48, bias=False)
        self.mlp = nn.Linear(48, 40, bias=False)
        nn.init.zeros_(self.mlp.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.tanh(self.attn(x)))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(64, 32, generator=g), torch.randn(64, 40, generator=g)


def _run(opt: torch.optim.Optimizer, model: nn.Module, steps: int) -> list[torch.Tensor]:
    grads = []
    for t in range(steps):
        x, y = _batch(t)
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        grads.append(model.attn.weight.grad.clone())
        opt.step()
    return grads


def test_limiter_is_not_armed_by_a_zero_norm() -> None:
    state: dict = {}
    limit_norm_growth(torch.zeros(5), state, 1.01)
    out = limit_norm_growth(torch.full((5,), 3.0), state, 1.01)
    torch.testing.assert_close(out, torch.full((5,), 3.0))  # before: capped to 1.01e-8 in norm
    torch.testing.assert_close(state[LIMITER_KEY], torch.tensor(3.0 * 5**0.5))
    capped = limit_norm_growth(torch.full((5,), 30.0), state, 1.01)  # armed now: a 10x jump is limited
    torch.testing.assert_close(capped.norm(), 1.01 * torch.tensor(3.0 * 5**0.5))


def test_fira_zero_init_layer_residual_not_capped() -> None:
    model = ZeroInit()
    opt = lro.Fira(lro.param_groups(model, rank=4, target_modules=["attn", "mlp"]), lr=1e-2)
    grads = _run(opt, model, 3)
    assert not grads[0].any() and grads[1].any()
    st = opt.state[model.attn.weight]
    # after the first nonzero gradient, the stored norm is that of an uncapped residual, not ~1e-8
    assert float(st[LIMITER_KEY]) > 1e-3


@pytest.mark.parametrize("name", ["galore_adamw", "fira", "online_subspace_descent", "coap", "gum", "dct_adamw"])
def test_subspace_is_chosen_from_the_first_nonzero_gradient(name: str) -> None:
    model = ZeroInit()
    kwargs = {"full_rank_layers": 0} if name == "gum" else {}
    opt = lro.create_optimizer(name, lro.param_groups(model, rank=4, target_modules=["attn", "mlp"]), lr=1e-2,
                               **kwargs)
    grads = _run(opt, model, 2)
    assert not grads[0].any() and grads[1].any()
    st = opt.state[model.attn.weight]
    assert PENDING not in st
    g = grads[1]
    proj = opt._parts(opt.param_groups[-1])[0]
    seed = st["projector"]["seed"]
    fresh, from_zero = proj.init(g, seed=seed), proj.init(torch.zeros_like(g), seed=seed)

    def captured(pst: dict) -> float:
        return float(proj.project(g, pst).norm() ** 2 / g.norm() ** 2)

    # the subspace is the one a fresh init on the first nonzero gradient picks, not the zero matrix's
    assert captured(st["projector"]) == pytest.approx(captured(fresh), rel=1e-5)
    assert captured(st["projector"]) > 1.5 * captured(from_zero)


def test_pending_flag_set_only_on_zero_first_gradient() -> None:
    model = ZeroInit()
    opt = lro.GaLoreAdamW(lro.param_groups(model, rank=4, target_modules=["attn", "mlp"]), lr=1e-2)
    _run(opt, model, 1)
    assert opt.state[model.attn.weight][PENDING] == 1
    assert PENDING not in opt.state[model.mlp.weight]  # its first gradient was nonzero


def test_zero_first_gradient_runs_like_deferred_init() -> None:
    """Two steps from a zero first gradient leave the same projector state as initialising at step 2."""
    model = ZeroInit()
    opt = lro.GaLoreAdamW(lro.param_groups(model, rank=4, target_modules=["attn", "mlp"]), lr=1e-2)
    grads = _run(opt, model, 2)
    basis = opt.state[model.attn.weight]["projector"]["basis"]
    fresh = lro.make_projector("svd", 4).init(grads[1])["basis"]
    torch.testing.assert_close(basis, fresh)


def test_sparse_residual_entries_not_chosen_from_zero_scores() -> None:
    model = ZeroInit()
    opt = lro.GaLorePlus(lro.param_groups(model, rank=4, target_modules=["attn", "mlp"]), lr=1e-2,
                         residual_warmup=1, residual_density=0.05)
    grads = _run(opt, model, 2)
    st = opt.state[model.attn.weight]
    proj = opt._parts(opt.param_groups[-1])[0]
    pst = st["projector"]
    e = grads[1] - proj.project_back(proj.project(grads[1], pst), pst)
    k = st["residual_index"].numel()
    expected = torch.topk(e.square().flatten(), k).indices.sort().values
    assert torch.equal(st["residual_index"].long(), expected)


def _planted(step: int, m: int = 40, n: int = 24) -> torch.Tensor:
    """A rank-4 gradient with a fixed subspace plus small noise."""
    g = torch.Generator().manual_seed(7)
    u, _ = torch.linalg.qr(torch.randn(m, 4, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, 4, generator=g))
    noise = torch.randn(m, n, generator=torch.Generator().manual_seed(step))
    return u @ torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0])) @ v.T + 0.01 * noise


@pytest.mark.parametrize(("name", "kwargs"), [
    ("galore_adamw", {}), ("galore_adamw", {"projector": "rsvd"}), ("galore_adamw", {"projector": "dct"}),
    ("coap", {"reproject_factor": 1}), ("gum", {}), ("galore_plus", {"projector_options": {"num_heads": 4}}),
    ("galore_adamw", {"projector_options": {"basis_dtype": "int8"}})])
def test_zero_gradient_at_a_later_refresh_keeps_the_subspace(name: str, kwargs: dict) -> None:
    """A refresh that sees an exactly zero gradient (an MoE expert with no tokens in the batch, a masked layer)
    keeps the current subspace as stored; it used to take the arbitrary decomposition of 0 for a whole period
    (a basis capturing 0.11 of the true subspace). The refresh count still advances, and the next refresh on a
    nonzero gradient is an ordinary one."""
    w = nn.Parameter(torch.zeros(40, 24))
    opt = lro.create_optimizer(name, [{"params": [w], "rank": 4}], lr=1e-2, update_proj_gap=3, **kwargs)
    kept = None
    for step in range(7):
        w.grad = torch.zeros(40, 24) if step == 3 else _planted(step)
        before = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[w].get("projector", {}).items()}
        opt.step()
        pst = opt.state[w]["projector"]
        if step == 3:  # the refresh at state step 3 saw the zero gradient
            kept = pst
            assert pst["refresh"] == before["refresh"] + 1
            for key in ("basis", "indices", "basis_scale"):
                if key in before:
                    assert torch.equal(pst[key], before[key]), key
    assert kept is not None and opt.state[w]["projector"]["refresh"] == kept["refresh"] + 1


def test_zero_gradient_expert_keeps_its_subspace() -> None:
    """An MoE expert stack ``(E, m, n)``: the expert that got no tokens at a refresh keeps its basis; the others
    refresh."""
    w = nn.Parameter(torch.zeros(3, 40, 24))
    opt = lro.GaLoreAdamW([{"params": [w], "rank": 4}], lr=1e-2, update_proj_gap=3)
    for step in range(4):
        g = torch.stack([_planted(step + 10 * e) for e in range(3)])
        if step == 3:
            g[1] = 0
            before = [st["projector"]["basis"].clone() for st in opt.state[w]["matrices"]]
        w.grad = g
        opt.step()
    after = [st["projector"]["basis"] for st in opt.state[w]["matrices"]]
    assert torch.equal(after[1], before[1])
    assert not torch.equal(after[0], before[0]) and not torch.equal(after[2], before[2])
