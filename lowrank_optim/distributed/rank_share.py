"""What the fullest FSDP2 rank holds of each tensor, for the memory planner (:func:`lowrank_optim.plan_memory`).

``fully_shard`` splits every parameter along its first axis by torch's ``Shard`` rule (:func:`.shards.chunk`):
chunks of ``ceil(d0 / K)`` rows, so rank 0 holds the largest chunk of every tensor at once and is the fullest
rank. Its share of a tensor whose first axis is ``d0`` is ``ceil(d0 / K) / d0``, which is ``1 / K`` only when
``K`` divides ``d0``. The gap is largest for MoE expert stacks ``(E, m, n)``, split by whole experts: with
``E = 8`` experts on ``K = 16`` ranks, rank 0 holds one expert (``1 / 8`` of the stack's weights, gradients and
state), not ``1 / 16``. Elementwise tensors (weights, gradients, plain moments) and whole experts scale with the
rows they hold, so these shares are exact for them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from fractions import Fraction

from .shards import chunk


def fullest_share(shape: Sequence[int], shards: int) -> Fraction:
    """The fraction of a tensor of ``shape`` held by the fullest rank (rank 0) of ``shards`` FSDP2 ranks.

    Args:
        shape: the whole tensor's shape (a 0-d tensor is replicated: share 1).
        shards: FSDP2 ranks, ``>= 1``.

    Returns:
        ``ceil(shape[0] / shards) / shape[0]`` (1 for a 0-d tensor or an empty first axis).
    """
    if not shape or int(shape[0]) == 0:
        return Fraction(1)
    d0 = int(shape[0])
    return Fraction(chunk(d0, shards, 0)[1], d0)


def fullest_bytes(parts: Iterable[tuple[int, Sequence[int]]], shards: int) -> int:
    """``ceil(sum(bytes * fullest_share(shape)))`` over ``(bytes, shape)`` pairs: what rank 0 holds of them (equal to
    ``ceil(sum(bytes) / shards)`` when ``shards`` divides every first axis)."""
    return math.ceil(sum((Fraction(int(b)) * fullest_share(s, shards) for b, s in parts), Fraction(0)))


__all__ = ["fullest_bytes", "fullest_share"]
