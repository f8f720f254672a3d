"""GUM's step on an FSDP2 parameter (``DTensor``, ``Shard(0)``): every state tensor sharded, equal to one process.

GUM (:class:`~lowrank_optim.projectors.gum.GUMProjector`, Pan et al. 2025, arXiv:2510.17802) keeps, per period, a
matrix either in its top-``r`` SVD subspace (basis ``P``, ``m x r``, left side; ``Q``, ``n x r``, right side) or on
the complement at full size (the period's layer draw, ``full = 1``). Rank ``i`` holds rows ``W_i``, ``G_i``:

* the basis and the draw come from :func:`~.fsdp._refreshed`: the owner rank runs the projector's own ``init`` /
  ``update`` on the whole gradient with the parameter's group layout (position, count, group seed), so the SVD and
  the draw are one process's, then broadcasts; each rank keeps its chunk of each stored basis tensor (:mod:`.bases`:
  a bf16 / int8 basis is decoded just in time);
* low-rank branch: the right and left strategies of :mod:`.fsdp` (``R_i = w G_i Q``, moments ``m_i x r``; or
  ``R = w sum_i P_i^T G_i`` all-reduced, moments ``r x n_j``, the step all-gathered and lifted as ``P_i N``);
* full branch: the complement ``G_i - G_i Q Q^T`` (right, local) or ``G_i - P_i R`` (left, ``R`` all-reduced), its
  rounding floor from two norms completed over the ranks, moments ``m_i x n`` (row chunks like ``W``), and the
  step's own complement the same way (left: one more ``r x n`` all-reduce);
* the inner rule (Muon) runs through :func:`~.fsdp._inner_step` with its sums completed over the ranks: Newton-
  Schulz by :mod:`.newton_schulz` (a Gram all-reduce per iteration, or one all-gather), its lr factor from the whole
  parameter's shape.

Weights ``w = 1/q`` (full) or ``1/(1-q)`` (low) where ``weighting`` puts them, as in one process. Checkpoints:
:func:`whole_state` gathers a parameter's state into one process's form (collective: every rank calls
``state_dict()``, as ``get_optimizer_state_dict`` does), so a sharded GUM checkpoint is a single-process one and loads
at any world size; :func:`local_state` cuts a loaded one back to this rank's chunks.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..projectors.base import LEFT
from ..state import ABSMAX, StateStore
from . import bases as _bases
from . import comm
from .shards import Layout, Split, all_gather_cols, all_gather_rows, layout

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import LowRankOptimizer

#: Projectors whose FSDP2 step is this module's (GUM: a weighted projection and a full-size branch).
PROJECTORS = ("gum",)
#: Transfers it runs with: the moments change shape with the draw, so they restart each period.
TRANSFERS = ("reset",)


def full_size(proj: Any, pst: dict[str, Any]) -> bool:
    """Whether ``pst`` (a GUM projector state) is in the full-size branch: moments shaped like the parameter,
    row-sharded like ``W``."""
    return proj is not None and proj.name in PROJECTORS and bool(pst.get("full", 0))


def _complement(x: torch.Tensor, view: dict[str, Any], lay: Layout, tau: float) -> torch.Tensor:
    """This rank's rows of ``X - P P^T X`` (left, ``P^T X`` all-reduced) or ``X - X Q Q^T`` (right, local), zeroed
    when the whole complement is at or below ``tau`` times the whole ``X`` (the basis's rounding floor,
    :meth:`~lowrank_optim.projectors.base.Projector.residual`; two norms in one all-reduce)."""
    from .fsdp import _BASIS

    basis = view["basis"]
    # P^T X, (r, n), all-reduced (left); X_i Q, (m_i, r), local (right)
    low = comm.all_reduce((basis.T @ x).contiguous(), lay.group) if int(view["side"]) == LEFT else x @ basis
    out = x.clone(memory_format=torch.contiguous_format)
    _BASIS.add_back(out, low, view, -1.0)
    if tau > 0:
        sums = comm.all_reduce(torch.stack([out.square().sum(), x.square().sum()]), lay.group)
        out.mul_(sums[0].sqrt() > tau * sums[1].sqrt())
    return out


def step(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor, lay: Layout, state: dict[str, Any],
         w: torch.Tensor, grad: torch.Tensor) -> None:
    """One step of GUM's sharded parameter ``p`` (rows ``w``, fp32 gradient rows ``grad``), its projector state
    initialised or refreshed already (:func:`~.fsdp._step_lowrank`)."""
    from .fsdp import _inner_step

    proj, rule, _, _, store = opt._parts(group)
    pst = state["projector"]
    m, n = _matrix(opt, group, p)
    side, r = int(pst["side"]), int(pst["rank"])
    offset = lay.rows(m)[0]
    basis = _bases.step_basis(pst, m if side == LEFT else n, lay, side == LEFT)  # P_i, or the whole Q (fp32)
    view = {"side": side, "rank": r, "basis": basis}
    tau = proj.complement_floor(pst)
    whole, full = proj.whole(pst), bool(pst["full"])
    weight = proj.weight(pst)
    target = w if w.dtype == torch.float32 else w.float()
    if whole or full:
        low = grad.clone(memory_format=torch.contiguous_format) if whole else _complement(grad, view, lay, tau)
        spec, split = comm.Sharding(lay.group, 0, (m, n), m * n), Split(0, offset, (m, n))
    elif side == LEFT:
        c0, cn = lay.rows(n)
        low = comm.all_reduce((basis.T @ grad).contiguous(), lay.group)[:, c0: c0 + cn].contiguous()  # (r, n_j)
        spec, split = comm.Sharding(lay.group, 1, (r, n), m * n), Split(1, c0, (r, n))
    else:
        low = grad @ basis  # (m_i, r)
        spec, split = comm.Sharding(lay.group, 0, (m, r), m * n), Split(0, offset, (m, r))
    if proj.weighting == "paper" and not whole:
        low.mul_(weight)
    d = _inner_step(group, rule, store, state, low, target, spec, split)
    update = d.num if d.den is None else d.num / d.den
    if whole:
        back = update
    elif full:
        back = _complement(update, view, lay, tau)
    elif side == LEFT:
        back = basis @ all_gather_cols(update, n, lay)  # P_i N
    else:
        back = update @ basis.T  # N_i Q^T
    if proj.weighting == "after":
        back = back * weight
    target.add_(back, alpha=-d.coef * group["scale"])
    if target is not w:
        w.copy_(target)


# -- checkpoints ---------------------------------------------------------------------------------------------
def _matrix(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor) -> tuple[int, int]:
    """``(m, n)``: the whole matrix ``p`` is stepped as (a conv weight: ``out x (in * prod(k))``)."""
    from .fsdp import matrix_shape

    m, n = matrix_shape(opt, group, p)[:2]
    return int(m), int(n)


def _moment_split(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor, pst: dict[str, Any],
                  lay: Layout) -> tuple[tuple[int, int], int]:
    """``(global shape, split axis)`` of the moments for projector state ``pst``."""
    proj = opt._parts(group)[0]
    (m, n), r = _matrix(opt, group, p), int(pst["rank"])
    if full_size(proj, pst):
        return (m, n), 0
    return ((r, n), 1) if int(pst["side"]) == LEFT else ((m, r), 0)


def _gather(t: torch.Tensor, length: int, dim: int, lay: Layout) -> torch.Tensor:
    return all_gather_rows(t, length, lay) if dim == 0 else all_gather_cols(t, length, lay)


def _cut(t: torch.Tensor, length: int, dim: int, lay: Layout) -> torch.Tensor:
    offset, size = lay.rows(length)
    return t.narrow(dim, offset, size).clone(memory_format=torch.contiguous_format)


def whole_state(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor, st: dict[str, Any]) -> dict[str, Any]:
    """``st`` (this rank's state of sharded GUM parameter ``p``) in one process's form: the whole basis and the
    whole moments in the store's dtype (fp32 and bf16 exactly; 8-bit codes requantized in the whole moment's
    blocks from their exact values). Collective over ``p``'s mesh: every rank calls it, in the same order."""
    from .fsdp import local_store

    _, rule, _, _, store = opt._parts(group)
    lay = layout(p)
    pst = st["projector"]
    st = dict(st)
    d = _matrix(opt, group, p)[0 if int(pst["side"]) == LEFT else 1]  # the basis' rows
    st["projector"] = _bases.gather(pst, d, lay)  # every stored basis tensor whole (codes, scales: exact)
    shape, dim = _moment_split(opt, group, p, pst, lay)
    numel = math.prod(shape)
    for spec in rule.moments(shape, group):
        if spec.name not in st:
            continue
        value = _gather(StateStore.load(st, spec.name, spec.signed).float(), shape[dim], dim, lay)
        if st[spec.name].dtype != torch.uint8:
            st[spec.name] = value.to(st[spec.name].dtype)  # fp32 and bf16: exact
            continue
        st.pop(spec.name + ABSMAX, None)
        local_store(store, numel).create(st, spec.name, shape, value.device)
        StateStore.save(st, spec.name, value, spec.signed)
    return st


