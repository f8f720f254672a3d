"""Fira's step with no second lift: the residual term in closed form for an orthonormal basis.

For a right projection (basis ``Q``, ``(n, r)``, ``Q^T Q = I``), ``R = G Q``, the inner step ``N`` and one factor
``phi_i`` per row, Fira's update is ``coef * scale * N Q^T + c * phi * (G - alpha R Q^T)`` with ``c`` the step size
over the limiter's factor. Row scaling commutes with the lift, so it equals
``c * phi * G + (coef * scale * N - c * alpha * phi * R) Q^T``: one lift of an ``(m, r)`` matrix plus elementwise
work, no full-size temporary. Its norm needs no lift either: ``<G_i, R_i Q^T> = ||R_i||^2`` and
``||R_i Q^T|| = ||R_i||``, so ``||G_i - alpha R_i Q^T||^2 = ||G_i||^2 - (2 alpha - alpha^2) ||R_i||^2``. A left
projection is the transpose (one factor per column). The result equals
:class:`~lowrank_optim.rules.fira_residual.FiraResidual` to rounding (``tests/test_stacks.py``); the squared norm
is clamped at zero against cancellation when the residual is tiny (full rank, ``alpha = 1``).

A complement that is rounding error is zero, as in :meth:`~lowrank_optim.projectors.base.Projector.residual`
(``||E|| <= tau ||G||``, ``tau`` the basis's floor): here ``||E||^2`` comes from a difference of squared norms,
which resolves ``||E||^2 / ||G||^2`` only down to about ``eps`` of fp32, so the test is
``||E||^2 <= max(tau^2, 64 eps) ||G||^2`` (a device-side mask, no host read). Below that, the per-matrix path's
complement is rounding noise too, and Fira's limiter must not arm on it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..projectors.base import LEFT
from .fira_residual import _TINY, LIMITER_KEY

#: The smallest ``||E||^2 / ||G||^2`` the difference of squared norms resolves (fp32 sums of squares).
CANCELLATION = 64 * torch.finfo(torch.float32).eps


def fira_closed_form_step(target: torch.Tensor, grad: torch.Tensor, low: torch.Tensor, update: torch.Tensor,
                          basis: torch.Tensor, side: int, coef: float, lr: float, state: dict,
                          group: dict[str, Any], floor: float = 0.0) -> None:
    """Applies ``-(coef * scale * lift(update) + Fira's residual step)`` to ``target`` in place.

    Args:
        target: fp32 ``(m, n)`` weight, updated in place (weight decay already applied).
        grad: fp32 ``(m, n)`` gradient ``G``.
        low: ``project(G)``: ``(r, n)`` (left) or ``(m, r)`` (right).
        update: the inner rule's low-rank step ``num / den``, shaped like ``low``.
        basis: orthonormal ``(d, r)`` basis (``m`` rows on the left side, ``n`` on the right).
        side: ``LEFT`` or ``RIGHT``.
        coef, lr: the inner step's coefficient and learning rate (:class:`~lowrank_optim.rules.base.Direction`).
        state: the matrix's state (the limiter's stored norm lives there).
        group: the param group (``scale``, ``fira_residual``, ``limiter_gamma``, ``betas``).
        floor: the basis's complement floor ``tau`` (:meth:`~lowrank_optim.projectors.base.Projector.complement_floor`).
    """
    scale = float(group["scale"])
    eta = float(lr)
    if "betas" in group:
        t = state["inner_step"]
        beta1, beta2 = group["betas"]
        eta *= math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
    lift_low = update * (coef * scale)
    if eta == 0.0 and group["limiter_gamma"] is not None:  # as FiraResidual: -1 means "not measured yet"
        state.setdefault(LIMITER_KEY, torch.full((), -1.0, dtype=torch.float32, device=grad.device))
    if eta != 0.0:
        alpha = scale if group["fira_residual"] == "reference" else 1.0
        dim = 0 if side == LEFT else 1
        phi = update.norm(dim=dim, keepdim=True).div_(low.norm(dim=dim, keepdim=True).add_(_TINY))
        phi.mul_(coef / eta)  # Fira's phi in the un-corrected units of the limiter
        # ||phi * (G - alpha lift(R))||^2 from the slice norms of G and R
        sq = torch.linalg.vector_norm(grad, dim=dim, keepdim=True).square_()
        total = sq.sum()  # ||G||^2
        sq.sub_(low.square().sum(dim=dim, keepdim=True), alpha=2.0 * alpha - alpha * alpha).clamp_(min=0.0)
        # a complement at the rounding floor is zero (module docstring)
        above = sq.sum() > total * max(floor * floor, CANCELLATION)
        sq.mul_(above)
        mult = phi.mul(eta).mul_(above)  # eta * phi (0 under the floor), then over the limiter's factor
        gamma = group["limiter_gamma"]
        if gamma is not None:
            norm = sq.mul_(phi.square()).sum().sqrt_()
            stored = state.get(LIMITER_KEY)
            if stored is None:
                state[LIMITER_KEY] = norm.to(torch.float32).clone()
            else:
                factor = (norm / (stored + _TINY)).clamp(min=float(gamma)) / float(gamma)
                factor = torch.where(stored > 0, factor, torch.ones_like(factor))  # armed after a nonzero norm
                mult.div_(factor)
                stored.copy_(norm / factor)
        lift_low.sub_(low * mult, alpha=alpha)
        target.addcmul_(grad, mult, value=-1.0)
    if side == LEFT:
        target.addmm_(basis, lift_low, alpha=-1.0)
    else:
        target.addmm_(lift_low, basis.T, alpha=-1.0)


__all__ = ["fira_closed_form_step"]
