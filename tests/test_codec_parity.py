"""The int32 state codecs write the same bits as the int64 ones they replaced (checkpoints, FSDP2 parity and resume
depend on it).

``stochastic_round_bf16_`` and ``quantize_blockwise_sr_`` now hash in wrapping int32 (one XOR of int16 halves for
``x ^= x >>> 16``, the index with the key folded into one ``arange``) and compare ``hash >>> 8`` with
``frac * 2^24``. The oracle below is a verbatim copy of the int64 implementation they replaced (``_ref_*``, the
code of ``lowrank_optim/state.py`` at commit a47598c); every case asserts equal codes, equal ``absmax`` bits and
equal bf16 bits, on shapes with ragged last blocks, 0-d and empty tensors, FSDP2 shard origins (rows, columns,
inner blocks, indices past ``2^32``), keys whose index range crosses ``2^31`` and ``2^32``, non-finite values
and the positive floor.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from lowrank_optim import state as S
from lowrank_optim.projectors.base import derive_seed

CPU = torch.device("cpu")

# ---------------------------------------------------------------------------------------------------------------
# Oracle: the int64 codecs as they were (verbatim but for the ``_ref_`` names).
_MASK32 = 0xFFFFFFFF
_HASH_MULTIPLIERS = (0x7FEB352D, 0x2C1B3C6D, 0x297A2D39)


def _ref_hash32(x: torch.Tensor) -> torch.Tensor:
    for mult in _HASH_MULTIPLIERS:
        x.bitwise_xor_(x >> 16).mul_(mult).bitwise_and_(_MASK32)
    return x.bitwise_xor_(x >> 16)


def _ref_element_index(shape: tuple[int, ...], start: int, stop: int, origin: tuple[int, ...] | None = None,
                       global_shape: tuple[int, ...] | None = None,
                       device: torch.device | str = "cpu") -> torch.Tensor:
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


def _ref_round_bf16_(out: torch.Tensor, value: torch.Tensor, key: int, *, origin: tuple[int, ...] | None = None,
                     global_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    if out.dim() == 0:
        out, value = out.view(1), value.view(1)
        origin = global_shape = None
    rows = int(out.shape[0])
    row_numel = out[0].numel() if rows else 0
    per_chunk = max(1, (1 << 22) // max(row_numel, 1))
    bits_out = out.view(torch.int16)
    bits_in = value.view(torch.int32)
    for start in range(0, rows, per_chunk):
        stop = min(start + per_chunk, rows)
        idx = _ref_element_index(tuple(out.shape), start, stop, origin, global_shape, out.device)
        noise = _ref_hash32(idx.add_(key).bitwise_and_(_MASK32)).bitwise_right_shift_(16)
        rounded = noise.view(stop - start, *out.shape[1:]).add_(bits_in[start:stop]).bitwise_right_shift_(16)
        bits_out[start:stop].copy_(rounded)
    return out


def _ref_quantize_(codes: torch.Tensor, absmax: torch.Tensor, value: torch.Tensor, code: torch.Tensor, key: int, *,
                   origin: tuple[int, ...] | None = None, global_shape: tuple[int, ...] | None = None,
                   positive_floor: int | None = None) -> None:
    flat = value.reshape(-1)
    numel = flat.numel()
    blocks = S.n_blocks(numel)
    padded = torch.zeros(blocks * S.BLOCKSIZE, dtype=torch.float32, device=flat.device)
    padded[:numel] = flat
    padded = padded.view(blocks, S.BLOCKSIZE)
    torch.amax(padded.abs(), dim=1, out=absmax)
    normalized = padded.div_(absmax.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1)).view(-1)[:numel]
    upper = torch.searchsorted(code, normalized).clamp_(1, code.numel() - 1)
    lower = upper - 1
    low, high = code[lower], code[upper]
    frac = (normalized - low).div_(high - low).clamp_(0.0, 1.0)
    if value.dim() == 0:
        origin = global_shape = None
    rows = int(value.shape[0]) if value.dim() else 1
    idx = _ref_element_index(tuple(value.shape) if value.dim() else (1,), 0, rows, origin, global_shape,
                             flat.device)
    u = _ref_hash32(idx.add_(key).bitwise_and_(_MASK32)).bitwise_right_shift_(8).to(torch.float32).mul_(2.0**-24)
    chosen = lower.add_((u < frac).to(torch.int64))
    if positive_floor is not None:
        chosen = torch.maximum(chosen, (normalized > 0).to(torch.int64).mul_(positive_floor))
    codes.view(-1).copy_(chosen)


# ---------------------------------------------------------------------------------------------------------------

#: Keys at the edges of the 32-bit range; with 4096+ elements the index range of 2^31 - 3 and 2^32 - 1 crosses
#: 2^31 and 2^32 (the wrapping branch of the index).
KEYS = (0, 1, 2**31 - 3, 2**31, 2**32 - 1, 0x9E3779B9)
#: (shape, origin, global_shape): whole tensors (origin None), 0-d, empty, ragged last blocks, shards.
CASES = [
    ((), None, None),
    ((1,), None, None),
    ((7,), None, None),
    ((256,), None, None),
    ((300,), None, None),
    ((0,), None, None),
    ((2, 0), None, None),
    ((64, 72), None, None),
    ((3, 5, 7), None, None),
    ((5, 1, 9), None, None),
    ((1, 513), None, None),
    ((3, 12), (2, 0), (8, 12)),  # FSDP2's row shard
    ((8, 5), (0, 4), (8, 12)),  # a column shard
    ((2, 3, 4), (1, 2, 3), (4, 6, 10)),  # an inner block of a 3-d tensor
    ((2, 1, 10), (1, 3, 0), (4, 6, 10)),  # a size-1 middle dimension
    ((17, 300), (40, 0), (80, 300)),  # rows, ragged blocks
    ((2, 10), (65000, 69990), (70000, 70000)),  # global indices past 2^32
    ((3, 4), (0, 0), (3, 4)),  # the whole tensor given as its own shard
]


def _values(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Gaussian values of magnitudes 1e-8 to 1e2 (a block's small ones fall below the unsigned map's smallest
    positive entry), with -0.0, zeros and subnormals throughout and, past one block, NaN, +-inf and 3.4e38 in the
    first block (a block holding one decodes degenerately: its absmax is NaN or inf)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.tensor(10.0).pow(torch.randint(-8, 3, shape, generator=gen))
    flat = x.view(-1)
    finite = torch.tensor([-0.0, 0.0, 1e-40, -3e-42])
    for i, pos in enumerate(range(5, flat.numel(), 29)):
        flat[pos] = finite[i % len(finite)]
    for pos, special in zip(range(3, 256 if flat.numel() > 256 else 0, 61), [float("nan"), float("inf"), -float("inf"),
                                                                    3.4e38], strict=False):
        flat[pos] = special
    return x


def _pair(shape: tuple[int, ...], numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full(shape, 77, dtype=torch.uint8), torch.full((S.n_blocks(numel),), 5.0)


def _same_float_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize(("shape", "origin", "global_shape"), CASES)
def test_8bit_codes_and_absmax_equal_the_int64_codec(shape, origin, global_shape) -> None:
    x = _values(shape, seed=len(shape) * 31 + sum(shape))
    nonneg = x.abs()
    nonneg.view(-1)[::11] = 0.0  # exact zeros keep code 0 under the floor
    for signed, key in itertools.product((True, False), KEYS):
        code = S.qmap(signed, CPU)
        value = x if signed else nonneg
        floors = (None, S.first_positive_code(signed), 0, 5)
        for floor in floors:
            want_codes, want_absmax = _pair(shape, value.numel())
            got_codes, got_absmax = _pair(shape, value.numel())
            _ref_quantize_(want_codes, want_absmax, value, code, key, origin=origin, global_shape=global_shape,
                           positive_floor=floor)
            S.quantize_blockwise_sr_(got_codes, got_absmax, value, code, key, origin=origin,
                                     global_shape=global_shape, positive_floor=floor)
            assert torch.equal(got_codes, want_codes), (signed, key, floor)
            assert _same_float_bits(got_absmax, want_absmax), (signed, key, floor)


@pytest.mark.parametrize(("shape", "origin", "global_shape"), CASES)
def test_bf16_bits_equal_the_int64_codec(shape, origin, global_shape) -> None:
    x = _values(shape, seed=7 + sum(shape))
    bits = x.view(torch.int32).clone()
    bits.view(-1)[::5] |= 0x7FFFFF80  # NaN patterns near 2^31 - 1: the int32 sum wraps, the upper half must not
    x = bits.view(torch.float32)
    for key in KEYS:
        want = _ref_round_bf16_(torch.empty(shape, dtype=torch.bfloat16), x, key, origin=origin,
                                global_shape=global_shape)
        got = S.stochastic_round_bf16_(torch.empty(shape, dtype=torch.bfloat16), x, key, origin=origin,
                                       global_shape=global_shape)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), key


def test_bf16_chunks_and_layouts_give_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of a few rows (``ROUND_CHUNK``) and a transposed ``out`` / ``value`` round as the oracle does."""
    x = _values((40, 33), seed=3)
    want = _ref_round_bf16_(torch.empty(40, 33, dtype=torch.bfloat16), x, 12345, origin=(8, 0),
                            global_shape=(100, 33))
    monkeypatch.setattr(S, "ROUND_CHUNK", 70)  # 2 rows a chunk, the last one short
    got = S.stochastic_round_bf16_(torch.empty(33, 40, dtype=torch.bfloat16).t(), x.t().contiguous().t(), 12345,
                                   origin=(8, 0), global_shape=(100, 33))
    assert torch.equal(got.contiguous().view(torch.int16), want.view(torch.int16))


