"""Fira: reductions, the norm-growth limiter, and agreement with the reference ``fira`` package."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import loss_fn, make_data, make_model

import lowrank_optim as lro
from lowrank_optim.projectors import LEFT, RIGHT, make_projector
from lowrank_optim.rules.fira_residual import LIMITER_KEY, FiraResidual, limit_norm_growth, slice_scaling


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    opt.step()


def _rule_group(mode: str = "reference", gamma: float | None = 1.01, scale: float = 1.0) -> dict:
    """A group without ``betas``: the residual's step size is plain ``lr`` (1 here)."""
    return {"fira_residual": mode, "limiter_gamma": gamma, "scale": scale}


@pytest.mark.parametrize("mode", ["reference", "orthogonal"])
def test_full_rank_exact_projector_has_zero_residual_and_equals_low_rank_adam(mode: str) -> None:
    """Rank = min(m, n) and scale 1: ``G - P P^T G = 0``, so Fira is GaLore's low-rank Adam.

    In floating point the residual is rounding noise (1e-7 of ``G``), which ``phi`` can magnify for rows whose
    projected gradient is nearly zero, hence a 1e-4 bound relative to the distance moved, within one period:
    a refresh of a *full-rank* basis rotates its near-degenerate noise directions arbitrarily and the kept
    moments would amplify rounding differences (the GaLore keep policy, not the residual).
    """
    model = make_model()
    ref_model = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    opt = lro.Fira(lro.param_groups(model, rank=80, target_modules=["attn", "mlp"], update_proj_gap=100),
                   lr=1e-2, scale=1.0, fira_residual=mode)
    ref = lro.GaLoreAdamW(lro.param_groups(ref_model, rank=80, target_modules=["attn", "mlp"], update_proj_gap=100),
                          lr=1e-2, scale=1.0)
    x, y = make_data()
    for _ in range(10):
        _step(model, opt, x, y)
        _step(ref_model, ref, x, y)
        for w in (model.attn.weight, model.mlp.weight):
            pst = opt.state[w]["projector"]
            proj = make_projector("svd", 80)
            residual = w.grad - proj.project_back(proj.project(w.grad, pst), pst)
            assert residual.norm() <= 1e-5 * w.grad.norm()
    for p, q, p0 in zip(model.parameters(), ref_model.parameters(), start, strict=True):
        assert (p - q).norm() <= 1e-4 * (q - p0).norm()


def test_limiter_caps_a_tenfold_jump_at_gamma_times_stored_norm() -> None:
    torch.manual_seed(0)
    g = torch.randn(12, 20)
    proj = make_projector("svd", 3)
    pst = proj.init(g)
    low = proj.project(g, pst)
    low_update = torch.randn_like(low)
    outside = g - proj.project_back(low, pst)
    rule, state, group = FiraResidual(), {"inner_step": 1}, _rule_group()
    first = rule.step(g, low, low_update, proj, pst, state, group)
    stored = state[LIMITER_KEY].clone()
    torch.testing.assert_close(first.norm(), stored)
    jumped = g + 9 * outside  # same low-rank part, residual norm x10
    second = rule.step(jumped, low, low_update, proj, pst, state, group)
    torch.testing.assert_close(second.norm(), 1.01 * stored, rtol=1e-6, atol=0)
    torch.testing.assert_close(second, first * 1.01, rtol=1e-5, atol=1e-6)  # direction kept, only rescaled
    torch.testing.assert_close(state[LIMITER_KEY], 1.01 * stored, rtol=1e-6, atol=0)
    # shrinking is never limited, and the stored norm follows it down
    third = rule.step(g, low, low_update, proj, pst, state, group)
    torch.testing.assert_close(third, first, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(state[LIMITER_KEY], stored, rtol=1e-6, atol=0)


def test_limiter_gamma_is_an_option_and_none_disables_it() -> None:
    state: dict = {}
    limit_norm_growth(torch.ones(4), state, 1.5)  # stores 2.0
    out = limit_norm_growth(torch.full((4,), 10.0), state, 1.5)
    torch.testing.assert_close(out.norm(), torch.tensor(3.0))
    torch.manual_seed(0)
    g = torch.randn(12, 20)
    proj = make_projector("svd", 3)
    pst = proj.init(g)
    low = proj.project(g, pst)
    st: dict = {"inner_step": 1}
    a = FiraResidual().step(g, low, low, proj, pst, st, _rule_group(gamma=None))
    b = FiraResidual().step(10 * g, 10 * low, low, proj, pst, st, _rule_group(gamma=None))
    assert LIMITER_KEY not in st
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)  # phi ~ 1/10, residual x10: same, unlimited


@pytest.mark.parametrize("side_rule", ["left", "right"])
def test_scaling_is_one_factor_per_slice_along_the_kept_side(side_rule: str) -> None:
    torch.manual_seed(1)
    g = torch.randn(10, 14)
    proj = make_projector("svd", 3, side=side_rule)
    pst = proj.init(g)
    low = proj.project(g, pst)
    n = torch.randn_like(low)
    phi = slice_scaling(n, low, pst["side"])
    if pst["side"] == LEFT:  # low is (r, n): one factor per column
        assert phi.shape == (1, 14)
        torch.testing.assert_close(phi[0, 5], n[:, 5].norm() / (low[:, 5].norm() + 1e-8))
    else:
        assert pst["side"] == RIGHT and phi.shape == (10, 1)
        torch.testing.assert_close(phi[7, 0], n[7].norm() / (low[7].norm() + 1e-8))


