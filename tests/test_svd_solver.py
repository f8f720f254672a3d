"""The SVD projector's Gram solver: the fp64 eigenvectors of the Gram matrix give the SVD's subspace."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_optim.projectors import make_projector
from lowrank_optim.projectors.svd import SOLVERS, SVDProjector, gram_top

SETTINGS = settings(max_examples=25, deadline=None)


def _matrix(m: int, n: int, seed: int, decay: float) -> torch.Tensor:
    """``U diag(s) V^T`` with ``s_i = decay^i`` (a gradient-like decaying spectrum), fp32."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    k = min(m, n)
    s = decay ** torch.arange(k, dtype=torch.float64)
    return ((u[:, :k] * s) @ v[:, :k].T).float()


@SETTINGS
@given(m=st.integers(2, 48), n=st.integers(2, 48), seed=st.integers(0, 2**16), side=st.sampled_from(["left", "right"]),
       decay=st.sampled_from([0.5, 0.8, 0.95]), data=st.data())
def test_gram_solver_gives_the_svd_basis(m: int, n: int, seed: int, side: str, decay: float, data) -> None:
    """With canonical signs the two solvers return the same columns. The kept singular values are at least 1e-3 of
    the largest (below ~1e-7 an fp32 gradient does not determine its vectors at all) and separated by
    ``(1 - decay) s_i``, so each kept vector is determined to ~1e-4 in fp32 (worst seen: 2.4e-5 in 600 draws)."""
    kept = int(math.log(1e-3) / math.log(decay)) + 1  # s_i >= 1e-3 for i < kept
    rank = data.draw(st.integers(1, min(m, n, kept)))
    g = _matrix(m, n, seed, decay)
    a = make_projector("svd", rank, side=side, sign="canonical", solver="svd").init(g)["basis"]
    b = make_projector("svd", rank, side=side, sign="canonical", solver="gram").init(g)["basis"]
    assert a.shape == b.shape and b.dtype == torch.float32
    torch.testing.assert_close(b, a, atol=2e-4, rtol=0)
    torch.testing.assert_close(b.T @ b, torch.eye(b.shape[1]), atol=1e-5, rtol=0)


def test_gram_top_is_the_top_eigenvectors_in_descending_order() -> None:
    a = torch.diag(torch.tensor([1.0, 3.0, 2.0]))
    top = gram_top(a, 2)
    assert torch.equal(top.abs(), torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    # rank-deficient input: still orthonormal columns, the zero directions anywhere in the null space
    z = gram_top(torch.zeros(4, 3), 2)
    torch.testing.assert_close(z.T @ z, torch.eye(2), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("shape", "side", "device", "expected"), [
    ((64, 32), "std", "cuda", "gram"),    # right side: Gram 32 x 32
    ((32, 64), "std", "cuda", "gram"),    # left side: Gram 32 x 32
    ((64, 32), "left", "cuda", "svd"),    # the Gram would be 64 x 64, the larger side: the SVD is cheaper
    ((64, 32), "std", "cpu", "gram"),     # the CPU too (3x faster at LLaMA-60M's 512 x 1376, fp64 at full speed)
    ((64, 32), "left", "cpu", "svd"),
])
def test_auto_solver_choice(shape: tuple[int, int], side: str, device: str, expected: str) -> None:
    proj = SVDProjector(4, side)
    left = side == "left" or (side == "std" and shape[0] < shape[1])
    assert proj.solver_for(shape, device, left) == expected
    assert SVDProjector(4, side, solver="gram").solver_for(shape, "cpu", left) == "gram"
    assert SVDProjector(4, side, solver="svd").solver_for(shape, "cuda", left) == "svd"


def test_auto_on_the_cpu_is_the_gram_solver_on_the_smaller_side_bit_for_bit() -> None:
    """``"auto"`` is ``"gram"`` when the Gram matrix is the smaller one and ``"svd"`` otherwise, on the CPU too."""
    g = _matrix(20, 12, 3, 0.8)
    for side, solver in (("right", "gram"), ("left", "svd")):  # 12 x 12 Gram on the right, 20 x 20 on the left
        a = make_projector("svd", 5, side=side).init(g)["basis"]
        b = make_projector("svd", 5, side=side, solver=solver).init(g)["basis"]
        assert torch.equal(a, b)


def test_bad_solver_is_refused_by_name() -> None:
    assert SOLVERS == ("auto", "svd", "gram")
    with pytest.raises(ValueError, match="solver"):
        make_projector("svd", 4, solver="eig")
