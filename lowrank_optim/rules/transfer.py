"""Transfer policies applied to the moments when a subspace is refreshed."""

from __future__ import annotations

from ..projectors.base import Projector, ProjState
from ..state import StateStore
from .base import MomentSpec, TransferPolicy


class KeepTransfer(TransferPolicy):
    """GaLore's choice: moments keep their coordinates and are reused in the new basis."""

    name = "keep"

    def apply(self, state: dict, old: ProjState, new: ProjState, projector: Projector, specs: list[MomentSpec],
              store: StateStore) -> None:
        return None


class ResetTransfer(TransferPolicy):
    """Moments restart from zero and so does the bias-correction step (FRUGAL's ``reset_statistics``)."""

    name = "reset"

    def apply(self, state: dict, old: ProjState, new: ProjState, projector: Projector, specs: list[MomentSpec],
              store: StateStore) -> None:
        for spec in specs:
            store.create(state, spec.name, spec.shape, state[spec.name].device)
        state["inner_step"] = 0