def test_8bit_transposed_value_and_a_code_outside_the_cache() -> None:
    """A transposed ``value`` quantizes in row-major order; a ``code`` that is not a cached :func:`qmap` (its floor
    not folded into the tables) gives the same codes."""
    x = _values((48, 96), seed=5).abs()
    code = S.qmap(False, CPU).clone()
    want_codes, want_absmax = _pair((48, 96), x.numel())
    _ref_quantize_(want_codes, want_absmax, x, code, 99, positive_floor=1)
    got_codes, got_absmax = _pair((48, 96), x.numel())
    S.quantize_blockwise_sr_(got_codes, got_absmax, x.t().contiguous().t(), code, 99, positive_floor=1)
    assert torch.equal(got_codes, want_codes)
    assert _same_float_bits(got_absmax, want_absmax)


@pytest.mark.parametrize("store", ["8bit", "bf16"])
@pytest.mark.parametrize("signed", [True, False])
def test_store_save_of_a_512_by_1376_moment_equals_the_oracle(store: str, signed: bool) -> None:
    """``StateStore.save`` at the size the CPU op count is reported for (``round_seed`` 5, step 3)."""
    x = _values((512, 1376), seed=11)
    x = x if signed else x.abs()
    st = {"step": 3}
    S.StateStore(store).create(st, "m", (512, 1376), CPU, seed=5)
    S.StateStore(store).save(st, "m", x, signed)
    key = derive_seed(5, 3, zlib.crc32(b"m")) & _MASK32
    assert key == S.rounding_key(5, 3, "m")
    if store == "bf16":
        want = _ref_round_bf16_(torch.empty(512, 1376, dtype=torch.bfloat16), x, key)
        assert torch.equal(st["m"].view(torch.int16), want.view(torch.int16))
        return
    codes, absmax = _pair((512, 1376), x.numel())
    _ref_quantize_(codes, absmax, x, S.qmap(signed, CPU), key,
                   positive_floor=None if signed else S.first_positive_code(False))
    assert torch.equal(st["m"], codes)
    assert _same_float_bits(st["m_absmax"], absmax)


