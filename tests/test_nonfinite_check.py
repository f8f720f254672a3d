"""The global non-finite check (:func:`lowrank_optim.nonfinite.all_finite`) on both of its CPU paths.

Small CPU gradients go through torch's fused GradScaler kernel, large ones (``CPU_SUM_MIN_ELEMENTS`` entries and
up) and float64 ones through their fp32 sums over the last axis; both must flag exactly the tensors with an inf or
a NaN anywhere, leave every value alone (every bit of fp32 / fp64 ones), and give the same verdict for any mix of
the two paths.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_optim import nonfinite

BAD = [float("nan"), float("inf"), float("-inf")]


def _grads(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 5, generator=gen), torch.randn(300, generator=gen),
            torch.randn(3, 4, generator=gen).double(), torch.randn(6, 6, generator=gen).bfloat16()]


@pytest.mark.parametrize("threshold", [0, 1 << 22, 40])  # everything summed, nothing summed (but float64), a mix
def test_all_finite_verdict_and_bits(threshold: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nonfinite, "CPU_SUM_MIN_ELEMENTS", threshold)
    grads = _grads()
    bits = [g.clone() for g in grads]
    assert nonfinite.all_finite(grads)
    for i in range(len(grads)):
        for bad in BAD:
            work = [t.clone() for t in grads]
            work[i].view(-1)[3] = bad
            before = [t.clone() for t in work]
            assert not nonfinite.all_finite(work), (i, bad)
            for t, b in zip(work, before, strict=True):  # unchanged: every bit (a half NaN's payload may change)
                torch.testing.assert_close(t, b, rtol=0, atol=0, equal_nan=True)
                if t.element_size() >= 4:
                    assert torch.equal(t.view(_int(t)), b.view(_int(b)))
    for g, b in zip(grads, bits, strict=True):
        assert torch.equal(g, b)


def _int(t: torch.Tensor) -> torch.dtype:
    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]


def test_inf_and_minus_inf_together_are_flagged(monkeypatch: pytest.MonkeyPatch) -> None:
    """``inf + -inf`` sums to NaN: a tensor holding both cannot look finite on the summed path."""
    monkeypatch.setattr(nonfinite, "CPU_SUM_MIN_ELEMENTS", 0)
    g = torch.zeros(64)
    g[1], g[2] = float("inf"), float("-inf")
    assert not nonfinite.all_finite([g])


def test_huge_finite_gradients_pass_unless_their_sum_overflows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented conservative edge: finite entries pass; only a sum beyond fp32's range is flagged."""
    monkeypatch.setattr(nonfinite, "CPU_SUM_MIN_ELEMENTS", 0)
    assert nonfinite.all_finite([torch.full((8,), 1e37)])
    assert nonfinite.all_finite([torch.tensor([3e38, -3e38, 3e38])])
    assert not nonfinite.all_finite([torch.full((8,), 1e38)])  # 8e38 > 3.4e38


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0.0, 1.0, -2.5, 1e-40, 1e30, float("nan"), float("inf"), float("-inf")]),
                min_size=1, max_size=40), st.integers(0, 64))
def test_verdict_equals_isfinite_all(values: list[float], threshold: int) -> None:
    """Whatever the split between the two paths, the verdict is ``isfinite(g).all()`` (sums stay far from
    overflow here)."""
    old = nonfinite.CPU_SUM_MIN_ELEMENTS
    nonfinite.CPU_SUM_MIN_ELEMENTS = threshold
    try:
        g = torch.tensor(values)
        pieces = [g[: len(values) // 2].clone(), g[len(values) // 2:].clone()]
        assert nonfinite.all_finite(pieces) == bool(torch.isfinite(g).all())
    finally:
        nonfinite.CPU_SUM_MIN_ELEMENTS = old


def test_large_cpu_gradients_are_summed_and_small_ones_fused() -> None:
    """Which path each gradient takes: profiled ops (one fused kernel for the small ones, one sum per large one)."""
    small, large = torch.randn(16, 16), torch.randn(nonfinite.CPU_SUM_MIN_ELEMENTS)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        assert nonfinite.all_finite([small, large, small.clone()])
    names = [e.name for e in prof.events()]
    assert names.count("aten::_amp_foreach_non_finite_check_and_unscale_") == 1
    assert names.count("aten::sum") == 1


def test_zero_dim_and_empty_gradients_on_the_summed_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nonfinite, "CPU_SUM_MIN_ELEMENTS", 0)
    assert nonfinite.all_finite([torch.tensor(2.0), torch.empty(0, 3), torch.tensor(1.0, dtype=torch.float64)])
    assert not nonfinite.all_finite([torch.tensor(float("nan")), torch.empty(0, 3)])
