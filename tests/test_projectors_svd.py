"""Property tests of the exact and randomized SVD projectors."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import roundtrip
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_optim import make_projector
from lowrank_optim.projectors import LEFT, RIGHT, choose_side

shapes = st.tuples(st.integers(2, 40), st.integers(2, 40))
SETTINGS = settings(max_examples=40, deadline=None)


def _matrix(m: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


def _decaying(m: int, n: int, seed: int, decay: float = 0.8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    s = decay ** torch.arange(k, dtype=torch.float32)
    return (u * s) @ v.T


@SETTINGS
@given(shape=shapes, rank=st.integers(1, 50), side=st.sampled_from(["std", "reverse_std", "left", "right"]),
       name=st.sampled_from(["svd", "rsvd"]), seed=st.integers(0, 2**16))
def test_shapes_side_and_rank_clamp(shape, rank, side, name, seed) -> None:
    m, n = shape
    proj = make_projector(name, rank, side=side)
    g = _matrix(m, n, seed)
    state = proj.init(g, seed=seed)
    r = min(rank, m, n)
    assert state["rank"] == r
    assert state["side"] == choose_side(g.shape, side)
    low = proj.project(g, state)
    assert tuple(low.shape) == proj.low_shape(g.shape, state)
    assert tuple(low.shape) == ((r, n) if state["side"] == LEFT else (m, r))
    assert proj.project_back(low, state).shape == g.shape
    assert state["basis"].numel() == proj.state_numel(g.shape)


def test_side_rules() -> None:
    assert choose_side((10, 4), "std") == RIGHT and choose_side((4, 10), "std") == LEFT
    assert choose_side((10, 4), "reverse_std") == LEFT and choose_side((4, 10), "reverse_std") == RIGHT
    assert choose_side((5, 5), "std") == RIGHT and choose_side((5, 5), "reverse_std") == LEFT
    assert choose_side((4, 10), "right") == RIGHT and choose_side((10, 4), "left") == LEFT


@SETTINGS
@given(shape=shapes, rank=st.integers(1, 50), side=st.sampled_from(["std", "reverse_std"]),
       name=st.sampled_from(["svd", "rsvd"]), seed=st.integers(0, 2**16))
def test_orthonormal_round_trip(shape, rank, side, name, seed) -> None:
    """project(project_back(X)) == X for any X in the low-rank space (orthonormal basis)."""
    proj = make_projector(name, rank, side=side)
    g = _matrix(*shape, seed)
    state = proj.init(g, seed=seed)
    basis = state["basis"]
    torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1]), atol=2e-5, rtol=0)
    x = _matrix(*proj.low_shape(g.shape, state), seed + 1)
    torch.testing.assert_close(proj.project(proj.project_back(x, state), state), x, atol=2e-5, rtol=1e-5)


@SETTINGS
@given(shape=shapes, rank=st.integers(1, 50), seed=st.integers(0, 2**16))
def test_svd_is_eckart_young_optimal(shape, rank, seed) -> None:
    """The captured energy ||P^T G||^2 equals the sum of the top-r squared singular values."""
    g = _matrix(*shape, seed).double().float()
    proj = make_projector("svd", rank)
    state = proj.init(g)
    s = torch.linalg.svdvals(g.double())
    r = state["rank"]
    captured = proj.project(g, state).double().pow(2).sum()
    torch.testing.assert_close(captured, s[:r].pow(2).sum(), rtol=1e-4, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(m=st.integers(64, 200), n=st.integers(64, 200), rank=st.integers(4, 32), seed=st.integers(0, 2**16),
       decay=st.floats(0.5, 0.9))
def test_rsvd_captures_95_percent_on_decaying_spectra(m, n, rank, seed, decay) -> None:
    g = _decaying(m, n, seed, decay)
    s = torch.linalg.svdvals(g.double())
    optimal = s[:rank].pow(2).sum()
    proj = make_projector("rsvd", rank)
    state = proj.init(g, seed=seed)
    assert proj.project(g, state).double().pow(2).sum() >= 0.95 * optimal


def test_rsvd_warm_start_improves_on_a_slowly_changing_gradient() -> None:
    g = _decaying(300, 200, 0, 0.97)
    optimal = torch.linalg.svdvals(g)[:16].pow(2).sum()
    cold = make_projector("rsvd", 16, power_iters=0, warm_start=False)
    warm = make_projector("rsvd", 16, power_iters=0, warm_start=True)
    sc, sw = cold.init(g, seed=1), warm.init(g, seed=1)
    for _ in range(4):
        sc, sw = cold.update(g, sc), warm.update(g, sw)
    e_cold = warm.project(g, sc).pow(2).sum() / optimal
    e_warm = warm.project(g, sw).pow(2).sum() / optimal
    assert e_warm > e_cold and e_warm > 0.99


def test_rsvd_is_deterministic_per_seed_and_refresh() -> None:
    g = _matrix(60, 40, 0)
    proj = make_projector("rsvd", 5, power_iters=0, warm_start=False)
    a, b = proj.init(g, seed=7), proj.init(g, seed=7)
    assert torch.equal(a["basis"], b["basis"])
    assert not torch.equal(proj.update(g, a)["basis"], a["basis"])  # refresh count changes the sketch


@pytest.mark.parametrize("name", ["svd", "rsvd"])
def test_state_survives_weights_only(name) -> None:
    proj = make_projector(name, 4)
    state = proj.init(_matrix(20, 12, 0), seed=3)
    loaded = roundtrip({"s": state})["s"]
    assert loaded.keys() == state.keys()
    assert torch.equal(loaded["basis"], state["basis"]) and loaded["basis"].dtype == torch.float32
    assert all(type(loaded[k]) is int for k in ("side", "rank", "seed", "refresh"))


def test_bf16_gradient_decomposed_in_fp32() -> None:
    g = _matrix(30, 20, 0).bfloat16()
    state = make_projector("svd", 4).init(g)
    assert state["basis"].dtype == torch.float32


def test_svd_failure_falls_back_with_warning(monkeypatch) -> None:
    g = _decaying(40, 30, 0)
    proj = make_projector("svd", 4)
    good = proj.init(g)

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", broken)
    monkeypatch.setattr(torch.linalg, "eigh", broken)  # the randomized fallback's small eigenproblem fails too
    with pytest.warns(RuntimeWarning, match="falling back"):
        fresh = proj.update(g, good)
    # Both fail -> keeps the previous basis, with a warning.
    assert torch.equal(fresh["basis"], good["basis"])


def test_svd_failure_uses_rsvd_when_it_works(monkeypatch) -> None:
    g = _decaying(40, 30, 0)
    proj = make_projector("svd", 4, solver="svd")  # "auto" takes the Gram eigenvectors (test_review10_svd_gram.py)
    real = torch.linalg.svd

    def flaky(a, *args, **kwargs):
        if tuple(a.shape) == (40, 30):  # the full decomposition of G fails; the small ones succeed
            raise torch.linalg.LinAlgError("failed to converge")
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = proj.init(g)
    assert any("falling back" in str(w.message) for w in caught)
    s = torch.linalg.svdvals(g)
    assert proj.project(g, state).pow(2).sum() >= 0.99 * s[:4].pow(2).sum()


@pytest.mark.parametrize(("kwargs", "exc", "word"), [
    ({"rank": 0}, ValueError, "rank"), ({"rank": 2.5}, TypeError, "rank"), ({"rank": 4, "side": "up"}, ValueError,
                                                                               "proj_side"),
    ({"rank": 4, "oversample": -1}, ValueError, "oversample"), ({"rank": 4, "bogus": 1}, TypeError, "bogus"),
])
def test_bad_projector_options(kwargs, exc, word) -> None:
    with pytest.raises(exc, match=word):
        make_projector("rsvd", **kwargs)


def test_unknown_projector_named() -> None:
    with pytest.raises(ValueError, match="projector"):
        make_projector("nope", 4)


def test_non_2d_rejected() -> None:
    with pytest.raises(ValueError, match="grad"):
        make_projector("svd", 4).init(torch.randn(3, 4, 5))
