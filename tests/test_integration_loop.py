"""The usual training loop: accelerate, gradient accumulation, GradScaler, LR schedulers, gradient clipping.

Every test compares against a hand-written loop doing the same floating-point operations, so the
assertions are bit-exact, and checks the counters (``step``, projector refreshes) in optimizer steps.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
from helpers import assert_same_state, build, flat_state, loss_fn, make_data, make_model

import lowrank_optim as lro

ACCUM = 3
OPT_STEPS = 4
GAP = 3  # helpers.GROUP_OPTIONS["update_proj_gap"]


def micro_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = make_data(n=8 * n)
    return [(x[8 * i: 8 * i + 8], y[8 * i: 8 * i + 8]) for i in range(n)]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), n


@pytest.fixture
def accelerate_state() -> Iterator[None]:
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    del accelerate


def manual_accumulation(name: str, clip: float | None = None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Reference loop: ACCUM backward passes of loss / ACCUM, then one step (optionally clipped)."""
    model = make_model()
    opt = build(name, model, state_dtype="8bit")
    for i, (x, y) in enumerate(micro_batches(ACCUM * OPT_STEPS)):
        (loss_fn(model, x, y) / ACCUM).backward()
        if (i + 1) % ACCUM == 0:
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("name", lro.available_optimizers())
def test_accelerate_accumulation_and_clipping(name: str, accelerate_state: None) -> None:
    from accelerate import Accelerator

    ref_model, ref_opt = manual_accumulation(name, clip=0.05)
    model = make_model()
    opt = build(name, model, state_dtype="8bit")
    acc = Accelerator(cpu=True, gradient_accumulation_steps=ACCUM)
    # prepare() round-trips opt.state_dict() through load_state_dict before the first step
    model, opt = acc.prepare(model, opt)
    norms = []
    for x, y in micro_batches(ACCUM * OPT_STEPS):
        with acc.accumulate(model):
            acc.backward(loss_fn(model, x, y))
            if acc.sync_gradients:
                norms.append(float(acc.clip_grad_norm_(model.parameters(), 0.05)))
            opt.step()  # a no-op except on the last micro-batch of each cycle
            opt.zero_grad()
    assert len(norms) == OPT_STEPS and min(norms) > 0.05  # clipping was active
    same_weights(acc.unwrap_model(model), ref_model)
    inner = opt.optimizer
    assert_same_state(inner, ref_opt)
    # steps and refresh schedules count optimizer steps, not micro-batches
    assert all(st["step"] == OPT_STEPS for st in inner.state.values())
    refreshes = [st["projector"]["refresh"] for st in inner.state.values()
                 if "projector" in st and "refresh" in st["projector"]]
    assert all(r == (OPT_STEPS - 1) // GAP for r in refreshes)


def test_accelerate_prepare_keeps_8bit_state_midway(accelerate_state: None) -> None:
    """prepare() after some steps round-trips a live 8-bit state: dtypes kept, the run continues exactly."""
    from accelerate import Accelerator

    ref = make_model()
    ref_opt = build("galore_adamw", ref, state_dtype="8bit", rank=64)  # 96 x 64 moments: 8-bit codes
    model = make_model()
    opt = build("galore_adamw", model, state_dtype="8bit", rank=64)
    batches = micro_batches(6)
    for i, (x, y) in enumerate(batches):
        for m, o in ((ref, ref_opt), (model, opt)):
            o.zero_grad()
            loss_fn(m, x, y).backward()
            o.step()
        if i == 2:
            dtypes = {k: v.dtype for k, v in flat_state(opt) if isinstance(v, torch.Tensor)}
            assert torch.uint8 in dtypes.values()
            model, opt = Accelerator(cpu=True).prepare(model, opt)
            assert {k: v.dtype for k, v in flat_state(opt.optimizer) if isinstance(v, torch.Tensor)} == dtypes
    same_weights(model, ref)
    assert_same_state(opt.optimizer, ref_opt)


def test_gradscaler_overflow_skips_step_and_state_does_not_advance() -> None:
    ref = make_model()
    ref_opt = build("galore_adamw", ref, state_dtype="8bit")
    model = make_model()
    opt = build("galore_adamw", model, state_dtype="8bit", nonfinite="ignore")  # the scaler does the check
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    batches = micro_batches(5)
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        scaler.scale(loss_fn(model, x, y)).backward()
        if i == 2:
            model.mlp.weight.grad[0, 0] = float("inf")
            before = flat_state(opt)
        scaler.step(opt)
        scaler.update()
        if i == 2:
            after = flat_state(opt)
            assert [k for k, _ in before] == [k for k, _ in after]
            for (k, a), (_, b) in zip(before, after, strict=True):
                assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, k
            assert scaler.get_scale() == 2.0**7
            continue
        ref_opt.zero_grad()
        loss_fn(ref, x, y).backward()
        ref_opt.step()
    # power-of-two scaling is exact, so the scaled run equals the plain run that never saw batch 2
    same_weights(model, ref)
    assert_same_state(opt, ref_opt)
    assert all(st["step"] == 4 for st in opt.state.values())


def test_engine_nonfinite_skip_without_scaler() -> None:
    """Without a GradScaler the engine's own policy skips the whole step (default ``nonfinite='skip'``)."""
    model = make_model()
    opt = build("galore_adamw", model)
    x, y = make_data()
    for _ in range(2):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    before = flat_state(opt)
    weights = [p.clone() for p in model.parameters()]
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    model.attn.weight.grad[1, 1] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert any(issubclass(w.category, RuntimeWarning) for w in caught)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert [k for k, _ in before] == [k for k, _ in flat_state(opt)]


def test_lr_scheduler_drives_every_group() -> None:
    """A LambdaLR run equals a run that writes ``group['lr']`` by hand; low-rank keys are untouched."""
    lam = [1.0, 0.5, 0.25, 0.125, 2.0, 1.0]
    ref = make_model()
    ref_opt = build("galore_adamw", ref)
    model = make_model()
    opt = build("galore_adamw", model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lam[s])
    base = [g["lr"] for g in ref_opt.param_groups]
    keys = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in opt.param_groups]
    x, y = make_data()
    for s in range(len(lam) - 1):
        for g, b in zip(ref_opt.param_groups, base, strict=True):
            g["lr"] = b * lam[s]
        for m, o in ((ref, ref_opt), (model, opt)):
            o.zero_grad()
            loss_fn(m, x, y).backward()
            o.step()
        sched.step()
    same_weights(model, ref)
    assert [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in opt.param_groups] == keys
    # the scheduler's own state round-trips beside the optimizer's
    sched2 = torch.optim.lr_scheduler.LambdaLR(build("galore_adamw", make_model()), lambda s: lam[s])
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == sched.last_epoch
