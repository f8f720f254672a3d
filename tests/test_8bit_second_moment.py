"""The 8-bit store never rounds a positive second moment to zero (a user's report: with an outlier in a
256-element block, ``v`` decoded to 0, the next step divided ``m`` by ``eps`` and moved a weight 44,000 x lr where
fp32 moves it 1 x lr)."""

from __future__ import annotations

import warnings

import bitsandbytes.functional as bnb_f
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank_optim as lro
from lowrank_optim.state import BLOCKSIZE, first_positive_code, qmap, quantize_blockwise_sr_


@settings(max_examples=25, deadline=None)
@given(exponent=st.floats(-12.0, -1.0), outlier=st.floats(1.0, 1e4), key=st.integers(0, 2**31), n=st.integers(2, 520))
def test_positive_values_of_an_unsigned_moment_never_decode_to_zero(exponent: float, outlier: float, key: int,
                                                                    n: int) -> None:
    gen = torch.Generator().manual_seed(key)
    value = torch.rand(n, generator=gen) * 10.0**exponent  # positive, some far below 3.25e-7 of the outlier
    value[::BLOCKSIZE] = outlier
    codes = torch.empty(n, dtype=torch.uint8)
    absmax = torch.empty((n + BLOCKSIZE - 1) // BLOCKSIZE)
    code = qmap(False, torch.device("cpu"))
    quantize_blockwise_sr_(codes, absmax, value, code, key, positive_floor=first_positive_code(False))
    decoded = bnb_f.dequantize_blockwise(codes, absmax=absmax, code=code, blocksize=BLOCKSIZE)
    assert bool((decoded > 0).all())
    # the floor only lifts values below the smallest positive entry; exact zeros stay zero
    value[1] = 0.0
    quantize_blockwise_sr_(codes, absmax, value, code, key, positive_floor=first_positive_code(False))
    assert int(codes[1]) == 0


def _worst_step(make, steps: int = 6) -> float:
    """Largest |dW| / lr over ``steps`` steps with gradients whose every 64th column is 1000x the rest (so each
    256-element block of the second moment holds an outlier 10^6 x its neighbours)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(256, 512))
    opt = make([w])
    col = torch.ones(512)
    col[::64] = 1e3
    worst = 0.0
    for _ in range(steps):
        before = w.detach().clone()
        w.grad = torch.randn(256, 512) * col
        opt.step()
        worst = max(worst, float((w.detach() - before).abs().max()) / 1e-3)
    return worst


def test_outlier_blocks_do_not_blow_up_8bit_adam() -> None:
    """Over these 6 steps, without the floor: 16,831 x lr (plain) and 432 x lr (rank 16) against fp32's 1.01 and
    0.28 (over 20 steps 44,067 and 842; bitsandbytes' AdamW8bit 1.22). With it: 2.40 and 0.28; stochastic rounding
    between the sparse low entries of the dynamic map (3.25e-7, 7.75e-7, 2.1e-6 of the block's largest) still
    under-estimates some ``v`` by up to ~2.7x."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for groups in (lambda p: p, lambda p: [{"params": p, "rank": 16}]):
            fp32 = _worst_step(lambda p, g=groups: lro.GaLoreAdamW(g(p), lr=1e-3, state_dtype="fp32"))
            q8 = _worst_step(lambda p, g=groups: lro.GaLoreAdamW(g(p), lr=1e-3, state_dtype="8bit"))
            assert q8 <= 3.0 * max(fp32, 1.0), (fp32, q8)
