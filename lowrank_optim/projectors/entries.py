"""The complement ``E = G - project_back(project(G))`` at a few entries, without forming it.

GaLore+'s sparse residual (:mod:`lowrank_optim.rules.sparse_residual`) reads ``E`` at ``k`` fixed entries (1% of
the matrix by default) on every step after its warm-up. Forming ``E`` costs one lift (``2 m n r`` flops, as much
as the projection) and an ``m x n`` buffer; one entry of the lift is a dot product of length ``r``:

* left side (basis ``P``, ``(m, r)``; ``R = P^T G``, ``(r, n)``): ``lift(R)_ij = P_i . R_:j``;
* right side (basis ``Q``, ``(n, r)``; ``R = G Q``, ``(m, r)``): ``lift(R)_ij = R_i . Q_j``.

So ``E`` at ``k`` entries costs ``2 k r`` flops (``2 density m n r``: 1/100 of the lift at the default density),
computed in chunks of at most :data:`CHUNK_ELEMENTS` gathered elements so the transient stays bounded at any size.

:meth:`~lowrank_optim.projectors.base.Projector.residual` zeroes a complement at the basis's rounding floor
(``||E|| <= tau ||G||``, ``tau = 64 eps`` for an fp32 basis). For an orthonormal basis ``||E||^2 = ||G||^2 -
||R||^2`` (``<G, lift(R)> = ||R||^2``), but that difference of squared norms resolves ``||E||^2 / ||G||^2`` only
down to :data:`~lowrank_optim.rules.fira_closed_form.CANCELLATION` (``R``'s own rounding), i.e. ``||E|| / ||G||``
down to 0.28%, far above ``tau``. So the closed form is taken only when it is clearly above that
(:func:`clearly_above_floor`, where the formed test would keep ``E`` too); otherwise ``E`` is formed and its exact
test decides: a gradient fitted by its subspace to within 0.28% (a refresh step's own gradient, measured 0.24%)
gets exactly the formed complement's entries. The test reads one host value per matrix and step, so it runs on the
CPU only; on a GPU, where the lift is cheap and a read is a sync, ``E`` is always formed. Any other projector (no
dense fp32 basis, a basis that is not orthonormal, weighted maps) forms ``E`` and reads the entries. Under FSDP2's
sharded mode (:func:`lowrank_optim.distributed.comm.sharded`) ``grad`` is this rank's rows and the two norms are
completed over the ranks (two fp64 scalars), so every rank takes the same path.
"""

from __future__ import annotations

import torch

from ..distributed import comm
from ..rules.fira_closed_form import CANCELLATION
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
    if basis is not None and not clearly_above_floor(projector, grad, low, state):
        basis = None  # at or near the rounding floor: the formed complement's exact test decides
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
    return out


def clearly_above_floor(projector: Projector, grad: torch.Tensor, low: torch.Tensor, state: ProjState) -> bool:
    """Whether ``||E||^2 = ||G||^2 - ||R||^2`` (orthonormal basis) is above :data:`CANCELLATION` ``||G||^2``, where the
    difference of squared norms still resolves it: then the formed complement is far above its rounding floor
    (``||E|| > tau ||G||``) too, and its entries need no floor. One host read, so only on the CPU (``False`` on
    other devices and the meta device: the formed complement decides without a read). Under FSDP2 the two norms are
    completed over the ranks, so every rank decides alike."""
    if grad.device.type != "cpu":
        return False
    g2 = torch.linalg.vector_norm(grad, dtype=torch.float64).square()
    r2 = torch.linalg.vector_norm(low, dtype=torch.float64).square()
    spec = comm.current()
    if spec is not None:  # FSDP2: grad is this rank's rows; low its rows (right side) or the whole R (left side)
        g2 = comm.all_reduce(g2.reshape(1), spec.group).reshape(())
        r2 = comm.reduce_total(r2)
    tau = projector.complement_floor(state)
    return bool((g2 - r2) > g2 * max(tau * tau, CANCELLATION))


__all__ = ["CHUNK_ELEMENTS", "clearly_above_floor", "closed_form", "residual_entries"]
