"""FRUGAL's state-free residual rules: signSGD or plain SGD on ``G - lift(project(G))``
(Zmushko et al. 2025, arXiv:2411.07837)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .._validation import check_number
from ..projectors.base import Projector, ProjState
from .base import Group, ResidualRule


def complement(grad: torch.Tensor, low_grad: torch.Tensor, projector: Projector,
               proj_state: ProjState) -> torch.Tensor | None:
    """``G - lift(project(G))`` (no scale), or ``None`` when it is identically zero.

    Selection projectors (coordinates, blocks) may offer ``complement(grad, state)``, which skips the
    lift-and-subtract (an active block's complement is ``None``, an inactive one's is ``G`` itself).
    """
    own = getattr(projector, "complement", None)
    if own is not None:
        return own(grad, proj_state)
    return projector.residual(grad, low_grad, proj_state)


class _StateFree(ResidualRule):
    """Shared validation: the state-free part steps with ``lr * scale * inactive_lr_scale``.

    ``scale`` is the engine's multiplier of the state-full update (FRUGAL's ``proj_params_lr_scale``), so
    the state-free part's lr is ``lr * proj_params_lr_scale * inactive_lr_scale`` as in the reference.
    """

    defaults: ClassVar[dict[str, Any]] = {"inactive_lr_scale": 1.0}

    def validate(self, group: Group) -> None:
        check_number("inactive_lr_scale", group["inactive_lr_scale"], low=0.0)
        if group["lr"] is None:
            raise ValueError(f"Invalid lr: None, the state-free residual {self.name!r} needs a learning rate")

    def _lr(self, group: Group) -> float:
        return float(group["lr"]) * float(group["scale"]) * float(group["inactive_lr_scale"])

    def _direction(self, rest: torch.Tensor, lr: float) -> torch.Tensor:
        """The step to subtract, as a new tensor (``rest`` may be the gradient itself)."""
        raise NotImplementedError

    def step(self, grad: torch.Tensor, low_grad: torch.Tensor, low_update: torch.Tensor, projector: Projector,
             proj_state: ProjState, state: dict, group: Group) -> torch.Tensor | None:
        rest = complement(grad, low_grad, projector, proj_state)
        if rest is None:
            return None
        return self._direction(rest, self._lr(group))


class SignResidual(_StateFree):
    """signSGD on the complement: subtract ``lr * scale * inactive_lr_scale * sign(G - lift(R))``."""

    name = "sign"

    def _direction(self, rest: torch.Tensor, lr: float) -> torch.Tensor:
        return torch.sign(rest).mul_(lr)


class SGDResidual(_StateFree):
    """Plain SGD on the complement: subtract ``lr * scale * inactive_lr_scale * (G - lift(R))``."""

    name = "sgd"

    def _direction(self, rest: torch.Tensor, lr: float) -> torch.Tensor:
        return rest * lr


__all__ = ["SGDResidual", "SignResidual", "complement"]
