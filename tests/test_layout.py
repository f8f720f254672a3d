"""Parameters in any memory layout get the same update (issue 11, fault 1).

Torch's fused AdamW kernel walks raw storage, so a transposed or ``channels_last`` parameter whose
gradient and moments were laid out row-major got another element's moments (0.09 off ``torch.optim.AdamW``
after 5 steps). Every plain inner rule x every state store must equal its reference on transposed,
``channels_last`` (4-D) and strided-slice (non-dense) parameters, with gradients in the parameter's
layout or row-major; every preset's low-rank path must equal its run on a row-major copy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import lowrank_optim as lro

STORES = ("fp32", "bf16", "8bit")
STEPS = 5


def _transposed(g: torch.Generator) -> torch.Tensor:
    return torch.randn(72, 64, generator=g).t()  # (64, 72): 4608 elements, 8-bit moments are quantized


def _channels_last(g: torch.Generator) -> torch.Tensor:
    return torch.randn(16, 8, 6, 6, generator=g).to(memory_format=torch.channels_last)


def _sliced(g: torch.Generator) -> torch.Tensor:
    return torch.randn(64, 144, generator=g)[:, ::2]  # (64, 72), not dense


def _sliced_transposed(g: torch.Generator) -> torch.Tensor:
    return torch.randn(144, 64, generator=g)[::2].t()  # (64, 72), column-major and not dense


LAYOUTS: dict[str, Callable[[torch.Generator], torch.Tensor]] = {
    "transposed": _transposed, "channels_last": _channels_last, "sliced": _sliced,
    "sliced_transposed": _sliced_transposed,
}
#: How each step's gradient is laid out: like the parameter (autograd's contract) or row-major.
GRAD_LAYOUTS = ("param", "row_major")


def _grads(shape: torch.Size, like: torch.Tensor, grad_layout: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        grad = torch.randn(shape, generator=g)
        if grad_layout == "param":
            grad = torch.empty_like(like, memory_format=torch.preserve_format).copy_(grad)
        out.append(grad)
    return out


def _run(make_opt: Callable[[list[torch.Tensor]], torch.optim.Optimizer], data: torch.Tensor,
         grads: list[torch.Tensor]) -> torch.Tensor:
    p = torch.nn.Parameter(data)
    opt = make_opt([p])
    for grad in grads:
        p.grad = grad.clone(memory_format=torch.preserve_format)
        opt.step()
    return p.detach()


def _ours(inner: str, store: str, **kw: Any) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    return lambda params: lro.LowRankOptimizer(params, lr=1e-2, inner=inner, state_dtype=store,
                                               weight_decay=0.1, **kw)


def test_issue_example_transposed_weight_equals_adamw() -> None:
    """``nn.Parameter(torch.randn(64, 48).t())`` was 0.09 off ``torch.optim.AdamW`` after 5 steps."""
    base = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    w = torch.nn.Parameter(base.clone().t())
    ref = torch.nn.Parameter(base.t().contiguous())
    opt = lro.GaLoreAdamW([w], lr=1e-2)
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grad = torch.randn(64, 48, generator=g).t()  # the parameter's layout, as autograd gives it
        w.grad, ref.grad = grad, grad.contiguous()
        opt.step()
        ref_opt.step()
    assert (w - ref).abs().max() < 1e-6


@pytest.mark.parametrize("grad_layout", GRAD_LAYOUTS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_adam_and_sgd_fp32_equal_torch(layout: str, grad_layout: str) -> None:
    data = LAYOUTS[layout](torch.Generator().manual_seed(0))
    grads = _grads(data.shape, data, grad_layout)
    row_major = data.contiguous()
    adam = _run(_ours("adam", "fp32"), data.clone(memory_format=torch.preserve_format), grads)
    # (torch's fused AdamW itself mixes elements when the gradient's layout differs from the parameter's)
    row_grads = [g.contiguous() for g in grads]
    ref = _run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True), row_major.clone(), row_grads)
    assert torch.equal(adam, ref)
    sgd = _run(lambda ps: lro.LowRankOptimizer(ps, lr=1e-2, inner="sgd", momentum=0.9),
               data.clone(memory_format=torch.preserve_format), grads)
    ref = _run(lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9), row_major.clone(), row_grads)
    torch.testing.assert_close(sgd, ref, rtol=0, atol=1e-7)


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("inner", ["adam", "adafactor", "sgd", "muon"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_plain_rule_is_layout_invariant(layout: str, inner: str, store: str) -> None:
    """Every plain inner rule x store: the same result as on a row-major copy of the parameter (bit-exact
    for the element-wise rules; to rounding where a reduction or matmul runs over another memory order)."""
    data = LAYOUTS[layout](torch.Generator().manual_seed(0))
    if inner == "muon" and data.dim() != 2:
        pytest.skip("Muon takes matrices only (refused by name at the first step)")
    extra = {"relative_step": False, "scale_parameter": False, "beta1": 0.9} if inner == "adafactor" else {}
    make = _ours(inner, store, **extra)
    for grad_layout in GRAD_LAYOUTS:
        grads = _grads(data.shape, data, grad_layout)
        got = _run(make, data.clone(memory_format=torch.preserve_format), grads)
        ref = _run(make, data.contiguous(), [g.contiguous() for g in grads])
        assert not torch.equal(ref, data.contiguous())
        if inner in ("adam", "sgd"):
            assert torch.equal(got, ref), (layout, grad_layout)
        else:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_bf16_parameter_in_channels_last_matches_row_major() -> None:
    data = _channels_last(torch.Generator().manual_seed(0)).bfloat16()
    grads = [g.bfloat16() for g in _grads(data.shape, data, "param")]
    make = _ours("adam", "fp32")
    got = _run(make, data.clone(memory_format=torch.preserve_format), grads)
    ref = _run(make, data.contiguous(), [g.contiguous() for g in grads])
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, ref)


def test_moments_follow_the_parameter_layout() -> None:
    """No per-step copy for a transposed or channels_last weight: its moments share its layout."""
    for make in (_transposed, _channels_last):
        p = torch.nn.Parameter(make(torch.Generator().manual_seed(0)))
        opt = lro.GaLoreAdamW([p], lr=1e-2)
        p.grad = torch.ones_like(p)
        opt.step()
        for name in ("exp_avg", "exp_avg_sq"):
            assert opt.state[p][name].stride() == p.stride()


@pytest.mark.parametrize("preset", lro.available_optimizers())
def test_presets_equal_their_row_major_run(preset: str) -> None:
    """Low-rank and plain paths of every preset (the state-free residuals of FRUGAL, Fira's and GaLore+'s
    residuals, Muon in GUM) on a transposed projected weight, a strided slice and a channels_last conv."""
    from helpers import CASES

    g = torch.Generator().manual_seed(0)
    datas = [torch.randn(24, 20, generator=g).t(), torch.randn(20, 48, generator=g)[:, ::2],
             torch.randn(6, 4, 3, 3, generator=g).to(memory_format=torch.channels_last)]
    grads = [[torch.randn(d.shape, generator=g) for _ in range(STEPS)] for d in datas]

    def run(layouted: bool) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(d.clone(memory_format=torch.preserve_format) if layouted else d.contiguous())
                  for d in datas]
        groups = [{"params": params[:2], "rank": 4, "update_proj_gap": 2}, {"params": params[2:]}]
        opt = lro.create_optimizer(preset, groups, **{**CASES.get(preset, {}), "lr": 1e-2})
        for t in range(STEPS):
            for p, gs in zip(params, grads, strict=True):
                p.grad = torch.empty_like(p).copy_(gs[t]) if layouted else gs[t].clone()
            opt.step()
        return [p.detach() for p in params]

    for got, ref, d in zip(run(True), run(False), datas, strict=True):
        assert not torch.equal(ref, d.contiguous())
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
