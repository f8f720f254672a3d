"""Exact truncated SVD projector (GaLore, Zhao et al. 2024, arXiv:2403.03507)."""

from __future__ import annotations

import warnings

import torch

from .._validation import check_choice
from ..linalg import DecompositionError, robust
from .base import LEFT, SIGN_RULES, Projector, ProjState, oriented
from .rsvd import randomized_range


class SVDProjector(Projector):
    """Top-``r`` singular vectors of the gradient, from ``torch.linalg.svd`` in fp32.

    ``G`` itself is decomposed on both sides (left: ``U[:, :r]``, right: ``Vh[:r]^T``), as galore-torch does.
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
    """

    name = "svd"
    orthonormal = True
    dominant = True

    def __init__(self, rank: int, side: str = "std", *, sign: str = "align") -> None:
        super().__init__(rank, side)
        self.sign_rule = check_choice("sign", sign, SIGN_RULES)

    def _basis(self, grad: torch.Tensor, state: ProjState, previous: torch.Tensor | None) -> torch.Tensor:
        r = state["rank"]
        left = state["side"] == LEFT

        def top(g: torch.Tensor) -> torch.Tensor:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            return (u[:, :r] if left else vh[:r].T).contiguous()

        g = grad.float()
        try:
            return robust(top, g, what="SVD")
        except DecompositionError as err:
            warnings.warn(f"lowrank_optim: {err}; falling back to randomized SVD", RuntimeWarning, stacklevel=4)
        return randomized_range(oriented(g, state["side"]), r, oversample=8, power_iters=2,
                                seed=(state["seed"], state["refresh"]), warm=previous)
