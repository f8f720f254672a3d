"""APOLLO's structured gradient scaling (Zhu et al., MLSys 2025, arXiv:2412.05270).

The auxiliary Adam runs on the projected gradient ``R = project(G)`` only to *estimate* how much Adam would
rescale each channel; the step applied to the weight is the raw full-rank gradient ``G`` scaled channel by
channel (or by one factor per tensor, APOLLO-Mini), norm-growth limited (Fira's limiter). Nothing is lifted
back from the subspace, so this residual rule *replaces* the engine's low-rank lift (``replaces_lift``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .._validation import check_choice, check_number
from ..distributed import comm
from ..projectors.base import LEFT, Projector, ProjState
from .base import Group, ResidualRule, device_scalar
from .fira_residual import adam_step_size, limit_norm_growth, reserve_limiter, slice_scaling

SCALE_TYPES = ("channel", "tensor")
_TINY = 1e-8  # guard of ||R|| in the scaling factor, as Fira's


def apollo_scaling(low_step: torch.Tensor, low_grad: torch.Tensor, side: int, scale_type: str) -> torch.Tensor:
    """The scaling factor ``s = ||R~|| / (||R|| + 1e-8)``, shaped to broadcast over the full gradient.

    Args:
        low_step: ``R~``, the auxiliary Adam's normalised step in the subspace, ``(r, n)`` (left side) or
            ``(m, r)`` (right side).
        low_grad: ``R``, the projected gradient, same shape.
        side: the projection side (``LEFT``: one factor per column, ``(1, n)``; ``RIGHT``: one per row,
            ``(m, 1)``), i.e. per slice along the dimension the projection keeps (the paper's channels).
        scale_type: ``"channel"`` (APOLLO) or ``"tensor"`` (APOLLO-Mini: one factor, ``(1, 1)``).
    """
    if scale_type == "tensor":  # norms of the whole R~, R when they are row shards (FSDP2)
        return (comm.norm(low_step) / (comm.norm(low_grad) + _TINY)).reshape(1, 1)
    return slice_scaling(low_step, low_grad, side)


class APOLLOScaling(ResidualRule):
    """The whole APOLLO update ``lr * scale * limit(G diag(s))``; the inner rule's lifted step is not applied.

    ``s`` is :func:`apollo_scaling` of the auxiliary Adam's normalised step ``R~ = m / (sqrt(v) + eps)``
    *without* bias correction, which sits in the step size ``eta_t = lr sqrt(1 - beta2^t) / (1 - beta1^t)``
    (the paper's Algorithm 1 writes ``R~ = M / (sqrt(V) + eps)``; the authors' code and Fira's do the same).
    The rule reads it off the applied low-rank step as ``coef * low_update / eta_t``, whatever split of
    the coefficient the inner rule uses; for an inner rule without ``betas`` ``eta_t = lr``. The limiter
    (:func:`lowrank_optim.rules.fira_residual.limit_norm_growth`, the piece Fira uses, with its stored
    norm) caps ``||G diag(s)||`` at ``limiter_gamma`` times the previous step's, in those un-corrected
    units and before ``lr`` and ``scale`` (a learning-rate schedule does not trip it); the rule returns
    ``eta_t * scale * limit(G diag(s))``. While the limiter does not bind this is
    ``lr * scale * G diag(s_hat)`` with ``s_hat`` from the bias-corrected step; early in training, when the
    un-corrected step grows (``(1 - beta1^t) / sqrt(1 - beta2^t)`` rises from 3.2 to about 7), the limiter
    damps it, as in the authors' code.

    Group keys:
        scale_type: ``"channel"`` (default, APOLLO) or ``"tensor"`` (APOLLO-Mini).
        limiter_gamma: growth bound gamma (1.01, the paper's and Fira's value); ``None`` disables the limiter.
        scale: the engine's ``scale`` is APOLLO's alpha, the multiplier of the whole update.
    """

    name = "apollo"
    #: scales the raw gradient channel by channel; no G - P P^T G, so a Gaussian random projection is fine
    takes_complement = False
    wants_coef = True
    #: The engine skips its ``add_back`` of the low-rank step: this rule's tensor is the whole update.
    replaces_lift = True
    defaults: ClassVar[dict[str, Any]] = {"scale_type": "channel", "limiter_gamma": 1.01}

    def validate(self, group: Group) -> None:
        check_choice("scale_type", group["scale_type"], SCALE_TYPES)
        if group["limiter_gamma"] is not None:
            check_number("limiter_gamma", group["limiter_gamma"], low=1.0)

    def step(self, grad: torch.Tensor, low_grad: torch.Tensor, low_update: torch.Tensor, projector: Projector,
             proj_state: ProjState, state: dict, group: Group, coef: float = 1.0,
             lr: float = 1.0) -> torch.Tensor | None:
        eta = adam_step_size(lr, state, group)  # Adam's bias correction moves into the step size eta_t
        if eta == 0.0:
            if group["limiter_gamma"] is not None:
                reserve_limiter(state, grad.device)
            return None
        s = apollo_scaling(low_update, low_grad, int(proj_state.get("side", LEFT)), group["scale_type"])
        s.mul_(coef / eta)  # norms of coef * low_update / eta_t: the un-corrected Adam step R~
        update = grad * s
        if group["limiter_gamma"] is not None:
            limit_norm_growth(update, state, float(group["limiter_gamma"]))
        return update.mul_(eta * float(group["scale"]))


def apollo_stack_step(params: list[torch.Tensor], grads: list[torch.Tensor], low: torch.Tensor, update: torch.Tensor,
                      side: int, coef: float, eta: float, states: list[dict], group: Group,
                      grad_norms: tuple[torch.Tensor, tuple[torch.Tensor, ...]],
                      stored: torch.Tensor | None) -> None:
    """:class:`APOLLOScaling`'s update for a stack of ``B`` same-shape matrices, applied to ``params`` in place.

    The same math as :meth:`APOLLOScaling.step` per matrix, with the factors and the limiter as ``(B, ...)``
    tensors: ``s = ||N slices|| / (||R slices|| + 1e-8) * coef / eta`` (one factor per channel, or per matrix for
    ``scale_type="tensor"``), the limiter's norm ``||G diag(s)||`` in closed form from the gradient's slice norms
    (``||G diag(s)||^2 = sum_j s_j^2 ||G_j||^2``), and per matrix one slice-norm and one ``addcmul_`` of
    ``-eta * scale * s / f * G`` (``f`` the limiter's factor). Equals the per-matrix rule to rounding
    (``tests/test_stacks.py``).

    Args:
        params: the ``B`` fp32 ``(m, n)`` weights (weight decay already applied).
        grads: their fp32 ``(m, n)`` gradients.
        low: ``(B, r, n)`` (left side) or ``(B, m, r)`` (right) projected gradients ``R``.
        update: the inner rule's step ``N`` (``num / den``), shaped like ``low``.
        side: ``LEFT`` or ``RIGHT``.
        coef: the inner step's coefficient (shared by the stack).
        eta: Adam's step size with the bias correction folded in (:func:`adam_step_size`), nonzero.
        states: the matrices' states (the limiter's stored norm is read from ``stored``).
        group: the param group (``scale_type``, ``limiter_gamma``, ``scale``).
        grad_norms: a ``(B, ...)`` scratch buffer for the gradients' slice norms and its per-matrix views.
        stored: the ``(B,)`` arena of the limiter's stored norms (``-1``: not measured yet), or ``None`` without
            a limiter.
    """
    dev = low.device
    left = side == LEFT
    b = len(params)
    tensor = group["scale_type"] == "tensor"
    dims = (1, 2) if tensor else ((1,) if left else (2,))
    s = torch.linalg.vector_norm(update, dim=dims, keepdim=True)
    s.div_(torch.linalg.vector_norm(low, dim=dims, keepdim=True).add_(device_scalar(_TINY, dev)))
    s.mul_(device_scalar(coef / eta, dev))
    gamma = group["limiter_gamma"]
    if gamma is not None and stored is not None:
        sq, views = grad_norms
        for g, out in zip(grads, views, strict=True):
            if tensor:
                torch.linalg.vector_norm(g, keepdim=True, out=out)
            else:
                torch.linalg.vector_norm(g, dim=0 if left else 1, keepdim=True, out=out)
        sq = torch.mul(sq, sq).mul_(s).mul_(s)
        norm = sq.sum(dim=(1, 2)).sqrt_()  # ||G diag(s)|| per matrix
        factor = torch.div(norm, stored.add(device_scalar(_TINY, dev))).clamp_min_(device_scalar(float(gamma), dev))
        factor.div_(device_scalar(float(gamma), dev))
        factor = torch.where(stored.gt(device_scalar(0.0, dev)), factor, device_scalar(1.0, dev))  # armed
        s.div_(factor.view(b, 1, 1))
        torch.div(norm, factor, out=stored)
    value = -eta * float(group["scale"])
    for w, g, f in zip(params, grads, s.unbind(0), strict=True):
        w.addcmul_(g, f, value=value)


__all__ = ["SCALE_TYPES", "APOLLOScaling", "apollo_scaling", "apollo_stack_step"]