def test_orthogonal_residual_lies_outside_the_subspace_reference_keeps_1_minus_alpha() -> None:
    torch.manual_seed(2)
    g = torch.randn(10, 16)
    proj = make_projector("svd", 3, side="left")
    pst = proj.init(g)
    low = proj.project(g, pst)
    p = pst["basis"]
    ones = torch.ones_like(low)
    ortho = FiraResidual().step(g, low, ones, proj, pst, {"inner_step": 1}, _rule_group("orthogonal", None, 0.25))
    ref = FiraResidual().step(g, low, ones, proj, pst, {"inner_step": 1}, _rule_group("reference", None, 0.25))
    assert (p.T @ ortho).abs().max() < 1e-5
    phi = slice_scaling(ones, low, LEFT)
    torch.testing.assert_close(p.T @ ref, 0.75 * phi * low, rtol=1e-5, atol=1e-5)


def _fira_pair(scale: float, gap: int, eps: float) -> tuple:
    from fira import FiraAdamW

    model = make_model()
    ref_model = copy.deepcopy(model)
    opt = lro.Fira(lro.param_groups(model, rank=8, target_modules=["attn", "mlp"], update_proj_gap=gap,
                                    scale=scale), lr=1e-2, eps=eps, projector_options={"sign": "raw", "solver": "svd"})
    projected = [ref_model.attn.weight, ref_model.mlp.weight]
    rest = [p for p in ref_model.parameters() if all(p is not q for q in projected)]
    ref = FiraAdamW([{"params": rest}, {"params": projected, "rank": 8, "update_proj_gap": gap, "alpha": scale,
                                        "proj_type": "std"}], lr=1e-2, eps=eps, no_deprecation_warning=True)
    return model, opt, ref_model, ref


@pytest.mark.parametrize(("scale", "gap", "steps"), [(0.25, 100, 25), (1.0, 100, 25), (0.25, 10, 30)])
def test_matches_fira_package(scale: float, gap: int, steps: int) -> None:
    """Same gradients, fp32, same eps: the weight trajectories agree to 1e-4 relative (to the distance moved).

    Intended differences, each neutralised here:

    * Adam's ``eps`` placement: we add it after the second-moment bias correction (torch's AdamW), the
      reference before (HF style); the denominators differ by ``eps (1 - sqrt(1 - beta2^t))``, which is
      relatively large for tiny gradient entries at early steps, so both run with the same tiny ``eps=1e-12``.
    * Weight decay: ours decays the pre-update weight, the reference the updated one: ``weight_decay=0``.
    * The limiter's gamma is an option here (1.01 in both).
    * Singular-vector signs: the fira package keeps LAPACK's raw signs; ours are canonical and aligned with the
      previous basis by default, which changes the trajectory under kept moments: ``projector_options={"sign":
      "raw"}``.
    * Solver: the fira package calls ``torch.linalg.svd``; ours by default takes the fp64 Gram eigenvectors (same
      subspace, other rounding and raw signs): ``"solver": "svd"`` too.

    The refresh case (gap 10) is sensitive in general: when two singular values at the rank cut-off almost
    tie, rounding-level differences rotate the new basis and the kept moments amplify it (GaLore's keep
    policy, not a defect of either side); this data has separated values at steps 0, 10, 20.
    """
    model, opt, ref_model, ref = _fira_pair(scale, gap, 1e-12)
    start = [p.detach().clone() for p in model.parameters()]
    x, y = make_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            _step(model, opt, x, y)
            _step(ref_model, ref, x, y)
            for p, q, p0 in zip(model.parameters(), ref_model.parameters(), start, strict=True):
                assert (p - q).norm() <= 1e-4 * (q - p0).norm()
    for w, v in ((model.attn.weight, ref_model.attn.weight), (model.mlp.weight, ref_model.mlp.weight)):
        torch.testing.assert_close(opt.state[w][LIMITER_KEY], ref.state[v]["scaling_grad"], rtol=1e-4, atol=0)


@pytest.mark.parametrize(("key", "value", "exc"), [("fira_residual", "paper", ValueError),
                                                   ("limiter_gamma", 0.5, ValueError),
                                                   ("limiter_gamma", "x", TypeError)])
def test_bad_fira_options_named(key: str, value: object, exc: type) -> None:
    model = make_model()
    with pytest.raises(exc, match=key):
        lro.Fira(lro.param_groups(model, rank=8, target_modules=["attn", "mlp"]), **{key: value})


def test_registered_and_limiter_state_is_one_fp32_scalar_per_matrix() -> None:
    model = make_model()
    opt = lro.create_optimizer("fira", lro.param_groups(model, rank=8, target_modules=["attn", "mlp"]),
                               state_dtype="8bit")
    assert isinstance(opt, lro.Fira)
    x, y = make_data()
    _step(model, opt, x, y)
    for w in (model.attn.weight, model.mlp.weight):
        t = opt.state[w][LIMITER_KEY]
        assert t.shape == () and t.dtype == torch.float32
    assert LIMITER_KEY not in opt.state[model.head.weight]
