"""When a projected matrix refreshes its subspace.

A matrix refreshes every ``update_proj_gap`` steps (``T``). By default all matrices refresh together, at steps
``T, 2T, ...`` after their first step (GaLore's schedule), so one step in ``T`` carries every SVD of the model.
With the group key ``refresh_stagger=True`` each matrix refreshes at its own phase ``phi`` in ``[0, T)``: at
steps ``phi, phi + T, ...`` (its first refresh comes after ``phi`` steps, or after ``T`` when ``phi = 0``), with
``phi = floor(position * T / count)`` for the matrix at ``position`` among the group's ``count`` projected
matrices (:meth:`lowrank_optim.plan.Planner.layout`), so the refreshes of a group are spread evenly over the
period. The phase depends only on the matrix's identity in its group, never on the process rank or on how
the engine batches the work. This module is the one place that decides it, so the engine's per-matrix and
batched paths cannot disagree.
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


def stagger_phase(position: int, count: int, gap: int) -> int:
    """The phase in ``[0, gap)`` of the matrix at ``position`` among ``count`` (spread evenly over the period)."""
    if count <= 0 or position < 0:
        return 0
    return (position * gap) // count


__all__ = ["refresh_due", "stagger_phase"]
