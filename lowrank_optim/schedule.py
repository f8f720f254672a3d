"""When a projected matrix refreshes its subspace.

A matrix refreshes every ``update_proj_gap`` steps (``T``): at steps ``T, 2T, ...`` after its first step
(GaLore's schedule), which is the default. This module is the one place that decides it, so the engine's
per-matrix and batched paths cannot disagree.
"""

from __future__ import annotations


def refresh_due(step: int, gap: int, phase: int = 0) -> bool:
    """Whether a matrix that has taken ``step`` steps refreshes before its next one.

    Args:
        step: steps already taken by the matrix (its ``state["step"]``); step 0 is the first step, which
            initialises the subspace instead.
        gap: the refresh period ``update_proj_gap``, in steps.
        phase: offset in ``[0, gap)``: the matrix refreshes when ``(step - phase) % gap == 0`` and ``step > 0``.
    """
    return step > 0 and (step - phase) % gap == 0


__all__ = ["refresh_due"]
