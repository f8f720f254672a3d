"""GUM and its Muon inner rule: unbiasedness before Newton-Schulz, seeded draws, orthogonality, the
cancellation of the debiasing weights, and agreement with ``torch.optim.Muon``."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import loss_fn, make_data, make_model

import lowrank_optim as lro
from lowrank_optim.engine import LowRankOptimizer
from lowrank_optim.projectors import make_projector
from lowrank_optim.projectors.gum import full_rank_draw
from lowrank_optim.rules.muon import lr_factor, newton_schulz


def _gum(model: torch.nn.Module, gap: int = 3, **kwargs: object) -> lro.GUM:
    return lro.GUM(lro.param_groups(model, rank=8, target_modules=["attn", "mlp"]), update_proj_gap=gap, **kwargs)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    x, y = make_data()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()


@pytest.mark.parametrize(("prob", "layers"), [(0.3, None), (None, 2)])
def test_monte_carlo_average_of_the_estimate_approaches_g(prob: float | None, layers: int | None) -> None:
    """``project_back(project(G))`` before Newton-Schulz: ``(G - P P^T G) / q`` or ``P P^T G / (1 - q)``.

    The SVD basis is fixed (same G every period), so the estimate takes one of two values per matrix; the
    average over 4000 seeded periods x 5 matrices weighs them by the drawn frequencies.
    """
    torch.manual_seed(0)
    g = torch.randn(12, 20)
    proj = make_projector("gum", 3, full_rank_prob=prob, full_rank_layers=layers)
    count, periods = 5, 4000
    st = proj.init(g, seed=1, layout=(0, count, 11))
    estimate = {}
    for full in (0, 1):
        st["full"] = full
        estimate[full] = proj.project_back(proj.project(g, st), st)
    hits = sum(len(full_rank_draw(count, period, 11, prob, layers)) for period in range(periods))
    mean = (hits * estimate[1] + (count * periods - hits) * estimate[0]) / (count * periods)
    assert (mean - g).norm() < 0.03 * g.norm()
    for full in (0, 1):  # each single draw is far from G: the average is doing the work
        assert (estimate[full] - g).norm() > 0.3 * g.norm()
    q = proj.q(count)
    torch.testing.assert_close(q * estimate[1] + (1 - q) * estimate[0], g, rtol=1e-5, atol=1e-5)  # exact mean


def test_seeded_draw_is_reproducible_and_exact_count() -> None:
    a = [full_rank_draw(10, period, 3, None, 2) for period in range(8)]
    assert a == [full_rank_draw(10, period, 3, None, 2) for period in range(8)]
    assert all(len(d) == 2 for d in a) and len({tuple(d) for d in a}) > 1
    b = [full_rank_draw(10, period, 3, 0.4, None) for period in range(8)]
    assert b == [full_rank_draw(10, period, 3, 0.4, None) for period in range(8)]
    assert b != [full_rank_draw(10, period, 4, 0.4, None) for period in range(8)]
    assert full_rank_draw(10, 0, 3, 0.0, None) == [] and full_rank_draw(10, 0, 3, 1.0, None) == list(range(10))


def test_replicas_draw_the_same_layers_and_branches_switch() -> None:
    models = [make_model(), make_model()]
    opts = [_gum(m, gap=2, full_rank_layers=1, lr=1e-2) for m in models]
    x, y = make_data()
    flags = []
    for _ in range(16):  # periods 0-7: with seed 0 the draw picks mlp in 0-6, attn in 7
        for m, o in zip(models, opts, strict=True):
            o.zero_grad()
            loss_fn(m, x, y).backward()
            o.step()
        f = [tuple(o.state[w]["projector"]["full"] for w in (m.attn.weight, m.mlp.weight))
             for m, o in zip(models, opts, strict=True)]
        assert f[0] == f[1] and sum(f[0]) == 1
        flags.append(f[0])
    assert len(set(flags)) == 2  # both matrices get the full branch in some period
    for m, o in zip(models, opts, strict=True):
        for w in (m.attn.weight, m.mlp.weight):
            st = o.state[w]
            low = tuple(w.shape) if st["projector"]["full"] else make_projector("svd", 8).low_shape(w.shape)
            assert st["momentum_buffer"].shape == low
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16, 64), (64, 16), (32, 32)])
def test_newton_schulz_is_orthogonal_to_tolerance(shape: tuple[int, int], dtype: torch.dtype) -> None:
    """The quintic iteration is built for speed, not convergence: singular values land near 1 (about
    [0.68, 1.2] for a well-conditioned input), rows (or columns) near orthonormal, and the result is the
    polar factor ``U V^T`` up to that spread; with bf16 products (``ns_dtype="bf16"``) too, the result fp32 and
    within bf16's rounding (about 1e-2) of the fp32 iteration."""
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0]))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1]))
    k = min(shape)
    s = torch.linspace(1.0, 0.2, k)
    x = u[:, :k] @ torch.diag(s) @ v[:, :k].T
    o = newton_schulz(x, dtype=dtype)
    assert o.dtype == torch.float32
    if dtype != torch.float32:
        rel = float((o - newton_schulz(x)).norm() / o.norm())
        assert 1e-4 < rel < 3e-2, rel
    sv = torch.linalg.svdvals(o)
    assert sv.min() > 0.65 and sv.max() < 1.25
    gram = o @ o.T if shape[0] <= shape[1] else o.T @ o
    assert (gram - torch.eye(k)).abs().max() < 0.5
    polar = u[:, :k] @ v[:, :k].T
    assert (o - polar).norm() < 0.25 * polar.norm()
    torch.testing.assert_close(newton_schulz(37.0 * x, dtype=dtype), o, rtol=1e-4, atol=1e-5)  # scale invariant


