"""Registries of inner rules, residual rules and transfer policies (stateless singletons)."""

from __future__ import annotations

from .adafactor import AdafactorRule
from .adam import AdamRule
from .apollo_scaling import APOLLOScaling
from .base import Direction, InnerRule, MomentSpec, ResidualRule, TransferPolicy
from .fira_residual import FiraResidual
from .muon import MuonRule
from .reset_on_change import ResetOnChangeTransfer
from .residual import DropResidual
from .sgd import SGDMomentumRule
from .sparse_residual import SparseResidual
from .state_free import SGDResidual, SignResidual
from .transfer import KeepTransfer, LinearTransfer, MatchTransfer, ResetTransfer

INNER_RULES: dict[str, InnerRule] = {r.name: r for r in (AdamRule(), AdafactorRule(), SGDMomentumRule(),
                                                                  MuonRule())}
RESIDUAL_RULES: dict[str, ResidualRule] = {r.name: r for r in (DropResidual(), FiraResidual(), SignResidual(),
                                                                     SGDResidual(), SparseResidual(),
                                                                     APOLLOScaling())}
TRANSFER_POLICIES: dict[str, TransferPolicy] = {t.name: t for t in (
    KeepTransfer(), ResetTransfer(), LinearTransfer(), MatchTransfer(),
    ResetOnChangeTransfer())}

__all__ = ["INNER_RULES", "RESIDUAL_RULES", "TRANSFER_POLICIES", "Direction", "InnerRule", "MomentSpec",
           "ResidualRule", "TransferPolicy"]
