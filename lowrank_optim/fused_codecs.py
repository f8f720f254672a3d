"""Fused (``torch.compile``) tails of the stochastic-rounding codecs of :mod:`lowrank_optim.state`, for CUDA.

Eagerly, the hash of an element's index is about ten elementwise kernels (:func:`state._hash32_`); on a GPU each
is a launch and a pass over the moment. Here the part of each codec that is integer arithmetic and comparisons
only is one compiled kernel:

* bf16: ``hash(index) -> noise -> (fp32 bits + noise) >>> 16`` into the bf16 moment's bits;
* 8-bit: ``hash(index) >>> 8 < frac * 2^24`` and ``lower + that`` into the uint8 codes.

The index (with the key) still comes from :func:`state._keyed_index` (one ``arange``) and the float part of the
8-bit codec (``absmax``, the division, ``searchsorted``, the fraction) stays eager: inductor lowers an fp32 ``/`` to
triton's approximate ``div.full`` (``div_rn`` only under ``TORCHINDUCTOR_EMULATE_DIVISION_ROUNDING=1``), and those
bits decide the codes. The compiled tails compute the hash exactly as the original int64 formulation (values below
``2^32``, products below ``2^63``), so they give the same bits as the eager int32 path; the one float operation,
``float(hash >>> 8) < frac * 2^24``, compares an exact integer with a value that is 0 or at least ``2^-126`` in
magnitude (``|x - low| >= 2^-149`` over a width ``<= 2``, the map lying in ``[-1, 1]``, scaled by ``2^-24``), so
flushing subnormals to zero cannot change it. :func:`check_against_eager` asserts the bits on a device.

Used only when :data:`ENABLED`, the tensors are on a device of :data:`DEVICES` (CUDA) with triton importable, the
operands are contiguous and no ``torch.compile`` trace is running; any error while compiling or running turns the
fused tails off for the process (:data:`BROKEN`, one warning) and the eager path is taken. The CPU / CI path never
depends on it.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable

import torch

#: Module switch: ``False`` always takes the eager path.
ENABLED = True
#: Device types the fused tails run on (tests add ``"cpu"`` to exercise the compiled graphs with inductor's C++
#: backend).
DEVICES: set[str] = {"cuda"}
#: Set (to the error's text) when a compile or a run failed: the fused tails stay off for the process.
BROKEN: str | None = None
#: Number of codec calls the fused tails served (a check reads it to know they ran).
CALLS = 0

_MASK32 = 0xFFFFFFFF
_COMPILED: dict[str, Callable[..., None]] = {}
_TRITON: bool | None = None


def _backend_ok(device: torch.device) -> bool:
    global _TRITON
    if device.type != "cuda":
        return True
    if _TRITON is None:
        _TRITON = importlib.util.find_spec("triton") is not None
    return _TRITON


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the fused tails would serve a call on ``tensors`` (all contiguous, on one enabled device)."""
    if not ENABLED or BROKEN is not None or torch.compiler.is_compiling():
        return False
    device = tensors[0].device
    return (device.type in DEVICES and _backend_ok(device)
            and all(t.device == device and t.is_contiguous() for t in tensors))


