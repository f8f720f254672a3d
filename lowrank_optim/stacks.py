"""The batched step: every projected matrix of a group that the batched kernels can take, stepped together.

The engine hands over the projected matrices of one group (``Unit``: the matrix's state, its fp32 weight view
and fp32 gradient), already initialised and refreshed. :func:`apply_units` steps those it can in one go and
returns the others, which then take the per-matrix path (:func:`lowrank_optim.update.apply_step`). That is the
whole seam: a projector, rule or residual that cannot batch simply gets its matrices back.

A matrix is batched when:

* its projector gives a dense basis (:meth:`~lowrank_optim.projectors.base.Projector.batch_basis`: exact,
  randomized, online-PCA, COAP and seeded random bases; not selections, blocks or DCT columns);
* its weight is fp32 (bf16 weights are stepped through fp32 copies on the per-matrix path);
* the group's residual is ``"drop"`` or Fira's with an orthonormal basis (closed form,
  :mod:`lowrank_optim.rules.fira_closed_form`).

Then ``project`` is one matrix product per matrix, the inner rule runs once over the list
(:meth:`~lowrank_optim.rules.base.InnerRule.directions`: Adam is one fused kernel for the whole group), and
the lift is one ``addmm_`` into the weight. State stays per matrix, in the same format as the per-matrix path,
so checkpoints do not depend on batching, and the result equals the per-matrix path to rounding
(``tests/test_stacks.py``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .projectors.base import LEFT
from .rules.fira_closed_form import fira_closed_form_step
from .update import Parts

Group = dict[str, Any]

#: Residual rules the batched step applies itself (``"fira"`` only with an orthonormal basis).
BATCHED_RESIDUALS = ("drop", "fira")


class Unit(NamedTuple):
    """One projected matrix of this step: its state dict, fp32 ``(m, n)`` weight view and fp32 gradient."""

    state: dict
    param: torch.Tensor
    grad: torch.Tensor


def transposed(basis: torch.Tensor, state: dict, views: dict[int, tuple[torch.Tensor, torch.Tensor]] | None
               ) -> torch.Tensor:
    """``basis.T``, kept in ``views`` (keyed by the matrix's state) while ``basis`` is the stored basis: a steady
    step then dispatches no transpose (a view is free in time but not in dispatches, the cost a GPU pays per op).
    A basis made for this step only (Flora's regenerated one) is not kept, so ``views`` never holds more than
    views of the stored bases."""
    if views is None or basis is not state["projector"].get("basis"):
        return basis.T
    key = id(state)
    hit = views.get(key)
    if hit is not None and hit[0] is basis:
        return hit[1]
    t = basis.T
    views[key] = (basis, t)
    return t


def apply_units(units: list[Unit], group: Group, parts: Parts,
                views: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> list[Unit]:
    """Steps the units the batched kernels can take (module docstring); returns the rest, untouched. ``views``
    caches the transposed bases between steps (:func:`transposed`)."""
    proj, rule, residual, _, store = parts
    if proj is None or not units or residual.name not in BATCHED_RESIDUALS:
        return units
    fira = residual.name == "fira"
    batch: list[tuple[Unit, torch.Tensor]] = []
    rest: list[Unit] = []
    for u in units:
        pst = u.state["projector"]
        basis = proj.batch_basis(pst, u.grad.device) if u.param.dtype == torch.float32 else None
        if basis is None or basis.dtype != torch.float32 or (fira and not proj.orthonormal_basis(pst)):
            rest.append(u)
        else:
            batch.append((u, basis))
    if not batch:
        return rest
    lows = []
    for u, basis in batch:
        left = u.state["projector"]["side"] == LEFT
        lows.append(torch.mm(transposed(basis, u.state, views), u.grad) if left else torch.mm(u.grad, basis))
    specs = [rule.moments(tuple(low.shape), group) for low in lows]
    moments = [{s.name: store.load(u.state, s.name, s.signed) for s in sp} for (u, _), sp in
               zip(batch, specs, strict=True)]
    steps = [u.state["inner_step"] + 1 for u, _ in batch]
    directions = rule.directions(lows, moments, steps, group, [u.param for u, _ in batch])
    wd = group["weight_decay"]
    scale = group["scale"]
    for (u, basis), low, sp, mom, d in zip(batch, lows, specs, moments, directions, strict=True):
        state = u.state
        for s in sp:
            store.save(state, s.name, mom[s.name], s.signed)
        state["step"] += 1
        state["inner_step"] += 1
        target = u.param
        if wd != 0:
            target.mul_(1 - d.lr * wd)
        update = d.num if d.den is None else d.num / d.den
        side = state["projector"]["side"]
        if fira:
            basis_t = transposed(basis, state, views) if side != LEFT else None
            fira_closed_form_step(target, u.grad, low, update, basis, side, d.coef, d.lr, state, group,
                                  proj.complement_floor(state["projector"]), basis_t)
        elif update.numel():
            alpha = -d.coef * scale
            if side == LEFT:
                target.addmm_(basis, update, alpha=alpha)
            else:
                target.addmm_(update, transposed(basis, state, views), alpha=alpha)
    return rest


__all__ = ["BATCHED_RESIDUALS", "Unit", "apply_units"]
