"""Property tests of the seeded random projector (Flora's Gaussian and the orthonormal option)."""

from __future__ import annotations

import math

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
from lowrank_optim.projectors import LEFT, choose_side
from lowrank_optim.projectors.base import cpu_generator, derive_seed

shapes = st.tuples(st.integers(2, 40), st.integers(2, 40))
sides = st.sampled_from(["std", "reverse_std", "left", "right"])
dists = st.sampled_from(["gaussian", "orthonormal"])
SETTINGS = settings(max_examples=30, deadline=None)


def _matrix(m: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


@SETTINGS
@given(shape=shapes, rank=st.integers(1, 50), side=sides, dist=dists, seed=st.integers(0, 2**40))
def test_shapes_side_rank_and_int_only_state(shape, rank, side, dist, seed) -> None:
    m, n = shape
    proj = make_projector("random", rank, side=side, distribution=dist)
    g = _matrix(m, n, seed % 1000)
    state = proj.init(g, seed=seed)
    r = min(rank, m, n)
    assert state["rank"] == r and state["side"] == choose_side(g.shape, side)
    assert all(type(v) is int for v in state.values())  # no float matrix of the basis's size, no tensor at all
    low = proj.project(g, state)
    assert tuple(low.shape) == proj.low_shape(g.shape, state) == ((r, n) if state["side"] == LEFT else (m, r))
    assert proj.project_back(low, state).shape == g.shape
    assert proj.state_numel(g.shape) == 0


@SETTINGS
@given(shape=shapes, rank=st.integers(1, 50), side=sides, seed=st.integers(0, 2**40))
def test_orthonormal_round_trip(shape, rank, side, seed) -> None:
    proj = make_projector("random", rank, side=side, distribution="orthonormal")
    g = _matrix(*shape, 0)
    state = proj.init(g, seed=seed)
    p = proj.basis(state)
    torch.testing.assert_close(p.T @ p, torch.eye(p.shape[1]), atol=2e-5, rtol=0)
    x = _matrix(*proj.low_shape(g.shape, state), 1)
    torch.testing.assert_close(proj.project(proj.project_back(x, state), state), x, atol=2e-5, rtol=1e-5)


@SETTINGS
@given(shape=shapes, rank=st.integers(1, 50), side=sides, seed=st.integers(0, 2**40), refresh=st.integers(0, 50))
def test_gaussian_basis_is_the_seeded_cpu_draw_over_sqrt_r(shape, rank, side, seed, refresh) -> None:
    """Closed form of the basis: randn(d, r) from the CPU generator of (seed, refresh), divided by sqrt(r);
    project = P^T (down), project_back = P (up), as Flora."""
    proj = make_projector("random", rank, side=side)
    g = _matrix(*shape, 0)
    state = proj.init(g, seed=seed)
    for _ in range(refresh):
        state = proj.update(g, state)
    assert state["refresh"] == refresh and state["seed"] == seed
    d = g.shape[0] if state["side"] == LEFT else g.shape[1]
    expect = torch.randn(d, state["rank"], generator=cpu_generator(seed, refresh)) / math.sqrt(state["rank"])
    assert torch.equal(proj.basis(state), expect)
    low = proj.project(g, state)
    assert torch.equal(low, expect.T @ g if state["side"] == LEFT else g @ expect)
    assert torch.equal(proj.project_back(low, state), expect @ low if state["side"] == LEFT else low @ expect.T)


def test_gaussian_back_projection_is_unbiased() -> None:
    """E[P P^T] = I: the average of project_back(project(X)) over many seeds approaches X."""
    proj = make_projector("random", 8, distribution="gaussian", cache_size=0)
    x = _matrix(20, 16, 0)
    acc = torch.zeros_like(x)
    trials = 600
    for s in range(trials):
        st_ = proj.init(x, seed=s)
        acc += proj.project_back(proj.project(x, st_), st_)
    err = (acc / trials - x).norm() / x.norm()
    assert err < 0.2  # sampling error ~ 0.07 here; a wrong scale (1/r instead of 1/sqrt(r)) gives ~0.9


def test_deterministic_per_seed_index_refresh_and_cache_free() -> None:
    g = _matrix(30, 20, 0)
    a, b = make_projector("random", 4), make_projector("random", 4, cache_size=0)
    s = a.init(g, seed=derive_seed(0, 3))
    assert torch.equal(a.basis(s), b.basis(s))
    assert torch.equal(a.basis(a.update(g, s)), b.basis(b.update(g, s)))
    assert not torch.equal(a.basis(a.update(g, s)), a.basis(s))  # a refresh draws a new basis
    other = a.init(g, seed=derive_seed(0, 4))  # another parameter index
    assert not torch.equal(a.basis(other), a.basis(s))


def test_stack_draw_equals_per_matrix_draws_and_cpu_generator_option() -> None:
    """A stack's bases (one (B, d, r) draw from per-matrix generators) equal each matrix's basis(), whatever the
    stack holds; generator='cpu' equals the default on the CPU; a bad generator is refused by name."""
    proj = make_projector("random", 4, cache_size=0)
    g = _matrix(30, 20, 0)
    states = [proj.init(g, seed=derive_seed(0, i)) for i in range(3)]
    states[1] = proj.update(g, states[1])
    stack = proj.stack_basis(states, torch.device("cpu"))
    for state, b in zip(states, stack, strict=True):
        assert torch.equal(b, proj.basis(state))
    assert torch.equal(proj.stack_basis(states[1:2], torch.device("cpu"))[0], stack[1])
    cpu = make_projector("random", 4, generator="cpu")
    assert torch.equal(cpu.basis(states[0]), proj.basis(states[0]))
    assert proj.stack_basis_shape(states[0]) == (states[0]["dim"], 4)
    assert make_projector("random", 4, distribution="orthonormal").stack_basis_shape(states[0]) is None
    with pytest.raises(ValueError, match="generator"):
        make_projector("random", 4, generator="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dist", ["gaussian", "orthonormal"])
def test_identical_on_cpu_and_cuda(dist) -> None:
    """With generator='cpu' the basis is the same on every device (the default draws on the device: same device
    type and seed, same basis)."""
    proj = make_projector("random", 16, distribution=dist, generator="cpu")
    device = make_projector("random", 16, distribution=dist)
    g0 = _matrix(300, 200, 0)
    s0 = device.init(g0, seed=7)
    assert torch.equal(device.basis(s0, "cuda"), make_projector("random", 16, distribution=dist).basis(s0, "cuda"))
    g = _matrix(300, 200, 0)
    state = proj.update(g, proj.init(g, seed=12345))
    assert torch.equal(proj.basis(state, "cuda").cpu(), proj.basis(state, "cpu"))
    low = proj.project(g.cuda(), state)
    torch.testing.assert_close(low.cpu(), proj.project(g, state), rtol=1e-5, atol=1e-5)


def test_state_survives_weights_only() -> None:
    proj = make_projector("random", 4)
    state = proj.init(_matrix(20, 12, 0), seed=3)
    loaded = roundtrip({"s": state})["s"]
    assert loaded == state and all(type(v) is int for v in loaded.values())
    assert torch.equal(proj.basis(loaded), proj.basis(state))


@pytest.mark.parametrize(("kwargs", "exc", "word"), [
    ({"distribution": "uniform"}, ValueError, "distribution"), ({"cache_size": -1}, ValueError, "cache_size"),
    ({"cache_size": 1.5}, TypeError, "cache_size"), ({"bogus": 1}, TypeError, "bogus"),
])
def test_bad_options(kwargs, exc, word) -> None:
    with pytest.raises(exc, match=word):
        make_projector("random", 4, **kwargs)


@pytest.mark.parametrize("state_dtype", ["fp32", "8bit"])
@pytest.mark.parametrize("dist", ["gaussian", "orthonormal"])
def test_drives_galore_adamw_with_resume(state_dtype, dist) -> None:
    """The random projector behind GaLoreAdamW (group projector=...): it trains, its state holds no
    projection, and a weights_only resume is bit-exact with dtypes kept."""
    def make(m):
        groups = lro.param_groups(m, rank=8, target_modules=["attn", "mlp"], update_proj_gap=3,
                                  projector="random", projector_options={"distribution": dist})
        return lro.GaLoreAdamW(groups, lr=1e-2, state_dtype=state_dtype, transfer="linear")

    model = make_model()
    opt = make(model)
    losses = train(model, opt, 20)
    assert losses[-1] < 0.8 * losses[0]
    for p in opt.param_groups[-1]["params"]:
        assert all(type(v) is int for v in opt.state[p]["projector"].values())
    model2, opt2 = resume_copy(model, opt, make)
    assert_same_continuation(model, opt, model2, opt2, 4)
