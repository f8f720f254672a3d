"""Row shards of FSDP2 parameters: layouts and the collectives that move whole rows between ranks.

``fully_shard`` splits dim 0 of every parameter with torch's chunk rule: ``c = ceil(L / k)`` rows per rank,
rank ``i`` holds rows ``[i c, min((i + 1) c, L))`` (possibly none). Every tensor the optimizer shards
(moments, bases) is split the same way along one axis, so one gather / scatter of padded chunks serves all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from . import comm

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - very old torch: nothing is ever a DTensor
    DTensor = None  # type: ignore[assignment,misc]
    Replicate = Shard = None  # type: ignore[assignment,misc]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 parameter or gradient)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (``t`` itself when it is not a ``DTensor``); shares storage."""
    return t.to_local() if is_dtensor(t) else t


def chunk(length: int, world: int, rank: int) -> tuple[int, int]:
    """``(offset, size)`` of rank ``rank``'s chunk of an axis of ``length`` split over ``world`` ranks
    (torch's ``Shard`` rule: chunks of ``ceil(length / world)``, trailing ranks possibly empty)."""
    c = -(-length // world) if length else 0
    offset = min(rank * c, length)
    return offset, max(0, min(length, offset + c) - offset)


@dataclass(frozen=True)
class Layout:
    """Where a ``Shard(0)`` parameter lives: its mesh, process group, this rank and the world size."""

    mesh: Any
    group: Any
    rank: int
    world: int

    def rows(self, length: int) -> tuple[int, int]:
        """``(offset, size)`` of this rank's chunk of an axis of ``length``."""
        return chunk(length, self.world, self.rank)


def check_placement(p: torch.Tensor, where: str) -> None:
    """Raises ``ValueError`` unless ``p`` is placed ``Shard(0)`` on a 1-D mesh (FSDP2 without HSDP)."""
    placements = tuple(p.placements)
    if p.device_mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard) \
            or placements[0].dim != 0:
        raise ValueError(f"Invalid params: {where} is a DTensor placed {placements} on a {p.device_mesh.ndim}-D "
                         "mesh; lowrank_optim supports FSDP2's Shard(0) on a 1-D mesh (no HSDP, no tensor "
                         "parallelism)")


def layout(p: torch.Tensor) -> Layout:
    """The :class:`Layout` of a ``Shard(0)`` DTensor parameter."""
    mesh = p.device_mesh
    group = mesh.get_group()
    return Layout(mesh, group, dist.get_rank(group), dist.get_world_size(group))


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t.contiguous()
    out = t.new_zeros((rows, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def all_gather_rows(part: torch.Tensor, length: int, lay: Layout) -> torch.Tensor:
    """The whole tensor whose dim-0 chunks the ranks hold (``part``: this rank's chunk); every rank gets it."""
    c = -(-length // lay.world) if length else 0
    padded = _pad_rows(part, c)
    bufs = [torch.empty_like(padded) for _ in range(lay.world)]
    comm._count(padded, lay.world - 1)
    dist.all_gather(bufs, padded, group=lay.group)
    return torch.cat(bufs)[:length]


def all_gather_cols(part: torch.Tensor, length: int, lay: Layout) -> torch.Tensor:
    """:func:`all_gather_rows` along dim 1 (column chunks of a 2-D tensor)."""
    return all_gather_rows(part.T, length, lay).T


def gather_rows_to(part: torch.Tensor, length: int, lay: Layout, owner: int) -> torch.Tensor | None:
    """The whole tensor on rank ``owner`` of the group (``None`` elsewhere): one gather of padded chunks."""
    c = -(-length // lay.world) if length else 0
    padded = _pad_rows(part, c)
    bufs = [torch.empty_like(padded) for _ in range(lay.world)] if lay.rank == owner else None
    comm._count(padded, (lay.world - 1) / lay.world)
    dist.gather(padded, bufs, dst=dist.get_global_rank(lay.group, owner), group=lay.group)
    return torch.cat(bufs)[:length] if bufs is not None else None


def broadcast_from(obj: Any, lay: Layout, owner: int) -> Any:
    """Rank ``owner``'s ``obj`` (a dict of ints and tensors, nested one level) on every rank: the ints by
    ``broadcast_object_list``, the tensors by ``broadcast`` (their shapes and dtypes travel with the ints)."""
    src = dist.get_global_rank(lay.group, owner)
    meta: list[Any] = [None]
    if lay.rank == owner:
        meta[0] = {k: (("tensor", tuple(v.shape), v.dtype, v.device.type) if isinstance(v, torch.Tensor)
                       else ("value", v)) for k, v in obj.items()}
    dist.broadcast_object_list(meta, src=src, group=lay.group)
    out: dict[str, Any] = {}
    for k, (kind, *rest) in meta[0].items():
        if kind == "value":
            out[k] = rest[0]
            continue
        shape, dtype, device_type = rest  # the device type ("cuda": this rank's current device)
        t = obj[k].contiguous() if lay.rank == owner else torch.empty(shape, dtype=dtype, device=device_type)
        comm._count(t, (lay.world - 1) / lay.world)
        dist.broadcast(t, src=src, group=lay.group)
        out[k] = t
    return out


def split_axis(name: str, ndim: int, low_ndim: int, dim: int | None) -> int | None:
    """The axis of moment ``name`` (``ndim`` axes) split across ranks when the inner rule's tensor (``low_ndim``
    axes) is split along ``dim``: the same axis for a moment shaped like that tensor; axis 0 of Adafactor's
    row statistic (``*_row``) when rows are split, of its column statistic (``*_col``) when columns are;
    ``None`` (whole on every rank) otherwise."""
    if dim is None:
        return None
    if ndim == low_ndim:
        return dim
    if ndim == 1 and ((name.endswith("_row") and dim == 0) or (name.endswith("_col") and dim == 1)):
        return 0
    return None


@dataclass(frozen=True)
class Split:
    """How this rank's moments sit in the whole moments: the inner rule's tensor of global shape ``shape`` is
    split along ``dim`` and this rank's chunk starts at ``offset`` along it."""

    dim: int
    offset: int
    shape: tuple[int, ...]

    def place(self, name: str, local_shape: tuple[int, ...]) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
        """``(origin, global_shape)`` of this rank's part of moment ``name`` (``(None, None)``: whole here)."""
        axis = split_axis(name, len(local_shape), len(self.shape), self.dim)
        if axis is None:
            return None, None
        origin = [0] * len(local_shape)
        origin[axis] = self.offset
        whole = list(local_shape)
        whole[axis] = self.shape[axis] if len(local_shape) == len(self.shape) else self.shape[self.dim]
        return tuple(origin), tuple(whole)


def wrap(t: torch.Tensor, lay: Layout, dim: int | None, global_shape: tuple[int, ...]) -> torch.Tensor:
    """``t`` (this rank's chunk along ``dim``, or the whole tensor when ``dim`` is ``None``) as a DTensor on
    the parameter's mesh, sharing storage: what ``torch.distributed.checkpoint`` reshards by placement."""
    placement = Replicate() if dim is None else Shard(dim)
    stride = torch.empty(global_shape, dtype=torch.float32, device="meta").stride()
    return DTensor.from_local(t, lay.mesh, [placement], run_check=False, shape=torch.Size(global_shape),
                              stride=stride)


__all__ = ["Layout", "Split", "all_gather_cols", "all_gather_rows", "broadcast_from", "check_placement", "chunk",
           "gather_rows_to", "is_dtensor", "layout", "local", "split_axis", "wrap"]
