"""GaLore+'s sparse residual on a whole stack (:mod:`lowrank_optim.stacks`), after the stack's lifts.

:meth:`~lowrank_optim.rules.sparse_residual.SparseResidual.step` runs per matrix: at LLaMA-60M shapes on two CPU
cores its some 35 dispatches and their Python cost a matrix (the closed-form test's norms and host read, the CSR
pattern rebuilt from the indices, the sampled product, eight elementwise Adam ops on ``k`` entries) were a fifth of
GaLore+'s steady step. Once every matrix of a stack is past its warm-up, with the same residual step count, fp32
moments and a contiguous weight, :func:`stack_residual_step` runs the same math on the stack:

* the closed-form test (:func:`lowrank_optim.projectors.entries.clearly_above_floor`, CPU only) from one ``(2 B,)``
  tensor of norms (``||G_i||`` from each matrix's row norms, ``||R_i||`` as two reductions over the stack) and
  **one** host read per stack, compared in Python floats (fp64, the same operations as the tensor form);
* ``E`` at the entries as **one** batched sampled product (``torch.sparse.sampled_addmm`` of a ``(B, m, n)`` CSR
  tensor, the same dot product per entry as the per-matrix call, bit for bit) when the bases are fp32 tensors
  stored in the state: they become the views of one ``(B, d, r)`` *arena* (:meth:`~lowrank_optim.stacks.StackCache.
  arena`, as the moments: no copy kept, the state format unchanged, rebuilt after a refresh replaced them). The CSR
  row pointers depend on the entries only, chosen once after the warm-up: they are kept with the stack (``B (m + 1)``
  integers: 7% to 20% of the indices at LLaMA-60M shapes at the default density, ``1 / (density n)``). A matrix
  whose complement is not clearly above the floor gets the formed complement's entries, as the per-matrix path;
* Adam on the ``(B, k)`` entries (moments and indices arenas too), the per-matrix operations in the same order, so
  the same values;
* per matrix only the gradient's row norms, the gather of its ``k`` entries and the ``index_add_`` into its weight.

Dispatches per steady step at LLaMA-60M shapes (``benchmarks.op_counts``' 56 matrices and the embedding, after the
warm-up): 8202 before, 1289 with this.

Anything else (a stack in its warm-up or with mixed step counts, bf16 / 8-bit moments, FSDP2 row blocks, a single
matrix) goes to the rule per matrix.
"""

from __future__ import annotations

from typing import Any

import torch

from ..distributed import comm
from ..distributed import sparse as _rows
from ..projectors.base import Projector
from ..projectors.entries import closed_form, resolves_complement, sampled_csr_residual, sampled_lift_residual
from .sparse_residual import _INDEX, _M, _SEEN, _STEP, _V, SparseResidual, residual_count

Group = dict[str, Any]


def stack_residual_step(residual: SparseResidual, units: list[Any], low: torch.Tensor, lows: list[torch.Tensor],
                        updates: list[torch.Tensor], bases: list[torch.Tensor], left: bool, group: Group,
                        proj: Projector, cache: Any, key: tuple[int, ...]) -> None:
    """The sparse residual of the ``B`` matrices of one stack (module docstring), after their lifts.

    Args:
        residual: the group's :class:`~lowrank_optim.rules.sparse_residual.SparseResidual`.
        units: the stack's :class:`~lowrank_optim.stacks.Unit` s (state, fp32 ``(m, n)`` weight, fp32 gradient).
        low: ``(B, r, n)`` (left side) or ``(B, m, r)`` projected gradients ``R``; ``lows`` its matrices.
        updates: the inner rule's low-rank steps (the per-matrix rule's ``low_update``).
        bases: each matrix's fp32 ``(d, r)`` basis (``batch_basis``).
        left: the stack's side.
        group: the parameter group.
        proj: the group's projector.
        cache: the engine's :class:`~lowrank_optim.stacks.StackCache`.
        key: the stack's cache key.
    """
    states = [u.state for u in units]
    b = len(units)
    m, n = (int(s) for s in units[0].grad.shape)
    k = residual_count(group["residual_density"], (m, n))
    t = int(states[0].get(_STEP, -1)) + 1
    if (b < 2 or k == 0 or group["state_dtype"] != "fp32" or _rows.current() is not None
            or comm.current() is not None or low.device.type == "meta"
            or any(_INDEX not in st or int(st[_STEP]) + 1 != t for st in states)
            or any(not u.param.is_contiguous() for u in units)):
        for u, out, upd in zip(units, lows, updates, strict=True):
            extra = residual.step(u.grad, out, upd, proj, u.state["projector"], u.state, group, target=u.param)
            if extra is not None:
                u.param.sub_(extra)
        return
    device = low.device
    pstates = [st["projector"] for st in states]
    closed = [closed_form(proj, pst, u.grad) is not None for u, pst in zip(units, pstates, strict=True)]
    above = _above_floor(units, low, pstates, proj, cache, key) if any(closed) else [False] * b
    sampled = [c and a for c, a in zip(closed, above, strict=True)]
    idx = cache.arena(key, states, _INDEX)  # (B, k) sorted flat indices; the states hold its rows
    rows = [st[_INDEX] for st in states]
    vals, vals_rows = cache.buffer(key, "sparse_values", (b, k), device)
    stored = all(basis is pst.get("basis") for basis, pst in zip(bases, pstates, strict=True))
    if all(sampled) and stored:
        for u, ix, out in zip(units, rows, vals_rows, strict=True):
            torch.index_select(u.grad.view(-1), 0, ix, out=out)
        arena = cache.arena(key, pstates, "basis")  # (B, d, r): the states' bases become its views
        a, bm = (arena, low) if left else (low, arena.mT)
        e = _sampled(vals, idx, _crow(cache, key, idx, m, n), n, a, bm)
    else:
        e = vals
        for i, (u, ix, out) in enumerate(zip(units, rows, vals_rows, strict=True)):
            if sampled[i]:
                pair = (bases[i], lows[i]) if left else (lows[i], bases[i].T)
                out.copy_(sampled_lift_residual(u.grad, pair[0], pair[1], ix))
            else:  # the formed complement decides at its floor (projectors.entries.residual_entries)
                torch.index_select(proj.residual(u.grad, lows[i], pstates[i]).view(-1), 0, ix, out=out)
    beta1, beta2 = group["residual_betas"]
    mom, var = cache.arena(key, states, _M), cache.arena(key, states, _V)
    # the per-matrix rule's operations (SparseResidual.step), on the (B, k) entries
    mom.lerp_(e, 1 - beta1)
    var.mul_(beta2).addcmul_(e, e, value=1 - beta2)
    denom = (var.sqrt() / (1 - beta2**t) ** 0.5).add_(group["residual_eps"])
    upd = (mom / denom).mul_(float(group["lr"]) * group["scale"] / (1 - beta1**t))
    for u, ix, step in zip(units, rows, upd.view(-1).split_with_sizes([k] * b), strict=True):
        u.param.view(-1).index_add_(0, ix, step, alpha=-1.0)
    for st in states:
        st[_SEEN] = int(st.get(_SEEN, 0)) + 1
        st[_STEP] = t


