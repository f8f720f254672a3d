"""Projector bases of FSDP2 sharded matrices, in any stored form, as chunks of each tensor's own first axis.

A basis projector's state holds, besides ints, tensors whose first axis runs along the projected axis ``d``
(``m`` on the left side, ``n`` on the right): the basis in its stored form
(:mod:`~lowrank_optim.projectors.quantized_basis`) and Online Subspace Descent's Adam moments of the basis:

==================  =========================  ============================  ===========================
key                 fp32 / bf16                int8                          int4
==================  =========================  ============================  ===========================
``basis``           ``(d, r)`` fp32 / bf16     ``(d, r)`` int8 codes         ``(ceil(d/2), r)`` uint8
``basis_scale``     --                         ``(ceil(d/256), r)`` fp32     ``(ceil(d/256), r)`` fp32
``p_exp_avg(_sq)``  ``(d, r)`` fp32 (OSD)      --                            --
==================  =========================  ============================  ===========================

Every rank keeps its chunk of each tensor along that tensor's own first axis, split by torch's chunk rule
(:func:`~.shards.chunk`), so a checkpoint places each as ``Shard(0)`` of its whole shape and
``torch.distributed.checkpoint`` moves the stored bytes themselves to any world size: codes are never
requantized. The chunks of codes and of scales need not cover the same rows of the basis (an int8 block of 256
rows may straddle two ranks; an int4 byte holds two rows): a step decodes just in time (:func:`step_basis`):

* left side (``P``, ``m x r``; this rank needs its rows ``[o, o + s)``, those of its ``W_i``): fp32 and bf16
  chunks are those rows already (no traffic); int8 codes too, and the whole ``scales`` are all-gathered
  (``4 ceil(m / 256) r`` bytes); int4 codes and scales are all-gathered (``ceil(m / 2) r + 4 ceil(m / 256) r``),
  decoded and cut;
* right side (``Q``, ``n x r``, needed whole): every stored tensor is all-gathered and decoded: ``4 n r`` bytes
  (fp32), ``2 n r`` (bf16), ``n r + 4 ceil(n / 256) r`` (int8), ``ceil(n / 2) r + 4 ceil(n / 256) r`` (int4).

Decoding a code is one product ``code x scale`` per entry, so the rows decoded here are bit-identical to the same
rows of one process's decoded basis, and the codes themselves are the owner rank's (:func:`~.fsdp._refreshed`
runs the projector's own ``init`` / ``update`` on the whole gradient and the whole old state, :func:`gather_to`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..projectors.base import Projector, ProjState
from ..projectors.quantized_basis import BLOCK, RESIDUAL_FLOORS, decode_basis, stored_form
from . import comm
from .shards import Layout, all_gather_rows, gather_rows_to, wrap

#: Projector-state tensors kept as chunks of their own first axis (which runs along the basis rows ``d``).
BASIS_KEYS = ("basis", "basis_scale", "p_exp_avg", "p_exp_avg_sq")


def lengths(pst: dict[str, Any], d: int) -> dict[str, int]:
    """Whole first-axis length of each :data:`BASIS_KEYS` tensor of ``pst`` for a basis of ``d`` rows: ``d``,
    ``ceil(d / 2)`` for int4's packed codes (``uint8``), ``ceil(d / 256)`` for ``basis_scale``."""
    out: dict[str, int] = {}
    for key in BASIS_KEYS:
        t = pst.get(key)
        if not isinstance(t, torch.Tensor):
            continue
        if key == "basis_scale":
            out[key] = math.ceil(d / BLOCK)
        elif key == "basis" and t.dtype == torch.uint8:
            out[key] = math.ceil(d / 2)
        else:
            out[key] = d
    return out


def gather(pst: dict[str, Any], d: int, lay: Layout) -> dict[str, Any]:
    """``pst`` (this rank's chunks) with every :data:`BASIS_KEYS` tensor whole, on every rank (all-gathers)."""
    return {**pst, **{k: all_gather_rows(pst[k], n, lay) for k, n in lengths(pst, d).items()}}


def gather_to(pst: dict[str, Any], d: int, lay: Layout, owner: int) -> dict[str, Any] | None:
    """``pst`` with every :data:`BASIS_KEYS` tensor whole on rank ``owner`` (``None`` elsewhere; gathers)."""
    whole = {k: gather_rows_to(pst[k], n, lay, owner) for k, n in lengths(pst, d).items()}
    return {**pst, **whole} if lay.rank == owner else None


def cut(pst: dict[str, Any], lay: Layout) -> dict[str, Any]:
    """``pst`` (whole, as one process holds it) with each :data:`BASIS_KEYS` tensor cut to this rank's chunk of
    its own first axis (copies; no communication)."""
    out = dict(pst)
    for key in BASIS_KEYS:
        t = pst.get(key)
        if isinstance(t, torch.Tensor):
            offset, size = lay.rows(int(t.shape[0]))
            out[key] = t[offset: offset + size].clone()
    return out


