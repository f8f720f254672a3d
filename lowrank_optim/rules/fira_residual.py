"""Fira's residual: the gradient the projection drops, rescaled and added back (Chen et al. 2024, arXiv:2410.01623)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from .._validation import check_number
from ..distributed import comm
from ..projectors.base import LEFT, Projector, ProjState
from .base import Group, ResidualRule

#: State key of the norm-growth limiter's stored norm (one fp32 0-d tensor per matrix).
LIMITER_KEY = "fira_residual_norm"
_TINY = 1e-8  # the reference code's guard in both the scaling factor and the limiter


def slice_scaling(low_step: torch.Tensor, low_grad: torch.Tensor, side: int) -> torch.Tensor:
    """Fira's norm-based scaling ``phi_j = ||N_j|| / (||R_j|| + 1e-8)``, one factor per slice along the
    side the projection keeps, shaped to broadcast over the full gradient.

    A left projection gives an ``(r, n)`` low-rank tensor: one factor per column, shape ``(1, n)``; a right
    one gives ``(m, r)``: one factor per row, shape ``(m, 1)``. A low-rank tensor that is not 2-D (entry
    selection) gets a single per-matrix factor.
    """
    if low_grad.dim() != 2:
        return (low_step.norm() / (low_grad.norm() + _TINY)).reshape(1, 1)
    dim = 0 if side == LEFT else 1
    return low_step.norm(dim=dim, keepdim=True) / (low_grad.norm(dim=dim, keepdim=True) + _TINY)


def reserve_limiter(state: dict, device: torch.device) -> None:
    """Creates the limiter's stored norm as the placeholder -1 ("not measured yet") if it is absent: a zero-lr
    step (DCP's fresh-optimizer template comes from one) leaves the same keys as a trained step, so a checkpoint
    loads into the template with nothing dropped."""
    state.setdefault(LIMITER_KEY, torch.full((), -1.0, dtype=torch.float32, device=device))


def limit_norm_growth(residual: torch.Tensor, state: dict, gamma: float) -> torch.Tensor:
    """Fira's norm-growth limiter: if ``||S_t|| > gamma * s_{t-1}``, rescale ``S_t`` to ``gamma * s_{t-1}``.

    ``s_t`` (the norm after limiting) is kept in ``state[LIMITER_KEY]``; the first call only stores it.
    The limiter is armed only once a nonzero norm has been stored: while ``s_{t-1} = 0`` (a zero-initialised
    layer whose first residuals are exactly zero) ``S_t`` passes unchanged and its norm becomes the reference.
    The reference code compares with ``s_{t-1} + 1e-8`` from the first call on, so after a zero first residual
    every later one was capped at ``1e-8 * gamma^k`` (about 2000 steps to grow back to 1 at gamma = 1.01).
    A placeholder -1 (left by a zero-lr step) is not armed either.
    Works on tensors (no host synchronisation) and rescales ``residual`` in place.
    """
    norm = comm.param_norm(residual)  # of the whole matrix when ``residual`` is a row shard (FSDP2)
    stored = state.get(LIMITER_KEY)
    if stored is None:
        state[LIMITER_KEY] = norm.detach().to(torch.float32).clone()
        return residual
    factor = (norm / (stored + _TINY)).clamp(min=gamma) / gamma
    factor = torch.where(stored > 0, factor, torch.ones_like(factor))  # not armed before a nonzero norm
    residual.div_(factor)
    stored.copy_(norm / factor)
    return residual


def adam_step_size(lr: float, state: dict, group: Group) -> float:
    """The step size eta_t of an Adam inner rule with its bias correction folded in,
    ``lr * sqrt(1 - beta2^t) / (1 - beta1^t)`` at ``t = state["inner_step"]`` (``lr`` itself for a rule without
    ``betas``): Fira's and APOLLO's scaling factors are norms of the un-corrected step, so the correction moves
    here."""
    eta = float(lr)
    if "betas" in group:
        t = state["inner_step"]
        beta1, beta2 = group["betas"]
        eta *= math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
    return eta


class FiraResidual(ResidualRule):
    """Adds ``phi * (G - lift(R))`` to the low-rank Adam step, norm-growth limited.

    ``N`` is Adam's normalised step ``m / (sqrt(v) + eps)`` *without* bias correction, as in the paper
    and the reference code, where both terms share the step size ``eta_t = lr sqrt(1 - beta2^t) / (1 - beta1^t)``.
    The rule reads ``N`` off the applied low-rank step ``coef * low_update`` (whatever split of the
    coefficient the inner rule uses) as ``coef * low_update / eta_t``, builds and limits ``S`` in those
    un-corrected units, and returns ``eta_t * S``. For an inner rule without ``betas`` ``eta_t = lr``.

    Group keys:
        fira_residual: ``"reference"`` (default): ``G - scale * P R``, the reference code, where GaLore's
            ``scale`` (alpha) sits inside the lift, so with alpha < 1 the residual still holds
            ``(1 - alpha)`` of the in-subspace gradient; ``"orthogonal"``: ``G - P R``, the paper's
            equation (the part of ``G`` outside the subspace only).
        limiter_gamma: the limiter's growth bound gamma (1.01, fixed in the reference code); ``None``
            switches the limiter off.
    """

    name = "fira"
    wants_coef = True
    defaults: ClassVar[dict[str, Any]] = {"fira_residual": "reference", "limiter_gamma": 1.01}

    def check_projector(self, projector: Projector, group: Group) -> None:
        """Besides the complement's orthonormal basis (:meth:`ResidualRule.check_projector`), Fira takes each
        slice's scaling ``phi = ||psi(R)|| / ||R||`` of the kept part for the whole slice's (paper, Sec. 3.2),
        which holds when the subspace is the gradient's dominant part (:attr:`Projector.dominant`). With random
        coordinates or a random basis a slice's ``||R||`` can be near 0 and ``phi`` unbounded (one kept entry of a
        1 x 16 weight: ``phi = 1 / |r|``, loss 0.74 -> 2.55 in one step): refused by name."""
        super().check_projector(projector, group)
        if not projector.dominant:
            raise ValueError(
                f"Invalid projector: {projector.name!r} with residual={self.name!r}: Fira's scaling factor is read "
                "off the kept part of each slice, which needs a subspace chosen as the gradient's dominant part "
                "('svd', 'rsvd', 'rsvd_heads', 'dct', 'online_pca'); for a random subspace use APOLLO's "
                "scaling (residual='apollo')")

    def validate(self, group: Group) -> None:
        mode = group["fira_residual"]
        if mode not in ("reference", "orthogonal"):
            raise ValueError(f"Invalid fira_residual: {mode!r} (expected 'reference' or 'orthogonal')")
        if group["limiter_gamma"] is not None:
            check_number("limiter_gamma", group["limiter_gamma"], low=1.0)

    def step(self, grad: torch.Tensor, low_grad: torch.Tensor, low_update: torch.Tensor, projector: Projector,
             proj_state: ProjState, state: dict, group: Group, coef: float = 1.0,
             lr: float = 1.0) -> torch.Tensor | None:
        eta = adam_step_size(lr, state, group)
        if eta == 0.0:
            if group["limiter_gamma"] is not None:
                reserve_limiter(state, grad.device)
            return None
        # G - alpha * lift(R) ("reference") or G - lift(R)
        alpha = group["scale"] if group["fira_residual"] == "reference" else 1.0
        residual = projector.residual(grad, low_grad, proj_state, alpha)
        phi = slice_scaling(low_update, low_grad, int(proj_state.get("side", LEFT)))
        phi.mul_(coef / eta)
        residual.mul_(phi)
        if group["limiter_gamma"] is not None:
            limit_norm_growth(residual, state, float(group["limiter_gamma"]))
        return residual.mul_(eta)


__all__ = ["LIMITER_KEY", "FiraResidual", "adam_step_size", "limit_norm_growth", "reserve_limiter", "slice_scaling"]
