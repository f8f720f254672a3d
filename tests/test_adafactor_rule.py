"""The Adafactor rule vs ``transformers.optimization.Adafactor`` (oracle), and its row-block path.

A plain matrix's step is applied block by block of rows on the CPU (no full-size temporaries); the
tests force many uneven blocks by shrinking ``CPU_BLOCK_ELEMENTS`` and check HF's trajectory, the
unblocked result and the low-rank ``direction`` path (which must stay the same computation).
"""

from __future__ import annotations

import pytest
import torch

import lowrank_optim as lro
from lowrank_optim.rules import adafactor

SHAPES = [(37, 23), (23, 37), (41,)]
CONFIGS = [
    {"lr": None, "relative_step": True, "scale_parameter": True, "beta1": None, "weight_decay": 0.0},
    {"lr": 1e-2, "relative_step": False, "scale_parameter": False, "beta1": 0.9, "weight_decay": 0.1},
    {"lr": None, "relative_step": True, "scale_parameter": True, "warmup_init": True, "beta1": 0.5,
     "weight_decay": 0.0},
    {"lr": 3e-2, "relative_step": False, "scale_parameter": True, "beta1": None, "weight_decay": 0.0,
     "clip_threshold": 0.5},
]


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(0.05 * torch.randn(*s, generator=gen)) for s in SHAPES]


def _grads(t: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + t)
    return [torch.randn(*s, generator=gen) * (1 + 0.3 * t) for s in SHAPES]


def _run(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int) -> list[list[torch.Tensor]]:
    out = []
    for t in range(steps):
        for p, g in zip(params, _grads(t), strict=True):
            p.grad = g.clone()
        opt.step()
        out.append([p.detach().clone() for p in params])
    return out


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("block", [100, 1 << 20])
def test_plain_trajectory_matches_transformers(config, block, monkeypatch) -> None:
    """Plain parameters (no rank): 12 steps agree with HF's Adafactor to 1e-5 of the distance moved.

    ``block=100`` splits a 37x23 matrix into ten row blocks of 4 (the last of 1); no difference is intended.
    The small weights (RMS 0.05) keep fp32 rounding of the weights far below the distance moved.
    """
    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(adafactor, "CPU_BLOCK_ELEMENTS", block)
    ours, ref = _params(), _params()
    start = [p.detach().clone() for p in ours]
    opt = lro.GaLoreAdafactor(ours, **config)
    ref_opt = transformers.optimization.Adafactor(ref, **config)
    for a, b in zip(_run(opt, ours, 12), _run(ref_opt, ref, 12), strict=True):
        for x, y, s in zip(a, b, start, strict=True):
            ulp = torch.finfo(torch.float32).eps * s.abs().max()
            assert (x - y).abs().max() <= 1e-5 * (y - s).abs().max() + 2 * ulp


@pytest.mark.parametrize("beta1", [None, 0.9])
def test_blocked_plain_step_equals_low_rank_direction(beta1: float | None, monkeypatch) -> None:
    """``apply_plain`` (blocks, fused into the parameter) and ``direction`` + the engine's update are the
    same operations in the same order: bit-identical parameter and moments. With ``beta1`` the plain path's
    momentum and parameter update is one pass of torch's fused SGD kernel (HF's ``mul_`` / ``add_`` form of the
    average, see the next test) and the low-rank path's a ``lerp_``: equal to 2 ulps."""
    monkeypatch.setattr(adafactor, "CPU_BLOCK_ELEMENTS", 64)
    rule = adafactor.AdafactorRule()
    group = {**rule.defaults, "lr": 1e-2, "relative_step": False, "beta1": beta1, "weight_decay": 0.05}
    gen = torch.Generator().manual_seed(3)
    grad = torch.randn(29, 17, generator=gen)
    p_a = torch.randn(29, 17, generator=gen)
    p_b = p_a.clone()
    mom_a = {s.name: torch.zeros(s.shape) for s in rule.moments((29, 17), group)}
    mom_b = {k: v.clone() for k, v in mom_a.items()}
    for step in (1, 2, 3):
        assert rule.apply_plain(p_a, grad * step, mom_a, step, group)
        d = rule.direction(grad * step, mom_b, step, group, p_b)
        p_b.mul_(1 - d.lr * group["weight_decay"]).add_(d.num, alpha=-d.coef)
        for a, b in [(p_a, p_b), *((mom_a[k], mom_b[k]) for k in mom_a)]:
            if beta1 is None:
                assert torch.equal(a, b)
            else:
                assert ((a - b).abs() <= 2 * torch.finfo(torch.float32).eps * b.abs()).all()


def test_plain_momentum_is_torch_fused_sgd_and_hf_average() -> None:
    """The plain path's fused momentum (``_fused_sgd_`` with momentum = dampening = beta1, lr 1) is HF's
    ``exp_avg.mul_(beta1).add_(u, alpha=1 - beta1)`` then ``p -= exp_avg``: bit for bit here (64 x 512 entries;
    the kernel's scalar tail, the last few entries of an odd length, may round one ulp apart)."""
    gen = torch.Generator().manual_seed(5)
    u, avg, p = (torch.randn(64, 512, generator=gen) for _ in range(3))
    avg_ref, p_ref = avg.clone(), p.clone()
    torch._fused_sgd_([p], [u], [avg], weight_decay=0.0, momentum=0.9, lr=1.0, dampening=0.9, nesterov=False,
                      maximize=False, is_first_step=False)
    p_ref.sub_(adafactor._average(avg_ref, u, 0.9))
    assert torch.equal(avg, avg_ref) and torch.equal(p, p_ref)


def test_blocks_cover_every_row_once() -> None:
    for m, n, block in [(37, 23, 100), (5, 300, 100), (2048 * 3 + 1, 512, 1 << 20), (0, 4, 100)]:
        old = adafactor.CPU_BLOCK_ELEMENTS
        try:
            adafactor.CPU_BLOCK_ELEMENTS = block
            blocks = adafactor._row_blocks(torch.empty(m, n))
        finally:
            adafactor.CPU_BLOCK_ELEMENTS = old
        assert sum(blocks) == m  # row counts, in order: every row once
        assert all(1 <= k <= max(1, block // n) for k in blocks) if m else blocks == [0]
        assert len(blocks) == max(1, -(-m // max(1, block // n)))
