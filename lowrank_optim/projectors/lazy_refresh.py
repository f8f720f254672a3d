"""Lazy refresh: a longer refresh period for matrices whose subspace keeps still (Q-GaLore's adaptive update
frequency, Zhang et al. 2024, arXiv:2407.08296, with a rotation-invariant measure of the change).

After every real refresh the projector measures how much the subspace moved,
``overlap = ||P_old^T P_new||_F^2 / r`` (1 for the same subspace, about ``r / d`` for unrelated random ones;
invariant to the signs and to any rotation of the basis columns, unlike Q-GaLore's cosine of one column).
If ``overlap >= threshold`` the period multiple doubles (up to ``max_multiple``), otherwise it falls back to 1.
With multiple ``k`` the next ``k - 1`` scheduled refreshes are skipped: the projector returns its state
unchanged but for the countdown, so the engine's schedule (``update_proj_gap``) is untouched, and the transfer
policies see that nothing moved (:meth:`LazyRefresh.was_skipped`: ``reset`` and ``reset_on_change`` keep the
moments across a skipped refresh; ``keep``, ``linear`` and ``match`` are the identity on an unchanged state).

Which projectors take it (``Projector.lazy_refusal`` is ``None``): those whose refresh recomputes the subspace
from the gradient and can keep the old one, ``svd``, ``rsvd`` and ``rsvd_heads`` (stored bases, overlap of the
decoded bases) and ``dct`` (a selection of orthonormal DCT columns: the overlap is the fraction of indices kept,
exactly). Refused by name: ``coap`` and ``online_pca`` (their refreshes are mostly one incremental step of the
basis, not a decomposition: the overlap after a small step is high by construction, so skipping would slow the
basis's own learning instead of saving work), ``gum`` (each period redraws which matrices take the
full-rank branch, exactly gamma of them; a matrix that skipped would break the draw and the 1/q weights that
make the estimate unbiased), ``random`` (a fresh seeded draw every period, independent of the gradient),
``columns`` / ``rows`` / ``entries`` (random coordinates, likewise) and ``blocks`` (the active set follows a
schedule across the group's tensors).

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

    @staticmethod
    def was_skipped(old: dict[str, Any], new: dict[str, Any]) -> bool:
        """Whether ``new`` is ``old`` after a skipped refresh (the lazy schedule is on and no refresh was
        counted): the subspace is the same, so transfer policies leave the moments alone."""
        return "lazy_wait" in new and int(new["refresh"]) == int(old["refresh"])

    def record(self, state: dict[str, Any], overlap: float) -> None:
        """Sets the next period from the overlap just measured (in place)."""
        k = int(state.get("lazy_multiple", 1))
        k = min(2 * k, self.max_multiple) if overlap >= self.threshold else 1
        state["lazy_multiple"] = k
        state["lazy_wait"] = k - 1
        state["overlap"] = float(overlap)


def subspace_overlap(old: torch.Tensor, new: torch.Tensor) -> float:
    """``||Q_old^T Q_new||_F^2 / r`` for two ``(d, r)`` bases, ``Q`` the orthonormal factor of each (QR), ``r`` =
    ``new``'s columns.

    Orthonormalising first makes the measure a function of the two subspaces alone, also for bases whose
    columns are not orthonormal: a quantized basis after decoding (int4's column norms are off by ~1%), COAP's
    corrected basis, online PCA's. For orthonormal bases it equals ``||old^T new||_F^2 / r`` up to rounding.
    The QR costs ``O(d r^2)``, small next to the decomposition of the refresh it follows.
    """
    r = new.shape[1]
    if r == 0:
        return 1.0
    q_old = torch.linalg.qr(old.double(), mode="reduced").Q
    q_new = torch.linalg.qr(new.double(), mode="reduced").Q
    return float((q_old.T @ q_new).square().sum()) / r


__all__ = ["LazyRefresh", "subspace_overlap"]
