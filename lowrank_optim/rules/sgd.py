"""SGD with heavy-ball momentum (``torch.optim.SGD``'s rule, no dampening, no Nesterov)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .._validation import check_number
from .base import Direction, Group, InnerRule, MomentSpec


class SGDMomentumRule(InnerRule):
    """``buf <- momentum * buf + g``; step ``= lr * buf``.

    Linear and rotation invariant, so with a full-rank orthonormal basis GaLore reduces to it exactly
    (``P (P^T buf) = buf``), which the tests use to prove the engine's plumbing.
    """

    name = "sgd"
    defaults: ClassVar[dict[str, Any]] = {"momentum": 0.9}

    def validate(self, group: Group) -> None:
        check_number("momentum", group["momentum"], low=0.0, high=1.0, high_open=True)

    def moments(self, shape: tuple[int, ...], group: Group) -> list[MomentSpec]:
        return [MomentSpec("momentum_buffer", shape, True)] if group["momentum"] > 0 else []

    def direction(self, grad: torch.Tensor, moments: dict[str, torch.Tensor], step: int, group: Group,
                  param: torch.Tensor) -> Direction:
        lr = float(group["lr"])
        if group["momentum"] == 0:
            return Direction(grad, None, lr, lr)
        buf = moments["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(grad)
        return Direction(buf, None, lr, lr)
