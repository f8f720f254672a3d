"""Where moment tensors live: ``fp32``, ``bf16`` or ``8bit`` (blockwise dynamic quantization).

All optimizer math runs in fp32. A store only decides how a moment is *kept* between steps:

* ``fp32``: the fp32 tensor itself (``load`` returns it, updates happen in place).
* ``bf16``: a bf16 copy, written on ``save`` with *deterministic stochastic rounding* (see
  :func:`stochastic_round_bf16_`). Rounding to nearest cannot hold a slowly decaying moment: with Adam's
  ``beta2 = 0.999`` the 0.1% decay per step is below half a bf16 ulp (2^-9 to 2^-8 of the value), so the
  rounded second moment never decreases (after 3000 zero-gradient steps it stays 1.0 where fp32 holds
  0.0497) and once gradients shrink the step is 0.3-0.5x fp32's. Stochastic rounding is unbiased, so the
  stored moment follows fp32 Adam in expectation (Zamirai et al. 2020, "Revisiting BFloat16 Training",
  arXiv:2010.06192). The random bits are a hash of (the parameter's ``round_seed``, its ``step`` count, the
  moment's name, the element's row-major index), not a generator draw: resuming from a checkpoint is
  bit-exact, every data-parallel rank rounds alike, and the result does not depend on the device or on the
  tensor's memory layout.
* ``8bit``: bitsandbytes' blockwise dynamic quantization format (Dettmers et al. 2022, arXiv:2110.02861):
  ``uint8`` codes shaped like the moment plus one fp32 ``absmax`` per block of 256 values (the last
  block may be ragged), a signed dynamic map for signed moments (Adam's first moment) and an unsigned
  one for non-negative moments (the second). Tensors under ``min_8bit_size`` (4096) elements stay fp32,
  as in bitsandbytes' own optimizers. Codes are chosen by the same deterministic stochastic rounding
  between the two neighbouring map entries (:func:`quantize_blockwise_sr_`; bitsandbytes' decoder reads
  them): rounding to the nearest entry held Adafactor's factored statistics of a >= 4096-wide matrix 4.6%
  below fp32 after gradients shrank 10x. A non-negative moment's positive value never takes the zero code: a
  value below the unsigned map's smallest positive entry (3.25e-7 of its block's largest) is stored as that
  entry. Rounded to zero, a second moment ``v`` next to an outlier in its block divides the first moment by
  ``eps`` at the next step (a user measured steps of 44,000 x lr where fp32 takes 1 x lr); stored at the floor
  it over-estimates ``v``, which only shortens that step.

The state of a moment called ``name`` is one or two plain tensors in the parameter's state dict:
``state[name]`` (fp32 / bf16 / uint8 codes) and, for 8-bit, ``state[name + "_absmax"]``; the ``bf16`` and
``8bit`` stores also keep the int ``state["round_seed"]`` (no tensor bytes).

Layout: fp32 and bf16 moments of a plain parameter take the parameter's memory layout (``like``:
transposed, ``channels_last``), so fused kernels that walk raw storage see every operand in the same
order; 8-bit codes are always row-major (quantization blocks follow the row-major element order, so the
codes do not depend on the layout), and ``load`` returns a row-major fp32 tensor.
"""

from __future__ import annotations

import zlib

import torch

from ._validation import check_choice
from .projectors.base import derive_seed

STATE_DTYPES = ("fp32", "bf16", "8bit")
BLOCKSIZE = 256
MIN_8BIT_SIZE = 4096
ABSMAX = "_absmax"
ROUND_SEED = "round_seed"
#: Elements hashed at once by the stochastic rounding (bounds its int64 temporaries to 64 MB).
ROUND_CHUNK = 1 << 22
_MASK32 = 0xFFFFFFFF
#: Odd multipliers of the element hash, below 2**31 so that int64 products of 32-bit values never overflow.
_HASH_MULTIPLIERS = (0x7FEB352D, 0x2C1B3C6D, 0x297A2D39)

_QMAPS: dict[tuple[bool, str], torch.Tensor] = {}


def _bnb_functional():
    try:
        import bitsandbytes.functional as bnb_f
    except ImportError as err:  # pragma: no cover - bitsandbytes is a hard dependency
        raise ImportError("state_dtype='8bit' needs bitsandbytes>=0.46 (pip install bitsandbytes)") from err
    return bnb_f


