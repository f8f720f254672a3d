"""Tests of COAP's projector: closed-form correction gradient, a correction that acts at realistic
gradient scales, the randomized-SVD schedule, and the optimizer path."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import (
    assert_same_continuation,
    make_model,
    resume_copy,
    roundtrip,
    train,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank_optim as lro
from lowrank_optim import make_projector
from lowrank_optim.projectors import LEFT
from lowrank_optim.projectors.base import aligned_signs, oriented
from lowrank_optim.projectors.coap import correction_objective
from lowrank_optim.projectors.rsvd import randomized_range

SETTINGS = settings(max_examples=25, deadline=None)


def _matrix(m: int, n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


def _autograd_loss(a, u, mo, normalize):
    ah = a / a.norm() if normalize else a
    w = 1.0 if normalize else 1.0 / a.numel()
    f = (ah - u @ (u.T @ ah)).square().sum() * w
    h = 1 - torch.nn.functional.cosine_similarity(u @ mo, ah, dim=0).mean()
    return f * h


@SETTINGS
@given(p=st.integers(3, 30), q=st.integers(2, 30), r=st.integers(1, 8), seed=st.integers(0, 2**16),
       normalize=st.booleans(), scale=st.sampled_from([1e-3, 1.0, 50.0]))
def test_closed_form_gradient_matches_autograd(p, q, r, seed, normalize, scale) -> None:
    r = min(r, p)
    a = _matrix(p, q, seed, scale).double()
    u = torch.linalg.qr(_matrix(p, r, seed + 1).double()).Q + 0.01 * _matrix(p, r, seed + 2).double()
    mo = _matrix(r, q, seed + 3).double()
    f, h, g = correction_objective(a, u, mo, normalize=normalize)
    uu = u.clone().requires_grad_()
    loss = _autograd_loss(a, uu, mo, normalize)
    loss.backward()
    torch.testing.assert_close(torch.tensor(f * h, dtype=torch.float64), loss.detach(), rtol=1e-9, atol=1e-300)
    torch.testing.assert_close(g, uu.grad, rtol=1e-8, atol=1e-12 * float(uu.grad.abs().max()) + 1e-300)


def _state_with_moment(shape, rank, side="std", seed=0, scale=1e-3):
    g = _matrix(*shape, seed, scale)
    proj = make_projector("coap", rank, side=side)
    state = proj.init(g, seed=seed)
    m = proj.project(_matrix(*shape, seed + 7, scale), state)  # a first moment from an earlier gradient
    return proj, g, state, {"exp_avg": m, "exp_avg_sq": m.square()}


@pytest.mark.parametrize("side", ["std", "reverse_std"])
def test_correction_moves_p_at_realistic_scale_and_the_reference_does_not(side) -> None:
    """Gradient entries ~1e-3 (a 256 x 192 matrix, rank 32): our normalised step changes P by a visible
    fraction; the reference's mean-reduced loss moves it by less than fp32 can resolve on an O(1) basis."""
    proj, g, state, moments = _state_with_moment((256, 192), 32, side)
    g2 = g + _matrix(256, 192, 99, 1e-3)  # the gradient has moved since the basis was fitted
    new = proj.update(g2, state, moments=moments)
    assert new["refresh"] == 1 and not torch.equal(new["basis"], state["basis"])
    rel = float((new["basis"] - state["basis"]).norm() / state["basis"].norm())
    assert rel > 5e-4  # ~1.2e-3 here, in fp32 and bf16 range
    ref = make_projector("coap", 32, side=side, normalize=False)
    new_ref = ref.update(g2, state, moments=moments)
    rel_ref = float((new_ref["basis"] - state["basis"]).norm() / state["basis"].norm())
    assert rel_ref < 1e-8 and rel > 1e5 * rel_ref  # ~1e-9: below the resolution of an fp32 (let alone bf16) P
    # the old state is left untouched (update returns a new dict)
    assert state["refresh"] == 0


@SETTINGS
@given(m=st.integers(8, 40), n=st.integers(8, 40), r=st.integers(1, 6), seed=st.integers(0, 2**16),
       side=st.sampled_from(["std", "reverse_std"]), scale=st.sampled_from([1e-4, 1e-2, 10.0]))
