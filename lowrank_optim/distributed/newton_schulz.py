"""Muon's Newton-Schulz iteration on a matrix split across ranks, equal to one process's up to summation order.

The inner rule sees this rank's chunk ``X_j`` of a matrix ``X`` of global shape ``(M, N)``, split along one axis
(:class:`~.comm.Sharding`: rows of ``(m, r)`` or ``(m, n)`` moments, columns of ``(r, n)`` ones). One process
(:func:`~lowrank_optim.rules.muon.newton_schulz`) runs on the wide orientation ``Y`` (``X^T`` when ``M > N``, else
``X``; ``Y`` is ``s x l`` with ``s = min(M, N)``, ``l = max(M, N)``): ``Y <- Y / max|Y|``, ``Y <- Y / ||Y||_F``, then
``steps`` times ``Y <- a Y + (b A + c A^2) Y`` with the Gram ``A = Y Y^T`` (``s x s``). Two exact forms:

* **Gram form** (the split axis is ``l``, the long one: ``Y``'s columns are split): ``A = sum_j Y_j Y_j^T`` is one
  ``s x s`` SUM all-reduce per iteration and ``Y_j <- a Y_j + (b A + c A^2) Y_j`` is local, so the work divides by
  the ranks. The normalisation is one MAX all-reduce (the largest magnitude) and one SUM all-reduce (the squared
  Frobenius norm). Traffic per call, in the ring model of :data:`~.comm.TRAFFIC`: ``2 (k-1)/k (steps s^2 + 2)``
  fp32 elements.
* **Gather form** (the split axis is ``s``, the short one, e.g. the rows of a wide ``(m, n)`` moment, or the Gram
  form would move more): the Gram needs every row, so ``X`` is all-gathered (``(k-1) ceil(L/k) (M N / L)``
  elements, ``L`` the split axis' length), every rank runs one process's function on it (bit-identical to one
  process) and keeps its chunk. The work is repeated on every rank, the state stays divided.

The Gram form is chosen exactly when it is possible and moves fewer bytes: ``2 steps s <= l`` (5 iterations:
the long axis at least 10 times the short one: GaLore-rank moments ``(m, r)`` / ``(r, n)`` with ``r <= m / 10``,
tall full-size moments with ``m >= 10 n``). The choice reads global shapes only, so every rank makes the same
one. Results equal one process up to the order of the Gram's and the norm's sums (relative ``1e-6`` in fp32).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..rules.muon import NS_COEFFICIENTS, newton_schulz
from . import comm
from .shards import Layout, all_gather_cols, all_gather_rows


def gram_form(shape: tuple[int, ...], dim: int, steps: int) -> bool:
    """Whether a matrix of global ``shape`` split along ``dim`` runs the Gram form (see the module): the split
    axis is the long one of the wide orientation and ``2 steps min(shape) <= max(shape)``."""
    rows, cols = int(shape[0]), int(shape[1])
    tall = rows > cols
    long_split = (dim == 0) if tall else (dim == 1)
    short, long = (cols, rows) if tall else (rows, cols)
    return long_split and 2 * steps * short <= long


def traffic_elements(shape: tuple[int, ...], dim: int, steps: int, world: int) -> float:
    """Elements (fp32) one call moves into a rank, as :data:`~.comm.TRAFFIC` counts them (closed form)."""
    rows, cols = int(shape[0]), int(shape[1])
    if world <= 1:
        return 0.0
    if gram_form(shape, dim, steps):
        short = min(rows, cols)
        return 2 * (world - 1) / world * (steps * short * short + 2)
    length, other = (rows, cols) if dim == 0 else (cols, rows)
    return float((world - 1) * math.ceil(length / world) * other)


def sharded_newton_schulz(x: torch.Tensor, spec: comm.Sharding, steps: int = 5, eps: float = 1e-7,
                          coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """This rank's chunk of ``newton_schulz(X)``, ``X`` the whole matrix ``x`` is the chunk of.

    Args:
        x: this rank's chunk (fp32), ``(M_j, N)`` when ``spec.dim == 0`` or ``(M, N_j)`` when it is 1 (possibly
            empty).
        spec: the split: ``spec.shape`` is ``(M, N)``, ``spec.dim`` the split axis (0 or 1), ``spec.group`` the
            ranks (every rank of it must call, in the same order).
        steps: Newton-Schulz iterations (Muon's ``ns_steps``, 5).
        eps: floor of the Frobenius norm (Muon's ``ns_eps``, 1e-7).
        coefficients: ``(a, b, c)`` of the quintic (Keller Jordan's, :data:`~lowrank_optim.rules.muon.NS_COEFFICIENTS`).
        dtype: precision of the products (Muon's ``ns_dtype``). In bf16 the Gram form sums the partial Grams of the
            bf16 chunks in fp32 (each product exact) and rounds the sum to bf16 once, as one process's bf16 product
            rounds its fp32 accumulation once: the two differ only where the summation order moves a value across a
            bf16 rounding boundary.

    Returns:
        A new fp32 tensor shaped like ``x``.

    Raises:
        ValueError: ``spec`` does not split a 2-D matrix along axis 0 or 1.
    """
    if len(spec.shape) != 2 or spec.dim not in (0, 1):
        raise ValueError(f"Invalid spec: Newton-Schulz splits a 2-D matrix along axis 0 or 1, got shape "
                         f"{spec.shape} split along {spec.dim}")
    rows, cols = int(spec.shape[0]), int(spec.shape[1])
    group = spec.group
    lay = Layout(None, group, dist.get_rank(group), dist.get_world_size(group))
    if not gram_form((rows, cols), spec.dim, steps):
        whole = all_gather_rows(x, rows, lay) if spec.dim == 0 else all_gather_cols(x, cols, lay).contiguous()
        with comm.sharded(None):  # one process's function on the whole matrix
            out = newton_schulz(whole, steps, eps, coefficients, dtype)
        offset, size = lay.rows(rows if spec.dim == 0 else cols)
        return (out[offset: offset + size] if spec.dim == 0 else out[:, offset: offset + size]).contiguous()
    a, b, c = coefficients
    tall = rows > cols
    y = x.T if tall else x  # (s, l_j): this rank's columns of the wide orientation
    top = y.abs().amax() if y.numel() else y.new_zeros(())
    top = comm.all_reduce_max(top.reshape(1).clone(), group).reshape(())
    y = y / top.clamp(min=torch.finfo(y.dtype).tiny)
    total = comm.all_reduce(y.square().sum().reshape(1), group).reshape(())
    y = (y / total.sqrt().clamp(min=eps)).to(dtype)
    for _ in range(steps):
        y32 = y.float()  # bf16 products are exact in fp32: the partial Grams are the unrounded sums' terms
        gram = comm.all_reduce((y32 @ y32.T).contiguous(), group).to(dtype)  # A = sum_j Y_j Y_j^T, (s, s)
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        y = torch.addmm(y, poly, y, beta=a)
    return (y.T if tall else y).to(torch.float32).contiguous()


__all__ = ["gram_form", "sharded_newton_schulz", "traffic_elements"]
