"""Review 10: the projectors built on :class:`SVDProjector` (GUM's SVD basis, online PCA's first basis) take its
``solver`` too. Since the fp64 Gram solver became the default on every device they could not get
``torch.linalg.svd`` back (``projector_options={"solver": "svd"}`` raised ``TypeError``), which the README offers for
GPUs with slow fp64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowrank_optim as lro
from lowrank_optim.projectors import make_projector


def _grad(m: int = 20, n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("solver", ["auto", "svd", "gram"])
@pytest.mark.parametrize("shape", [(20, 12), (12, 20)])
def test_gum_and_online_pca_bases_are_the_svd_projectors(solver: str, shape: tuple[int, int]) -> None:
    g = _grad(*shape)
    want = make_projector("svd", 4, solver=solver).init(g)["basis"]
    gum = make_projector("gum", 4, solver=solver, full_rank_layers=0)
    assert torch.equal(gum.basis_of(gum.init(g, layout=(0, 1, 0))), want)
    pca = make_projector("online_pca", 4, solver=solver)
    assert torch.equal(pca.basis_of(pca.init(g)), want)


def test_the_solvers_differ_on_gum_so_the_option_is_not_ignored() -> None:
    """``"svd"`` and ``"gram"`` return the same subspace with different raw rounding: not bit-identical bases."""
    g = _grad()
    a = make_projector("gum", 4, solver="svd", full_rank_layers=0)
    b = make_projector("gum", 4, solver="gram", full_rank_layers=0)
    ba, bb = a.basis_of(a.init(g, layout=(0, 1, 0))), b.basis_of(b.init(g, layout=(0, 1, 0)))
    assert not torch.equal(ba, bb)
    torch.testing.assert_close(ba @ ba.T, bb @ bb.T, atol=1e-5, rtol=0)  # the same projector onto the subspace


@pytest.mark.parametrize("name", ["gum", "online_subspace_descent"])
def test_presets_accept_the_solver_option(name: str) -> None:
    p = nn.Parameter(torch.randn(16, 8))
    opt = lro.create_optimizer(name, [{"params": [p], "rank": 2}], lr=1e-3, projector_options={"solver": "svd"})
    p.grad = torch.randn(16, 8)
    opt.step()
    with pytest.raises(ValueError, match="solver"):
        lro.create_optimizer(name, [{"params": [p], "rank": 2}], lr=1e-3, projector_options={"solver": "qr"})
