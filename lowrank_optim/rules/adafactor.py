"""Adafactor (Shazeer and Stern 2018, arXiv:1804.04235), as used by GaLore-Adafactor."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from .._validation import check_number
from .base import Direction, Group, InnerRule, MomentSpec


def _rms(t: torch.Tensor) -> float:
    return float(t.norm(2) / math.sqrt(t.numel()))


class AdafactorRule(InnerRule):
    """Adafactor with the factored second moment, in the HF Transformers formulation.

    ``beta2_t = 1 - t^decay_rate``; for a matrix the second moment is kept as row and column means of
    ``g^2 + eps[0]``; the update ``g / sqrt(v_hat)`` is clipped to RMS ``clip_threshold``, multiplied by
    the learning rate (relative ``min(1e-2, 1/sqrt(t))`` when ``relative_step``, times
    ``max(eps[1], RMS(param))`` when ``scale_parameter``), then averaged by ``beta1`` when given.
    As in HF, the first moment averages lr-scaled updates. Set ``relative_step=False`` to use ``lr``.
    """

    name = "adafactor"
    defaults: ClassVar[dict[str, Any]] = {"eps": (1e-30, 1e-3), "clip_threshold": 1.0, "decay_rate": -0.8,
                                          "beta1": None, "scale_parameter": True, "relative_step": True,
                                          "warmup_init": False}

    def validate(self, group: Group) -> None:
        eps = group["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise TypeError(f"Invalid eps: Adafactor takes a pair (eps1, eps2), got {eps!r}")
        for i, e in enumerate(eps):
            check_number(f"eps[{i}]", e, low=0.0)
        check_number("clip_threshold", group["clip_threshold"], low=0.0, low_open=True)
        check_number("decay_rate", group["decay_rate"], high=0.0)
        if group["beta1"] is not None:
            check_number("beta1", group["beta1"], low=0.0, high=1.0, high_open=True)
        if group["lr"] is None and not group["relative_step"]:
            raise ValueError("Invalid lr: None needs relative_step=True")
        if group["warmup_init"] and not group["relative_step"]:
            raise ValueError("Invalid warmup_init: True needs relative_step=True")

    def moments(self, shape: tuple[int, ...], group: Group) -> list[MomentSpec]:
        specs = []
        if len(shape) == 2:
            specs += [MomentSpec("exp_avg_sq_row", (shape[0],), False),
                      MomentSpec("exp_avg_sq_col", (shape[1],), False)]
        else:
            specs.append(MomentSpec("exp_avg_sq", tuple(shape), False))
        if group["beta1"] is not None:
            specs.append(MomentSpec("exp_avg", tuple(shape), True))
        return specs

    def _lr(self, group: Group, step: int, param: torch.Tensor) -> float:
        if group["relative_step"]:
            min_step = 1e-6 * step if group["warmup_init"] else 1e-2
            lr = min(min_step, 1.0 / math.sqrt(step))
        else:
            lr = float(group["lr"])
        if group["scale_parameter"]:
            lr *= max(group["eps"][1], _rms(param.float()))
        return lr

    def direction(self, grad: torch.Tensor, moments: dict[str, torch.Tensor], step: int, group: Group,
                  param: torch.Tensor) -> Direction:
        lr = self._lr(group, step, param)
        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        eps1 = group["eps"][0]
        if "exp_avg_sq_row" in moments:
            # row / column means of g^2 + eps1 (= mean(g^2) + eps1: eps1 is added to the small vectors only)
            row, col = moments["exp_avg_sq_row"], moments["exp_avg_sq_col"]
            sq = grad.square()
            row_mean = sq.mean(dim=-1).add_(eps1)
            col_mean = sq.mean(dim=-2).add_(eps1)
            del sq
            row.mul_(beta2t).add_(row_mean, alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(col_mean, alpha=1.0 - beta2t)
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            update = grad * r_factor
            update.mul_(col.rsqrt().unsqueeze(-2))
        else:
            v = moments["exp_avg_sq"]
            v.mul_(beta2t).addcmul_(grad, grad, value=1.0 - beta2t).add_(eps1 * (1.0 - beta2t))
            update = v.rsqrt().mul_(grad)
        # RMS clipping and the learning rate in one multiply
        update.mul_(lr / max(1.0, _rms(update) / group["clip_threshold"]))
        if group["beta1"] is not None:
            exp_avg = moments["exp_avg"]
            exp_avg.lerp_(update, 1 - group["beta1"])
            update = exp_avg
        return Direction(update, None, 1.0, lr)
