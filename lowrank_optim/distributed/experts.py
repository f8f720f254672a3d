"""FSDP2 MoE expert stacks: each rank steps the whole experts it holds, and checkpoints stack them.

An expert parameter ``(E, m, n)`` (more leading axes ``(A, B, ..., m, n)`` are ``E = A B ...`` matrices,
:mod:`lowrank_optim.plan`) is split by ``fully_shard`` along its first axis, so rank ``i`` holds whole experts:
the contiguous run ``first, ..., first + count - 1`` of the stack (possibly none; torch's chunk rule, uneven
allowed). Every expert is its own matrix with its own basis, moments and counters, so its whole low-rank step
(projection, refresh, inner rule, residual, lift) is the single-process step on that rank's experts, with no
traffic and the state divided by construction. What makes k ranks equal one process is that every per-matrix
identity uses the expert's index in the whole stack: the seeds of random projections and of the stores'
stochastic rounding (``derive_seed(group seed, parameter index, expert)``), the position among the group's
matrices (FRUGAL's and GUM's draws, the staggered refresh phases), and the checkpoint layout below. Each expert's
refresh is computed on the one rank that holds it (never repeated). Every preset runs this way, including those
whose 2-D matrices run replicated (GUM's Newton-Schulz, GaLore+'s sparse residual, a quantized basis): all of
their parts act on one whole matrix.

Checkpoints: :meth:`~lowrank_optim.engine.LowRankOptimizer.state_dict` exports an expert parameter's per-matrix
states (``state["matrices"]``, a list in memory) as one dict of stacked values, in one process and under FSDP2
alike: each tensor of shape ``S`` becomes ``(*lead, *S)`` (``lead`` the parameter's leading axes), each int or
float becomes an ``int64`` / ``float64`` tensor of shape ``lead``, listed in the string ``python_scalars`` so a
load gives back the Python numbers. Under FSDP2 every stacked tensor is a ``DTensor`` placed ``Shard(0)`` along
the first leading axis (the parameter's own split), so ``torch.distributed.checkpoint`` saves each expert once
and reshards to any world size (2 -> 1, 2 -> 4), and a full (gathered) optimizer state dict is exactly the
single-process one. An expert's 8-bit codes and block ``absmax`` are its own (the blocks never cross experts), so
they move as they are and a resharded resume is bit-exact. A rank that holds no expert exports empty ``(0, ...)``
tensors of the same keys, from a skeleton of one expert's state built on the ``meta`` device.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any

import torch

from .shards import Layout, local, wrap

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import LowRankOptimizer

#: The key of the stacked dict that names (dot-separated paths, comma-joined) the entries that were Python numbers.
SCALARS = "python_scalars"
#: Refreshes of a rank's experts run here (a world of one), never through an owner rank.
_HERE = Layout(None, None, 0, 1)


def span(p: torch.Tensor, lay: Layout) -> tuple[int, int]:
    """``(first, count)``: the experts of the stack ``p`` (a ``Shard(0)`` ``DTensor``) this rank holds, as indices
    in the whole stack (``count`` may be 0)."""
    per = math.prod(int(s) for s in p.shape[1:-2])  # matrices per index of the first axis
    offset, size = lay.rows(int(p.shape[0]))
    return offset * per, size * per


def step(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor, index: int, lay: Layout) -> None:
    """One step of this rank's experts of ``p``: the engine's single-process step on the local experts, each
    known by its index in the whole stack; refreshes computed here (each expert lives on one rank)."""
    from .fsdp import _ONCE

    first, _ = span(p, lay)
    token = _ONCE.set(_HERE)
    try:
        opt._step_param(group, p, index, param=local(p), grad=local(p.grad), first_matrix=first)
    finally:
        _ONCE.reset(token)


def skeleton(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor, index: int) -> dict[str, Any]:
    """One expert's state as a fresh first step allocates it, on the ``meta`` device (keys, shapes, dtypes)."""
    from ..update import apply_step, init_state

    parts = opt._parts(group)
    shape = tuple(int(s) for s in p.shape[-2:])
    w = torch.empty(shape, dtype=torch.float32, device="meta")
    g = torch.empty(shape, dtype=torch.float32, device="meta")
    sub: dict[str, Any] = {}
    init_state(sub, group, w, g, parts.projector, parts.inner, parts.store, index,
               lambda: opt._planner.layout(group, p, 0), 0)
    with contextlib.suppress(RuntimeError, NotImplementedError):  # keys a first step adds (Fira's limiter norm)
        apply_step(sub, group, w, g, parts, True)
    return sub