def test_debiasing_weights_cancel_under_newton_schulz() -> None:
    """``weighting="paper"`` (1/q, 1/(1-q) before NS) and ``"none"`` give the same trajectory up to rounding;
    ``"after"`` (weights on the orthogonalised step) does not."""
    base = make_model()
    runs = {}
    for weighting in ("paper", "none", "after"):
        model = copy.deepcopy(base)
        _train(model, _gum(model, gap=3, full_rank_prob=0.4, weighting=weighting, lr=1e-2), 7)
        runs[weighting] = [p.detach() for p in model.parameters()]
    for p, q in zip(runs["paper"], runs["none"], strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert any((p - q).abs().max() > 1e-3 for p, q in zip(runs["paper"], runs["after"], strict=True))


def test_branch_updates_live_in_their_subspaces() -> None:
    """Within a period a low-rank matrix moves inside span(P); a full-rank one moves orthogonally to it."""
    model = make_model()
    opt = _gum(model, gap=100, full_rank_layers=1, lr=1e-2)
    _train(model, opt, 1)
    before = {w: w.detach().clone() for w in (model.attn.weight, model.mlp.weight)}
    _train(model, opt, 4)
    for w in (model.attn.weight, model.mlp.weight):
        st = opt.state[w]["projector"]
        p = st["basis"]
        delta = w.detach() - before[w]
        inside = p @ (p.T @ delta) if st["side"] == 0 else (delta @ p) @ p.T
        if st["full"]:
            assert inside.norm() < 1e-4 * delta.norm()
        else:
            assert (delta - inside).norm() < 1e-4 * delta.norm()


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_rule_matches_torch_muon(nesterov: bool) -> None:
    """The Muon inner rule on plain 2-D weights against ``torch.optim.Muon`` on the same gradients.

    Intended differences: torch runs Newton-Schulz in bf16 (we run fp32) and keeps the momentum as an EMA
    (``lerp``; ours is the plain sum ``mu B + g``, ``1/(1 - mu)`` times larger, which NS normalises away), so
    each step agrees to bf16 accuracy (NS alone differs by about 1.5e-2 relative), not bit for bit; a wrong
    lr factor (``sqrt(40 / 24)``) or momentum form would be off by far more.
    """
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(24, 40) * 0.1)
    w2 = torch.nn.Parameter(w.detach().clone())
    ours = LowRankOptimizer([w], lr=0.02, inner="muon", nesterov=nesterov, weight_decay=0.01)
    ref = torch.optim.Muon([w2], lr=0.02, nesterov=nesterov, weight_decay=0.01)
    for _ in range(6):
        g = torch.randn(24, 40)
        before = w.detach().clone()
        w.grad, w2.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        step, ref_step = w.detach() - before, w2.detach() - before
        assert (step - ref_step).norm() < 3e-2 * ref_step.norm()
        w2.data.copy_(w.detach())  # compare one step at a time, from the same weights
    assert lr_factor("original", (40, 24)) == pytest.approx((40 / 24) ** 0.5)
    assert lr_factor("match_rms_adamw", (40, 24)) == pytest.approx(0.2 * 40**0.5)


