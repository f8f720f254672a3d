"""Exact truncated SVD projector (GaLore, Zhao et al. 2024, arXiv:2403.03507)."""

from __future__ import annotations

import warnings

import torch

from .._validation import check_choice
from ..linalg import DecompositionError, robust
from .base import LEFT, SIGN_RULES, Projector, ProjState, oriented
from .rsvd import randomized_range

#: How the top singular vectors are computed (:class:`SVDProjector`'s ``solver``).
SOLVERS = ("auto", "svd", "gram")


def gram_top(a: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-``rank`` left singular vectors of ``a`` (``d x n``) as the leading eigenvectors of ``a a^T`` in fp64.

    The Gram matrix of fp32 entries is formed in float64 (each product exact, the sums rounded at 1e-16), so the
    squared spectrum costs nothing at the scales that matter: a vector's error is about
    ``1e-16 * sigma_1^2 / (sigma_i^2 - sigma_{i+1}^2)``, below fp32 SVD's ``1e-7 * sigma_1 / (sigma_i -
    sigma_{i+1})`` unless ``sigma_i / sigma_1 < 1e-9``. Columns are in descending eigenvalue order, signs as
    ``eigh`` returns them (the projector's sign rule fixes them).

    Args:
        a: ``(d, n)`` matrix, any floating dtype.
        rank: columns to return (at most ``d``).

    Returns:
        ``(d, min(rank, d))`` tensor of ``a``'s dtype.
    """
    a64 = a.double()
    _, vecs = torch.linalg.eigh(a64 @ a64.T)
    keep = min(rank, int(vecs.shape[1]))  # not vecs[:, -rank:]: at rank 0 that is every column
    return vecs[:, vecs.shape[1] - keep:].flip(-1).to(a.dtype).contiguous()


class SVDProjector(Projector):
    """Top-``r`` singular vectors of the gradient: ``torch.linalg.svd`` in fp32, or the fp64 Gram eigenvectors.

    ``G`` itself is decomposed on both sides (left: ``U[:, :r]``, right: ``Vh[:r]^T``), as galore-torch does.
    By default (``solver="auto"``) the top eigenvectors of the smaller ``d x d`` Gram matrix (``G G^T`` on the left,
    ``G^T G`` on the right) are taken in float64 instead (:func:`gram_top`): the same subspace, at least as
    accurate, and faster on both devices:

    * H200, LLaMA-1B shapes (2048 x 5461): 0.22 s per matrix with cuSOLVER's default ``gesvdj`` SVD, 0.027 s for
      the Gram and its ``eigh`` (``python -m benchmarks.gpu_check --parts refresh``, ``benchmarks/results/cuda/``):
      a 168-matrix GaLore refresh at 1B from 37 s to 4.6 s. GPUs with slow fp64 (consumer cards: 1/64 of fp32)
      gain less.
    * CPU (2 cores, MKL), LLaMA-60M shapes: 106 ms against 35 ms for 512 x 1376, 46 against 32 ms for 512 x 512;
      the 56-matrix refresh step of GaLoreAdamW and Fira from 3.0-3.8 s to 1.4-2.1 s (LAPACK's ``gesdd`` of a wide
      matrix is the slow part; the refresh column of ``python -m benchmarks.throughput --mode step``).

    ``solver="svd"`` keeps ``torch.linalg.svd`` (the reference implementations' call: the oracle tests against
    galore-torch and fira run with it and ``sign="raw"``, since the two solvers round differently and return
    different raw signs).
    When the SVD fails (ill-conditioned gradients, galore issue #58; entries near ``1e19``) it is retried on
    the gradient rescaled by its largest entry, in float64 and on the CPU (:func:`lowrank_optim.linalg.robust`),
    then by randomized subspace iteration; if every path fails the previous basis is kept, with a warning.

    Args:
        rank: target rank.
        side: side rule.
        sign: sign rule of the singular vectors (:data:`~lowrank_optim.projectors.base.SIGN_RULES`):
            ``"align"`` (default: canonical, then each refreshed column agrees with its predecessor, which is
            what GaLore's kept moments assume), ``"canonical"`` (a function of the basis alone) or ``"raw"``
            (LAPACK's signs, galore-torch's convention; the column of a rank-1 basis may flip between refreshes).
        solver: ``"auto"`` (default: ``"gram"`` when the Gram matrix is the smaller one, ``d = min(m, n)``,
            which GaLore's ``"std"`` side rule always gives; ``"svd"`` otherwise), ``"svd"``
            (``torch.linalg.svd``, as galore-torch) or ``"gram"`` (:func:`gram_top`, on any device). Under
            ``sign="raw"`` the two return different signs.

    Raises:
        ValueError: an unknown ``sign`` or ``solver``.
    """

    name = "svd"
    orthonormal = True
    dominant = True

    def __init__(self, rank: int, side: str = "std", *, sign: str = "align", solver: str = "auto") -> None:
        super().__init__(rank, side)
        self.sign_rule = check_choice("sign", sign, SIGN_RULES)
        self.solver = check_choice("solver", solver, SOLVERS)

    def solver_for(self, shape: tuple[int, ...] | torch.Size, device_type: str, left: bool) -> str:
        """``"svd"`` or ``"gram"``: what this projector uses for a ``shape`` gradient on ``device_type``."""
        if self.solver != "auto":
            return self.solver
        d = int(shape[0]) if left else int(shape[1])
        return "gram" if d <= min(int(shape[0]), int(shape[1])) else "svd"

    def orthonormal_basis(self, state: ProjState) -> bool:
        """Singular vectors are orthonormal (the fallback that keeps a previous basis keeps an orthonormal one)."""
        return type(self) is SVDProjector

    def _basis(self, grad: torch.Tensor, state: ProjState, previous: torch.Tensor | None) -> torch.Tensor:
        r = state["rank"]
        left = state["side"] == LEFT

        def top_svd(g: torch.Tensor) -> torch.Tensor:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            return (u[:, :r] if left else vh[:r].T).contiguous()

        def top_gram(g: torch.Tensor) -> torch.Tensor:
            return gram_top(g if left else g.T, r)

        g = grad.float()
        gram = self.solver_for(g.shape, g.device.type, left) == "gram"
        try:
            return robust(top_gram if gram else top_svd, g, what="Gram eigh" if gram else "SVD")
        except DecompositionError as err:
            warnings.warn(f"lowrank_optim: {err}; falling back to randomized SVD", RuntimeWarning, stacklevel=4)
        return randomized_range(oriented(g, state["side"]), r, oversample=8, power_iters=2,
                                seed=(state["seed"], state["refresh"]), warm=previous)
