"""Adam with decoupled weight decay (Loshchilov and Hutter 2019, arXiv:1711.05101)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .._validation import check_betas, check_number
from .base import Direction, Group, InnerRule, MomentSpec


class AdamRule(InnerRule):
    """Adam in ``torch.optim.AdamW``'s exact operation order.

    ``m <- lerp(m, g, 1 - b1)``, ``v <- b2 v + (1 - b2) g^2``,
    step ``= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.

    This differs from galore-torch's HF-style Adam, which adds ``eps`` to ``sqrt(v)`` *before* the
    bias correction is folded into the step size: the two agree up to ``eps * (1 - sqrt(1 - b2^t))``
    in the denominator. We follow torch so that a plain parameter is bit-identical to torch AdamW.
    """

    name = "adam"
    defaults: ClassVar[dict[str, Any]] = {"betas": (0.9, 0.999), "eps": 1e-8}

    def validate(self, group: Group) -> None:
        check_betas("betas", group["betas"])
        check_number("eps", group["eps"], low=0.0)

    def moments(self, shape: tuple[int, ...], group: Group) -> list[MomentSpec]:
        return [MomentSpec("exp_avg", shape, True), MomentSpec("exp_avg_sq", shape, False)]

    def direction(self, grad: torch.Tensor, moments: dict[str, torch.Tensor], step: int, group: Group,
                  param: torch.Tensor) -> Direction:
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        exp_avg, exp_avg_sq = moments["exp_avg"], moments["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(group["eps"])
        return Direction(exp_avg, denom, lr / bias_correction1, lr)