def test_plain_params_take_adamw() -> None:
    """Embeddings, norms, heads and biases use ``plain_inner="adam"``: exactly torch AdamW's trajectory."""
    model = make_model()
    ref_model = copy.deepcopy(model)
    opt = _gum(model, lr=1e-2, weight_decay=0.1)
    plain = [p for p in ref_model.parameters() if p is not ref_model.attn.weight and p is not ref_model.mlp.weight]
    ref = torch.optim.AdamW(plain, lr=1e-2, weight_decay=0.1, fused=True)
    x, y = make_data()
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    ref.zero_grad()
    loss_fn(ref_model, x, y).backward()
    opt.step()
    ref.step()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        if name not in ("attn.weight", "mlp.weight"):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
    assert set(opt.state[model.head.weight]) >= {"exp_avg", "exp_avg_sq"}
    assert "momentum_buffer" in opt.state[model.mlp.weight]


@pytest.mark.parametrize(("kwargs", "match", "exc"), [
    ({"full_rank_prob": 0.5, "full_rank_layers": 2}, "full_rank", ValueError),
    ({"full_rank_prob": 1.5}, "full_rank_prob", ValueError),
    ({"full_rank_layers": -1}, "full_rank_layers", ValueError),
    ({"weighting": "before"}, "weighting", ValueError),
    ({"momentum": 1.0}, "momentum", ValueError),
    ({"ns_steps": 0}, "ns_steps", ValueError),
    ({"ns_dtype": "fp16"}, "ns_dtype", ValueError),
    ({"muon_lr_adjust": "big"}, "muon_lr_adjust", ValueError),
    ({"plain_inner": "lion"}, "plain_inner", ValueError),
])
def test_bad_input_named(kwargs: dict, match: str, exc: type) -> None:
    with pytest.raises(exc, match=match):
        _gum(make_model(), **kwargs)


def test_muon_refuses_non_matrices_with_a_hint() -> None:
    b = torch.nn.Parameter(torch.zeros(5))
    opt = LowRankOptimizer([b], inner="muon")
    b.grad = torch.ones(5)
    with pytest.raises(ValueError, match="plain_inner"):
        opt.step()


def test_bf16_newton_schulz_follows_the_fp32_run() -> None:
    """``ns_dtype="bf16"`` (torch's Muon's precision) changes each step by bf16's rounding only: after 8 steps the
    weights are within 6% of the fp32 run's movement (measured 3.6%; they differ, so the products did run in bf16),
    and the loss falls as much."""
    base = make_model()
    x, y = make_data()
    start = loss_fn(base, x, y).item()
    runs, losses = {}, {}
    for ns in ("fp32", "bf16"):
        model = copy.deepcopy(base)
        _train(model, _gum(model, gap=4, lr=1e-2, ns_dtype=ns), 8)
        runs[ns] = [p.detach() for p in model.parameters()]
        losses[ns] = loss_fn(model, x, y).item()
    moved = sum(float((p - q.detach()).norm() ** 2) for p, q in zip(runs["fp32"], base.parameters(), strict=True))
    apart = sum(float((p - q).norm() ** 2) for p, q in zip(runs["fp32"], runs["bf16"], strict=True))
    assert 0 < apart ** 0.5 < 6e-2 * moved ** 0.5
    assert losses["bf16"] < start and abs(losses["bf16"] - losses["fp32"]) < 0.05 * (start - losses["fp32"])
