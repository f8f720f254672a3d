"""The online-PCA projector (Online Subspace Descent): closed-form gradient, convergence, tracking, state."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_optim.projectors import LEFT, choose_side, make_projector
from lowrank_optim.projectors.base import oriented
from lowrank_optim.projectors.online_pca import OnlinePCAProjector, reconstruction_grad, reconstruction_loss

SETTINGS = settings(max_examples=25, deadline=None)
SIDES = ("std", "reverse_std", "left", "right")


def _grad(m: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


def _lowrank(m: int, n: int, spectrum: list[float], seed: int, noise: float = 0.01) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    r = len(spectrum)
    u = torch.linalg.qr(torch.randn(m, r, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=gen)).Q
    return u @ torch.diag(torch.tensor(spectrum)) @ v.T + noise * torch.randn(m, n, generator=gen)


def _sin_theta(basis: torch.Tensor, target: torch.Tensor) -> float:
    """Largest principal-angle sine between span(basis) and span(target) (target orthonormal)."""
    q = torch.linalg.qr(basis.double()).Q
    t = target.double()
    return float(torch.linalg.matrix_norm(q - t @ (t.T @ q), ord=2))


def _top(a: torch.Tensor, r: int) -> torch.Tensor:
    return torch.linalg.svd(a.double(), full_matrices=False).U[:, :r]


@SETTINGS
@given(d=st.integers(1, 12), k=st.integers(1, 12), r=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_closed_form_gradient_equals_autograd(d: int, k: int, r: int, seed: int) -> None:
    a = _grad(d, k, seed).double()
    basis = _grad(d, r, seed + 1).double().requires_grad_(True)
    a_hat = a / a.norm()
    loss = (a_hat - basis @ (basis.T @ a_hat)).square().sum()
    (auto,) = torch.autograd.grad(loss, basis)
    closed = reconstruction_grad(a / a.norm(), basis.detach())
    torch.testing.assert_close(closed, auto, rtol=1e-10, atol=1e-12)


@SETTINGS
@given(m=st.integers(1, 16), n=st.integers(1, 16), rank=st.integers(1, 20), side=st.sampled_from(SIDES),
       optimizer=st.sampled_from(("adam", "sgd")), seed=st.integers(0, 2**16))
def test_shapes_side_rule_and_state(m: int, n: int, rank: int, side: str, optimizer: str, seed: int) -> None:
    proj = make_projector("online_pca", rank, side=side, optimizer=optimizer, lr_rule="fixed", lr=0.01)
    grad = _grad(m, n, seed)
    state = proj.init(grad)
    r = min(rank, m, n)
    assert state["side"] == choose_side((m, n), side) and state["rank"] == r
    d = m if state["side"] == LEFT else n
    basis = state["basis"]
    assert basis.shape == (d, r) and basis.dtype == torch.float32
    torch.testing.assert_close(basis.T @ basis, torch.eye(r), rtol=0, atol=1e-5)  # SVD init: orthonormal
    floats = sum(v.numel() for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point())
    assert floats == proj.state_numel((m, n)) == d * r * (3 if optimizer == "adam" else 1)
    low = proj.project(grad, state)
    assert tuple(low.shape) == proj.low_shape((m, n), state)
    x = _grad(*low.shape, seed + 1)
    torch.testing.assert_close(proj.project(proj.project_back(x, state), state), x, rtol=0, atol=1e-5)
    new = proj.update(_grad(m, n, seed + 2), state)
    assert new["basis"].shape == (d, r) and new["p_step"] == 1 and state["p_step"] == 0 and new["refresh"] == 1
    assert new["basis"] is not state["basis"]  # the old state is not modified


@pytest.mark.parametrize(("optimizer", "lr"), [("adam", 0.01), ("sgd", 0.2)])
@pytest.mark.parametrize("side", ["std", "reverse_std"])
def test_loss_falls_and_subspace_approaches_top_r(optimizer: str, lr: float, side: str) -> None:
    """Started from another gradient's SVD, steps on a fixed gradient reach its top-r subspace."""
    m, n, r = 40, 24, 4
    g0, g1 = _lowrank(m, n, [4.0, 3.0, 2.0, 1.5], 1), _lowrank(m, n, [4.0, 3.0, 2.0, 1.5], 2)
    proj = OnlinePCAProjector(r, side, optimizer=optimizer, lr_rule="fixed", lr=lr)
    state = proj.init(g0)
    a = oriented(g1, state["side"])
    target = _top(a, r)
    angles = [_sin_theta(state["basis"], target)]
    losses = []
    for _ in range(200):
        losses.append(float(reconstruction_loss(a, state["basis"])))
        state = proj.update(g1, state)
    losses.append(float(reconstruction_loss(a, state["basis"])))
    angles.append(_sin_theta(state["basis"], target))
    optimum = float(torch.linalg.svdvals(a)[r:].square().sum() / a.square().sum())
    assert angles[0] > 0.9 and losses[0] > 0.5
    assert losses[-1] < 0.02 * losses[0] and losses[-1] < 1.5 * optimum + 1e-3
    assert angles[-1] < 0.1
    assert min(losses[:50]) < losses[0]


