"""Adam with decoupled weight decay (Loshchilov and Hutter 2019, arXiv:1711.05101)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .._validation import check_betas, check_number
from ..state import in_layout, is_dense
from .base import Direction, Group, InnerRule, MomentSpec


class AdamRule(InnerRule):
    """Adam through torch's fused AdamW kernel (``torch._fused_adamw_``), one pass per tensor.

    ``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2``,
    step ``= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.

    A plain parameter is bit-identical to ``torch.optim.AdamW(fused=True)`` and agrees with the default
    ``torch.optim.AdamW`` to rounding. For a projected gradient the same kernel writes the Adam direction
    into a scratch buffer (``lr=-1`` on a zero "parameter"), which is then projected back.
    Where the fused kernel is unavailable (a device without it) the rule falls back to torch's
    single-tensor operation order.

    The fused kernel walks raw storage, so its four operands must share one dense memory layout: the
    gradient and moments are brought into the parameter's layout (the store already creates a plain
    parameter's moments in it, so a transposed or ``channels_last`` weight costs no copy) and a non-dense
    parameter (a strided slice) is updated through a contiguous copy written back.

    This differs from galore-torch's HF-style Adam, which adds ``eps`` to ``sqrt(v)`` *before* folding
    the bias correction into the step size: the two agree up to ``eps * (1 - sqrt(1 - b2^t))`` in the
    denominator.
    """

    name = "adam"
    defaults: ClassVar[dict[str, Any]] = {"betas": (0.9, 0.999), "eps": 1e-8}

    def validate(self, group: Group) -> None:
        check_betas("betas", group["betas"])
        check_number("eps", group["eps"], low=0.0)

    def moments(self, shape: tuple[int, ...], group: Group) -> list[MomentSpec]:
        return [MomentSpec("exp_avg", shape, True), MomentSpec("exp_avg_sq", shape, False)]

    @staticmethod
    def _fused(target: torch.Tensor, grad: torch.Tensor, moments: dict[str, torch.Tensor], step: int,
               group: Group, lr: float, weight_decay: float) -> bool:
        beta1, beta2 = group["betas"]
        work = target if is_dense(target) else target.contiguous()
        exp_avg, exp_avg_sq = in_layout(moments["exp_avg"], work), in_layout(moments["exp_avg_sq"], work)
        try:
            torch._fused_adamw_([work], [in_layout(grad, work)], [exp_avg], [exp_avg_sq], [],
                                [torch.tensor(float(step), dtype=torch.float32, device=work.device)], lr=lr,
                                beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=group["eps"],
                                amsgrad=False, maximize=False)
        except (RuntimeError, NotImplementedError, AttributeError):
            return False
        if work is not target:
            target.copy_(work)
        # copies made for the kernel replace the loaded moments (the engine saves what the dict holds)
        moments["exp_avg"], moments["exp_avg_sq"] = exp_avg, exp_avg_sq
        return True

    def apply_plain(self, target: torch.Tensor, grad: torch.Tensor, moments: dict[str, torch.Tensor], step: int,
                    group: Group) -> bool:
        return self._fused(target, grad, moments, step, group, float(group["lr"]), group["weight_decay"])

    def direction(self, grad: torch.Tensor, moments: dict[str, torch.Tensor], step: int, group: Group,
                  param: torch.Tensor) -> Direction:
        lr = float(group["lr"])
        buf = torch.zeros_like(grad)
        if self._fused(buf, grad, moments, step, group, -1.0, 0.0):
            return Direction(buf, None, lr, lr)
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = moments["exp_avg"], moments["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(group["eps"])
        return Direction(exp_avg, denom, lr / bias_correction1, lr)
