"""Registries of inner rules, residual rules and transfer policies (stateless singletons)."""

from __future__ import annotations

from .adafactor import AdafactorRule
from .adam import AdamRule
from .base import Direction, InnerRule, MomentSpec, ResidualRule, TransferPolicy
from .residual import DropResidual
from .sgd import SGDMomentumRule
from .transfer import KeepTransfer, ResetTransfer

INNER_RULES: dict[str, InnerRule] = {r.name: r for r in (AdamRule(), AdafactorRule(), SGDMomentumRule())}
RESIDUAL_RULES: dict[str, ResidualRule] = {r.name: r for r in (DropResidual(),)}
TRANSFER_POLICIES: dict[str, TransferPolicy] = {t.name: t for t in (KeepTransfer(), ResetTransfer())}

__all__ = ["INNER_RULES", "RESIDUAL_RULES", "TRANSFER_POLICIES", "Direction", "InnerRule", "MomentSpec",
           "ResidualRule", "TransferPolicy"]
