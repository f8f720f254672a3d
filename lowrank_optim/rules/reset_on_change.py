"""Reset on a real subspace change only (FRUGAL's ``reset_statistics``, Zmushko et al. 2025, arXiv:2411.07837)."""

from __future__ import annotations

from ..projectors.base import Projector, ProjState
from ..state import StateStore
from .base import MomentSpec
from .transfer import ResetTransfer


class ResetOnChangeTransfer(ResetTransfer):
    """Zeroes the moments and the bias-correction step, unless the subspace did not change.

    A projector may offer ``same_subspace(old, new) -> bool`` (coordinate and block selections do); when it
    says the refresh kept the same subspace (every coordinate kept at density 1, a block that stays active)
    the moments are still valid and are kept. Without that method every refresh resets, like ``"reset"``.
    The reference FRUGAL code rebuilds a block's state even when it stays active; we keep it, which is what
    makes ``density=1`` exactly AdamW across switches.
    """

    name = "reset_on_change"

    def apply(self, state: dict, old: ProjState, new: ProjState, projector: Projector, specs: list[MomentSpec],
              store: StateStore) -> None:
        same = getattr(projector, "same_subspace", None)
        if same is not None and same(old, new):
            return
        super().apply(state, old, new, projector, specs, store)


__all__ = ["ResetOnChangeTransfer"]
