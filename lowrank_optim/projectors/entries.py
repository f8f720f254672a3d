"""The complement ``E = G - project_back(project(G))`` at a few entries, without forming it.

GaLore+'s sparse residual (:mod:`lowrank_optim.rules.sparse_residual`) reads ``E`` at ``k`` fixed entries (1% of
the matrix by default) on every step after its warm-up. Forming ``E`` costs one lift (``2 m n r`` flops, as much
as the projection) and an ``m x n`` buffer; one entry of the lift is a dot product of length ``r``:

* left side (basis ``P``, ``(m, r)``; ``R = P^T G``, ``(r, n)``): ``lift(R)_ij = P_i . R_:j``;
* right side (basis ``Q``, ``(n, r)``; ``R = G Q``, ``(m, r)``): ``lift(R)_ij = R_i . Q_j``.

So ``E`` at ``k`` entries costs ``2 k r`` flops (``2 density m n r``: 1/100 of the lift at the default density),
computed in chunks of at most :data:`CHUNK_ELEMENTS` gathered elements so the transient stays bounded at any size.

:meth:`~lowrank_optim.projectors.base.Projector.residual` zeroes a complement at the basis's rounding floor
(``||E|| <= tau ||G||``). For an orthonormal basis ``||E||^2 = ||G||^2 - ||R||^2`` (``<G, lift(R)> = ||R||^2``), so
the same test needs no lift either; as in Fira's closed form (:mod:`lowrank_optim.rules.fira_closed_form`) the
difference of squared norms resolves ``||E||^2 / ||G||^2`` down to :data:`~.fira_closed_form.CANCELLATION`, so the
test is ``||E||^2 <= max(tau^2, CANCELLATION) ||G||^2`` (a device-side mask, no host read). Any other projector
(no dense fp32 basis, a basis that is not orthonormal, weighted maps) forms ``E`` and reads the entries: the same
values, as before. Under FSDP2's sharded mode (:func:`lowrank_optim.distributed.comm.sharded`) ``grad`` is this rank's
rows and the two squared norms are completed over the ranks (two fp64 scalars), so k ranks decide the floor as one
process does.
"""

from __future__ import annotations

import torch

from ..distributed import comm
from .base import LEFT, Projector, ProjState

#: Largest number of gathered basis / low-rank elements one chunk of entries holds (16 Mi fp32: 64 MiB).
CHUNK_ELEMENTS = 1 << 24


def closed_form(projector: Projector, state: ProjState, grad: torch.Tensor) -> torch.Tensor | None:
    """The basis :func:`residual_entries` computes with (``(d, r)`` fp32, orthonormal, unweighted maps), or
    ``None`` when the complement must be formed."""
    basis = projector.batch_basis(state, grad.device)
    if (basis is None or basis.dtype != torch.float32 or grad.dtype != torch.float32
            or not projector.orthonormal_basis(state) or projector.batch_weights(state) != (1.0, 1.0)):
        return None
    return basis


def residual_entries(projector: Projector, grad: torch.Tensor, low: torch.Tensor, state: ProjState,
                     index: torch.Tensor) -> torch.Tensor:
    """``projector.residual(grad, low, state).flatten()[index]``, without the full-size complement when
    :func:`closed_form` gives a basis (module docstring).

    Args:
        projector: the matrix's projector.
        grad: ``(m, n)`` gradient.
        low: ``project(grad)``: ``(r, n)`` on the left side, ``(m, r)`` on the right.
        state: the projector state (``side``, ``basis``).
        index: ``(k,)`` int32 / int64 flat (row-major) indices into ``(m, n)``.

    Returns:
        A new ``(k,)`` fp32 tensor: ``E`` at ``index``, zeros when ``E`` is at the rounding floor.
    """
    basis = closed_form(projector, state, grad)
    idx = index.long()
    if basis is None:
        return projector.residual(grad, low, state).view(-1).index_select(0, idx)
    n = int(grad.shape[1])
    rows, cols = torch.div(idx, n, rounding_mode="floor"), torch.remainder(idx, n)
    left = int(state["side"]) == LEFT
    a, b = (basis, low.T) if left else (low, basis)  # lift(R) = a @ b^T: (m, r) and (n, r)
    out = grad.view(-1).index_select(0, idx) if grad.is_contiguous() else grad.reshape(-1).index_select(0, idx)
    r = int(a.shape[1])
    step = max(1, CHUNK_ELEMENTS // max(2 * r, 1))
    for start in range(0, int(idx.numel()), step):
        i, j = rows[start: start + step], cols[start: start + step]
        dots = (a.index_select(0, i) * b.index_select(0, j)).sum(dim=1)
        out[start: start + step].sub_(dots)
    g2 = torch.linalg.vector_norm(grad, dtype=torch.float64).square()
    r2 = torch.linalg.vector_norm(low, dtype=torch.float64).square()
    spec = comm.current()
    if spec is not None:  # FSDP2: grad is this rank's rows; low its rows (right side) or the whole R (left side)
        g2 = comm.all_reduce(g2.reshape(1), spec.group).reshape(())
        r2 = comm.reduce_total(r2)
    from ..rules.fira_closed_form import CANCELLATION

    tau = projector.complement_floor(state)
    above = (g2 - r2) > g2 * max(tau * tau, CANCELLATION)
    return out.mul_(above)


__all__ = ["CHUNK_ELEMENTS", "closed_form", "residual_entries"]
