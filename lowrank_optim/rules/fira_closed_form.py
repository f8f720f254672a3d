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

from typing import Any

import torch

from ..projectors.base import LEFT
from .base import device_scalar
from .fira_residual import _TINY, LIMITER_KEY, adam_step_size

#: The smallest ``||E||^2 / ||G||^2`` the difference of squared norms resolves (fp32 sums of squares).
CANCELLATION = 64 * torch.finfo(torch.float32).eps


def fira_closed_form_step(target: torch.Tensor, grad: torch.Tensor, low: torch.Tensor, update: torch.Tensor,
                          basis: torch.Tensor, side: int, coef: float, lr: float, state: dict,
                          group: dict[str, Any], floor: float = 0.0, basis_t: torch.Tensor | None = None) -> None:
    """Applies ``-(coef * scale * lift(update) + Fira's residual step)`` to ``target`` in place.

    With ``eta`` Adam's step size (:func:`~lowrank_optim.rules.fira_residual.adam_step_size`), ``u`` and ``rho`` the
    slice norms of ``update`` and ``low`` and ``m = u / (rho + 1e-8)`` (so ``eta * phi = coef * m``), the step is
    ``coef * m / f * G + alpha * coef * (scale / alpha * update - low * m / f) Q^T`` (right side; the left side is
    the transpose), ``f`` the limiter's factor for the norm ``coef / eta * ||m * (G - alpha R Q^T)||``. Scalars
    enter as shared 0-d tensors or as an op's ``alpha`` / ``value`` (one dispatch each).

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
        basis_t: ``basis.T`` if the caller holds it already (right side), else ``None``.
    """
    scale = float(group["scale"])
    eta = adam_step_size(lr, state, group)
    gamma = group["limiter_gamma"]
    left = side == LEFT
    back = basis if left else (basis.T if basis_t is None else basis_t)
    if eta == 0.0:
        if gamma is not None:  # as FiraResidual: -1 means "not measured yet"
            state.setdefault(LIMITER_KEY, torch.full((), -1.0, dtype=torch.float32, device=grad.device))
        if left:
            target.addmm_(back, update, alpha=-coef * scale)
        else:
            target.addmm_(update, back, alpha=-coef * scale)
        return
    dev = grad.device
    alpha = scale if group["fira_residual"] == "reference" else 1.0
    dim = 0 if left else 1
    # ||m * (G - alpha lift(R))||^2 per slice from the slice norms of G and R (<G, lift(R)> = ||R||^2)
    sq = torch.linalg.vector_norm(grad, dim=dim, keepdim=True)
    sq.mul_(sq)
    total = sq.sum()  # ||G||^2
    rho = torch.linalg.vector_norm(low, dim=dim, keepdim=True)
    sq.addcmul_(rho, rho, value=-(2.0 * alpha - alpha * alpha)).clamp_min_(device_scalar(0.0, dev))
    # a complement at the rounding floor is zero (module docstring): m = 0 zeroes the residual and its norm
    above = sq.sum().gt_(total.mul_(device_scalar(max(floor * floor, CANCELLATION), dev)))
    m = torch.linalg.vector_norm(update, dim=dim, keepdim=True).div_(rho.add_(device_scalar(_TINY, dev)))
    m.mul_(above)
    if gamma is not None:
        norm = sq.mul_(m).mul_(m).sum().sqrt_().mul_(device_scalar(coef / eta, dev))
        stored = state.get(LIMITER_KEY)
        if stored is None:
            state[LIMITER_KEY] = norm.clone()
        else:
            factor = torch.div(norm, stored.add(device_scalar(_TINY, dev))).div_(device_scalar(float(gamma), dev))
            factor.clamp_min_(device_scalar(1.0, dev))
            factor = torch.where(stored.gt(device_scalar(0.0, dev)), factor, device_scalar(1.0, dev))  # armed
            m.div_(factor)
            torch.div(norm, factor, out=stored)
    target.addcmul_(grad, m, value=-coef)
    lift = low.mul(m).sub_(update, alpha=scale / alpha)  # -(scale / alpha * update - low * m)
    if left:
        target.addmm_(back, lift, alpha=alpha * coef)
    else:
        target.addmm_(lift, back, alpha=alpha * coef)


__all__ = ["fira_closed_form_step"]
