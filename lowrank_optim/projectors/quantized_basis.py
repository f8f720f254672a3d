"""Quantized storage of projector bases (Q-GaLore's idea, Zhang et al. 2024, arXiv:2407.08296).

A ``(d, r)`` fp32 basis is kept in the projector state as plain tensors and decoded to fp32 for every
projection:

* ``"fp32"``: ``basis`` as is (4 bytes per entry);
* ``"bf16"``: ``basis`` rounded to bf16 (2 bytes);
* ``"int8"``: symmetric absmax quantization, blockwise along each column: the ``d`` entries of a column are
  cut into blocks of :data:`BLOCK` rows, each block stores ``code = round(127 x / absmax)`` (int8) and its
  absmax / 127 (fp32): ``basis`` int8 ``(d, r)`` + ``basis_scale`` fp32 ``(ceil(d / BLOCK), r)``;
* ``"int4"``: the same with codes in ``[-7, 7]``, two per byte (row ``2i`` in the low nibble, ``2i + 1`` in
  the high one): ``basis`` uint8 ``(ceil(d / 2), r)``, ``basis_scale`` as int8, and ``basis_rows = d`` (an int).

Rounding to nearest adds a zero-mean error of variance ``step^2 / 12`` to every entry, so a decoded column's
squared norm is too large on average by ``d step^2 / 12``: about +1.7% for int4 at ``d = 128 .. 1024`` (the lift
``P N`` of every step about 0.85% too long), 1e-4 for int8. The encoder removes that bias: after rounding, each
column's block scales are multiplied by one factor so that the decoded column has the fp32 column's norm (same
storage, one multiplication). An entry's error then stays within ``absmax / (2 L) + |1 - factor| absmax``.

Decoding depends only on the stored tensors (their dtype says which form), so a checkpoint decodes the same
basis whatever the projector's options. Rounding is to nearest (deterministic): quantizing the same basis
twice gives the same codes, which keeps resume bit-exact.
"""

from __future__ import annotations

import math
from typing import Any

import torch

BASIS_DTYPES = ("fp32", "bf16", "int8", "int4")
#: Rows per quantization block along a basis column (the 8-bit state store's block size).
BLOCK = 256
_LEVELS = {"int8": 127, "int4": 7}


def _blocks(d: int) -> int:
    return math.ceil(d / BLOCK)


def basis_bytes(d: int, r: int, basis_dtype: str) -> int:
    """Closed-form bytes of a stored ``(d, r)`` basis (codes plus scales)."""
    if basis_dtype == "fp32":
        return 4 * d * r
    if basis_dtype == "bf16":
        return 2 * d * r
    codes = d * r if basis_dtype == "int8" else math.ceil(d / 2) * r
    return codes + 4 * _blocks(d) * r


def encode_basis(basis: torch.Tensor, basis_dtype: str) -> dict[str, Any]:
    """The state entries holding ``basis`` (a ``(d, r)`` float tensor) in ``basis_dtype``."""
    if basis_dtype == "fp32":
        return {"basis": basis.float()}
    if basis_dtype == "bf16":
        return {"basis": basis.to(torch.bfloat16)}
    levels = _LEVELS[basis_dtype]
    d, r = basis.shape
    nb = _blocks(d)
    x = basis.float()
    if nb * BLOCK != d:
        x = torch.cat([x, x.new_zeros(nb * BLOCK - d, r)])
    x = x.view(nb, BLOCK, r)
    scale = x.abs().amax(dim=1) / levels  # (nb, r)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(x / safe.unsqueeze(1)).clamp_(-levels, levels)
    # one factor per column so that the decoded column keeps the fp32 column's norm (removes rounding's bias)
    decoded_norm = (codes * scale.unsqueeze(1)).square().sum(dim=(0, 1)).sqrt()
    true_norm = x.square().sum(dim=(0, 1)).sqrt()
    factor = torch.where(decoded_norm > 0, true_norm / torch.where(decoded_norm > 0, decoded_norm, 1.0), 1.0)
    scale = scale * factor
    codes = codes.view(nb * BLOCK, r)[:d]
    if basis_dtype == "int8":
        return {"basis": codes.to(torch.int8), "basis_scale": scale}
    nibbles = (codes + 8).to(torch.uint8)  # 1..15
    if d % 2:
        nibbles = torch.cat([nibbles, nibbles.new_full((1, r), 8)])
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    return {"basis": packed.contiguous(), "basis_scale": scale, "basis_rows": int(d)}


def decode_basis(state: dict[str, Any]) -> torch.Tensor:
    """The fp32 ``(d, r)`` basis held in ``state`` (any of the forms above)."""
    basis = state["basis"]
    if basis.dtype == torch.float32:
        return basis
    if basis.dtype in (torch.bfloat16, torch.float16, torch.float64):
        return basis.float()
    scale = state["basis_scale"]
    if basis.dtype == torch.uint8:  # int4, packed
        d = int(state["basis_rows"])
        low = (basis & 0x0F).to(torch.int16) - 8
        high = (basis >> 4).to(torch.int16) - 8
        codes = torch.stack([low, high], dim=1).reshape(-1, basis.shape[1])[:d]
    else:
        codes = basis
    d, r = codes.shape
    nb = scale.shape[0]
    x = codes.float()
    if nb * BLOCK != d:
        x = torch.cat([x, x.new_zeros(nb * BLOCK - d, r)])
    return (x.view(nb, BLOCK, r) * scale.unsqueeze(1)).view(nb * BLOCK, r)[:d]


#: Relative floor ``tau`` of a computed complement ``E = G - P P^T G`` by stored basis form: ``||E|| <= tau ||G||``
#: is rounding or quantization error, not gradient. Measured noise of ``E`` for a gradient of rank below r
#: (true complement 0), LLaMA-like shapes 64 x 512 to 1024 x 4096: fp32 0.8e-6 to 1.1e-6 (floor 64 eps = 7.6e-6),
#: bf16 1.8e-3 to 2.1e-3 (floor 1.6e-2), int8 7.1e-3 to 7.7e-3 (floor 3.1e-2). int4's noise is 0.14 of the
#: gradient, as large as real complements: complement-taking rules refuse int4 bases
#: (:meth:`lowrank_optim.rules.base.ResidualRule.check_projector`).
RESIDUAL_FLOORS = {"fp32": 64 * torch.finfo(torch.float32).eps, "bf16": 4.0 / 256, "int8": 4.0 / 127}


def stored_form(state: dict[str, Any]) -> str:
    """Which of :data:`BASIS_DTYPES` ``state["basis"]`` is stored in (``"fp32"`` when there is no basis)."""
    basis = state.get("basis")
    if not isinstance(basis, torch.Tensor) or basis.dtype == torch.float32:
        return "fp32"
    if basis.dtype == torch.uint8:
        return "int4"
    return "int8" if basis.dtype == torch.int8 else "bf16"


def residual_floor(state: dict[str, Any]) -> float:
    """The relative floor :data:`RESIDUAL_FLOORS` of the complement for the basis stored in ``state``."""
    return RESIDUAL_FLOORS.get(stored_form(state), 1.0)


def is_encoded(state: dict[str, Any]) -> bool:
    """Whether ``state["basis"]`` is already in a stored (non-fp32) form."""
    return state["basis"].dtype != torch.float32


__all__ = ["BASIS_DTYPES", "BLOCK", "RESIDUAL_FLOORS", "basis_bytes", "decode_basis", "encode_basis", "is_encoded",
           "residual_floor", "stored_form"]