def export(pst: dict[str, Any], d: int, lay: Layout) -> dict[str, Any]:
    """``pst`` with each :data:`BASIS_KEYS` chunk wrapped as a ``DTensor`` placed ``Shard(0)`` of its whole shape
    (sharing storage), what ``torch.distributed.checkpoint`` saves and reshards."""
    return {**pst, **{k: wrap(pst[k], lay, 0, (n, *tuple(pst[k].shape[1:]))) for k, n in lengths(pst, d).items()}}


def step_basis(pst: dict[str, Any], d: int, lay: Layout, left: bool) -> torch.Tensor:
    """The fp32 basis a step needs: this rank's rows ``[o, o + s)`` of ``P`` (``left``; ``(o, s) =
    lay.rows(d)``, the rows of ``W_i``) or the whole ``Q`` (right), decoded from the chunks (module docstring).

    Raises:
        ValueError: ``pst`` holds no ``basis`` tensor.
    """
    basis = pst.get("basis")
    if not isinstance(basis, torch.Tensor):
        raise ValueError(f"Invalid projector state: no 'basis' tensor (keys {sorted(pst)})")
    offset, size = lay.rows(d)
    if basis.dtype == torch.float32:
        return basis if left else all_gather_rows(basis, d, lay)
    if basis.dtype != torch.int8 and basis.dtype != torch.uint8:  # bf16 (and fp16 / fp64 read as such)
        return basis.float() if left else all_gather_rows(basis, d, lay).float()
    scale = all_gather_rows(pst["basis_scale"], math.ceil(d / BLOCK), lay)
    if basis.dtype == torch.int8 and left:  # the codes of this rank's rows are local
        return decode_rows(basis, scale, offset)
    codes = all_gather_rows(basis, math.ceil(d / 2) if basis.dtype == torch.uint8 else d, lay)
    whole = decode_basis({"basis": codes, "basis_scale": scale, "basis_rows": d})
    return whole[offset: offset + size] if left else whole


def decode_rows(codes: torch.Tensor, scale: torch.Tensor, offset: int) -> torch.Tensor:
    """Rows ``[offset, offset + len(codes))`` of a decoded int8 basis from their codes alone: ``codes`` int8
    ``(s, r)``, ``scale`` the whole fp32 ``(ceil(d / 256), r)``; each entry is ``code x scale[row // 256]``, the one
    product :func:`~lowrank_optim.projectors.quantized_basis.decode_basis` takes, so bit-identical to its rows."""
    rows = torch.arange(offset, offset + int(codes.shape[0]), dtype=torch.int64, device=codes.device) // BLOCK
    return codes.float() * scale[rows]


class StepBasis(Projector):
    """The base class's matrix products on an explicit fp32 basis (a view ``{"side", "rank", "basis"}`` of this
    rank's rows of ``P`` or the whole ``Q``) with the complement floor of the basis's stored form, tested on the
    whole matrix.

    One process zeroes a complement ``E = G - lift(R)`` with ``||E|| <= tau ||G||`` (``tau`` by stored form,
    :data:`~lowrank_optim.projectors.quantized_basis.RESIDUAL_FLOORS`: 3.1e-2 for int8). Here ``G`` and ``E`` are
    this rank's rows, so :meth:`residual` completes both norms over the ranks of the active
    :func:`~.comm.sharded` context (one all-reduce of two numbers) before the test; out of one, it is local.

    Args:
        form: stored form of the basis (``"fp32"``, ``"bf16"``, ``"int8"`` or ``"int4"``).
    """

    name = "step_basis"

    def __init__(self, form: str = "fp32") -> None:
        super().__init__(rank=1)
        self.form = form
        self.floor = RESIDUAL_FLOORS.get(form, 1.0)

    def complement_floor(self, state: ProjState) -> float:
        return self.floor

    def orthonormal_basis(self, state: ProjState) -> bool:
        """An fp32 view is the projector's own orthonormal basis (the sharded mode takes only orthonormal projectors
        with complement-taking residuals); a decoded quantized one is orthonormal only to its rounding."""
        return self.form == "fp32"

    def residual(self, grad: torch.Tensor, low: torch.Tensor, state: ProjState, alpha: float = 1.0) -> torch.Tensor:
        out = grad.clone(memory_format=torch.contiguous_format)
        self.add_back(out, low, state, -alpha)
        if self.floor > 0:
            sums = torch.stack([out.float().square().sum(), grad.float().square().sum()])
            spec = comm.current()
            if spec is not None:
                comm.all_reduce(sums, spec.group)
            out.mul_(sums[0].sqrt() > self.floor * sums[1].sqrt())
        return out


#: One :class:`StepBasis` per stored form.
STEP_BASES = {form: StepBasis(form) for form in ("fp32", "bf16", "int8", "int4")}


def step_projector(pst: dict[str, Any]) -> StepBasis:
    """The :class:`StepBasis` for the stored form of ``pst["basis"]`` (fp32 when there is none)."""
    return STEP_BASES[stored_form(pst)]


__all__ = ["BASIS_KEYS", "STEP_BASES", "StepBasis", "cut", "decode_rows", "export", "gather", "gather_to", "lengths",
           "step_basis", "step_projector"]
