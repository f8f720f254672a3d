"""Review 10 of the SVD projector's fp64 Gram solver (the default on every device since round 10).

* ``gram_top`` (and the randomized SVD's small eigenproblem) kept every column at rank 0 (``vecs[:, -0:]``), so an
  empty ``(0, n)`` gradient projected on its ``n`` side got an ``n x n`` basis instead of ``n x 0``;
* the subspace it returns is at least as close to the float64 SVD's as the fp32 SVD's is, on the inputs the
  docstring names (entries near ``1e19`` and ``1e-30``, subnormal, graded rows / columns, fp16 / bf16 gradients,
  rank-deficient gradients, ``1 x n`` / ``n x 1``, ``rank >= min(m, n)``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowrank_optim as lro
from lowrank_optim.projectors import make_projector
from lowrank_optim.projectors.rsvd import randomized_range
from lowrank_optim.projectors.svd import gram_top


def test_gram_top_at_rank_zero_returns_no_column() -> None:
    a = torch.randn(5, 3)
    assert gram_top(a, 0).shape == (5, 0)
    assert gram_top(a, 2).shape == (5, 2)
    assert gram_top(a, 9).shape == (5, 5)  # at most d columns
    assert randomized_range(a, 0, oversample=8, power_iters=1, seed=(0,), warm=None).shape == (5, 0)
    assert randomized_range(a, 2, oversample=8, power_iters=1, seed=(0,), warm=None).shape == (5, 2)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0)])
@pytest.mark.parametrize("side", ["std", "left", "right", "reverse_std"])
def test_empty_gradient_basis_shape_is_the_same_for_both_solvers(shape: tuple[int, int], side: str) -> None:
    g = torch.randn(shape)
    a = make_projector("svd", 4, side=side, solver="svd").init(g)
    b = make_projector("svd", 4, side=side, solver="gram").init(g)
    assert a["rank"] == b["rank"] == 0
    assert a["basis"].shape == b["basis"].shape
    assert b["basis"].shape[1] == 0


def test_empty_weight_steps_with_the_gram_solver_on_its_long_side() -> None:
    p, q = nn.Parameter(torch.randn(0, 5)), nn.Parameter(torch.randn(6, 5))
    opt = lro.GaLoreAdamW([{"params": [p, q], "rank": 2, "proj_side": "right",
                            "projector_options": {"solver": "gram"}}], lr=1e-3, update_proj_gap=2)
    for _ in range(3):
        p.grad, q.grad = torch.randn(0, 5), torch.randn(6, 5)
        opt.step()
    assert opt.state[p]["projector"]["basis"].shape == (5, 0)
    assert opt.state[p]["exp_avg"].shape == (0, 0)


def _subspace_error(basis: torch.Tensor, truth: torch.Tensor) -> float:
    """``||(I - T T^T) B||_2``: 0 when ``B``'s columns lie in ``T``'s span (signs and rotations ignored)."""
    b = basis.double()
    return float(torch.linalg.matrix_norm(b - truth @ (truth.T @ b), ord=2))


def _spectrum(m: int, n: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    k = min(m, n)
    return ((u[:, :k] * s[:k]) @ v[:, :k].T).float()


def _cases() -> dict[str, tuple[torch.Tensor, int, int]]:
    """name -> (gradient, rank, columns whose subspace is determined: the rank of a rank-deficient gradient)."""
    gen = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    graded_rows = r(64, 32)
    graded_rows[0] *= 1e6
    graded_cols = r(64, 32) * torch.logspace(0, -12, 32)
    return {
        "randn": (r(64, 32), 8, 8),
        "decay 0.3": (_spectrum(64, 32, 0.3 ** torch.arange(32.0, dtype=torch.float64), 1), 8, 8),
        "decay 0.1": (_spectrum(48, 32, 0.1 ** torch.arange(32.0, dtype=torch.float64), 2), 6, 6),
        "entries near 1e19": (r(64, 32) * 1e19, 8, 8),
        "entries near 1e-30": (r(64, 32) * 1e-30, 8, 8),
        "subnormal": (r(64, 32) * 1e-40, 8, 8),
        "graded row 1e6": (graded_rows, 4, 4),
        "graded columns 1 .. 1e-12": (graded_cols, 8, 8),
        "wide": (r(16, 80), 5, 5),
        "1 x n": (r(1, 50), 4, 1),
        "n x 1": (r(50, 1), 4, 1),
        "rank >= min(m, n)": (r(10, 6), 8, 6),
        "rank-deficient (3 of 8)": (r(64, 3) @ r(3, 32), 8, 3),
        "fp16": (r(64, 32).half(), 8, 8),
        "bf16": (r(64, 32).bfloat16(), 8, 8),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_gram_subspace_is_at_least_as_accurate_as_the_fp32_svd(case: str) -> None:
    g, rank, determined = _cases()[case]
    errors = {}
    for solver in ("svd", "gram"):
        st = make_projector("svd", rank, solver=solver).init(g)
        basis = st["basis"]
        assert basis.dtype == torch.float32 and basis.shape[1] == st["rank"] == min(rank, *g.shape)
        torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1]), atol=2e-6, rtol=0)
        u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
        truth = (u if st["side"] == 0 else vh.T)[:, :determined]
        # the determined columns of the basis span the truth's top subspace (the rest of a rank-deficient
        # gradient's basis is any orthonormal completion, for either solver)
        top = basis[:, :determined]
        errors[solver] = _subspace_error(top, truth)
    assert errors["gram"] <= max(errors["svd"], 1e-6), errors


def test_gram_failure_uses_rsvd_when_it_works(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default solver's fallback chain: the ``30 x 30`` Gram ``eigh`` fails on every rung of ``robust`` (plain,
    rescaled, float64), the randomized SVD (whose small eigenproblem is ``12 x 12``) gives the basis, with a
    warning; it captures the top-4 energy of a gradient with a decaying spectrum."""
    g = _spectrum(40, 30, 0.5 ** torch.arange(30.0, dtype=torch.float64), 0)
    proj = make_projector("svd", 4)
    assert proj.solver_for(g.shape, "cpu", left=False) == "gram"
    real = torch.linalg.eigh
    calls: list[tuple[int, ...]] = []

    def flaky(a: torch.Tensor, *args: object, **kwargs: object) -> object:
        calls.append(tuple(a.shape))
        if tuple(a.shape) == (30, 30):
            raise torch.linalg.LinAlgError("failed to converge")
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    with pytest.warns(RuntimeWarning, match="falling back to randomized SVD"):
        state = proj.init(g)
    assert (30, 30) in calls and (12, 12) in calls  # the Gram tried, then the sketch's (r + 8) x (r + 8) problem
    s = torch.linalg.svdvals(g)
    assert proj.project(g, state).pow(2).sum() >= 0.999 * s[:4].pow(2).sum()