def test_small_correction_lowers_the_loss_and_is_scale_free(m, n, r, seed, side, scale) -> None:
    _, g, state, moments = _state_with_moment((m, n), r, side, seed, scale)
    g2 = g + _matrix(m, n, seed + 11, scale)
    small = make_projector("coap", r, side=side, correction_lr=1e-3)
    new = small.update(g2, state, moments=moments)
    a = oriented(g2, state["side"])
    mo = moments["exp_avg"] if state["side"] == LEFT else moments["exp_avg"].T
    f0, h0, _ = correction_objective(a.double(), state["basis"].double(), mo.double())
    f1, h1, _ = correction_objective(a.double(), new["basis"].double(), mo.double())
    assert f1 * h1 < f0 * h0
    # scale-free: the same step for c * G and c * M
    c = 1234.5
    scaled = small.update(c * g2, state, moments={k: c * v for k, v in moments.items()})
    torch.testing.assert_close(scaled["basis"], new["basis"], rtol=1e-4, atol=1e-6)


def test_every_kth_refresh_is_a_warm_started_randomized_svd() -> None:
    g = _matrix(60, 40, 0)
    proj = make_projector("coap", 6, reproject_factor=3)
    state = proj.init(g, seed=5)
    torch.testing.assert_close(state["basis"].T @ state["basis"], torch.eye(6), atol=1e-5, rtol=0)
    moments = {"exp_avg": proj.project(_matrix(60, 40, 1), state)}
    bases = [state["basis"]]
    for k in range(1, 7):
        prev = state
        state = proj.update(_matrix(60, 40, k), state, moments=moments)
        bases.append(state["basis"])
        if k % 3 == 0:
            expect = randomized_range(oriented(_matrix(60, 40, k), state["side"]), 6, oversample=0, power_iters=0,
                                      seed=(5, k), warm=prev["basis"])
            assert torch.equal(state["basis"], aligned_signs(expect, prev["basis"]))  # the default sign rule
    for a, b in itertools.pairwise(bases):
        assert not torch.equal(a, b)


def test_without_a_first_moment_it_is_a_reconstruction_step() -> None:
    proj, g, state, _ = _state_with_moment((50, 30), 4)
    g2 = g + _matrix(50, 30, 3, 1e-3)
    plain = proj.update(g2, state)
    zero = proj.update(g2, state, moments={"exp_avg": torch.zeros(50, 4)})  # e.g. right after a reset
    assert torch.equal(plain["basis"], zero["basis"]) and not torch.equal(plain["basis"], state["basis"])
    a = oriented(g2, state["side"])
    assert correction_objective(a, plain["basis"], None)[0] < correction_objective(a, state["basis"], None)[0]


def test_state_survives_weights_only() -> None:
    proj, g, state, moments = _state_with_moment((20, 12), 3)
    state = proj.update(g, state, moments=moments)
    loaded = roundtrip({"s": state})["s"]
    assert loaded.keys() == state.keys() and loaded["basis"].dtype == torch.float32
    assert torch.equal(loaded["basis"], state["basis"])
    assert all(type(loaded[k]) is int for k in ("side", "rank", "seed", "refresh"))


@pytest.mark.parametrize(("kwargs", "exc", "word"), [
    ({"reproject_factor": 0}, ValueError, "reproject_factor"), ({"correction_lr": -1.0}, ValueError, "correction_lr"),
    ({"clip": 0.0}, ValueError, "clip"), ({"normalize": 1}, TypeError, "normalize"), ({"bogus": 1}, TypeError, "bogus"),
])
def test_bad_options(kwargs, exc, word) -> None:
    with pytest.raises(exc, match=word):
        make_projector("coap", 4, **kwargs)


@pytest.mark.parametrize("state_dtype", ["fp32", "8bit"])
def test_drives_galore_adamw_with_resume(state_dtype) -> None:
    def make(model):
        groups = lro.param_groups(model, rank=8, target_modules=["attn", "mlp"], update_proj_gap=2,
                                  projector="coap", projector_options={"reproject_factor": 3})
        return lro.GaLoreAdamW(groups, lr=1e-2, state_dtype=state_dtype)

    model = make_model()
    opt = make(model)
    losses = train(model, opt, 20)
    assert losses[-1] < 0.8 * losses[0]
    model2, opt2 = resume_copy(model, opt, make)
    assert_same_continuation(model, opt, model2, opt2, 4)
