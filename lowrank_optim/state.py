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

import sys
import zlib

import torch

from . import fused_codecs
from ._validation import check_choice
from .projectors.base import derive_seed

STATE_DTYPES = ("fp32", "bf16", "8bit")
BLOCKSIZE = 256
MIN_8BIT_SIZE = 4096
ABSMAX = "_absmax"
ROUND_SEED = "round_seed"
#: Elements hashed at once by the stochastic rounding of a bf16 moment (bounds its int32 temporary to 16 MB).
ROUND_CHUNK = 1 << 22
_MASK32 = 0xFFFFFFFF
#: Odd multipliers of the element hash (a 32-bit xorshift-multiply hash, computed in wrapping int32).
_HASH_MULTIPLIERS = (0x7FEB352D, 0x2C1B3C6D, 0x297A2D39)
_LITTLE_ENDIAN = sys.byteorder == "little"

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


def rounding_key(seed: int, step: int, name: str) -> int:
    """The 32-bit key of one stochastic rounding: a hash of the parameter's seed, its step and the moment."""
    return derive_seed(seed, step, zlib.crc32(name.encode())) & _MASK32


def _i32(v: int) -> int:
    """``v mod 2^32`` as the signed int32 value with the same 32 bits."""
    v &= _MASK32
    return v - (1 << 32) if v >= 1 << 31 else v


def _affine32(first: int, step: int, n: int, device: torch.device | str) -> torch.Tensor:
    """int32 tensor of the 32-bit patterns of ``first + step * i`` (mod ``2^32``), ``i`` in ``range(n)``.

    One ``arange`` when the values stay inside int32's range, else ``arange(n) * step + first`` in int32, whose
    additions and multiplications wrap modulo ``2^32`` (two's complement: the low 32 bits of a sum or product do
    not depend on signedness).
    """
    lo, stride = _i32(first), _i32(step)
    if n <= 0:
        return torch.empty(0, dtype=torch.int32, device=device)
    if stride > 0 and lo + stride * (n - 1) <= (1 << 31) - 2:
        return torch.arange(lo, lo + stride * (n - 1) + 1, stride, dtype=torch.int32, device=device)
    out = torch.arange(n, dtype=torch.int32, device=device)
    if stride != 1:
        out.mul_(stride)
    return out.add_(lo)


def _keyed_index(shape: tuple[int, ...], start: int, stop: int, key: int, origin: tuple[int, ...] | None,
                 global_shape: tuple[int, ...] | None, device: torch.device | str) -> torch.Tensor:
    """``(i + key) mod 2^32`` as a flat int32 tensor, for the row-major index ``i`` of each element of rows
    ``start:stop`` of a tensor of ``shape``; with ``origin`` and ``global_shape``, the tensor is the block of a larger
    ``global_shape`` tensor that starts at ``origin`` (a shard of a moment under FSDP2) and ``i`` is the element's
    index in the larger tensor, so stochastic rounding keyed by it gives every element the same bits whatever the
    split.

    The index is an affine function of the element's multi-index, ``sum_d (i_d + origin_d) * stride_d`` with the
    row-major strides of ``global_shape`` (of ``shape`` without ``origin``), so it is computed modulo ``2^32`` in
    int32 (the reduction mod ``2^32`` commutes with sums and products). Dimensions that run through the whole
    global dimension (``shape[d] == global_shape[d]``) merge with the one before: an unsharded tensor, or a shard
    of rows, is one ``arange``.
    """
    rows = stop - start
    rest = tuple(int(s) for s in shape[1:])
    if origin is None or global_shape is None:
        row_numel = 1
        for s in rest:
            row_numel *= s
        return _affine32(start * row_numel + key, 1, rows * row_numel, device)
    glob = tuple(int(s) for s in global_shape)
    strides = [1] * len(glob)
    for d in range(len(glob) - 2, -1, -1):
        strides[d] = strides[d + 1] * glob[d + 1]
    base = key + (int(origin[0]) + start) * strides[0]
    base += sum(int(o) * s for o, s in zip(origin[1:], strides[1:], strict=True))
    dims: list[tuple[int, int]] = []  # (size, stride), outermost first
    for size, stride in zip((rows, *rest), strides, strict=True):
        if dims and dims[-1][1] == size * stride:  # contiguous with the dimension before: merge
            dims[-1] = (dims[-1][0] * size, stride)
        elif size != 1 or not dims:
            dims.append((size, stride))
    numel = 1
    for size, _ in dims:
        numel *= size
    if numel == 0:
        return torch.empty(0, dtype=torch.int32, device=device)
    idx = _affine32(base, dims[0][1], dims[0][0], device)
    for size, stride in dims[1:]:
        idx = idx.unsqueeze(-1) + _affine32(0, stride, size, device)
    return idx.reshape(-1)