def stack(subs: list[dict[str, Any]], like: dict[str, Any], lead: tuple[int, ...], lay: Layout | None,
          device: torch.device) -> dict[str, Any]:
    """The per-expert states ``subs`` (this rank's, in stack order; already in their export form) as one dict of
    stacked values (see the module). ``like`` is one expert's exported state (keys, shapes and dtypes for a rank
    with no expert); ``lead`` the leading axes of the whole parameter; ``lay`` its layout (``None``: not a
    ``DTensor``, the stacked tensors stay plain)."""
    names: list[str] = []
    local_lead = (len(subs) // max(1, math.prod(lead[1:])), *lead[1:])

    def build(path: str, proto: dict[str, Any], values: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in sorted(proto):  # one order on every rank (a full state dict gathers entry by entry)
            name = f"{path}{key}"
            ref = proto[key]
            if isinstance(ref, dict):
                out[key] = build(name + ".", ref, [v[key] for v in values])
                continue
            if isinstance(ref, torch.Tensor):
                if values:
                    shapes = {tuple(v[key].shape) for v in values}
                    if len(shapes) != 1:
                        raise RuntimeError(f"expert states differ in the shape of {name!r}: {sorted(shapes)}")
                    t = torch.stack([v[key] for v in values])
                else:
                    t = torch.empty((0, *ref.shape), dtype=ref.dtype, device=device)
                t = t.reshape(*local_lead, *ref.shape)
                whole = (*lead, *(int(s) for s in ref.shape))
            elif isinstance(ref, (bool, int, float)):
                names.append(name)
                dtype = torch.float64 if isinstance(ref, float) else torch.int64
                t = torch.tensor([v[key] for v in values], dtype=dtype, device=device).reshape(local_lead)
                whole = lead
            else:
                raise TypeError(f"expert state entry {name!r} of type {type(ref).__name__} cannot be stacked")
            out[key] = wrap(t, lay, 0, whole) if lay is not None else t
        return out

    proto = subs[0] if subs else like
    out = build("", proto, subs)
    out[SCALARS] = ",".join(names)
    return out


def unstack(stacked: dict[str, Any], lead_ndim: int) -> list[dict[str, Any]]:
    """The inverse of :func:`stack` on this rank's plain (unwrapped) tensors, whose first ``lead_ndim`` axes are
    the parameter's leading (expert) axes: one state per local expert, in stack order."""
    scalars = set(filter(None, str(stacked.get(SCALARS, "")).split(",")))

    def split(path: str, d: dict[str, Any]) -> list[dict[str, Any]] | None:
        outs: list[dict[str, Any]] | None = None
        for key, value in d.items():
            if key == SCALARS:
                continue
            name = f"{path}{key}"
            parts: list[Any] | None
            if isinstance(value, dict):
                parts = split(name + ".", value)
            else:
                flat = value.reshape(-1, *value.shape[lead_ndim:])
                if name in scalars:
                    parts = [float(x) if value.dtype == torch.float64 else int(x) for x in flat.tolist()]
                else:
                    parts = [t.clone() for t in flat]
            if parts is None:
                continue
            if outs is None:
                outs = [{} for _ in parts]
            for o, v in zip(outs, parts, strict=True):
                o[key] = v
        return outs

    return split("", stacked) or []


__all__ = ["SCALARS", "skeleton", "span", "stack", "step", "unstack"]
