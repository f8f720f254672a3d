"""Where moment tensors live: ``fp32``, ``bf16`` or ``8bit`` (blockwise dynamic quantization).

All optimizer math runs in fp32. A store only decides how a moment is *kept* between steps:

* ``fp32``: the fp32 tensor itself (``load`` returns it, updates happen in place).
* ``bf16``: a bf16 copy, rounded to nearest on ``save``.
* ``8bit``: bitsandbytes' blockwise dynamic quantization (Dettmers et al. 2022, arXiv:2110.02861):
  ``uint8`` codes shaped like the moment plus one fp32 ``absmax`` per block of 256 values (the last
  block may be ragged), a signed dynamic map for signed moments (Adam's first moment) and an unsigned
  one for non-negative moments (the second). Tensors under ``min_8bit_size`` (4096) elements stay fp32,
  as in bitsandbytes' own optimizers.

The state of a moment called ``name`` is one or two plain tensors in the parameter's state dict:
``state[name]`` (fp32 / bf16 / uint8 codes) and, for 8-bit, ``state[name + "_absmax"]``.
"""

from __future__ import annotations

import torch

from ._validation import check_choice

STATE_DTYPES = ("fp32", "bf16", "8bit")
BLOCKSIZE = 256
MIN_8BIT_SIZE = 4096
ABSMAX = "_absmax"

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


def n_blocks(numel: int) -> int:
    """Number of 256-element blocks, the last one ragged."""
    return -(-numel // BLOCKSIZE)


class StateStore:
    """Allocates, loads and saves moment tensors in one storage format.

    Args:
        dtype: ``"fp32"``, ``"bf16"`` or ``"8bit"``.
        min_8bit_size: tensors with fewer elements stay fp32 under ``"8bit"``.
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

    def create(self, state: dict, name: str, shape: tuple[int, ...] | torch.Size, device: torch.device) -> None:
        """Allocates a zero moment ``name`` in ``state``."""
        numel = 1
        for s in shape:
            numel *= int(s)
        if self.quantized(numel):
            # absmax 0 decodes every code to 0, whatever the code.
            state[name] = torch.zeros(tuple(shape), dtype=torch.uint8, device=device)
            state[name + ABSMAX] = torch.zeros(n_blocks(numel), dtype=torch.float32, device=device)
        else:
            dt = torch.bfloat16 if self.dtype == "bf16" else torch.float32
            state[name] = torch.zeros(tuple(shape), dtype=dt, device=device)
            state.pop(name + ABSMAX, None)  # a moment recreated below the 8-bit threshold drops its old absmax

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
    def save(state: dict, name: str, value: torch.Tensor, signed: bool = True) -> None:
        """Writes the fp32 ``value`` back into moment ``name`` (no-op for an fp32 moment updated in place)."""
        stored = state[name]
        if stored.dtype == torch.uint8:
            _bnb_functional().quantize_blockwise(value.contiguous(), code=qmap(signed, stored.device),
                                                 absmax=state[name + ABSMAX], out=stored, blocksize=BLOCKSIZE)
        elif value is not stored:
            stored.copy_(value)