def _hash32_(x: torch.Tensor, final: bool = True) -> torch.Tensor:
    """In-place integer hash of a flat contiguous int32 tensor of 32-bit patterns; returns ``x``.

    Three rounds of ``x ^= x >>> 16; x *= mult`` (a logical shift; wrapping int32 multiplication: the low 32 bits
    of the product, those of the unsigned product), then ``x ^= x >>> 16`` unless ``final`` is false (that last
    step changes only the lower 16 bits, which a caller that reads the upper 16 does not need). Bit for bit the
    xorshift-multiply hash of the values as unsigned 32-bit integers. ``x ^= x >>> 16`` moves the upper half onto
    the lower one and leaves the upper half: on a little-endian machine (CPUs, CUDA) one XOR of int16 halves,
    ``low ^= high``.
    """
    if _LITTLE_ENDIAN:
        halves = x.view(torch.int16).view(-1, 2)
        low, high = halves[:, 0], halves[:, 1]
    for step in range(len(_HASH_MULTIPLIERS) + final):
        if _LITTLE_ENDIAN:
            low.bitwise_xor_(high)
        else:  # pragma: no cover - no big-endian test machine
            x.bitwise_xor_(torch.bitwise_right_shift(x, 16).bitwise_and_(0xFFFF))
        if step < len(_HASH_MULTIPLIERS):
            x.mul_(_HASH_MULTIPLIERS[step])
    return x


def _upper16(x: torch.Tensor) -> torch.Tensor:
    """The upper 16 bits of each int32 of a contiguous ``x``, as int16 (a view on little-endian machines)."""
    if _LITTLE_ENDIAN:
        return x.view(torch.int16)[..., 1::2]
    return torch.bitwise_right_shift(x, 16)  # pragma: no cover - no big-endian test machine