def test_p_stays_near_orthonormal_and_tracks_a_rotating_gradient() -> None:
    """A rank-3 gradient whose left subspace rotates by 0.01 rad per step is tracked; a frozen basis is lost."""
    m, n, r = 32, 20, 3
    gen = torch.Generator().manual_seed(5)
    q = torch.linalg.qr(torch.randn(m, m, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=gen)).Q
    s = torch.diag(torch.tensor([3.0, 2.0, 1.0]))

    def gradient(t: int) -> tuple[torch.Tensor, torch.Tensor]:
        angle = 0.01 * t  # plane rotations mixing column i with column r + i of q
        c, sn = math.cos(angle), math.sin(angle)
        u = q[:, :r] * c + q[:, r:2 * r] * sn
        noise = 0.01 * torch.randn(m, n, generator=gen)
        return u @ s @ v.T + noise, u

    proj = OnlinePCAProjector(r, side="left", lr_rule="ratio", lr_ratio=5.0)
    g, _ = gradient(0)
    state = proj.init(g)
    frozen = state["basis"].clone()
    worst_orth, worst_track = 0.0, 0.0
    for t in range(1, 201):
        g, u = gradient(t)
        state = proj.update(g, state, lr=2e-3)  # P's lr = 5 * 2e-3 (the paper's ratio)
        basis = state["basis"]
        worst_orth = max(worst_orth, float(torch.linalg.matrix_norm(basis.T @ basis - torch.eye(r))))
        if t > 20 and t % 10 == 0:
            worst_track = max(worst_track, _sin_theta(basis, u))
    assert worst_orth < 0.1
    assert worst_track < 0.15
    assert _sin_theta(frozen, u) > 0.8  # after 2 rad the starting subspace is far away


def test_orthonormalize_flag_and_zero_gradient() -> None:
    proj = OnlinePCAProjector(3, optimizer="sgd", lr_rule="fixed", lr=0.5, orthonormalize=True)
    state = proj.init(_grad(10, 8, 0))
    for seed in range(1, 6):
        state = proj.update(_grad(10, 8, seed), state)
        torch.testing.assert_close(state["basis"].T @ state["basis"], torch.eye(3), rtol=0, atol=1e-5)
    adam = OnlinePCAProjector(3, lr_rule="fixed")
    state = adam.update(_grad(10, 8, 1), adam.init(_grad(10, 8, 0)))
    same = adam.update(torch.zeros(10, 8), state)
    assert torch.equal(same["basis"], state["basis"]) and same["p_step"] == state["p_step"] == 1
    assert torch.equal(same["p_exp_avg"], state["p_exp_avg"])


def test_adam_step_on_p_matches_torch_adamw() -> None:
    """P's Adam step is torch's AdamW on the closed-form gradient (with P's weight decay)."""
    proj = OnlinePCAProjector(4, lr_rule="fixed", lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    grads = [_grad(16, 12, s) for s in range(4)]
    state = proj.init(grads[0])
    p = state["basis"].clone().requires_grad_(True)
    ref = torch.optim.AdamW([p], lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    for g in grads[1:]:
        a = oriented(g, state["side"])
        p.grad = reconstruction_grad(a / a.norm(), p.detach())
        ref.step()
        state = proj.update(g, state)
        torch.testing.assert_close(state["basis"], p.detach(), rtol=0, atol=1e-6)


def test_learning_rate_rules() -> None:
    ratio = OnlinePCAProjector(2, lr_rule="ratio")
    assert ratio.step_lr({"lr": 1e-3, "initial_lr": 5e-3}) == pytest.approx(5e-3)
    reference = OnlinePCAProjector(2)  # the default: the authors' code, base lr 1/200
    assert (reference.lr_rule, reference.lr) == ("reference", 0.005)
    assert reference.step_lr({"lr": 1e-3, "initial_lr": 4e-3}) == pytest.approx(1 / 800)
    assert reference.step_lr({"lr": 1e-3}) == pytest.approx(1 / 200)
    assert OnlinePCAProjector(2, lr_rule="fixed", lr=0.3).step_lr({}) == 0.3
    # no weight lr in the context (the projector on its own): every rule takes the base lr
    assert ratio.step_lr({}) == reference.step_lr({}) == 0.005
    # lr 0 leaves P where it is (Adam moments still accumulate)
    state = ratio.init(_grad(6, 5, 0))
    assert torch.equal(ratio.update(_grad(6, 5, 1), state, lr=0.0)["basis"], state["basis"])


def test_state_survives_weights_only_load() -> None:
    proj = OnlinePCAProjector(3, lr_rule="fixed")
    state = proj.update(_grad(9, 7, 1), proj.init(_grad(9, 7, 0)))
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded.keys() == state.keys()
    nxt_a, nxt_b = proj.update(_grad(9, 7, 2), state), proj.update(_grad(9, 7, 2), loaded)
    assert all(torch.equal(nxt_a[k], nxt_b[k]) if isinstance(nxt_a[k], torch.Tensor) else nxt_a[k] == nxt_b[k]
               for k in nxt_a)


@pytest.mark.parametrize(("key", "value", "exc"), [
    ("optimizer", "lion", ValueError), ("lr_rule", "cosine", ValueError), ("lr_ratio", -1.0, ValueError),
    ("lr", "big", TypeError), ("betas", (0.9,), TypeError), ("eps", -1.0, ValueError),
    ("weight_decay", -0.1, ValueError), ("orthonormalize", 1, TypeError)])
def test_bad_options_named(key: str, value: object, exc: type) -> None:
    with pytest.raises(exc, match=key):
        make_projector("online_pca", 4, **{key: value})
