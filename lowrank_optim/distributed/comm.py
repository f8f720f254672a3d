"""The communication part of the engine: reductions over the ranks that hold one sharded tensor.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) a parameter is a ``DTensor`` placed ``Shard(0)`` on a 1-D
device mesh: rank i holds rows ``W_i`` of ``W``. Elementwise work is local; whatever sums over the split axis
(Adafactor's column statistics, an RMS, Fira's limiter norm) asks this module, which all-reduces over the
parameter's mesh group while a :func:`sharded` context is active and is the identity otherwise (one process,
DDP, or a gathered tensor), so the single-process code path keeps its exact operation order.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Sharding:
    """How the tensor an inner rule sees is split across the ranks of ``group``.

    Attributes:
        group: the process group of the parameter's device mesh.
        dim: the axis of the rule's tensor split across ranks (``None``: every rank holds it whole).
        shape: global shape of the rule's tensor.
        param_numel: elements of the whole parameter (always row-sharded, ``Shard(0)``).
    """

    group: Any
    dim: int | None
    shape: tuple[int, ...]
    param_numel: int


_CURRENT: ContextVar[Sharding | None] = ContextVar("lowrank_optim_sharding", default=None)


def current() -> Sharding | None:
    """The active :class:`Sharding`, or ``None`` (one process: every reduction is local)."""
    return _CURRENT.get()


@contextlib.contextmanager
def sharded(spec: Sharding | None) -> Iterator[None]:
    """Makes ``spec`` the active sharding inside the block (``None``: local reductions)."""
    token = _CURRENT.set(spec)
    try:
        yield
    finally:
        _CURRENT.reset(token)


#: Bytes the optimizer's own collectives moved into this rank, by phase (a benchmark reads and resets it), in the
#: usual ring model averaged over ranks: all-reduce ``2 (k-1)/k T``, all-gather ``(k-1) c`` for chunks of ``c``,
#: gather to one rank ``(k-1) c / k``, broadcast ``(k-1)/k T``.
TRAFFIC: dict[str, float] = {"step": 0.0, "refresh": 0.0}
_PHASE: ContextVar[str] = ContextVar("lowrank_optim_phase", default="step")


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Counts the collectives inside the block under ``name`` in :data:`TRAFFIC`."""
    token = _PHASE.set(name)
    try:
        yield
    finally:
        _PHASE.reset(token)


def _count(t: torch.Tensor, factor: float) -> None:
    """Adds ``factor`` times the bytes of ``t`` to the current phase of :data:`TRAFFIC`."""
    TRAFFIC[_PHASE.get()] = TRAFFIC.get(_PHASE.get(), 0.0) + factor * t.numel() * t.element_size()


def _world(group: Any) -> int:
    return dist.get_world_size(group)


def all_reduce(t: torch.Tensor, group: Any) -> torch.Tensor:
    """In-place SUM all-reduce of ``t`` over ``group`` (returns ``t``)."""
    k = _world(group)
    _count(t, 2 * (k - 1) / k)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def all_reduce_max(t: torch.Tensor, group: Any) -> torch.Tensor:
    """In-place MAX all-reduce of ``t`` over ``group`` (returns ``t``)."""
    k = _world(group)
    _count(t, 2 * (k - 1) / k)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def reduce_split(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Completes, in place, a sum over axis ``dim`` of the rule's tensor when that axis is split across ranks
    (``t`` holds this rank's partial sums); the identity otherwise."""
    spec = current()
    if spec is not None and spec.dim == dim:
        all_reduce(t, spec.group)
    return t


def length(dim: int, local: int) -> int:
    """Global length of axis ``dim`` of the rule's tensor (``local`` when nothing is split)."""
    spec = current()
    return spec.shape[dim] if spec is not None and spec.dim is not None else local


def mean(v: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean of a vector ``v`` that runs along axis ``dim`` of the rule's tensor (0-d tensor); completed over
    the ranks when that axis is split."""
    spec = current()
    if spec is None or spec.dim != dim:
        return v.mean()
    return all_reduce(v.sum().reshape(1), spec.group).div_(spec.shape[dim]).reshape(())


def reduce_total(total: torch.Tensor) -> torch.Tensor:
    """Completes a sum over every element of the rule's tensor (``total``: this rank's part, 0-d)."""
    spec = current()
    if spec is None or spec.dim is None:
        return total
    return all_reduce(total.reshape(1), spec.group).reshape(())


def rms(t: torch.Tensor, *, param: bool = False) -> float:
    """Root mean square of the whole tensor ``t`` is a shard of: the rule's tensor, or the parameter when
    ``param`` is set. One process: ``||t|| / sqrt(numel)``, unchanged."""
    spec = current()
    if spec is None or (not param and spec.dim is None):
        return float(t.norm(2) / math.sqrt(t.numel()))
    total = all_reduce(t.float().square().sum().reshape(1), spec.group)
    numel = spec.param_numel if param else math.prod(spec.shape)
    return math.sqrt(float(total) / max(numel, 1))


def norm(t: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of the whole rule's tensor ``t`` is a shard of (0-d tensor); ``t.norm()`` when nothing is
    split (one process: unchanged)."""
    spec = current()
    if spec is None or spec.dim is None:
        return t.norm()
    return all_reduce(t.float().square().sum().reshape(1), spec.group).sqrt().reshape(())


def param_norm(t: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of the whole parameter-shaped tensor ``t`` is a row shard of (0-d tensor)."""
    spec = current()
    if spec is None:
        return t.norm()
    return all_reduce(t.float().square().sum().reshape(1), spec.group).sqrt().reshape(())


__all__ = ["TRAFFIC", "Sharding", "all_reduce", "all_reduce_max", "current", "length", "mean", "norm", "param_norm",
           "phase", "reduce_split", "reduce_total", "rms", "sharded"]
