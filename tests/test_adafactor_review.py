"""Review probes (round 9) of Adafactor's blocked, closed-form factored step and of the CPU non-finite check.

Oracles: ``transformers.optimization.Adafactor`` for plain parameters, the element-wise definition of "finite" for
:func:`lowrank_optim.nonfinite.all_finite`, and an uninterrupted run for a ``torch.load(weights_only=True)`` resume.
The first two caught defects of the review: tiny gradients with a small ``eps[0]`` gave NaN weights or a zero step
(a reciprocal of a tiny row statistic overflowed; the closed form now forms ratios only), and float64 weights were
rounded to fp32 every step (now refused by name).
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

import lowrank_optim as lro
from lowrank_optim import nonfinite
from lowrank_optim.rules import adafactor

transformers = pytest.importorskip("transformers")
HFAdafactor = transformers.optimization.Adafactor


def _one_step(cls: type, shape: tuple[int, ...], scale: float, **config: object) -> torch.Tensor:
    """The change of a unit-scale weight after one step on a gradient ``scale * N(0, 1)``."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(*shape, generator=gen))
    start = p.detach().clone()
    opt = cls([p], **config)
    p.grad = scale * torch.randn(*shape, generator=gen)
    opt.step()
    return p.detach() - start


@pytest.mark.parametrize("block", [1000, 1 << 22])
@pytest.mark.parametrize(("eps1", "scale"), [(0.0, 1e-20), (0.0, 1e-17), (1e-36, 1e-18)])
def test_tiny_gradients_with_small_eps1_match_transformers(eps1: float, scale: float, block: int,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A 64 x 64 (or 256 x 256) gradient of entries ~1e-17..1e-20 with a small ``eps[0]`` (0 and 1e-36 pass
    validation): the scale-free update ``g / sqrt(v_hat)`` of HF, entries of ~2e-2 at ``lr=1e-2``, to 1 ulp.

    Round 9's first closed form formed ``1 / R`` (~1e40: inf in fp32) and ``h_j / C_j`` (~1e38): an infinite RMS
    gave a zero step, or ``0 * inf`` NaN weights from finite gradients. Below ``(1 - beta2_t) eps[0] = 2^-126`` it
    now divides the squares by ``R`` first (ratios only), in one block and in many.
    """
    monkeypatch.setattr(adafactor, "CPU_BLOCK_ELEMENTS", block)
    shape = (256, 256) if scale == 1e-17 else (64, 64)
    config = {"lr": 1e-2, "relative_step": False, "scale_parameter": False, "eps": (eps1, 1e-3)}
    ours = _one_step(lro.GaLoreAdafactor, shape, scale, **config)
    ref = _one_step(HFAdafactor, shape, scale, **config)
    assert ref.abs().max() > 1e-2  # the oracle moves
    torch.testing.assert_close(ours, ref, rtol=0, atol=4e-7)


@pytest.mark.parametrize("block", [64, 1 << 22])
def test_zero_rows_next_to_huge_rows_match_transformers(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """An embedding-like gradient: rows of exact zeros (tokens not in the batch: their row statistic stays at
    ``eps[0] = 1e-30``) in the same block as rows of entries ~1e5 (statistic ~1e10). A ratio ``max R / R_i`` of 1e40
    overflows fp32: a closed form weighting the squares by ``s / R`` made ``0 * inf`` NaN weights here, where HF's
    ``(R / mean(R))^(-1/2)`` is fine. Three steps agree with HF."""
    monkeypatch.setattr(adafactor, "CPU_BLOCK_ELEMENTS", block)
    config = {"lr": 1e-2, "relative_step": False, "scale_parameter": False, "beta1": 0.9}
    outs = []
    for cls in (lro.GaLoreAdafactor, HFAdafactor):
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(40, 16, generator=gen))
        start = p.detach().clone()
        opt = cls([p], **config)
        for t in range(3):
            g = torch.randn(40, 16, generator=gen)
            g[::2] = 0.0
            g[1::4] *= 1e5 * (t + 1)
            p.grad = g
            opt.step()
        outs.append(p.detach() - start)
    ours, ref = outs
    assert torch.isfinite(ours).all() and ref.abs().max() > 1e-3
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("name", lro.available_optimizers())
def test_float64_parameter_is_refused_by_name(name: str) -> None:
    """The engine steps in fp32, so a float64 weight would be rounded to fp32 every step (before round 9 it was,
    silently: 1.1e-7 from HF's fp64 trajectory after 3 steps at ``lr=1e-3``, 1.4e-4 of the distance moved). Now a
    ``TypeError`` names the parameter at the step, and nothing changes."""
    gen = torch.Generator().manual_seed(0)
    ok = torch.nn.Parameter(torch.randn(6, 5, generator=gen))
    wide = torch.nn.Parameter(torch.randn(6, 5, generator=gen, dtype=torch.float64))
    opt = lro.create_optimizer(name, [{"params": [ok, wide]}], lr=1e-3)
    ok.grad, wide.grad = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen, dtype=torch.float64)
    before = [ok.detach().clone(), wide.detach().clone()]
    with pytest.raises(TypeError, match=r"float64 parameters \(parameter 1, shape \(6, 5\)\)"):
        opt.step()
    assert torch.equal(ok, before[0]) and torch.equal(wide, before[1]) and not opt.state


def _grad(shape: tuple[int, int], t: int, kind: str) -> torch.Tensor:
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(100 + t))
    if kind == "zero_rows":
        g[::3] = 0
    elif kind == "zero_cols":
        g[:, ::2] = 0
    elif kind == "row_scales":  # 16 orders of magnitude between rows
        g *= torch.logspace(-8, 8, shape[0]).unsqueeze(1)
    return g


CONFIGS = [
    {"lr": None, "relative_step": True, "scale_parameter": True, "warmup_init": True, "beta1": 0.9},
    {"lr": 1e-2, "relative_step": False, "scale_parameter": True, "beta1": 0.8, "weight_decay": 0.1,
     "clip_threshold": 0.01},  # clipping on every step
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("shape", [(31, 7), (7, 31), (1, 33), (33, 1)])
def test_blocked_plain_step_matches_transformers_on_edge_inputs(config: dict, shape: tuple[int, int],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """8 steps on zero rows, zero columns, rows 1e-8..1e8 apart, in row blocks of ``10 // n`` rows (uneven; one
    row per block when ``n > 10``), contiguous and non-contiguous (unfused) parameters: HF's weights to 1e-5 of the
    distance moved plus 8 fp32 ulps of the weights."""
    monkeypatch.setattr(adafactor, "CPU_BLOCK_ELEMENTS", 10)
    for kind in ("zero_rows", "zero_cols", "row_scales"):
        for contiguous in (True, False):
            outs = []
            for cls in (lro.GaLoreAdafactor, HFAdafactor):
                w0 = 0.05 * torch.randn(*shape, generator=torch.Generator().manual_seed(0))
                p = torch.nn.Parameter(w0.clone() if contiguous else w0.t().contiguous().t())
                assert p.is_contiguous() == (contiguous or 1 in shape)
                opt = cls([p], **config)
                for t in range(8):
                    p.grad = _grad(shape, t, kind)
                    opt.step()
                outs.append(p.detach().clone())
            ours, ref = outs
            tol = 1e-5 * (ref - w0).abs().max() + 8 * torch.finfo(torch.float32).eps * w0.abs().max()
            assert (ours - ref).abs().max() <= tol, (kind, contiguous)


def test_parameters_sharing_storage_match_transformers() -> None:
    """Two Parameter objects over one storage: stepped one after the other, as HF does (bit-equal here)."""
    outs = []
    for cls in (lro.GaLoreAdafactor, HFAdafactor):
        base = 0.1 * torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
        p1, p2 = torch.nn.Parameter(base), torch.nn.Parameter(base)
        assert p1.data_ptr() == p2.data_ptr()
        opt = cls([p1, p2], lr=1e-2, relative_step=False, scale_parameter=True, beta1=0.9)
        for t in range(3):
            gen = torch.Generator().manual_seed(t)
            p1.grad, p2.grad = torch.randn(8, 6, generator=gen), torch.randn(8, 6, generator=gen)
            opt.step()
        outs.append(p1.detach().clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-7)


N = nonfinite.CPU_SUM_MIN_ELEMENTS


@pytest.mark.parametrize("shape", [(1024, 4096), (N,), (16, 512, 512)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_large_gradient_nonfinite_anywhere_is_caught_and_left_alone(shape: tuple[int, ...],
                                                                    dtype: torch.dtype) -> None:
    """2^22-entry gradients (the row-sum path, 1-D: one sum): a NaN, inf or -inf at the first, a middle or the last
    entry, or inf and -inf in one row, is flagged; finite ones pass; the gradient keeps its bits."""
    base = torch.randn(N, generator=torch.Generator().manual_seed(0)).to(dtype).reshape(shape)
    assert nonfinite.all_finite([base, torch.randn(3, 3)])
    cases = [{pos: bad} for bad in (float("nan"), float("inf"), float("-inf")) for pos in (0, N // 2 + 7, N - 1)]
    for case in [*cases, {5: float("inf"), 6: float("-inf")}]:
        g = base.clone()
        for pos, bad in case.items():
            g.view(-1)[pos] = bad
        before = g.clone()
        assert not nonfinite.all_finite([torch.randn(3, 3), g]), case
        assert torch.equal(g.view(torch.int16), before.view(torch.int16)) if dtype != torch.float32 else \
            torch.equal(g.view(torch.int32), before.view(torch.int32))


def _state_bits(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v.clone() for s in opt.state_dict()["state"].values() for v in s.values() if torch.is_tensor(v)]


@pytest.mark.parametrize("preset", ["galore_adafactor", "flora"])
def test_step_on_large_nonfinite_gradient_changes_nothing(preset: str) -> None:
    """A 4096 x 1024 (2^22) gradient with one NaN at its last entry, plus a finite 64 x 32 one (projected, rank 4,
    under Flora): ``"skip"`` warns and leaves weights, moments and gradients bit-unchanged; ``"raise"`` raises
    ``FloatingPointError`` and changes nothing either."""
    gen = torch.Generator().manual_seed(0)
    emb = torch.nn.Parameter(0.02 * torch.randn(4096, 1024, generator=gen))
    small = torch.nn.Parameter(torch.randn(64, 32, generator=gen))
    if preset == "flora":
        opt = lro.Flora([{"params": [small], "rank": 4}, {"params": [emb]}], lr=1e-3)
    else:
        opt = lro.GaLoreAdafactor([emb, small], beta1=0.9)
    emb.grad, small.grad = torch.randn(4096, 1024, generator=gen), torch.randn(64, 32, generator=gen)
    opt.step()
    state, weights = _state_bits(opt), [emb.detach().clone(), small.detach().clone()]
    steps = copy.deepcopy([s["step"] for s in opt.state.values()])
    emb.grad = torch.randn(4096, 1024, generator=gen)
    emb.grad[-1, -1] = float("nan")
    grad = emb.grad.clone()
    for policy in ("skip", "raise"):
        for group in opt.param_groups:
            group["nonfinite"] = policy
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if policy == "raise":
                with pytest.raises(FloatingPointError, match="non-finite"):
                    opt.step()
            else:
                opt.step()
        assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == (policy == "skip")
        assert all(torch.equal(a, b) for a, b in zip(_state_bits(opt), state, strict=True))
        assert [s["step"] for s in opt.state.values()] == steps
        assert torch.equal(emb, weights[0]) and torch.equal(small, weights[1])
        assert torch.equal(emb.grad.view(torch.int32), grad.view(torch.int32))


@pytest.mark.parametrize(("cls", "config"), [(lro.GaLoreAdafactor, {"beta1": 0.9, "weight_decay": 0.1}),
                                             (lro.Flora, {"lr": 1e-2, "kappa": 2}),
                                             (lro.Flora, {"lr": 1e-2, "inner": "adam"})])
def test_resume_from_weights_only_checkpoint_is_bit_exact(cls: type, config: dict,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """3 steps, ``torch.save`` / ``torch.load(weights_only=True)`` into a fresh optimizer (other initial weights),
    3 more steps: bit-equal to 6 uninterrupted steps (row blocks of 50 elements: several per matrix)."""
    monkeypatch.setattr(adafactor, "CPU_BLOCK_ELEMENTS", 50)

    def make(seed: int) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
        gen = torch.Generator().manual_seed(seed)
        ps = [torch.nn.Parameter(0.1 * torch.randn(*s, generator=gen)) for s in ((33, 7), (9, 40), (13,))]
        groups = [{"params": ps[:2], "rank": 3}, {"params": ps[2:]}] if cls is lro.Flora else ps
        return ps, cls(groups, **config)

    def run(ps: list[torch.nn.Parameter], opt: torch.optim.Optimizer, steps: range) -> None:
        for t in steps:
            gen = torch.Generator().manual_seed(100 + t)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()

    ref, ref_opt = make(0)
    run(ref, ref_opt, range(6))
    first, first_opt = make(0)
    run(first, first_opt, range(3))
    buf = io.BytesIO()
    torch.save({"opt": first_opt.state_dict(), "w": [p.detach() for p in first]}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed, resumed_opt = make(5)
    with torch.no_grad():
        for p, w in zip(resumed, ckpt["w"], strict=True):
            p.copy_(w)
    resumed_opt.load_state_dict(ckpt["opt"])
    run(resumed, resumed_opt, range(3, 6))
    assert all(torch.equal(a, b) for a, b in zip(ref, resumed, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(ref, first, strict=True))  # the last 3 steps moved