def _keyed(index: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """The keyed element indices as int64 values in ``[0, 2^32)``: an int32 tensor of 32-bit patterns, or an int
    ``first`` for the consecutive indices ``first, first + 1, ...`` of ``like``'s elements (made inside the compiled
    kernel: no index tensor is written and read back)."""
    if isinstance(index, torch.Tensor):
        return index.to(torch.int64) & _MASK32
    return (torch.arange(like.numel(), dtype=torch.int64, device=like.device) + index) & _MASK32


def _hash64(x: torch.Tensor) -> torch.Tensor:
    """The element hash in int64 (the original formulation) of int64 values in ``[0, 2^32)``."""
    from .state import _HASH_MULTIPLIERS

    for mult in _HASH_MULTIPLIERS:
        x = ((x ^ (x >> 16)) * mult) & _MASK32
    return x ^ (x >> 16)


def _bf16_tail(index: torch.Tensor | int, bits_in: torch.Tensor, bits_out: torch.Tensor) -> None:
    noise = _hash64(_keyed(index, bits_in)) >> 16
    bits_out.copy_(((noise + bits_in.to(torch.int64)) >> 16).to(torch.int16))


def _q8_tail(index: torch.Tensor | int, lower: torch.Tensor, scaled: torch.Tensor, codes: torch.Tensor) -> None:
    up = (_hash64(_keyed(index, scaled)) >> 8).to(torch.float32) < scaled  # integers below 2^24: exact in fp32
    codes.copy_((lower + up.to(torch.int32)).to(torch.uint8))


def _run(name: str, fn: Callable[..., None], *args: torch.Tensor | int) -> bool:
    global BROKEN, CALLS
    compiled = _COMPILED.get(name)
    if compiled is None:
        compiled = _COMPILED[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    try:
        compiled(*args)
    except Exception as err:  # any compile or runtime failure: the eager path from now on
        BROKEN = f"{type(err).__name__}: {err}"
        warnings.warn(f"lowrank_optim: the fused stochastic-rounding codecs failed ({BROKEN[:300]}); using the "
                      "eager path from now on", RuntimeWarning, stacklevel=3)
        return False
    CALLS += 1
    return True


def bf16_tail(index: torch.Tensor | int, bits_in: torch.Tensor, bits_out: torch.Tensor) -> bool:
    """Writes the stochastically rounded bf16 bits of ``bits_in`` into ``bits_out``; ``False``: not served.

    Args:
        index: flat int32 keyed element indices (:func:`state._keyed_index`), ``n`` elements; or an int ``first``
            in ``[0, 2^32)``: the indices are ``first + i`` (mod ``2^32``), made in the kernel.
        bits_in: the fp32 values' bits, int32, ``n`` elements (any shape, contiguous).
        bits_out: the bf16 moment's bits, int16, shaped like ``bits_in`` (contiguous).
    """
    if not usable(*(t for t in (index, bits_in, bits_out) if isinstance(t, torch.Tensor))):
        return False
    name = "bf16" if isinstance(index, torch.Tensor) else "bf16-range"
    return _run(name, _bf16_tail, index, bits_in.view(-1), bits_out.view(-1))


def q8_tail(index: torch.Tensor | int, lower: torch.Tensor, scaled: torch.Tensor, codes: torch.Tensor) -> bool:
    """Writes ``lower + (hash >>> 8 < scaled)`` into the uint8 ``codes``; ``False``: not served.

    Args:
        index: flat int32 keyed element indices, ``n`` elements; or an int ``first`` in ``[0, 2^32)``: the indices
            are ``first + i`` (mod ``2^32``), made in the kernel.
        lower: flat int32 lower map entries, ``n``.
        scaled: flat fp32 fractions times ``2^24``, ``n``.
        codes: the uint8 codes, ``n`` elements (contiguous).
    """
    if not usable(*(t for t in (index, lower, scaled, codes) if isinstance(t, torch.Tensor))):
        return False
    name = "8bit" if isinstance(index, torch.Tensor) else "8bit-range"
    return _run(name, _q8_tail, index, lower, scaled, codes.view(-1))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """fp32 ``a`` and ``b`` hold the same bits, but that a NaN equals any NaN (a block with a NaN has a NaN
    ``absmax``, whose payload a device's reduction may set otherwise; no finite code depends on it)."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))


def check_against_eager(device: str | torch.device = "cuda") -> dict[str, int]:
    """Asserts that the fused codecs write the eager path's bits on ``device`` (and the CPU's).

    Runs :func:`state.quantize_blockwise_sr_` (signed and unsigned maps; positive floor folded, unfolded and none)
    and :func:`state.stochastic_round_bf16_` on whole tensors, ragged blocks, FSDP2 shard origins, non-finite
    values and keys at the edges of the 32-bit range, once with the fused tails and once eagerly, and compares
    every code, ``absmax`` and bf16 bit, and the result with the CPU's eager one (a NaN ``absmax`` equals any NaN:
    its payload is the device reduction's).

    Returns:
        ``{"cases": number of compared calls, "fused_calls": calls the fused tails served}``.

    Raises:
        AssertionError: a differing bit, or the fused tails did not serve every eligible call (:data:`BROKEN`
            says why when they failed).
    """
    from . import state

    global ENABLED
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    cases = [((512, 1376), None, None), ((300,), None, None), ((3, 5, 7), None, None), ((), None, None),
             ((17, 300), (40, 0), (80, 300)), ((8, 5), (0, 4), (8, 12)), ((2, 10), (65000, 69990), (70000, 70000))]
    keys = (0, 2**31 - 3, 2**32 - 1, 0x9E3779B9)
    compared = 0
    before = CALLS
    was = ENABLED
    try:
        for shape, origin, global_shape in cases:
            scale = torch.tensor(10.0, dtype=torch.float32, device="cpu").pow(
                torch.randint(-8, 3, shape, generator=gen, dtype=torch.int64, device="cpu"))
            x = torch.randn(shape, generator=gen, dtype=torch.float32, device="cpu") * scale
            if x.numel() > 256:
                x.view(-1)[3:200:61] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0],
                                                    dtype=torch.float32, device="cpu")
            where = {"origin": origin, "global_shape": global_shape}
            for key in keys:
                for signed, floor in ((True, None), (False, None), (False, state.first_positive_code(False)),
                                      (False, 5), (True, state.first_positive_code(True))):
                    value = x if signed else x.abs()
                    runs = []
                    for dev, fused in ((device, True), (device, False), (torch.device("cpu"), False)):
                        ENABLED = fused
                        codes = torch.zeros(shape, dtype=torch.uint8, device=dev)
                        absmax = torch.zeros(state.n_blocks(value.numel()), dtype=torch.float32, device=dev)
                        state.quantize_blockwise_sr_(codes, absmax, value.to(dev), state.qmap(signed, dev), key,
                                                     positive_floor=floor, **where)
                        runs.append((codes.cpu(), absmax.cpu()))
                    for codes, absmax in runs[1:]:
                        assert torch.equal(codes, runs[0][0]), ("8bit codes", shape, origin, key, signed, floor)
                        assert _same_bits(absmax, runs[0][1]), ("8bit absmax", shape, origin, key, signed, floor)
                    compared += 1
                runs = []
                for dev, fused in ((device, True), (device, False), (torch.device("cpu"), False)):
                    ENABLED = fused
                    out = torch.zeros(shape, dtype=torch.bfloat16, device=dev)
                    state.stochastic_round_bf16_(out, x.to(dev), key, **where)
                    runs.append(out.cpu().view(torch.int16))
                for bits in runs[1:]:
                    assert torch.equal(bits, runs[0]), ("bf16 bits", shape, origin, key)
                compared += 1
    finally:
        ENABLED = was
    assert BROKEN is None, f"the fused codecs failed: {BROKEN}"
    served = CALLS - before
    # every bf16 call and every 8-bit call without an unfolded floor (floor 5) is served
    eligible = len(cases) * len(keys) * 5
    assert served == eligible, f"the fused tails served {served} of {eligible} calls"
    return {"cases": compared, "fused_calls": served}
