"""Exact truncated SVD projector (GaLore, Zhao et al. 2024, arXiv:2403.03507)."""

from __future__ import annotations

import warnings

import torch

from .base import LEFT, Projector, ProjState, oriented
from .rsvd import randomized_range


class SVDProjector(Projector):
    """Top-``r`` singular vectors of the gradient, from ``torch.linalg.svd`` in fp32.

    When the SVD fails to converge (ill-conditioned gradients, galore issue #58) it falls back to
    randomized subspace iteration, and if that fails too it keeps the previous basis, with a warning.
    """

    name = "svd"

    def orthonormal_basis(self, state: ProjState) -> bool:
        """Singular vectors are orthonormal (the fallback that keeps a previous basis keeps an orthonormal one)."""
        return type(self) is SVDProjector

    def _basis(self, grad: torch.Tensor, state: ProjState, previous: torch.Tensor | None) -> torch.Tensor:
        r = state["rank"]
        g = grad.float()
        try:
            # Decompose G itself on both sides (left: U, right: Vh^T). With the "keep" transfer the moments
            # outlive a refresh in the old coordinates, so the singular vectors' sign convention is part of
            # the trajectory; this is the convention of galore-torch.
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            return (u[:, :r] if state["side"] == LEFT else vh[:r].T).contiguous()
        except RuntimeError as err:  # torch.linalg.LinAlgError derives from RuntimeError
            warnings.warn(f"lowrank_optim: SVD failed ({err}); falling back to randomized SVD", RuntimeWarning,
                          stacklevel=3)
        a = oriented(g, state["side"])
        try:
            return randomized_range(a, r, oversample=8, power_iters=2, seed=(state["seed"], state["refresh"]),
                                    warm=previous)
        except RuntimeError as err:
            if previous is None:
                raise
            warnings.warn(f"lowrank_optim: randomized SVD failed too ({err}); keeping the previous basis",
                          RuntimeWarning, stacklevel=3)
            return previous
