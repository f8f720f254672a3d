"""The complement at a few entries without forming it (lowrank_optim.projectors.entries): equal to the formed
complement's entries, its rounding floor included."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_optim.projectors import entries, make_projector
from lowrank_optim.projectors.entries import clearly_above_floor, closed_form, residual_entries

SETTINGS = settings(max_examples=30, deadline=None)


def _setup(m: int, n: int, r: int, side: str, name: str, seed: int, **opts: object):
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(m, n, generator=gen)
    proj = make_projector(name, r, side=side, **opts)
    state = proj.init(grad, seed=seed)
    g = torch.randn(m, n, generator=gen)  # a later gradient in the same subspace's period
    return proj, state, g, proj.project(g, state)


@SETTINGS
@given(m=st.integers(2, 40), n=st.integers(2, 40), r=st.integers(1, 8), side=st.sampled_from(["left", "right", "std"]),
       name=st.sampled_from(["svd", "rsvd"]), seed=st.integers(0, 2**16), data=st.data())
def test_entries_equal_the_formed_complement(m: int, n: int, r: int, side: str, name: str, seed: int, data) -> None:
    proj, state, g, low = _setup(m, n, r, side, name, seed)
    k = data.draw(st.integers(1, m * n))
    idx = torch.randperm(m * n, generator=torch.Generator().manual_seed(seed))[:k].sort().values.to(torch.int32)
    assert closed_form(proj, state, g) is not None  # orthonormal fp32 bases take the closed form
    want = proj.residual(g, low, state).view(-1)[idx.long()]
    got = residual_entries(proj, g, low, state, idx)
    assert got.shape == (k,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5 * float(g.norm()), rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_rank_deficient_gradient_gives_zero_entries(side: str) -> None:
    """A gradient of rank <= r has no complement: the formed one is rounding noise and zeroed by the floor; the
    closed form zeroes it too (``||G||^2 - ||R||^2`` within cancellation of 0)."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(30, 3, generator=gen) @ torch.randn(3, 20, generator=gen)
    proj = make_projector("svd", 4, side=side)
    state = proj.init(g)
    low = proj.project(g, state)
    idx = torch.arange(0, 600, 7)
    assert torch.count_nonzero(proj.residual(g, low, state)) == 0
    assert torch.count_nonzero(residual_entries(proj, g, low, state, idx)) == 0


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_sampled_product_equals_the_dense_lift(index_dtype: torch.dtype) -> None:
    """The SDDMM form reads exactly ``(G - a @ b)`` at the entries, for any strides of ``b`` and empty / full rows."""
    gen = torch.Generator().manual_seed(3)
    g, a, b = torch.randn(9, 7, generator=gen), torch.randn(9, 3, generator=gen), torch.randn(7, 3, generator=gen).T
    idx = torch.tensor([0, 1, 2, 3, 4, 5, 6, 20, 21, 40, 62], dtype=index_dtype)  # row 0 full, rows 1, 4-7 empty
    want = (g - a @ b).view(-1)[idx.long()]
    torch.testing.assert_close(entries.sampled_lift_residual(g, a, b, idx), want, atol=1e-6, rtol=0)
    assert entries.sampled_lift_residual(g, a, b, idx[:0]).shape == (0,)


@pytest.mark.parametrize("opts", [{"basis_dtype": "int8"}, {"basis_dtype": "bf16"}])
def test_other_bases_form_the_complement(opts: dict) -> None:
    """A quantized basis is not orthonormal: the complement is formed and read, exactly the formed entries."""
    proj, state, g, low = _setup(24, 36, 5, "left", "svd", 1, **opts)
    assert closed_form(proj, state, g) is None
    idx = torch.arange(0, 24 * 36, 5)
    want = proj.residual(g, low, state).view(-1)[idx]
    assert torch.equal(residual_entries(proj, g, low, state, idx), want)


def test_closed_form_is_taken_above_the_floor_and_formed_near_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gradient with a complement of about 1% of its norm takes the closed form (no lift); one fitted by its
    subspace to within 0.28% (a refresh step's own gradient: 0.24% measured) forms the complement, whose exact floor
    test keeps it: the same entries as the formed path, not zeros."""
    gen = torch.Generator().manual_seed(5)
    strong = torch.randn(48, 4, generator=gen) @ torch.randn(4, 40, generator=gen)
    proj = make_projector("svd", 4, side="left")
    idx = torch.arange(0, 48 * 40, 9)
    formed = []
    real = type(proj).residual
    monkeypatch.setattr(type(proj), "residual", lambda self, *a, **k: formed.append(1) or real(self, *a, **k))
    for noise, closed in ((0.05, True), (0.001, False)):
        g = strong + noise * torch.randn(48, 40, generator=gen)
        state = proj.init(g)
        low = proj.project(g, state)
        assert clearly_above_floor(proj, g, low, state) is closed
        formed.clear()
        got = residual_entries(proj, g, low, state, idx)
        assert bool(formed) is not closed
        want = real(proj, g, low, state).view(-1)[idx]
        assert torch.count_nonzero(want) > 0  # above the formed test's floor in both cases
        torch.testing.assert_close(got, want, atol=1e-5 * float(g.norm()), rtol=0)
