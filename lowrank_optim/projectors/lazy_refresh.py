"""Lazy refresh: a longer refresh period for matrices whose subspace keeps still (Q-GaLore's adaptive update
frequency, Zhang et al. 2024, arXiv:2407.08296, with a rotation-invariant measure of the change).

After every real refresh the projector measures how much the subspace moved,
``overlap = ||P_old^T P_new||_F^2 / r`` (1 for the same subspace, about ``r / d`` for unrelated random ones;
invariant to the signs and to any rotation of the basis columns, unlike Q-GaLore's cosine of one column).
If ``overlap >= threshold`` the period multiple doubles (up to ``max_multiple``), otherwise it falls back to 1.
With multiple ``k`` the next ``k - 1`` scheduled refreshes are skipped: the projector returns its state
unchanged but for the countdown, so the engine's schedule (``update_proj_gap``) is untouched.

State (in the projector state, ints and one float): ``lazy_multiple`` (the current multiple ``k``),
``lazy_wait`` (scheduled refreshes still to skip), ``overlap`` (the last measured overlap; -1.0 before any).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._validation import check_int, check_number


@dataclass(frozen=True)
class LazyRefresh:
    """Settings of the lazy schedule.

    Attributes:
        threshold: overlap at or above which the subspace counts as still (0.5 by default: on the benchmark
            decoder, GaLore bases 20 steps apart overlap below 0.9 almost always, and 0.5 skips about half
            of the refreshes at no loss, `benchmarks/apollo_check.py`).
        max_multiple: the longest period, in multiples of ``update_proj_gap`` (8 by default).
    """

    threshold: float = 0.5
    max_multiple: int = 8

    def __post_init__(self) -> None:
        check_number("lazy_threshold", self.threshold, low=0.0, high=1.0)
        check_int("lazy_max_multiple", self.max_multiple, low=1)

    @staticmethod
    def start(state: dict[str, Any]) -> None:
        """Adds the schedule's keys to a fresh projector state."""
        state["lazy_multiple"] = 1
        state["lazy_wait"] = 0
        state["overlap"] = -1.0

    @staticmethod
    def skips(state: dict[str, Any]) -> bool:
        """Whether the scheduled refresh of ``state`` is to be skipped."""
        return int(state.get("lazy_wait", 0)) > 0

    @staticmethod
    def skipped(state: dict[str, Any]) -> dict[str, Any]:
        """The state after a skipped refresh (same tensors, countdown one lower)."""
        new = dict(state)
        new["lazy_wait"] = int(state["lazy_wait"]) - 1
        return new

    def record(self, state: dict[str, Any], overlap: float) -> None:
        """Sets the next period from the overlap just measured (in place)."""
        k = int(state.get("lazy_multiple", 1))
        k = min(2 * k, self.max_multiple) if overlap >= self.threshold else 1
        state["lazy_multiple"] = k
        state["lazy_wait"] = k - 1
        state["overlap"] = float(overlap)


def subspace_overlap(old: torch.Tensor, new: torch.Tensor) -> float:
    """``||old^T new||_F^2 / r`` for two ``(d, r)`` bases with orthonormal columns (``r`` = ``new``'s columns)."""
    r = new.shape[1]
    if r == 0:
        return 1.0
    return float((old.T.float() @ new.float()).square().sum()) / r


__all__ = ["LazyRefresh", "subspace_overlap"]
