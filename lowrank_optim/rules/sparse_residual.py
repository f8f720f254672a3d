"""Sparsely coded residual (GaLore+, Liao et al. 2024, arXiv:2412.19820).

GaLore+ corrects the error of the low-rank approximation with a sparse term built during a warm-up
phase. No public code exists, so every concrete choice below is ours:

* the residual is the part of the gradient the projection drops, ``E = G - project_back(project(G))``;
* during the first ``residual_warmup`` steps of a parameter, ``E^2`` is accumulated (a transient
  full-size fp32 buffer, freed at the end of the warm-up; while it is all zero, e.g. for a layer feeding
  a zero-initialised one, the warm-up goes on); then the ``k = floor(residual_density * m * n)``
  entries with the largest accumulated energy are chosen once and for all (indices kept sorted, as
  int32 when they fit); the set is not re-chosen when the basis is refreshed. Ties are broken by position:
  with ``t`` the ``k``-th largest score, every entry scoring ``> t`` and, of those scoring ``== t``, the lowest
  flat (row-major) indices (:func:`lowrank_optim.distributed.sparse.select_entries`, the one definition that one
  process and FSDP2's k ranks share; before, ties went wherever ``torch.topk`` put them);
* afterwards each step runs Adam (torch's order, own ``residual_betas`` / ``residual_eps``) on ``E`` at
  those entries only, through the group's state store, and adds the step at those entries, scaled by
  ``lr * scale`` like the low-rank step. ``E`` is then read at the ``k`` entries only
  (:func:`lowrank_optim.projectors.entries.residual_entries`: ``2 k r`` flops, no lift and no ``m x n`` buffer, for
  an orthonormal fp32 basis; its rounding floor from ``||G||^2 - ||R||^2``, which resolves it down to Fira's
  closed form's ``CANCELLATION``), and the step is added to the weight in place at those entries;
* ``residual_density = 0`` keeps no state and is exactly the ``drop`` rule.

Under FSDP2's sharded mode the rule sees this rank's rows of ``G`` and keeps the entries of its rows
(:mod:`lowrank_optim.distributed.sparse`, which also gives checkpoints one process's form of the entries).

Checkpoints (:meth:`SparseResidual.export_state`): the state swaps the warm-up score for indices and moments, and
``torch.distributed.checkpoint`` loads by the keys and shapes of a fresh optimizer's state, which is in the
warm-up. So the exported state has the same keys in every phase: during the warm-up the indices and moments are
exported as placeholders (zeros of their final shape and dtype, ``residual_step = -1``) and an all-zero score
(a fresh optimizer's) is left out; ``residual_scored`` says whether the score was exported. A checkpoint taken
after the warm-up therefore loads through DCP into a fresh optimizer bit-exactly. One taken during the warm-up
(the first ``residual_warmup`` steps of training) holds an ``m x n`` score that a fresh optimizer's skeleton has
no room for: DCP skips it and the load raises ``ValueError`` instead of resuming with a lost score
(``torch.save(optimizer.state_dict())`` carries it).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .._validation import check_betas, check_int, check_number
from ..distributed import sparse as _rows
from ..projectors.base import Projector, ProjState
from ..projectors.entries import residual_entries
from ..state import ABSMAX, StateStore
from .base import Group, ResidualRule

_INDEX = "residual_index"
_SCORE = "residual_score"
_SEEN = "residual_seen"
_STEP = "residual_step"
_M = "residual_exp_avg"
_V = "residual_exp_avg_sq"
#: Exported only (checkpoints): 1 when the exported state carries a warm-up score, else 0.
_SCORED = "residual_scored"
#: ``residual_step`` of exported placeholders: the entries are not chosen yet.
_NOT_CHOSEN = -1


def residual_count(density: float, shape: tuple[int, ...] | torch.Size) -> int:
    """Number of residual entries kept for a matrix of ``shape``: ``floor(density * m * n)``."""
    numel = 1
    for s in shape:
        numel *= int(s)
    return int(density * numel)


def _store(group: Group, state: dict, k: int, block: _rows.RowBlock | None) -> StateStore:
    """The store of the residual's moments: the group's ``state_dtype``; under FSDP2 (``block``) a rank's part of
    the length-``k`` moments, quantized when the whole would be and rounded as the whole's entries from
    ``residual_first`` on (:class:`lowrank_optim.distributed.fsdp.ShardStore`)."""
    store = StateStore(group["state_dtype"])
    if block is None:
        return store
    from ..distributed.fsdp import local_store
    from ..distributed.shards import Split

    return local_store(store, k, Split(0, int(state.get(_rows.FIRST, 0)), (k,)))


class SparseResidual(ResidualRule):
    """Small Adam moments on the largest entries of the dropped gradient (see the module docstring)."""

    wants_target = True  # its step touches k entries: applied in place, no full-size tensor to subtract

    name = "sparse"
    defaults: ClassVar[dict[str, Any]] = {"residual_density": 0.01, "residual_warmup": 10,
                                          "residual_betas": (0.9, 0.999), "residual_eps": 1e-8}

    def validate(self, group: Group) -> None:
        density = check_number("residual_density", group["residual_density"], low=0.0, high=1.0)
        check_int("residual_warmup", group["residual_warmup"], low=0)
        check_betas("residual_betas", group["residual_betas"])
        check_number("residual_eps", group["residual_eps"], low=0.0)
        if density > 0 and group["lr"] is None:
            raise ValueError("Invalid lr: None, the sparse residual needs a learning rate")

    def step(self, grad: torch.Tensor, low_grad: torch.Tensor, low_update: torch.Tensor, projector: Projector,
             proj_state: ProjState, state: dict, group: Group, target: torch.Tensor | None = None
             ) -> torch.Tensor | None:
        block = _rows.current()  # FSDP2's sharded mode: grad is this rank's rows of the (m, n) matrix
        shape = tuple(grad.shape) if block is None else block.shape
        k = residual_count(group["residual_density"], shape)
        if k == 0:
            return None
        # E = G - lift(R): formed (a new contiguous buffer) during the warm-up, which scores every entry
        resid = projector.residual(grad, low_grad, proj_state) if _INDEX not in state else None
        seen = int(state.get(_SEEN, 0)) + 1
        state[_SEEN] = seen
        warmup = int(group["residual_warmup"])
        store = _store(group, state, k, block)
        if _INDEX not in state:
            score = state.get(_SCORE)
            score = resid.square() if score is None else score.addcmul_(resid, resid)
            # an all-zero score (only zero gradients so far) ranks nothing: the warm-up lasts until one is nonzero
            if seen < max(warmup, 1) or (score.device.type != "meta" and not _rows.any_nonzero(score, block)):
                state[_SCORE] = score
                return None
            state.pop(_SCORE, None)
            idx, first = _rows.select_entries(score, k, block)
            small = residual_count(1.0, shape) < 2**31
            state[_INDEX] = idx.to(torch.int32) if small else idx
            if block is not None:
                state[_rows.FIRST] = first
                store = _store(group, state, k, block)
            for name in (_M, _V):
                store.create(state, name, (idx.numel(),), grad.device)
            state[_STEP] = 0
            if seen <= warmup:
                return None
        idx = state[_INDEX].long()
        if resid is not None:
            e = resid.flatten().index_select(0, idx)
        else:  # only the chosen entries of E (projectors.entries: no lift, no full-size buffer; FSDP2: this rank's)
            e = residual_entries(projector, grad, low_grad, proj_state, idx)
        beta1, beta2 = group["residual_betas"]
        t = int(state[_STEP]) + 1
        m, v = store.load(state, _M, True), store.load(state, _V, False)
        m.lerp_(e, 1 - beta1)
        v.mul_(beta2).addcmul_(e, e, value=1 - beta2)
        denom = (v.sqrt() / (1 - beta2**t) ** 0.5).add_(group["residual_eps"])
        upd = (m / denom).mul_(float(group["lr"]) * group["scale"] / (1 - beta1**t))
        store.save(state, _M, m, True)
        store.save(state, _V, v, False)
        state[_STEP] = t
        if target is not None and target.is_contiguous():  # the step at the k entries, in place
            target.view(-1).index_add_(0, idx, upd, alpha=-1.0)
            return None
        out = grad.new_zeros(grad.shape) if resid is None else resid.view(-1).zero_().view(grad.shape)
        out.view(-1).index_copy_(0, idx, upd)
        return out

    def export_state(self, state: dict, group: Group, shape: tuple[int, ...]) -> dict:
        """The same keys in every phase (see the module docstring): after the warm-up the state plus
        ``residual_scored = 0``; during it, zero placeholders of the indices and moments (``residual_step =
        -1``) and the score only when it is nonzero (``residual_scored = 1``)."""
        if _INDEX in state:
            return {**state, _SCORED: 0}
        k = residual_count(group["residual_density"], shape)
        if k == 0 or _SEEN not in state:  # no residual entries: no state in any phase
            return state
        score = state.get(_SCORE)  # absent after a load that left out an all-zero score: zeros
        out = {name: v for name, v in state.items() if name != _SCORE}
        scored = score is not None and score.device.type != "meta" and bool(score.any())
        if scored:
            out[_SCORE] = score
        out[_SCORED] = int(scored)
        numel = 1
        for s in shape:
            numel *= int(s)
        device = next((v.device for v in state.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        out[_INDEX] = torch.zeros(k, dtype=torch.int32 if numel < 2**31 else torch.int64, device=device)
        store = StateStore(group["state_dtype"])
        for name in (_M, _V):
            store.create(out, name, (k,), device)
        out[_STEP] = _NOT_CHOSEN
        return out

    def import_state(self, state: dict, group: Group, shape: tuple[int, ...]) -> dict:
        """Drops :meth:`export_state`'s placeholders.

        Raises:
            ValueError: the checkpoint was taken during the warm-up with a nonzero score, and the score did not
                come back (``torch.distributed.checkpoint`` loads only the keys a fresh optimizer has)."""
        if _SCORED not in state:
            return state
        state = dict(state)
        scored = int(state.pop(_SCORED))
        if int(state.get(_STEP, 0)) != _NOT_CHOSEN:
            return state
        for name in (_INDEX, _M, _V, _M + ABSMAX, _V + ABSMAX, _STEP):
            state.pop(name, None)
        if scored and _SCORE not in state:
            raise ValueError(
                f"Invalid state_dict: the sparse residual (GaLore+) was saved during its warm-up (step "
                f"{state.get(_SEEN)} of residual_warmup={group['residual_warmup']}) with a score of its entries, "
                "and the score did not load: torch.distributed.checkpoint loads only the keys of a fresh "
                "optimizer's state, which has no score. Resume from a checkpoint taken after the warm-up, or "
                "save this one with torch.save(optimizer.state_dict())")
        return state