def _above_floor(units: list[Any], low: torch.Tensor, pstates: list[dict], proj: Projector, cache: Any,
                 key: tuple[int, ...]) -> list[bool]:
    """:func:`lowrank_optim.projectors.entries.clearly_above_floor` of every matrix of the stack with one host read:
    the norms ``||G_i||`` and ``||R_i||`` as one ``(2 B,)`` tensor, each the norm of the row norms (a whole-tensor
    fp32 ``vector_norm`` on the CPU accumulates row-major, its error growing with the size: 1.2e-5 of ``||G||^2``
    for a 1376 x 512 matrix, above the ``CANCELLATION`` margin; by rows about 1e-7, and faster), squared and compared
    in Python floats (fp64, the tensor form's operations). ``False`` off the CPU (no read: the formed complement
    decides)."""
    if low.device.type != "cpu":
        return [False] * len(units)
    b = len(units)
    norms, _ = cache.buffer(key, "sparse_norms", (2 * b,), low.device)
    rows, views = cache.buffer(key, "sparse_grad_rows", (b, int(units[0].grad.shape[0])), low.device)
    for u, out in zip(units, views, strict=True):
        torch.linalg.vector_norm(u.grad, dim=1, out=out)
    torch.linalg.vector_norm(rows, dim=1, out=norms[:b])
    torch.linalg.vector_norm(torch.linalg.vector_norm(low, dim=2), dim=1, out=norms[b:])
    values = norms.tolist()
    out = []
    for gi, ri, pst in zip(values[:b], values[b:], pstates, strict=True):
        out.append(resolves_complement(gi * gi, ri * ri, proj.complement_floor(pst)))
    return out


def _crow(cache: Any, key: tuple[int, ...], idx: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """The ``(B, m + 1)`` CSR row pointers of the stack's sorted entries ``idx``, kept while ``idx`` is the stack's
    index arena (the entries are chosen once, after the warm-up)."""
    entry = cache.entries.setdefault(key, {})
    hit = entry.get("sparse_crow")
    if hit is not None and hit[0] is idx:
        return hit[1]
    rows = torch.div(idx, n, rounding_mode="floor")
    grid = torch.arange(m + 1, dtype=rows.dtype, device=rows.device).expand(int(idx.shape[0]), m + 1).contiguous()
    crow = torch.searchsorted(rows, grid, out_int32=idx.dtype == torch.int32)
    entry["sparse_crow"] = (idx, crow)
    return crow


def _sampled(vals: torch.Tensor, idx: torch.Tensor, crow: torch.Tensor, n: int, a: torch.Tensor, bm: torch.Tensor
             ) -> torch.Tensor:
    """``(G_i - a_i @ b_i)`` at the entries of every matrix, ``vals`` holding ``G_i`` there: one batched sampled
    product (the per-matrix :func:`~lowrank_optim.projectors.entries.sampled_lift_residual`, stacked)."""
    b, m = int(a.shape[0]), int(a.shape[1])
    return sampled_csr_residual(crow, torch.remainder(idx, n), vals, (b, m, n), a, bm)


__all__ = ["stack_residual_step"]