# ---------------------------------------------------------------------------------------------------------------
# The int32 building blocks, against Python integers.

EDGES = [0, 1, 2, 0xFFFF, 0x10000, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 2, 2**32 - 1, 0x9E3779B9, 0x12345678]


def _as_i32(values: list[int]) -> torch.Tensor:
    return torch.tensor([v - 2**32 if v >= 2**31 else v for v in values], dtype=torch.int64).to(torch.int32)


@pytest.mark.parametrize("n", [1, 7, 8, 15, 16, 17, 33, 1000])
def test_int32_multiplication_wraps_like_the_low_32_bits_of_the_product(n: int) -> None:
    """torch's int32 ``mul_`` by each hash multiplier (vectorized body and scalar tail: several lengths, strided
    too) gives the low 32 bits of the exact product, for edge values and random 32-bit patterns."""
    gen = torch.Generator().manual_seed(n)
    values = (EDGES * (n // len(EDGES) + 1))[:n]
    rand = torch.randint(0, 2**32, (n,), generator=gen, dtype=torch.int64).tolist()
    for pattern in (values, rand):
        x = _as_i32(pattern)
        for mult in _HASH_MULTIPLIERS:
            want = _as_i32([(v * mult) & _MASK32 for v in pattern])
            assert torch.equal(x.clone().mul_(mult), want)
            strided = torch.zeros(2 * n, dtype=torch.int32)
            strided[::2] = x
            assert torch.equal(strided[::2].mul_(mult), want)
            assert torch.equal(torch.mul(x, mult), want)


def test_hash_equals_the_int64_hash_on_edge_and_random_patterns() -> None:
    gen = torch.Generator().manual_seed(0)
    values = EDGES + torch.randint(0, 2**32, (4099,), generator=gen, dtype=torch.int64).tolist()
    want = _ref_hash32(torch.tensor(values, dtype=torch.int64))
    got = S._hash32_(_as_i32(values))
    assert torch.equal(got.to(torch.int64) & _MASK32, want)
    # without the final xorshift the upper 16 bits are the same (the stochastic bf16 rounding reads only them)
    partial = S._hash32_(_as_i32(values), final=False)
    assert torch.equal((partial.to(torch.int64) & _MASK32) >> 16, want >> 16)


def test_affine_index_wraps_modulo_2_32() -> None:
    for first, step, n in [(0, 1, 10), (2**31 - 5, 1, 10), (2**32 - 3, 1, 7), (5, 2**31 + 7, 6), (-9, 3, 8),
                           (2**40 + 3, 70000, 50), (123, 1, 0), (2**31 - 2, 1, 1)]:
        got = S._affine32(first, step, n, CPU)
        assert got.dtype == torch.int32
        assert torch.equal(got, _as_i32([(first + step * i) & _MASK32 for i in range(n)])), (first, step, n)


@pytest.mark.parametrize(("shape", "origin", "global_shape"), [c for c in CASES if c[0]])
def test_keyed_index_equals_the_int64_index_plus_key(shape, origin, global_shape) -> None:
    rows = shape[0]
    for key, (start, stop) in itertools.product(KEYS, [(0, rows), (rows // 2, rows)]):
        want = (_ref_element_index(shape, start, stop, origin, global_shape) + key) & _MASK32
        got = S._keyed_index(shape, start, stop, key, origin, global_shape, CPU)
        assert got.dtype == torch.int32
        assert torch.equal(got.to(torch.int64) & _MASK32, want), (key, start, stop)


def test_a_positive_floor_outside_the_code_is_refused() -> None:
    codes, absmax = _pair((300,), 300)
    with pytest.raises(ValueError, match="positive_floor"):
        S.quantize_blockwise_sr_(codes, absmax, torch.ones(300), S.qmap(False, CPU), 0, positive_floor=256)
