"""Newton-Schulz's buffered form (``lowrank_optim.rules.muon._iterate``: ``X <- M X`` with ``M = a I + b A + c A^2``,
tall matrices iterated in their own orientation, the Frobenius normalisation folded into the first iteration)
against the plain textbook iteration written out below: equal to fp32 rounding, per matrix and per stack; bf16
products keep the plain update form and so match the plain bf16 iteration far more closely than its distance
from fp32."""

from __future__ import annotations

import math

import pytest
import torch

from lowrank_optim.rules.muon import NS_COEFFICIENTS, batched_newton_schulz, newton_schulz


def plain_newton_schulz(x: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference (the form before the buffered one): transpose a tall ``x``, divide by its largest magnitude and
    by its Frobenius norm, then ``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` as ``addmm`` / ``baddbmm`` calls
    (each product rounded to ``dtype``, ``a X`` added inside the product's accumulation), transpose back."""
    a, b, c = NS_COEFFICIENTS
    tall = x.shape[-2] > x.shape[-1]
    y = x.mT if tall else x
    top = y.abs().amax(dim=(-2, -1), keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    y = y / top
    y = (y / torch.linalg.vector_norm(y, dim=(-2, -1), keepdim=True).clamp(min=eps)).to(dtype)
    add = torch.baddbmm if y.dim() == 3 else torch.addmm
    for _ in range(steps):
        gram = y @ y.mT
        poly = add(gram, gram, gram, beta=b, alpha=c)
        y = add(y, poly, y, beta=a)
    return (y.mT if tall else y).float()


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


SHAPES = [(16, 64), (64, 16), (32, 32), (3, 16, 64), (3, 64, 16), (2, 32, 32), (2, 200, 24)]


@pytest.mark.parametrize("shape", SHAPES)
def test_buffered_form_equals_plain_iteration_in_fp32(shape: tuple[int, ...]) -> None:
    """fp32: the buffered form equals the plain iteration to rounding (measured about 1e-6 relative; a missing
    normalisation, a wrong coefficient or an untransposed tall update is off by 1e-1 or more); the result is a
    new contiguous fp32 tensor of ``x``'s shape and ``x`` is left unchanged."""
    torch.manual_seed(0)
    x = torch.randn(shape) * 3.0
    before = x.clone()
    ns = batched_newton_schulz if len(shape) == 3 else newton_schulz
    got = ns(x)
    assert got.shape == x.shape and got.dtype == torch.float32 and got.is_contiguous()
    assert got.data_ptr() != x.data_ptr()
    assert torch.equal(x, before)
    assert _relative(got, plain_newton_schulz(x)) < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_products_keep_the_plain_update(shape: tuple[int, ...]) -> None:
    """bf16 products: within 1e-3 of the plain bf16 iteration, while both lie about 1e-2 from fp32 (folding ``a I``
    into a bf16 ``M`` would move the result by about 1e-2 from the plain bf16 iteration)."""
    torch.manual_seed(1)
    x = torch.randn(shape)
    ns = batched_newton_schulz if len(shape) == 3 else newton_schulz
    got = ns(x, dtype=torch.bfloat16)
    assert got.dtype == torch.float32
    want = plain_newton_schulz(x, dtype=torch.bfloat16)
    assert _relative(got, want) < 1e-3
    assert _relative(want, plain_newton_schulz(x)) > 5e-3  # the bound above is not trivial


def test_stack_equals_each_matrix_and_layouts_agree() -> None:
    """A stack's matrices are each normalised and iterated alone (a matrix 1000x larger than its neighbours gives
    the same result as alone); a transposed (non-contiguous) input gives the contiguous input's result."""
    torch.manual_seed(2)
    x = torch.randn(4, 48, 20)
    x[1] *= 1000.0
    got = batched_newton_schulz(x)
    for i in range(4):
        torch.testing.assert_close(got[i], newton_schulz(x[i].clone()), rtol=1e-5, atol=1e-6)
    wide = torch.randn(20, 48)
    torch.testing.assert_close(newton_schulz(wide.T), newton_schulz(wide.T.contiguous()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched_newton_schulz(x.mT), batched_newton_schulz(x.mT.contiguous()),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_huge_and_no_iterations(dtype: torch.dtype) -> None:
    """A zero matrix (and a zero matrix in a stack) gives exactly zero; entries near 1e30, whose squares overflow
    fp32, give the result of the same matrix scaled down; ``steps=0`` returns the normalised input."""
    torch.manual_seed(3)
    assert torch.equal(newton_schulz(torch.zeros(6, 9), dtype=dtype), torch.zeros(6, 9))
    x = torch.randn(3, 9, 6)
    x[2] = 0.0
    got = batched_newton_schulz(x, dtype=dtype)
    assert torch.equal(got[2], torch.zeros(9, 6)) and bool(got.isfinite().all())
    y = torch.randn(10, 7)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(newton_schulz(y * 1e30, dtype=dtype), newton_schulz(y, dtype=dtype), rtol=tol, atol=tol)
    norm = newton_schulz(y, steps=0)
    torch.testing.assert_close(norm, y / y.norm(), rtol=1e-6, atol=1e-7)


def _conditioned(rows: int, cols: int, cond: float | None, seed: int) -> torch.Tensor:
    """An fp64 ``rows x cols`` matrix with log-spaced singular values from 1 to ``1 / cond`` (``None``: a quarter
    of them 1, the rest exactly 0)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(max(rows, cols), k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))
    if cond is None:
        s = torch.zeros(k, dtype=torch.float64)
        s[: k // 4] = 1.0
    else:
        s = torch.logspace(0.0, -math.log10(cond), k, dtype=torch.float64)
    x = (u * s) @ v.T
    return x if rows >= cols else x.T


@pytest.mark.parametrize("cond", [1e2, 1e4, 1e6, None])
@pytest.mark.parametrize("shape", [(480, 48), (48, 480), (3, 240, 60)])
def test_gram_form_is_as_accurate_as_the_plain_form(shape: tuple[int, ...], cond: float | None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The small-side (Gram) iteration of a long matrix (``muon._gram_iterate``, long side >= ``GRAM_ASPECT`` times
    the short) lies as close to the exact (fp64) iteration as the plain fp32 form, for ill-conditioned and
    rank-deficient inputs (within 2x of its error, both about 1e-6 to 1e-5); without its restarts (``GRAM_RESTART``
    beyond the iteration count) the Gram matrix's rounding is amplified and it does not (the property the restarts
    exist for)."""
    from lowrank_optim.rules import muon

    assert max(shape[-2:]) >= muon.GRAM_ASPECT * min(shape[-2:])
    x64 = torch.stack([_conditioned(*shape[-2:], cond, s) for s in range(shape[0])]) if len(shape) == 3 \
        else _conditioned(*shape, cond, 0)
    exact = plain_newton_schulz(x64, dtype=torch.float64).double()
    x = x64.float()
    ns = batched_newton_schulz if len(shape) == 3 else newton_schulz
    plain_error = _relative(plain_newton_schulz(x).double(), exact)
    assert _relative(ns(x).double(), exact) < 2.0 * plain_error + 1e-6  # measured 0.8x to 1.8x
    monkeypatch.setattr(muon, "GRAM_RESTART", 100)
    if cond is not None:  # measured 30x to 50x
        assert _relative(ns(x).double(), exact) > 10.0 * plain_error