def local_state(opt: LowRankOptimizer, group: dict[str, Any], p: torch.Tensor, st: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`whole_state` on load: ``st`` (one process's form of ``p``'s state) cut to this rank's
    rows of the basis and its chunk of the moments (fp32, bf16: exactly; 8-bit: decoded and requantized in the
    chunk's blocks, rounding keyed by the whole moment's indices). No communication."""
    from .fsdp import local_store

    _, rule, _, _, store = opt._parts(group)
    lay = layout(p)
    pst = st["projector"]
    st = dict(st)
    d = _matrix(opt, group, p)[0 if int(pst["side"]) == LEFT else 1]  # the basis' rows
    if "basis" in pst and int(pst["basis"].shape[0]) == _bases.lengths(pst, d)["basis"]:  # whole: cut
        st["projector"] = _bases.cut(pst, lay)
    shape, dim = _moment_split(opt, group, p, pst, lay)
    for spec in rule.moments(shape, group):
        t = st.get(spec.name)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
            continue
        if t.dtype != torch.uint8:
            st[spec.name] = _cut(t, shape[dim], dim, lay)
            continue
        value = _cut(StateStore.load(st, spec.name, spec.signed).float(), shape[dim], dim, lay)
        st.pop(spec.name + ABSMAX, None)
        saver = local_store(store, math.prod(shape), Split(dim, lay.rows(shape[dim])[0], tuple(shape)))
        saver.create(st, spec.name, tuple(value.shape), value.device)
        saver.save(st, spec.name, value, spec.signed)
    return st


__all__ = ["PROJECTORS", "TRANSFERS", "full_size", "local_state", "step", "whole_state"]
