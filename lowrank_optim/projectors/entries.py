"""The complement ``E = G - project_back(project(G))`` at a few entries, without forming it.

GaLore+'s sparse residual (:mod:`lowrank_optim.rules.sparse_residual`) reads ``E`` at ``k`` fixed entries (1% of
the matrix by default) on every step after its warm-up. Forming ``E`` costs one lift (``2 m n r`` flops, as much
as the projection) and an ``m x n`` buffer; one entry of the lift is a dot product of length ``r``:

* left side (basis ``P``, ``(m, r)``; ``R = P^T G``, ``(r, n)``): ``lift(R)_ij = P_i . R_:j``;
* right side (basis ``Q``, ``(n, r)``; ``R = G Q``, ``(m, r)``): ``lift(R)_ij = R_i . Q_j``.

So ``E`` at ``k`` entries costs ``2 k r`` flops (``2 density m n r``: 1/100 of the lift at the default density),
computed as one sampled dense-dense product (``torch.sparse.sampled_addmm`` over ``G``'s entries as a CSR matrix,
:func:`sampled_lift_residual`): no gathered ``(k, r)`` operands, whose copies cost more than the lift they replace
(LLaMA-60M shapes on two CPU cores: 0.39 ms for a 1376 x 512 matrix, against 2.5 ms gathering rows and 1.0 ms
forming ``E``).

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

import warnings

import torch

from ..distributed import comm
from ..rules.fira_closed_form import CANCELLATION
from .base import LEFT, Projector, ProjState


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
        index: ``(k,)`` int32 / int64 flat (row-major) indices into ``(m, n)``, sorted ascending without repeats
            (the sparse residual keeps them so).

    Returns:
        A new ``(k,)`` fp32 tensor: ``E`` at ``index``, zeros when ``E`` is at the rounding floor.
    """
    basis = closed_form(projector, state, grad)
    if basis is not None and not clearly_above_floor(projector, grad, low, state):
        basis = None  # at or near the rounding floor: the formed complement's exact test decides
    if basis is None:
        return projector.residual(grad, low, state).view(-1).index_select(0, index)
    left = int(state["side"]) == LEFT
    a, b = (basis, low) if left else (low, basis.T)  # lift(R) = a @ b: (m, r) @ (r, n)
    return sampled_lift_residual(grad, a, b, index)


def sampled_lift_residual(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(grad - a @ b).flatten()[index]`` as one sampled product (SDDMM): ``G`` at the entries as a CSR matrix and
    ``torch.sparse.sampled_addmm(G_csr, a, b, beta=1, alpha=-1)``, which takes one length-``r`` dot product per entry
    (``2 k r`` flops) and no gathered ``(k, r)`` operands.

    Args:
        grad: ``(m, n)`` fp32.
        a: ``(m, r)`` fp32.
        b: ``(r, n)`` fp32 (any strides).
        index: ``(k,)`` sorted, distinct flat row-major indices into ``(m, n)`` (int32 or int64).

    Returns:
        A new ``(k,)`` fp32 tensor.
    """
    m, n = (int(s) for s in grad.shape)
    rows = torch.div(index, n, rounding_mode="floor")
    cols = torch.remainder(index, n)
    # row pointers of the sorted entries: searchsorted, not bincount (which reads its input's max on a GPU)
    crow = torch.searchsorted(rows, torch.arange(m + 1, dtype=rows.dtype, device=rows.device),
                              out_int32=index.dtype == torch.int32)
    return sampled_csr_residual(crow, cols, grad.reshape(-1).index_select(0, index), (m, n), a, b)


def sampled_csr_residual(crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...],
                         a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``values - (a @ b)`` at the entries of the CSR pattern ``(crow, cols)`` of ``shape`` (``(m, n)``, or ``(B, m,
    n)`` with batched ``a`` / ``b``): one ``torch.sparse.sampled_addmm``, returned as its values."""
    with warnings.catch_warnings():  # torch flags its CSR layout as beta once per process
        warnings.simplefilter("ignore", UserWarning)
        sampled = torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)
        return torch.sparse.sampled_addmm(sampled, a, b, beta=1.0, alpha=-1.0).values()


def resolves_complement(g2: float | torch.Tensor, r2: float | torch.Tensor, tau: float) -> bool | torch.Tensor:
    """The closed-form test on ``g2 = ||G||^2`` and ``r2 = ||R||^2`` (fp64 tensors or Python floats):
    ``||G||^2 - ||R||^2 > max(tau^2, CANCELLATION) ||G||^2``."""
    return (g2 - r2) > g2 * max(tau * tau, CANCELLATION)


def clearly_above_floor(projector: Projector, grad: torch.Tensor, low: torch.Tensor, state: ProjState) -> bool:
    """Whether ``||E||^2 = ||G||^2 - ||R||^2`` (orthonormal basis) is above :data:`CANCELLATION` ``||G||^2``, where the
    difference of squared norms still resolves it: then the formed complement is far above its rounding floor
    (``||E|| > tau ||G||``) too, and its entries need no floor. One host read, so only on the CPU (``False`` on
    other devices and the meta device: the formed complement decides without a read). Under FSDP2 the two norms are
    completed over the ranks, so every rank decides alike."""
    if grad.device.type != "cpu":
        return False
    # fp32 norms of the row norms (relative error ~1e-7, 1/50 of the CANCELLATION margin compared below; a whole-tensor
    # fp32 vector_norm accumulates row-major on the CPU, 1.2e-5 of ||G||^2 for a 1376 x 512 matrix, above the margin),
    # squared in fp64: an fp64 norm would first copy the whole gradient to fp64
    g2 = torch.linalg.vector_norm(torch.linalg.vector_norm(grad, dim=-1)).double().square()
    r2 = torch.linalg.vector_norm(torch.linalg.vector_norm(low, dim=-1)).double().square()
    spec = comm.current()
    if spec is not None:  # FSDP2: grad is this rank's rows; low its rows (right side) or the whole R (left side)
        g2 = comm.all_reduce(g2.reshape(1), spec.group).reshape(())
        r2 = comm.reduce_total(r2)
    return bool(resolves_complement(g2, r2, projector.complement_floor(state)))


__all__ = ["clearly_above_floor", "closed_form", "residual_entries", "resolves_complement", "sampled_csr_residual",
           "sampled_lift_residual"]
