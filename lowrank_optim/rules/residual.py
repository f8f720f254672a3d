"""Residual rules: what happens to ``G - project_back(project(G))``."""

from __future__ import annotations

import torch

from ..projectors.base import Projector, ProjState
from .base import Group, ResidualRule


class DropResidual(ResidualRule):
    """GaLore's choice: the part of the gradient outside the subspace is discarded."""

    name = "drop"
    takes_complement = False

    def step(self, grad: torch.Tensor, low_grad: torch.Tensor, low_update: torch.Tensor, projector: Projector,
             proj_state: ProjState, state: dict, group: Group) -> torch.Tensor | None:
        return None
