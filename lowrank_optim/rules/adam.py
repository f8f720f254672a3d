"""Adam with decoupled weight decay (Loshchilov and Hutter 2019, arXiv:1711.05101)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .._validation import check_betas, check_number
from ..state import in_layout, is_dense
from .base import Direction, Group, InnerRule, MomentSpec, step_tensor


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
                                [step_tensor(step, work.device)], lr=lr,
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
                    group: Group, plan: Any = None) -> bool:
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

    def stack_direction(self, grads: torch.Tensor, moments: dict[str, torch.Tensor], step: int, group: Group,
                        params: list[torch.Tensor]) -> Direction | None:
        """One fused kernel call on the stack's ``(B, ...)`` gradient and moment arenas (one tensor each, so the
        kernel's per-tensor work is paid once per stack); ``None`` where the kernel is unavailable."""
        exp_avg, exp_avg_sq = moments["exp_avg"], moments["exp_avg_sq"]
        if any(t.dtype != torch.float32 or not t.is_contiguous() for t in (grads, exp_avg, exp_avg_sq)):
            return None
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        buf = torch.zeros_like(grads)
        try:
            torch._fused_adamw_([buf], [grads], [exp_avg], [exp_avg_sq], [], [step_tensor(step, grads.device)],
                                lr=-1.0, beta1=beta1, beta2=beta2, weight_decay=0.0, eps=group["eps"],
                                amsgrad=False, maximize=False)
        except (RuntimeError, NotImplementedError, AttributeError):
            return None
        return Direction(buf, None, lr, lr)

    def directions(self, grads: list[torch.Tensor], moments: list[dict[str, torch.Tensor]], steps: list[int],
                   group: Group, params: list[torch.Tensor]) -> list[Direction]:
        """One fused kernel over every projected gradient (the scratch buffers carved from one zero block);
        equal to :meth:`direction` per tensor. Falls back to it when an operand is not contiguous fp32."""
        tensors = [t for g, m in zip(grads, moments, strict=True) for t in (g, m["exp_avg"], m["exp_avg_sq"])]
        if not grads or any(t.dtype != torch.float32 or not t.is_contiguous() for t in tensors):
            return super().directions(grads, moments, steps, group, params)
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        flat = torch.zeros(sum(g.numel() for g in grads), dtype=torch.float32, device=grads[0].device)
        bufs = [b.view(g.shape) for b, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)]
        try:
            torch._fused_adamw_(bufs, list(grads), [m["exp_avg"] for m in moments],
                                [m["exp_avg_sq"] for m in moments], [],
                                [step_tensor(s, g.device) for s, g in zip(steps, grads, strict=True)], lr=-1.0,
                                beta1=beta1, beta2=beta2, weight_decay=0.0, eps=group["eps"], amsgrad=False,
                                maximize=False)
        except (RuntimeError, NotImplementedError, AttributeError):
            return super().directions(grads, moments, steps, group, params)
        return [Direction(b, None, lr, lr) for b in bufs]
