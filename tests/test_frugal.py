"""FRUGAL: reductions to AdamW and signSGD, coordinate and block selection, resets and lr scales."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import loss_fn, make_data, make_model
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank_optim as lro
from lowrank_optim.projectors import make_projector
from lowrank_optim.projectors.blocks import active_blocks

SELECTIONS = ["blocks", "columns", "rows", "entries"]


def _frugal(model: torch.nn.Module, gap: int = 3, **kwargs: object) -> lro.FRUGAL:
    return lro.FRUGAL(lro.param_groups(model, rank=8, target_modules=["attn", "mlp"]), update_gap=gap, **kwargs)


def _grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    loss_fn(model, x, y).backward()


@pytest.mark.parametrize("projector", SELECTIONS)
def test_density_one_is_adamw(projector: str) -> None:
    """Across subspace switches (gap 3) and with weight decay, FRUGAL(density=1) follows torch AdamW.

    Plain parameters run the same Adam kernel; a projected weight's Adam direction is computed into a
    buffer, lifted (identity here) and added as ``p - lr * d``, where torch fuses ``p - lr * m / den``: one
    rounding per step, so the bound is a few fp32 ulps of the weights after 10 steps, not bit equality.
    Nothing is reset at a switch, since the subspace (everything) did not change.
    """
    model = make_model()
    ref_model = copy.deepcopy(model)
    opt = _frugal(model, density=1.0, projector=projector, weight_decay=0.1, lr=1e-2)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = make_data()
    for _ in range(10):
        for m, o in ((model, opt), (ref_model, ref)):
            _grads(m, x, y, o)
            o.step()
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=5e-7)
    w = model.attn.weight
    assert opt.state[w]["inner_step"] == 10
    torch.testing.assert_close(opt.state[w]["exp_avg_sq"].reshape(w.shape), ref.state[ref_model.attn.weight][
        "exp_avg_sq"], rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("projector", SELECTIONS)
@pytest.mark.parametrize(("rule", "lr_scales"), [("sign_sgd", (1.0, 1.0)), ("sign_sgd", (0.5, 0.1)),
                                                 ("sgd", (0.3, 2.0)), ("no", (1.0, 1.0))])
def test_density_zero_is_the_state_free_rule(projector: str, rule: str, lr_scales: tuple[float, float]) -> None:
    """Density 0: every projected weight steps ``W (1 - lr wd) - lr s_proj s_free sign(G)`` exactly (or ``G``,
    or nothing), and keeps no moment elements."""
    s_proj, s_free = lr_scales
    model = make_model()
    opt = _frugal(model, density=0.0, projector=projector, inactive_update_rule=rule, weight_decay=0.05, lr=1e-2,
                  proj_params_lr_scale=s_proj, inactive_lr_scale=s_free)
    x, y = make_data()
    lr = 1e-2 * s_proj * s_free
    for _ in range(5):
        _grads(model, x, y, opt)
        expected = []
        for w in (model.attn.weight, model.mlp.weight):
            decayed = w.detach() * (1 - 1e-2 * 0.05)
            if rule == "sign_sgd":
                expected.append(decayed - torch.sign(w.grad) * lr)
            elif rule == "sgd":
                expected.append(decayed - w.grad * lr)
            else:
                expected.append(decayed)
        opt.step()
        assert torch.equal(model.attn.weight, expected[0])
        assert torch.equal(model.mlp.weight, expected[1])
    for w in (model.attn.weight, model.mlp.weight):
        assert opt.state[w]["exp_avg"].numel() == 0 and opt.state[w]["exp_avg_sq"].numel() == 0


def test_default_is_the_headline_configuration() -> None:
    model = make_model()
    opt = lro.FRUGAL(lro.param_groups(model, rank=8, target_modules=["attn", "mlp"]))
    g = opt.param_groups[-1]
    assert (g["projector"], g["projector_options"], g["update_proj_gap"], g["residual"], g["transfer"],
            g["scale"], g["inactive_lr_scale"]) == ("blocks", {"density": 0.25, "order": "descending"}, 200, "sign",
                                                    "reset_on_change", 1.0, 1.0)


@pytest.mark.parametrize(("kwargs", "match", "exc"), [
    ({"inactive_update_rule": "same"}, "inactive_update_rule", ValueError),
    ({"inactive_update_rule": None}, "inactive_update_rule", TypeError),
    ({"density": 1.5}, "density", ValueError),
    ({"block_order": "sideways"}, "block_order", ValueError),
    ({"reset_statistics": False}, "reset_statistics", ValueError),  # blocks always rebuild their state
    ({"reset_statistics": "yes"}, "reset_statistics", TypeError),
    ({"inactive_lr_scale": -1.0}, "inactive_lr_scale", ValueError),
])
def test_bad_input_named(kwargs: dict, match: str, exc: type) -> None:
    with pytest.raises(exc, match=match):
        _frugal(make_model(), **kwargs)


def test_active_blocks_orders() -> None:
    assert [active_blocks(8, c, 0.25, "descending", 0) for c in range(5)] == [[6, 7], [4, 5], [2, 3], [0, 1],
                                                                              [6, 7]]
    assert [active_blocks(8, c, 0.25, "ascending", 0) for c in range(2)] == [[0, 1], [2, 3]]
    assert [active_blocks(8, c, 0.25, "mirror", 0) for c in range(3)] == [[0, 7], [1, 6], [2, 5]]
    assert active_blocks(8, 0, 0.0, "descending", 0) == [] and active_blocks(8, 0, 1.0, "random", 3) == list(range(8))
    draws = [active_blocks(10, c, 0.3, "random", 7) for c in range(6)]
    assert draws == [active_blocks(10, c, 0.3, "random", 7) for c in range(6)]  # seeded: every rank agrees
    assert all(len(d) == 3 for d in draws) and len({tuple(d) for d in draws}) > 1
    assert draws != [active_blocks(10, c, 0.3, "random", 8) for c in range(6)]


def test_blocks_switch_and_ranks_agree() -> None:
    """Two replicas (as two data-parallel ranks would) pick the same active tensor, which walks descending."""
    models = [make_model(), make_model()]
    opts = [_frugal(m, gap=2, density=0.5, lr=1e-2) for m in models]
    x, y = make_data()
    seen = []
    for _ in range(6):
        for m, o in zip(models, opts, strict=True):
            _grads(m, x, y, o)
            o.step()
        flags = [[o.state[m.attn.weight]["projector"]["active"], o.state[m.mlp.weight]["projector"]["active"]]
                 for m, o in zip(models, opts, strict=True)]
        assert flags[0] == flags[1]
        seen.append(tuple(flags[0]))
    assert seen == [(0, 1), (0, 1), (1, 0), (1, 0), (0, 1), (0, 1)]
    w = models[0].mlp.weight  # active in steps 5-6 after being inactive: fresh moments, bias correction restarted
    assert opts[0].state[w]["inner_step"] == 2 and opts[0].state[w]["exp_avg"].shape == w.shape
    assert opts[0].state[models[0].attn.weight]["exp_avg"].numel() == 0


@pytest.mark.parametrize("reset", [True, False])
def test_reset_statistics_on_coordinate_switch(reset: bool) -> None:
    model = make_model()
    opt = _frugal(model, gap=3, density=0.5, projector="columns", reset_statistics=reset, lr=1e-2)
    x, y = make_data()
    w = model.attn.weight
    for _ in range(3):
        _grads(model, x, y, opt)
        opt.step()
    before = opt.state[w]["exp_avg_sq"].clone()
    _grads(model, x, y, opt)
    idx_before = opt.state[w]["projector"]["indices"].clone()
    opt.step()  # switch happens before this step's update
    assert not torch.equal(idx_before, opt.state[w]["projector"]["indices"])
    g = opt.state[w]["projector"]
    low_grad = w.grad.index_select(1, g["indices"])
    if reset:
        assert opt.state[w]["inner_step"] == 1
        torch.testing.assert_close(opt.state[w]["exp_avg_sq"], 0.001 * low_grad**2)
    else:
        assert opt.state[w]["inner_step"] == 4
        torch.testing.assert_close(opt.state[w]["exp_avg_sq"], 0.999 * before + 0.001 * low_grad**2)


@pytest.mark.parametrize("choice", ["columns", "rows", "entries"])
def test_coordinates_split_the_gradient_exactly(choice: str) -> None:
    torch.manual_seed(0)
    g = torch.randn(12, 20)
    proj = make_projector(choice, 1, density=0.25)
    st = proj.init(g, seed=5)
    low = proj.project(g, st)
    k = {"columns": 5, "rows": 3, "entries": 60}[choice]
    assert low.numel() == k * {"columns": 12, "rows": 20, "entries": 1}[choice]
    assert tuple(low.shape) == proj.low_shape(g.shape, st)
    assert torch.equal(proj.project_back(low, st) + proj.complement(g, st), g)
    assert torch.equal(proj.project(proj.project_back(low, st), st), low)
    assert torch.equal(proj.init(g, seed=5)["indices"], st["indices"])  # indices only, reproducible
    assert not torch.equal(proj.update(g, st)["indices"], st["indices"])


def test_frugal_on_a_basis_projector_uses_rank_and_complement() -> None:
    """With an SVD subspace the state-free part is sign(G - P P^T G)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 24))
    opt = lro.FRUGAL([{"params": [w], "rank": 4}], lr=0.1, projector="svd", betas=(0.0, 0.999))
    w.grad = torch.randn(16, 24)
    before = w.detach().clone()
    opt.step()
    st = opt.state[w]
    p = st["projector"]["basis"]
    assert st["exp_avg"].shape == (4, 24)
    low = p.T @ w.grad
    adam = low / (low.abs() + 1e-8)  # first Adam step with beta1 = 0
    expected = before - 0.1 * p @ adam - 0.1 * torch.sign(w.grad - p @ low)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 9), n=st.integers(1, 9), density=st.floats(0.0, 1.0), seed=st.integers(0, 2**31),
       choice=st.sampled_from(["columns", "rows", "entries"]))
def test_coordinate_split_property(m: int, n: int, density: float, seed: int, choice: str) -> None:
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(seed))
    proj = make_projector(choice, 1, density=density)
    state = proj.init(g, seed=seed)
    low = proj.project(g, state)
    count = {"columns": n, "rows": m, "entries": m * n}[choice]
    assert state["indices"].numel() == int(density * count) and tuple(low.shape) == proj.low_shape(g.shape)
    rest = proj.complement(g, state)
    assert torch.equal(proj.project_back(low, state) + (torch.zeros_like(g) if rest is None else rest), g)


@settings(max_examples=60, deadline=None)
@given(count=st.integers(1, 40), period=st.integers(0, 50), density=st.floats(0.0, 1.0), seed=st.integers(0, 99),
       order=st.sampled_from(["descending", "ascending", "random", "mirror"]))
def test_active_blocks_property(count: int, period: int, density: float, seed: int, order: str) -> None:
    active = active_blocks(count, period, density, order, seed)
    k = min(count, round(count * density))
    assert active == sorted(set(active)) and all(0 <= i < count for i in active)
    if order == "mirror":
        assert len(active) <= k and len(active) % 2 == 0 and all(count - 1 - i in active for i in active)
    else:
        assert len(active) == k