def qmap(signed: bool, device: torch.device) -> torch.Tensor:
    """The 256-entry dynamic quantization map (cached per sign and device; never stored in state)."""
    key = (signed, str(device))
    if key not in _QMAPS:
        _QMAPS[key] = _bnb_functional().create_dynamic_map(signed=signed).to(device)
    return _QMAPS[key]


_FIRST_POSITIVE: dict[bool, int] = {}


def first_positive_code(signed: bool) -> int:
    """Index of the smallest positive entry of the (sorted) dynamic map: the floor of a positive value of a
    non-negative moment (module docstring). Read once from the CPU map, then cached."""
    if signed not in _FIRST_POSITIVE:
        _FIRST_POSITIVE[signed] = int((qmap(signed, torch.device("cpu")) <= 0).sum())
    return _FIRST_POSITIVE[signed]


def n_blocks(numel: int) -> int:
    """Number of 256-element blocks, the last one ragged."""
    return -(-numel // BLOCKSIZE)


def is_dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers a gap-free, non-overlapping block of memory (any order of dimensions)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape, strict=True) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` have one shape and walk their (dense) memory in the same element order."""
    return a.shape == b.shape and is_dense(a) and is_dense(b) and all(
        sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape, strict=True) if n != 1)


def in_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is laid out like ``like``, else a copy of ``t`` in ``like``'s layout."""
    if same_layout(t, like):
        return t
    return torch.empty_like(like, dtype=t.dtype, memory_format=torch.preserve_format).copy_(t)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """In-place integer hash of int64 values in ``[0, 2^32)`` (xorshift-multiply rounds, all in int64)."""
    for mult in _HASH_MULTIPLIERS:
        x.bitwise_xor_(x >> 16).mul_(mult).bitwise_and_(_MASK32)
    return x.bitwise_xor_(x >> 16)


def rounding_key(seed: int, step: int, name: str) -> int:
    """The 32-bit key of one stochastic rounding: a hash of the parameter's seed, its step and the moment."""
    return derive_seed(seed, step, zlib.crc32(name.encode())) & _MASK32


def element_index(shape: tuple[int, ...], start: int, stop: int, origin: tuple[int, ...] | None = None,
                  global_shape: tuple[int, ...] | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Row-major indices (int64, flat) of rows ``start:stop`` of a tensor of ``shape``.

    With ``origin`` and ``global_shape``, the tensor is the block of a larger ``global_shape`` tensor that starts
    at ``origin`` (a shard of a moment under FSDP2), and the indices are those of its elements in the larger
    tensor: stochastic rounding keyed by them gives every element the same bits whatever the split.
    """
    rest = tuple(int(s) for s in shape[1:])
    row_numel = 1
    for s in rest:
        row_numel *= s
    if origin is None or global_shape is None:
        return torch.arange(start * row_numel, stop * row_numel, dtype=torch.int64, device=device)
    strides = [1] * len(global_shape)
    for d in range(len(global_shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * int(global_shape[d + 1])
    idx = (torch.arange(start, stop, dtype=torch.int64, device=device) + int(origin[0])) * strides[0]
    for d, size in enumerate(rest, start=1):
        axis = (torch.arange(size, dtype=torch.int64, device=device) + int(origin[d])) * strides[d]
        idx = idx.unsqueeze(-1) + axis
    return idx.reshape(-1)


def stochastic_round_bf16_(out: torch.Tensor, value: torch.Tensor, key: int, *,
                           origin: tuple[int, ...] | None = None,
                           global_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Writes fp32 ``value`` into the bf16 ``out`` with stochastic rounding; returns ``out``.

    bf16 is the upper half of an fp32 bit pattern. Adding a uniform 16-bit integer ``u`` to the fp32 bits
    and truncating the lower half rounds the magnitude up with probability ``(low 16 bits) / 2^16``, i.e.
    ``E[out] = value`` (sign-magnitude: the same holds for negative values; 0 stays 0). ``u`` is the upper
    half of ``hash(key + i)`` for the element's row-major index ``i``, computed with integer tensor ops, so
    it is identical on every device and for every memory layout of ``value`` and ``out``.

    Args:
        out: bf16 tensor of ``value``'s shape (any layout).
        value: fp32 tensor (any layout); non-finite values stay non-finite.
        key: 32-bit key (:func:`rounding_key`).
        origin: where ``out`` starts in a larger tensor of ``global_shape`` it is a block of (FSDP2's shard of a
            moment): ``i`` is then the element's row-major index in the larger tensor (:func:`element_index`),
            so a shard rounds exactly as the whole tensor would. ``None``: ``out`` is the whole tensor.
        global_shape: the larger tensor's shape (with ``origin``).

    Raises:
        TypeError: when the dtypes are not bf16 / fp32.
    """
    if out.dtype != torch.bfloat16 or value.dtype != torch.float32:
        raise TypeError(f"Invalid value: stochastic rounding maps float32 to bfloat16, got {value.dtype} -> "
                        f"{out.dtype}")
    if out.dim() == 0:
        out, value = out.view(1), value.view(1)
        origin = global_shape = None
    rows = int(out.shape[0])
    row_numel = out[0].numel() if rows else 0
    per_chunk = max(1, ROUND_CHUNK // max(row_numel, 1))
    bits_out = out.view(torch.int16)
    bits_in = value.view(torch.int32)
    for start in range(0, rows, per_chunk):
        stop = min(start + per_chunk, rows)
        idx = element_index(tuple(out.shape), start, stop, origin, global_shape, out.device)
        noise = _hash32(idx.add_(key).bitwise_and_(_MASK32)).bitwise_right_shift_(16)
        # fp32 bits + u, then the upper 16 bits (arithmetic shift keeps the sign half as int16)
        rounded = noise.view(stop - start, *out.shape[1:]).add_(bits_in[start:stop]).bitwise_right_shift_(16)
        bits_out[start:stop].copy_(rounded)
    return out


def quantize_blockwise_sr_(codes: torch.Tensor, absmax: torch.Tensor, value: torch.Tensor, code: torch.Tensor,
                           key: int, *, origin: tuple[int, ...] | None = None,
                           global_shape: tuple[int, ...] | None = None, positive_floor: int | None = None) -> None:
    """Blockwise dynamic quantization of ``value`` into ``codes`` / ``absmax`` with stochastic rounding.

    The format is bitsandbytes' (``dequantize_blockwise`` decodes it): per block of :data:`BLOCKSIZE` elements
    in row-major order, ``absmax`` is the largest magnitude and each code indexes the 256-entry ``code`` map
    (sorted ascending). A normalized value between two map entries takes the upper one with probability
    proportional to its distance from the lower one (random bits: the element hash of
    :func:`stochastic_round_bf16_`), so the decoded value is unbiased; bitsandbytes rounds to the nearest entry,
    which holds a slowly decaying value whose neighbours in the block decay at another rate. ``positive_floor``
    (a code index, :func:`first_positive_code`): a positive value takes at least that code, so it never decodes to
    zero (for non-negative moments; module docstring). ``origin`` /
    ``global_shape``: the random bits of a shard's element are those of its index in the whole tensor (as in
    :func:`stochastic_round_bf16_`); the blocks are still the shard's own.
    """
    flat = value.reshape(-1)
    numel = flat.numel()
    blocks = n_blocks(numel)
    padded = torch.zeros(blocks * BLOCKSIZE, dtype=torch.float32, device=flat.device)
    padded[:numel] = flat
    padded = padded.view(blocks, BLOCKSIZE)
    torch.amax(padded.abs(), dim=1, out=absmax)
    normalized = padded.div_(absmax.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1)).view(-1)[:numel]
    upper = torch.searchsorted(code, normalized).clamp_(1, code.numel() - 1)
    lower = upper - 1
    low, high = code[lower], code[upper]
    frac = (normalized - low).div_(high - low).clamp_(0.0, 1.0)
    if value.dim() == 0:
        origin = global_shape = None
    rows = int(value.shape[0]) if value.dim() else 1
    idx = element_index(tuple(value.shape) if value.dim() else (1,), 0, rows, origin, global_shape, flat.device)
    u = _hash32(idx.add_(key).bitwise_and_(_MASK32)).bitwise_right_shift_(8).to(torch.float32).mul_(2.0**-24)
    chosen = lower.add_((u < frac).to(torch.int64))
    if positive_floor is not None:  # a positive value keeps a positive code (second moments: no division by eps)
        chosen = torch.maximum(chosen, (normalized > 0).to(torch.int64).mul_(positive_floor))
    codes.view(-1).copy_(chosen)


class StateStore:
    """Allocates, loads and saves moment tensors in one storage format.

    Args:
        dtype: ``"fp32"``, ``"bf16"`` (stochastic rounding, see the module docstring) or ``"8bit"``.
        min_8bit_size: tensors with fewer elements stay fp32 under ``"8bit"``.

    Raises:
        ValueError: an unknown ``dtype``.
    """

    def __init__(self, dtype: str = "fp32", min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        self.dtype = check_choice("state_dtype", dtype, STATE_DTYPES)
        self.min_8bit_size = min_8bit_size

    def __repr__(self) -> str:
        return f"StateStore({self.dtype!r})"

    def quantized(self, numel: int) -> bool:
        """Whether a moment of ``numel`` elements is kept as 8-bit codes."""
        return self.dtype == "8bit" and numel >= self.min_8bit_size

    def bytes_for(self, numel: int) -> int:
        """Closed-form bytes of one moment of ``numel`` elements."""
        if self.quantized(numel):
            return numel + 4 * n_blocks(numel)
        return numel * (2 if self.dtype == "bf16" else 4)

    def create(self, state: dict, name: str, shape: tuple[int, ...] | torch.Size, device: torch.device,
               like: torch.Tensor | None = None, seed: int | None = None) -> None:
        """Allocates a zero moment ``name`` in ``state``.

        Args:
            state: the parameter's state dict.
            name: the moment's key.
            shape: its shape.
            device: its device.
            like: a tensor (the parameter) whose memory layout an fp32 / bf16 moment of the same shape
                takes (transposed, ``channels_last``; a non-dense ``like`` gives the dense layout with
                its dimension order); ``None``: row-major.
            seed: the parameter's seed for stochastic rounding (``bf16``, ``8bit``), kept as
                ``state["round_seed"]`` when the state has none yet.
        """
        numel = 1
        for s in shape:
            numel *= int(s)
        if self.quantized(numel):
            # absmax 0 decodes every code to 0, whatever the code.
            state[name] = torch.zeros(tuple(shape), dtype=torch.uint8, device=device)
            state[name + ABSMAX] = torch.zeros(n_blocks(numel), dtype=torch.float32, device=device)
            if seed is not None:
                state.setdefault(ROUND_SEED, int(seed))
            return
        dt = torch.bfloat16 if self.dtype == "bf16" else torch.float32
        if like is not None and tuple(like.shape) == tuple(shape):
            state[name] = torch.zeros_like(like, dtype=dt, device=device, memory_format=torch.preserve_format)
        else:
            state[name] = torch.zeros(tuple(shape), dtype=dt, device=device)
        state.pop(name + ABSMAX, None)  # a moment recreated below the 8-bit threshold drops its old absmax
        if self.dtype != "fp32" and seed is not None:
            state.setdefault(ROUND_SEED, int(seed))

    @staticmethod
    def load(state: dict, name: str, signed: bool = True) -> torch.Tensor:
        """The fp32 value of moment ``name`` (the stored tensor itself when it is fp32)."""
        stored = state[name]
        if stored.dtype == torch.float32:
            return stored
        if stored.dtype == torch.uint8:
            absmax = state[name + ABSMAX]
            out = _bnb_functional().dequantize_blockwise(stored, absmax=absmax, code=qmap(signed, stored.device),
                                                         blocksize=BLOCKSIZE)
            return out.view(stored.shape)
        return stored.float()

    @staticmethod
    def save(state: dict, name: str, value: torch.Tensor, signed: bool = True, *,
             origin: tuple[int, ...] | None = None, global_shape: tuple[int, ...] | None = None) -> None:
        """Writes the fp32 ``value`` back into moment ``name`` (no-op for an fp32 moment updated in place).

        bf16: stochastic rounding keyed by ``state["round_seed"]`` (0 when absent), ``state["step"]`` and
        ``name``; 8-bit: blockwise quantization in row-major order with the same stochastic rounding between
        map entries (``value`` may have any layout). ``origin`` / ``global_shape``: the moment is a shard
        starting at ``origin`` of a ``global_shape`` moment (FSDP2), whose rounding bits follow the elements'
        indices in the whole moment (:func:`element_index`).
        """
        stored = state[name]
        where = {"origin": origin, "global_shape": global_shape}
        if stored.dtype == torch.uint8:
            key = rounding_key(int(state.get(ROUND_SEED, 0)), int(state.get("step", 0)), name)
            quantize_blockwise_sr_(stored, state[name + ABSMAX], value.float(), qmap(signed, stored.device), key,
                                   positive_floor=None if signed else first_positive_code(False), **where)
        elif stored.dtype == torch.bfloat16:
            key = rounding_key(int(state.get(ROUND_SEED, 0)), int(state.get("step", 0)), name)
            stochastic_round_bf16_(stored, value.float(), key, **where)
        elif value is not stored:
            stored.copy_(value)
