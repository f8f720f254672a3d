"""GaLore+'s sparse residual (:mod:`lowrank_optim.rules.sparse_residual`) on FSDP2 row shards.

Under FSDP2's sharded mode (:mod:`.fsdp`) the residual rule sees this rank's rows ``G_i`` of a matrix ``G``
(``m x n``), so ``E_i = G_i - lift(R)`` and the warm-up score ``sum E_i^2`` are row-local. The one global operation
is the choice of the ``k`` entries of the whole score, which :func:`select_entries` defines for one process and for
k ranks alike:

* ``t`` is the ``k``-th largest score of the whole matrix (NaN counts as ``+inf``);
* the chosen entries are every entry with a score ``> t``, plus, among the entries whose score ``== t``, those with
  the lowest flat (row-major) indices, as many as it takes to make ``k``.

k ranks get ``t`` from the union of their local top-``k`` candidates (one all-gather of at most ``min(k, c n)``
values per rank, ``c = ceil(m / k_ranks)``) and the ties from a prefix count over the ranks in row order (one
all-gather of two ints per rank): the chosen set is one process's, bit for bit. Each rank keeps the chosen entries of
its own rows (flat indices into its rows, sorted) and their Adam moments; ``residual_first`` (an int, sharded state
only) is the position of its first entry in the whole sorted list, by which the bf16 / 8-bit stores key the
stochastic rounding of the moments as one process would (:class:`.fsdp.ShardStore`). The per-step work stays local.

Checkpoints (:func:`whole_state`, :func:`local_state`): the entries per rank vary in count, so they are exported in
one process's form (every rank all-gathers the length-``k`` sorted global flat indices and the moments, a transient
of ``3 k`` elements) as replicated tensors; a load keeps the entries of this rank's rows. 8-bit moments travel as
their codes with one fp32 scale per code (:func:`.checkpoint.element_scales`), from which :func:`requantize` restores
the block ``absmax`` (bit-exact at the same world size, requantized in this rank's blocks otherwise). The warm-up
score is exported row-sharded (``Shard(0)`` of ``(m, n)``, like the other row chunks), and a DCP load of a
checkpoint taken during the warm-up raises the rule's ``ValueError`` as in one process (a fresh optimizer's
skeleton has no score).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from . import comm

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import LowRankOptimizer

#: State keys of the sparse residual (kept in step with :mod:`lowrank_optim.rules.sparse_residual`).
INDEX, SCORE, STEP = "residual_index", "residual_score", "residual_step"
MOMENTS = (("residual_exp_avg", True), ("residual_exp_avg_sq", False))
#: Sharded state only: the position of this rank's first entry in the whole sorted list of entries.
FIRST = "residual_first"


@dataclass(frozen=True)
class RowBlock:
    """This rank's rows of a row-sharded matrix, as the residual rule sees them.

    Attributes:
        group: the process group of the parameter's mesh.
        offset: index of this rank's first row.
        rows: rows held here (possibly 0).
        shape: the whole matrix ``(m, n)``.
    """

    group: Any
    offset: int
    rows: int
    shape: tuple[int, int]


_ROWS: ContextVar[RowBlock | None] = ContextVar("lowrank_optim_row_block", default=None)


def current() -> RowBlock | None:
    """The active :class:`RowBlock`, or ``None`` (one process, or a gathered matrix: everything is whole)."""
    return _ROWS.get()


@contextlib.contextmanager
def rows(block: RowBlock | None) -> Iterator[None]:
    """Makes ``block`` the active :class:`RowBlock` inside the block (``None``: whole matrices)."""
    token = _ROWS.set(block)
    try:
        yield
    finally:
        _ROWS.reset(token)


def _all_gather(t: torch.Tensor, group: Any) -> list[torch.Tensor]:
    import torch.distributed as dist

    world = dist.get_world_size(group)
    out = [torch.empty_like(t) for _ in range(world)]
    comm._count(t, world - 1)
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def any_nonzero(score: torch.Tensor, block: RowBlock | None = None) -> bool:
    """Whether the whole score has a nonzero entry (one MAX all-reduce of a flag under ``block``)."""
    if block is None:
        return bool(score.any())
    flag = torch.tensor([1.0 if bool(score.any()) else 0.0], dtype=torch.float32, device=score.device)
    return bool(comm.all_reduce_max(flag, block.group).item() > 0)


def select_entries(score: torch.Tensor, k: int, block: RowBlock | None = None) -> tuple[torch.Tensor, int]:
    """The ``k`` chosen entries of the whole score (the rule of the module docstring), on this rank.

    One process: :func:`candidates`, :func:`threshold`, :func:`counts` and :func:`choose` on the whole score; k
    ranks: the same with the candidates and the counts all-gathered over ``block.group`` (collective).

    Args:
        score: this rank's rows of the score (one process: the whole ``(m, n)`` score); any shape, read row-major.
        k: entries to choose in the whole matrix, ``0 <= k <=`` its number of elements.
        block: this rank's rows (``None``: ``score`` is the whole matrix).

    Returns:
        ``(indices, first)``: the sorted ``int64`` flat indices into ``score`` of the chosen entries in this rank's
        rows, and the number of chosen entries in the rows of lower ranks (0 in one process). On the ``meta``
        device (the memory planner), ``k`` meta indices and 0.

    Raises:
        ValueError: ``k`` is negative or larger than the whole matrix.
    """
    flat = score.reshape(-1)
    whole = flat.numel() if block is None else block.shape[0] * block.shape[1]
    if not 0 <= k <= whole:
        raise ValueError(f"Invalid k: {k} entries of a score of {whole} elements")
    if flat.device.type == "meta":
        return torch.empty(k, dtype=torch.int64, device="meta"), 0
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=flat.device), 0
    if bool(torch.isnan(flat).any()):
        flat = flat.nan_to_num(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
    if block is None:
        t = threshold(candidates(flat, k), k)
        return choose(flat, t, [counts(flat, t)], 0, k)
    import torch.distributed as dist

    chunk = -(-block.shape[0] // dist.get_world_size(block.group))
    pool = torch.cat(_all_gather(candidates(flat, min(k, chunk * block.shape[1])), block.group))
    t = threshold(pool, k)
    table = _all_gather(counts(flat, t), block.group)
    return choose(flat, t, table, dist.get_rank(block.group), k)


def candidates(flat: torch.Tensor, length: int) -> torch.Tensor:
    """This rank's candidates for the ``k``-th largest score: its ``min(length, flat.numel())`` largest scores
    (any order), padded with ``-inf`` to ``length`` (every rank sends the same length; ``length >= min(k, its
    elements)`` keeps every entry of the whole top ``k`` among the ranks' candidates)."""
    out = torch.full((length,), float("-inf"), dtype=flat.dtype, device=flat.device)
    mine = min(length, flat.numel())
    if mine:
        out[:mine] = torch.topk(flat, mine, sorted=False).values
    return out


def threshold(pool: torch.Tensor, k: int) -> torch.Tensor:
    """``t``, the ``k``-th largest of the ranks' candidates ``pool`` (0-d): the ``k``-th largest score."""
    return torch.topk(pool, k, sorted=False).values.min()


def counts(flat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``[#(flat > t), #(flat == t)]`` of this rank's scores (``int64``, 2 elements)."""
    return torch.stack([(flat > t).sum(), (flat == t).sum()]).to(torch.int64)


def choose(flat: torch.Tensor, t: torch.Tensor, table: list[torch.Tensor], me: int, k: int) -> tuple[torch.Tensor,
                                                                                                      int]:
    """This rank's chosen entries (sorted ``int64`` flat indices into ``flat``) and the count chosen on lower ranks,
    from every rank's :func:`counts` in row order (``table``; ``me``: this rank's place in it): every score ``> t``
    and, of the ``k - sum(#(> t))`` ties still needed, those of the lowest flat indices (lower ranks first)."""
    rows = [(int(a), int(e)) for a, e in torch.stack(table).cpu().tolist()]
    need = k - sum(a for a, _ in rows)  # >= 1: at most k - 1 scores exceed the k-th largest
    before = sum(e for _, e in rows[:me])
    take = max(0, min(rows[me][1], need - before))
    first = sum(a for a, _ in rows[:me]) + min(need, before)
    ties = (flat == t).nonzero().reshape(-1)[:take]
    return torch.cat([(flat > t).nonzero().reshape(-1), ties]).sort().values, first


def _sharded_sparse(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor, st: Any) -> bool:
    from .fsdp import mode
    from .shards import is_dtensor

    return (isinstance(st, dict) and "projector" in st and is_dtensor(p) and opt._parts(group)[0] is not None
            and opt._parts(group)[2].name == "sparse" and mode(opt, group, p) == "sharded")


def _block(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor) -> RowBlock:
    from .fsdp import matrix_shape
    from .shards import layout

    lay = layout(p)
    m, n = (int(s) for s in matrix_shape(opt, group, p)[:2])
    offset, size = lay.rows(m)
    return RowBlock(lay.group, offset, size, (m, n))


def whole_state(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor, st: Any) -> Any:
    """An exported state (after :meth:`~lowrank_optim.rules.sparse_residual.SparseResidual.export_state`) of a
    sharded parameter with its residual entries in one process's form (see the module; collective: every rank of
    the parameter's mesh calls it): sorted global flat indices and moments of length ``k``, 8-bit moments as codes
    with per-code scales; the warm-up score as a ``Shard(0)`` ``DTensor`` of ``(m, n)``; ``residual_first``
    dropped. Any other state is returned as it is."""
    from ..state import ABSMAX
    from .checkpoint import element_scales
    from .shards import layout, wrap

    if not _sharded_sparse(opt, group, p, st) or INDEX not in st:
        return st
    block = _block(opt, group, p)
    m, n = block.shape
    st = dict(st)
    if isinstance(st.get(SCORE), torch.Tensor) and not hasattr(st[SCORE], "to_local"):
        st[SCORE] = wrap(st[SCORE].reshape(block.rows, n), layout(p), 0, (m, n))
    first = st.pop(FIRST, None)
    for name, _ in MOMENTS:  # per-code scales (placeholders included: the template's shapes are the checkpoint's)
        if name + ABSMAX in st and st[name + ABSMAX].numel() != st[name].numel():
            st[name + ABSMAX] = element_scales(st[name + ABSMAX], st[name])
    if first is None:  # placeholders (warm-up): already of one process's shapes
        return st
    idx = st[INDEX]
    count = torch.tensor([idx.numel()], dtype=torch.int64, device=idx.device)
    counts = [int(c) for c in torch.cat(_all_gather(count, block.group)).tolist()]
    width = max(counts)

    def gather(t: torch.Tensor) -> torch.Tensor:
        padded = t.new_zeros(width)
        padded[: t.numel()] = t
        return torch.cat([part[:c] for part, c in zip(_all_gather(padded, block.group), counts, strict=True)])

    st[INDEX] = gather(idx.long() + block.offset * n).to(idx.dtype)
    for name, _ in MOMENTS:
        if name in st:
            st[name] = gather(st[name])
        if name + ABSMAX in st:
            st[name + ABSMAX] = gather(st[name + ABSMAX])
    return st


def local_state(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor, st: Any) -> Any:
    """The inverse of :func:`whole_state` after a load (``st``: imported, ``DTensor`` chunks unwrapped): the
    entries of this rank's rows (local flat indices, their moments and per-code scales, ``residual_first``), and a
    whole ``(m, n)`` score cut to this rank's rows. Any other state is returned as it is."""
    from ..state import ABSMAX

    if not _sharded_sparse(opt, group, p, st):
        return st
    block = _block(opt, group, p)
    m, n = block.shape
    st = dict(st)
    score = st.get(SCORE)
    if isinstance(score, torch.Tensor) and score.shape[0] == m and block.rows != m:
        st[SCORE] = score[block.offset: block.offset + block.rows].clone()
    if INDEX not in st or FIRST in st:
        return st
    idx = st[INDEX]
    wide = idx.long()
    bounds = torch.tensor([block.offset * n, (block.offset + block.rows) * n], dtype=torch.int64, device=idx.device)
    lo, hi = (int(b) for b in torch.searchsorted(wide, bounds).tolist())
    st[INDEX] = (wide[lo:hi] - block.offset * n).to(idx.dtype)
    for name, _ in MOMENTS:
        for key in (name, name + ABSMAX):
            if key in st:
                st[key] = st[key][lo:hi].clone()
    st[FIRST] = lo
    return st


def requantize(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor, st: dict[str, Any]) -> None:
    """Restores, in place after a load, the block ``absmax`` of 8-bit residual moments that came with per-code
    scales (:func:`whole_state`): kept in the blocks they were saved in, requantized in this state's own blocks
    otherwise, rounding keyed by each entry's place in the whole list (``residual_first``)."""
    from ..rules.sparse_residual import residual_count
    from ..state import ABSMAX
    from .checkpoint import _from_scales
    from .fsdp import local_store
    from .shards import Split

    store = opt._parts(group)[4]
    first = st.get(FIRST)
    for name, signed in MOMENTS:
        t, scales = st.get(name), st.get(name + ABSMAX)
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or scales is None or scales.numel() != t.numel() \
                or t.numel() <= 1:
            continue
        if first is None:
            _from_scales(st, name, signed, store)
            continue
        k = residual_count(group["residual_density"], _block(opt, group, p).shape)
        _from_scales(st, name, signed, local_store(store, k, Split(0, int(first), (k,))))


__all__ = ["FIRST", "RowBlock", "any_nonzero", "candidates", "choose", "counts", "current", "local_state", "requantize",
           "rows", "select_entries", "threshold", "whole_state"]
