"""Randomized SVD projector (Halko, Martinsson and Tropp 2011, arXiv:0909.4061; used by GaLore+)."""

from __future__ import annotations

import torch

from .._validation import check_choice, check_int
from ..linalg import robust
from .base import SIGN_RULES, Projector, ProjState, cpu_generator, oriented


def _orth(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def randomized_range(a: torch.Tensor, rank: int, *, oversample: int, power_iters: int,
                     seed: tuple[int, ...], warm: torch.Tensor | None) -> torch.Tensor:
    """Approximate top-``rank`` left singular vectors of ``a`` (``(p, q)``, fp32) by subspace iteration.

    The sketch is ``a @ omega`` with ``omega`` of ``rank + oversample`` columns. A warm start puts
    ``a^T @ warm`` (one power step from the previous basis) in the first columns of ``omega``; the
    rest are Gaussian, drawn on the CPU from ``seed`` so every device and rank draws the same.
    Each half power step is re-orthonormalised (QR) for stability. The small projected problem is solved
    through the eigenvectors of its Gram matrix, formed and decomposed in float64, rather than an SVD.

    The whole computation runs through :func:`lowrank_optim.linalg.robust`: if a QR or the eigensolver fails
    (or gives a non-finite value, e.g. entries near ``1e19``), it is redone on ``a / max|a|``, in float64 and
    on the CPU (the sketch is drawn from the same seed each time).

    Raises:
        lowrank_optim.linalg.DecompositionError: every attempt failed.
    """
    return robust(lambda x: _randomized_range(x, rank, oversample, power_iters, seed, warm), a,
                  what="randomized SVD").to(a.dtype)


def _randomized_range(a: torch.Tensor, rank: int, oversample: int, power_iters: int, seed: tuple[int, ...],
                      warm: torch.Tensor | None) -> torch.Tensor:
    p, q = a.shape
    k = min(rank + oversample, p, q)
    n_random = k
    cols = []
    if warm is not None:
        w = a.T @ warm.to(device=a.device, dtype=a.dtype)
        w = w[:, :k]
        cols.append(w)
        n_random = k - w.shape[1]
    if n_random > 0:
        draw = torch.randn(q, n_random, generator=cpu_generator(*seed), dtype=torch.float32, device="cpu")
        cols.append(draw.to(device=a.device, dtype=a.dtype))
    omega = torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]
    basis = _orth(a @ omega)
    for _ in range(power_iters):
        basis = _orth(a @ _orth(a.T @ basis))
    small = (basis.T @ a).double()
    # Left singular vectors of the small (k x q) matrix = eigenvectors of its k x k Gram matrix, formed and
    # decomposed in float64 so that squaring the condition number costs nothing at the top-r end (and cannot
    # overflow: fp32 squares overflow for entries near 1e19); 7x cheaper than the small matrix's SVD.
    _, vecs = torch.linalg.eigh(small @ small.T)
    u_small = vecs[:, vecs.shape[1] - min(rank, int(vecs.shape[1])):].flip(-1).to(a.dtype)  # rank 0: no column
    return (basis @ u_small).contiguous()


class RandomizedSVDProjector(Projector):
    """Top-``r`` basis from randomized subspace iteration, warm-started from the previous basis.

    Args:
        rank: target rank.
        side: side rule.
        oversample: extra sketch columns ``p`` (default 8).
        power_iters: subspace iterations ``q`` (default 1).
        warm_start: start from the previous basis on a refresh (default True).
        sign: sign rule of the basis columns, as :class:`~lowrank_optim.projectors.svd.SVDProjector`
            (``"align"`` default, ``"canonical"``, ``"raw"``).
    """

    name = "rsvd"
    orthonormal = True
    dominant = True

    def orthonormal_basis(self, state: ProjState) -> bool:
        """The range finder's basis is the Q factor of a QR (or an eigenbasis): orthonormal."""
        return type(self) is RandomizedSVDProjector

    def __init__(self, rank: int, side: str = "std", *, oversample: int = 8, power_iters: int = 1,
                 warm_start: bool = True, sign: str = "align") -> None:
        super().__init__(rank, side)
        self.sign_rule = check_choice("sign", sign, SIGN_RULES)
        self.oversample = check_int("oversample", oversample, low=0)
        self.power_iters = check_int("power_iters", power_iters, low=0)
        if not isinstance(warm_start, bool):
            raise TypeError(f"Invalid warm_start: expected a bool, got {warm_start!r}")
        self.warm_start = warm_start

    def _basis(self, grad: torch.Tensor, state: ProjState, previous: torch.Tensor | None) -> torch.Tensor:
        return randomized_range(oriented(grad, state["side"]), state["rank"], oversample=self.oversample,
                                power_iters=self.power_iters, seed=(state["seed"], state["refresh"]),
                                warm=previous if self.warm_start else None)