def stochastic_round_bf16_(out: torch.Tensor, value: torch.Tensor, key: int, *,
                           origin: tuple[int, ...] | None = None,
                           global_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Writes fp32 ``value`` into the bf16 ``out`` with stochastic rounding; returns ``out``.

    bf16 is the upper half of an fp32 bit pattern. Adding a uniform 16-bit integer ``u`` to the fp32 bits
    and truncating the lower half rounds the magnitude up with probability ``(low 16 bits) / 2^16``, i.e.
    ``E[out] = value`` (sign-magnitude: the same holds for negative values; 0 stays 0). ``u`` is the upper
    half of ``hash(key + i)`` for the element's row-major index ``i``, computed with integer tensor ops, so
    it is identical on every device and for every memory layout of ``value`` and ``out``. The sum is formed in
    wrapping int32: its upper 16 bits are those of the exact sum (a NaN pattern near ``2^31`` wraps alike).

    Args:
        out: bf16 tensor of ``value``'s shape (any layout).
        value: fp32 tensor (any layout); non-finite values stay non-finite.
        key: 32-bit key (:func:`rounding_key`).
        origin: where ``out`` starts in a larger tensor of ``global_shape`` it is a block of (FSDP2's shard of a
            moment): ``i`` is then the element's row-major index in the larger tensor (:func:`_keyed_index`),
            so a shard rounds exactly as the whole tensor would. ``None``: ``out`` is the whole tensor.
        global_shape: the larger tensor's shape (with ``origin``).

    Raises:
        TypeError: when the dtypes are not bf16 / fp32.
    """
    if out.dtype != torch.bfloat16 or value.dtype != torch.float32:
        raise TypeError(f"Invalid value: stochastic rounding maps float32 to bfloat16, got {value.dtype} -> "
                        f"{out.dtype}")
    if out.device.type == "meta":  # shapes only (memory estimates): no values to round
        return out
    if out.dim() == 0:
        out, value = out.view(1), value.view(1)
        origin = global_shape = None
    rows = int(out.shape[0])
    row_numel = out[0].numel() if rows else 0
    per_chunk = max(1, ROUND_CHUNK // max(row_numel, 1))
    bits_out = out.view(torch.int16)
    bits_in = value.view(torch.int32)
    shape = tuple(out.shape)
    for start in range(0, rows, per_chunk):
        stop = min(start + per_chunk, rows)
        if origin is None or global_shape is None:  # consecutive indices: the fused tail makes them itself
            first = (start * row_numel + key) & _MASK32
            if fused_codecs.bf16_tail(first, bits_in[start:stop], bits_out[start:stop]):
                continue
        index = _keyed_index(shape, start, stop, key, origin, global_shape, out.device)
        if fused_codecs.bf16_tail(index, bits_in[start:stop], bits_out[start:stop]):
            continue
        # u = hash >>> 16: the hash's last xorshift only touches the lower half, so it is skipped
        noise = _hash32_(index, final=False)
        noise = noise.bitwise_right_shift_(16).bitwise_and_(0xFFFF).view(stop - start, *shape[1:])
        bits_out[start:stop].copy_(_upper16(noise.add_(bits_in[start:stop])))
    return out


_TABLES: dict[tuple[int, int | None], tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]] = {}


def _rounding_tables(code: torch.Tensor,
                     positive_floor: int | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(bounds, low_gap, floor_folded)`` of the stochastic rounding between the entries of the sorted ``code``.

    ``bounds = code[1:-1]``: ``searchsorted(bounds, x)`` is ``clamp(searchsorted(code, x), 1, n - 1) - 1``, the
    lower neighbour's index (both count the entries ``e`` with ``not e >= x``, NaN counting all). ``low_gap`` is
    ``(n - 1, 2)``: each interval's lower entry and its width ``code[j + 1] - code[j]`` times ``2^-24`` (exact), so
    that ``(x - low) / gap`` is the fraction scaled by ``2^24``, compared with 24 random bits as integers.
    ``floor_folded``: the positive floor is built in (its interval's lower entry is 0: a width of 0 makes the
    fraction ``+inf`` for a positive value, which then takes the floor, and NaN or ``-inf`` for zero or a negative
    one, which stay; no other interval changes). The dynamic maps of :func:`qmap` are read once on the host and
    cached; another ``code`` is handled on its device, unfolded, without a host read.
    """
    cacheable = any(code is m for m in _QMAPS.values())
    if cacheable:
        hit = _TABLES.get((id(code), positive_floor))
        if hit is not None and hit[0] is code:
            return hit[1], hit[2], hit[3]
    host = code.detach().cpu() if cacheable else code.detach()
    fold = cacheable and positive_floor is not None and 1 <= positive_floor <= host.numel() - 1 \
        and float(host[positive_floor - 1]) == 0.0
    gap = (host[1:] - host[:-1]).mul_(2.0**-24)
    if fold:
        gap[positive_floor - 1] = 0.0
    bounds = host[1:-1].contiguous().to(code.device)
    low_gap = torch.stack((host[:-1], gap), dim=1).to(code.device)
    if cacheable:
        _TABLES[(id(code), positive_floor)] = (code, bounds, low_gap, fold)
    return bounds, low_gap, fold


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

    The upper entry is taken when ``u < clamp(frac, 0, 1)`` for ``u = (hash >>> 8) / 2^24`` and
    ``frac = (x - low) / (high - low)``; the clamp never changes that comparison (``0 <= u < 1``) and it is made
    as ``hash >>> 8 < frac * 2^24`` on integers below ``2^24`` (exact in fp32).

    Raises:
        ValueError: a ``positive_floor`` outside ``[0, len(code))``.
    """
    if positive_floor is not None and not 0 <= positive_floor < code.numel():
        raise ValueError(f"Invalid positive_floor: {positive_floor!r} (a code index in [0, {code.numel()}))")
    if value.device.type == "meta":  # shapes only (memory estimates): no values to round
        return
    flat = value.reshape(-1)
    numel = flat.numel()
    blocks = n_blocks(numel)
    if numel == blocks * BLOCKSIZE:
        padded = flat.view(blocks, BLOCKSIZE)
        torch.linalg.vector_norm(padded, ord=float("inf"), dim=1, out=absmax)  # max |x|: no |x| tensor
        normalized = torch.div(padded, absmax.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1)).view(-1)
    else:  # the ragged last block is padded with zeros (they leave its largest magnitude alone)
        padded = torch.empty(blocks * BLOCKSIZE, dtype=torch.float32, device=flat.device)
        padded[numel:].zero_()
        padded[:numel].copy_(flat)
        padded = padded.view(blocks, BLOCKSIZE)
        torch.linalg.vector_norm(padded, ord=float("inf"), dim=1, out=absmax)  # max |x|: no |x| tensor
        normalized = padded.div_(absmax.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1)).view(-1)[:numel]
    bounds, low_gap, folded = _rounding_tables(code, positive_floor)
    lower = torch.searchsorted(bounds, normalized, out_int32=True)
    entries = low_gap.index_select(0, lower)
    scaled = torch.sub(normalized, entries[:, 0]).div_(entries[:, 1])  # frac * 2^24
    if value.dim() == 0:
        origin = global_shape = None
    rows = int(value.shape[0]) if value.dim() else 1
    simple = positive_floor is None or folded or positive_floor == 0
    if simple and (origin is None or global_shape is None) and fused_codecs.q8_tail(key & _MASK32, lower, scaled,
                                                                                      codes):
        return  # consecutive indices from the key: the fused tail makes them itself
    index = _keyed_index(tuple(value.shape) if value.dim() else (1,), 0, rows, key, origin, global_shape,
                         flat.device)
    if simple and fused_codecs.q8_tail(index, lower, scaled, codes):
        return
    bits = _hash32_(index).bitwise_right_shift_(8).bitwise_and_(0xFFFFFF)
    up = torch.lt(bits, scaled)
    if simple:
        torch.add(lower, up, out=codes.view(-1))
        return
    chosen = lower.add_(up)
    codes.view(-1).copy_(torch.maximum(chosen, torch.gt(normalized, 0).to(torch.int32).mul_(positive_floor)))

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
        indices in the whole moment (:func:`_keyed_index`).
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
