"""The DCT column-selection projector: transforms against scipy, paths, selection, state contents."""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.fft
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_optim.projectors import LEFT, choose_side, make_projector
from lowrank_optim.projectors.dct import DCTProjector, clear_dct_cache, dct_fft, dct_matrix, dct_rows

SETTINGS = settings(max_examples=30, deadline=None)
SIDES = ("std", "reverse_std", "left", "right")


def _grad(m: int, n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _scipy_coef(grad: torch.Tensor, side: int) -> np.ndarray:
    """All DCT-II coefficients along the projected dimension, ``(other, d)``, in float64."""
    a = grad.double().numpy()
    a = a.T if side == LEFT else a
    return scipy.fft.dct(a, norm="ortho", axis=-1)


@SETTINGS
@given(rows=st.integers(1, 5), size=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_fft_and_dense_equal_scipy(rows: int, size: int, seed: int) -> None:
    x = _grad(rows, size, seed).double()
    ref = scipy.fft.dct(x.numpy(), norm="ortho", axis=-1)
    fft = dct_fft(x)
    assert fft.dtype == torch.float32  # cast to fp32 before the FFT
    np.testing.assert_allclose(fft.double().numpy(), ref, atol=2e-6 * max(1.0, np.abs(ref).max()))
    dense64 = x @ dct_matrix(size, torch.float64).T
    np.testing.assert_allclose(dense64.numpy(), ref, atol=1e-12)
    dense32 = x.float() @ dct_matrix(size).T
    np.testing.assert_allclose(dense32.double().numpy(), ref, atol=2e-6 * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("size", [1, 2, 7, 16, 33])
def test_dct_matrix_orthonormal_and_cached(size: int) -> None:
    c = dct_matrix(size, torch.float64)
    torch.testing.assert_close(c @ c.T, torch.eye(size, dtype=torch.float64), rtol=0, atol=1e-13)
    assert dct_matrix(size, torch.float64) is c  # built once per (size, dtype, device)
    c32 = dct_matrix(size)
    assert c32.dtype == torch.float32 and c32 is not c and dct_matrix(size) is c32
    assert torch.equal(dct_rows(torch.tensor([size - 1, 0]), size), c32[[size - 1, 0]])
    clear_dct_cache()
    assert dct_matrix(size) is not c32 and torch.equal(dct_matrix(size), c32)


@SETTINGS
@given(m=st.integers(1, 24), n=st.integers(1, 24), rank=st.integers(1, 30), side=st.sampled_from(SIDES),
       path=st.sampled_from(("dense", "fft", "auto")), seed=st.integers(0, 2**16))
def test_shapes_side_rule_and_state(m: int, n: int, rank: int, side: str, path: str, seed: int) -> None:
    proj = make_projector("dct", rank, side=side, path=path)
    grad = _grad(m, n, seed)
    state = proj.init(grad)
    r = min(rank, m, n)
    assert state["side"] == choose_side((m, n), side) and state["rank"] == r
    d = m if state["side"] == LEFT else n
    assert state["dim"] == d
    idx = state["indices"]
    assert idx.dtype == torch.int64 and idx.shape == (r,)
    assert torch.all(idx[1:] > idx[:-1]) and int(idx.min()) >= 0 and int(idx.max()) < d  # sorted, unique
    # no float matrix: the only tensor is the (r,) index vector, and state_numel counts no float data
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    assert len(tensors) == 1 and not tensors[0].is_floating_point()
    assert proj.state_numel((m, n)) == 0
    low = proj.project(grad, state)
    assert tuple(low.shape) == proj.low_shape((m, n), state) == ((r, n) if state["side"] == LEFT else (m, r))
    assert proj.project_back(low, state).shape == (m, n)
    new = proj.update(grad, state)
    assert new["refresh"] == 1 and state["refresh"] == 0 and torch.equal(new["indices"], idx)


@SETTINGS
@given(m=st.integers(1, 20), n=st.integers(1, 20), rank=st.integers(1, 20), side=st.sampled_from(SIDES),
       path=st.sampled_from(("dense", "fft")), seed=st.integers(0, 2**16))
def test_orthonormal_round_trip(m: int, n: int, rank: int, side: str, path: str, seed: int) -> None:
    """``project(project_back(X)) == X``: the selected columns are orthonormal."""
    proj = make_projector("dct", rank, side=side, path=path)
    state = proj.init(_grad(m, n, seed))
    x = _grad(*proj.low_shape((m, n), state), seed + 1)
    torch.testing.assert_close(proj.project(proj.project_back(x, state), state), x, rtol=0, atol=1e-5)


@SETTINGS
@given(m=st.integers(1, 20), n=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_full_rank_is_exact(m: int, n: int, seed: int) -> None:
    """``std`` projects the smaller dimension d, and rank >= d keeps the whole orthonormal basis."""
    proj = make_projector("dct", 64, side="std")
    grad = _grad(m, n, seed)
    state = proj.init(grad)
    torch.testing.assert_close(proj.project_back(proj.project(grad, state), state), grad, rtol=0, atol=1e-5)


@SETTINGS
@given(m=st.integers(2, 20), n=st.integers(2, 20), rank=st.integers(1, 10), side=st.sampled_from(SIDES),
       score=st.sampled_from(("l1", "l2")), seed=st.integers(0, 2**16))
def test_fft_path_equals_dense_path_equals_scipy(m: int, n: int, rank: int, side: str, score: str,
                                                 seed: int) -> None:
    """On a gradient whose best columns are clear, both paths select scipy's top columns and project alike."""
    side_int = choose_side((m, n), side)
    d, other = (m, n) if side_int == LEFT else (n, m)
    r = min(rank, m, n)
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(d, generator=gen)[:r]
    coef = 0.01 * torch.randn(other, d, generator=gen, dtype=torch.float64)
    coef[:, chosen] = torch.sign(torch.randn(other, r, generator=gen, dtype=torch.float64)) * (
        1.0 + torch.rand(other, r, generator=gen, dtype=torch.float64))
    a = coef @ dct_matrix(d, torch.float64)  # rows are inverse DCTs of coef
    grad = (a.T if side_int == LEFT else a).float()
    expected = np.sort(chosen.numpy())
    ref_coef = _scipy_coef(grad, side_int)
    ref_scores = np.abs(ref_coef).sum(0) if score == "l1" else np.square(ref_coef).sum(0)
    assert np.array_equal(np.sort(np.argsort(-ref_scores, kind="stable")[:r]), expected)
    lows = []
    for path in ("dense", "fft"):
        proj = DCTProjector(rank, side, score=score, path=path)
        state = proj.init(grad)
        assert np.array_equal(state["indices"].numpy(), expected)
        low = proj.project(grad, state)
        ref_low = ref_coef[:, expected]
        ref_low = ref_low.T if side_int == LEFT else ref_low
        np.testing.assert_allclose(low.double().numpy(), ref_low, atol=1e-5)
        lows.append(low)
    torch.testing.assert_close(lows[0], lows[1], rtol=0, atol=1e-5)
    dense, fft = DCTProjector(rank, side, score=score, path="dense"), DCTProjector(rank, side, score=score, path="fft")
    state = dense.init(grad)
    torch.testing.assert_close(fft.project_back(lows[0], state), dense.project_back(lows[0], state), rtol=0,
                               atol=1e-6)


@SETTINGS
@given(m=st.integers(2, 16), n=st.integers(2, 16), rank=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_l2_selection_captures_the_most_energy(m: int, n: int, rank: int, seed: int) -> None:
    """With the l2 score the projected energy is the sum of the r largest column energies (the optimum)."""
    grad = _grad(m, n, seed)
    proj = DCTProjector(rank, score="l2", path="dense")
    state = proj.init(grad)
    energies = np.sort(np.square(_scipy_coef(grad, state["side"])).sum(0))[::-1]
    captured = float(proj.project(grad, state).double().square().sum())
    np.testing.assert_allclose(captured, energies[:state["rank"]].sum(), rtol=1e-5)


def test_reselection_follows_the_gradient() -> None:
    """A new gradient made of other DCT columns moves the selection there; ties go to the lower index."""
    d, r = 16, 3
    c = dct_matrix(d, torch.float64)
    g1 = (torch.ones(5, 3, dtype=torch.float64) @ c[[2, 9, 11]]).float()
    g2 = (torch.ones(5, 3, dtype=torch.float64) @ c[[0, 9, 15]]).float()
    proj = DCTProjector(r, side="right")
    state = proj.init(g1)
    assert state["indices"].tolist() == [2, 9, 11]
    assert proj.update(g2, state)["indices"].tolist() == [0, 9, 15]
    assert proj.init(torch.zeros(5, d))["indices"].tolist() == [0, 1, 2]


def test_bf16_gradient_and_auto_path() -> None:
    grad = _grad(12, 10, 3, torch.bfloat16)
    for path in ("fft", "dense"):
        proj = DCTProjector(4, path=path)
        state = proj.init(grad)
        low = proj.project(grad, state)
        assert low.dtype == torch.float32 and low.shape == (12, 4)
        torch.testing.assert_close(low, proj.project(grad.float(), state), rtol=0, atol=0)
    proj = DCTProjector(4)
    assert proj.resolved_path(16) == "dense" and proj.resolved_path(1 << 14) == "fft"


def test_state_survives_weights_only_load() -> None:
    proj = DCTProjector(4, path="fft")
    grad = _grad(9, 13, 4)
    state = proj.update(grad, proj.init(grad, seed=7))
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded.keys() == state.keys() and loaded["indices"].dtype == torch.int64
    assert torch.equal(proj.project(grad, loaded), proj.project(grad, state))


@pytest.mark.parametrize(("key", "value", "exc"), [("score", "l3", ValueError), ("path", "gpu", ValueError),
                                                   ("path", 1, TypeError), ("rank", 0, ValueError)])
def test_bad_options_named(key: str, value: object, exc: type) -> None:
    kwargs: dict = {"rank": 4, key: value}
    rank = kwargs.pop("rank")
    with pytest.raises(exc, match=key):
        make_projector("dct", rank, **kwargs)
    with pytest.raises(ValueError, match="grad"):
        make_projector("dct", 2).init(torch.zeros(3))

