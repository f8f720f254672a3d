"""The non-finite check of a large plain Adafactor matrix reads its new row / column statistics, not its gradient.

:func:`lowrank_optim.nonfinite.probed` matrices (fp32 on the CPU, at least ``CPU_SUM_MIN_ELEMENTS`` entries, state
already made) have their factored statistics computed before the check into copies
(:meth:`~lowrank_optim.rules.adafactor.AdafactorRule.plan_plain`), and the check reads those. Asserted here with the
threshold and Adafactor's row blocks lowered so that small matrices take the path in several blocks:

* the result is the same, bit for bit, as the path that checks the gradient itself (every Adafactor option that
  changes the factored update's operations);
* the check is given the two statistics and not the gradient;
* a NaN, inf or -inf anywhere in the matrix (first, last, middle entry, last row block), or a finite entry whose
  square overflows fp32, skips the step (or raises) with every parameter and state tensor unchanged, bit for bit;
* the first step (no state yet) and ``maximize`` keep the gradient check.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import lowrank_optim as lro
from lowrank_optim import nonfinite
from lowrank_optim.rules import adafactor

BIG = (48, 20)  # 960 entries: above the lowered threshold, 3 row blocks of 16 rows (and 320 entries) each


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*BIG, generator=gen)), torch.nn.Parameter(torch.randn(12, 8, generator=gen)),
            torch.nn.Parameter(torch.randn(5, generator=gen))]


def _grads(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(*BIG, generator=gen) * (1 + step), torch.randn(12, 8, generator=gen),
            torch.randn(5, generator=gen)]


def _build(name: str, params: list[torch.nn.Parameter], **kw: object) -> torch.optim.Optimizer:
    groups = [{"params": [params[0], params[2]]}, {"params": [params[1]], "rank": 3}]
    cls = {"flora": lro.Flora, "galore_adafactor": lro.GaLoreAdafactor}[name]
    return cls(groups, lr=0.01, **kw)


def _run(name: str, threshold: int, steps: int, monkeypatch: pytest.MonkeyPatch, **kw: object
         ) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    monkeypatch.setattr(nonfinite, "CPU_SUM_MIN_ELEMENTS", threshold)
    params = _params()
    opt = _build(name, params, **kw)
    for t in range(steps):
        for p, g in zip(params, _grads(t), strict=True):
            p.grad = g.clone()
        opt.step()
    return params, opt


def _state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = []
    for p in (q for g in opt.param_groups for q in g["params"]):
        for _, v in sorted(opt.state[p].items()):
            if isinstance(v, torch.Tensor):
                out.append(v.clone())
    return out


def _assert_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x.view(torch.int32) if x.dtype == torch.float32 else x,
                           y.view(torch.int32) if y.dtype == torch.float32 else y)


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adafactor, "CPU_BLOCK_ELEMENTS", 320)


OPTIONS = [
    ("flora", {}),
    ("flora", {"weight_decay": 0.1}),
    ("flora", {"scale_parameter": True}),
    ("flora", {"relative_step": True, "lr": None}),
    ("flora", {"beta1": None}),
    ("flora", {"eps": (0.0, 1e-3)}),  # eps[0] = 0: the statistics' non-reciprocal path
    ("flora", {"clip_threshold": 0.05}),  # clipping active
    ("galore_adafactor", {}),
    ("galore_adafactor", {"weight_decay": 0.05, "beta1": 0.9}),
]


@pytest.mark.parametrize(("name", "kw"), OPTIONS)
def test_probed_path_equals_the_gradient_check_bit_for_bit(name: str, kw: dict, monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    kw = dict(kw)
    if "lr" in kw:  # relative_step: the preset's lr is replaced
        kw.pop("lr")
    probed_params, probed_opt = _run(name, 900, 6, monkeypatch, **kw)
    plain_params, plain_opt = _run(name, 1 << 40, 6, monkeypatch, **kw)
    _assert_bits([p.detach() for p in probed_params], [p.detach() for p in plain_params])
    _assert_bits(_state_tensors(probed_opt), _state_tensors(plain_opt))


def test_the_check_reads_the_statistics_not_the_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    params, opt = _run("flora", 900, 2, monkeypatch)
    seen: list[list[torch.Tensor]] = []
    real = nonfinite.all_finite
    monkeypatch.setattr(nonfinite, "all_finite", lambda ts: seen.append(list(ts)) or real(ts))
    for p, g in zip(params, _grads(2), strict=True):
        p.grad = g.clone()
    opt.step()
    (checked,) = seen
    assert all(t is not params[0].grad for t in checked)
    assert any(t is params[1].grad for t in checked) and any(t is params[2].grad for t in checked)
    assert sorted(tuple(t.shape) for t in checked if t.dim() == 1 and t.numel() in BIG) == [(20,), (48,)]


POSITIONS = [(0, 0), (47, 19), (20, 7), (40, 3), (33, 0)]  # first, last, middle, last row block, a block's start


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 2e19])  # 2e19: finite, square > fp32 max
@pytest.mark.parametrize("where", POSITIONS)
@pytest.mark.parametrize("name", ["flora", "galore_adafactor"])
def test_a_bad_entry_anywhere_skips_the_step_with_nothing_changed(name: str, where: tuple[int, int], bad: float,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    params, opt = _run(name, 900, 3, monkeypatch)
    before = [p.detach().clone() for p in params], _state_tensors(opt)
    grads = _grads(3)
    grads[0][where] = bad
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    with pytest.warns(RuntimeWarning, match="step skipped"):
        opt.step()
    _assert_bits([p.detach() for p in params], before[0])
    _assert_bits(_state_tensors(opt), before[1])
    for group in opt.param_groups:
        group["nonfinite"] = "raise"
    with pytest.raises(FloatingPointError):
        opt.step()
    _assert_bits([p.detach() for p in params], before[0])
    _assert_bits(_state_tensors(opt), before[1])
    grads[0][where] = 0.5  # a finite gradient again: the run goes on, as the gradient check's path would
    for group in opt.param_groups:
        group["nonfinite"] = "skip"
    opt.step()
    assert all(bool(torch.isfinite(t).all()) for t in _state_tensors(opt))


def test_a_non_finite_first_step_still_creates_no_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nonfinite, "CPU_SUM_MIN_ELEMENTS", 900)
    params = _params()
    opt = _build("flora", params)
    grads = _grads(0)
    grads[0][47, 19] = float("nan")
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    with pytest.warns(RuntimeWarning, match="step skipped"):
        opt.step()
    assert not any(opt.state[p] for p in params)


def test_maximize_keeps_the_gradient_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """``maximize`` steps on ``-g`` (a new tensor), so the plan would see another gradient: it is not probed, and
    still equals minimizing ``-L`` (the gradient check's path)."""
    params, opt = _run("flora", 900, 3, monkeypatch, maximize=True)
    assert not nonfinite.probed(opt.param_groups[0], params[0])
    monkeypatch.setattr(nonfinite, "CPU_SUM_MIN_ELEMENTS", 900)
    neg = _params()
    other = _build("flora", neg)
    for t in range(3):
        for p, g in zip(neg, _grads(t), strict=True):
            p.grad = -g
        other.step()
    _assert_bits([p.detach() for p in params], [p.detach() for p in neg])


def test_probed_only_where_the_gradient_check_would_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nonfinite, "CPU_SUM_MIN_ELEMENTS", 900)
    group = {"nonfinite": "skip"}
    p = torch.nn.Parameter(torch.zeros(*BIG))
    p.grad = torch.zeros(*BIG)
    assert nonfinite.probed(group, p)
    assert not nonfinite.probed({"nonfinite": "ignore"}, p)
    small = torch.nn.Parameter(torch.zeros(10, 10))
    small.grad = torch.zeros(10, 10)
    assert not nonfinite.probed(group, small)
    half = torch.nn.Parameter(torch.zeros(*BIG, dtype=torch.bfloat16))
    half.grad = torch.zeros(*BIG, dtype=torch.bfloat16)
    assert not nonfinite.probed(group, half)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = torch.nn.Parameter(torch.zeros(*BIG, device="meta"))
        meta.grad = torch.zeros(*BIG, device="meta")
    assert not nonfinite.probed(group, meta)
