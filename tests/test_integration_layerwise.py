"""Layer-wise updates (lowrank_optim.layerwise): equal to the ordinary loop, gradients freed, resumable."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_state, build, loss_fn, make_data, make_model, roundtrip

import lowrank_optim as lro
from lowrank_optim.layerwise import LayerwiseUpdater

ACCUM = 2
CLIP = 0.05
LAM = [1.0, 0.5, 0.75, 0.25, 1.0, 0.5, 0.25, 0.125]


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = make_data(n=8 * n)
    return [(x[8 * i: 8 * i + 8], y[8 * i: 8 * i + 8]) for i in range(n)]


def reference(name: str, cycles: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Ordinary loop: ACCUM backward passes, per-parameter clipping, one step, one scheduler step."""
    model = make_model()
    opt = build(name, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: LAM[s])
    for i, (x, y) in enumerate(batches(ACCUM * cycles)):
        (loss_fn(model, x, y) / ACCUM).backward()
        if (i + 1) % ACCUM == 0:
            for p in model.parameters():
                torch.nn.utils.clip_grad_norm_([p], CLIP)
            opt.step()
            sched.step()
            opt.zero_grad()
    return model, opt


def layerwise(name: str) -> tuple[torch.nn.Module, LayerwiseUpdater]:
    model = make_model()
    opt = build(name, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: LAM[s])
    return model, LayerwiseUpdater(opt, accumulation_steps=ACCUM, max_grad_norm=CLIP, lr_scheduler=sched)


def count_live_gradients(lw: LayerwiseUpdater, model: torch.nn.Module) -> list[int]:
    """Wraps ``lw.optimizer.step_parameter``: each call appends how many parameters hold a gradient."""
    live: list[int] = []
    step_parameter = lw.optimizer.step_parameter

    def spy(p: torch.Tensor) -> None:
        live.append(sum(q.grad is not None for q in model.parameters()))
        step_parameter(p)

    lw.optimizer.step_parameter = spy  # type: ignore[method-assign]
    return live


def run(model: torch.nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for x, y in data:
        (loss_fn(model, x, y) / ACCUM).backward()


@pytest.mark.parametrize("name", lro.available_optimizers())
def test_layerwise_equals_ordinary_loop(name: str) -> None:
    cycles = 4
    ref_model, ref_opt = reference(name, cycles)
    model, lw = layerwise(name)
    live = count_live_gradients(lw, model)
    data = batches(ACCUM * cycles)
    for i, (x, y) in enumerate(data):
        run(model, [(x, y)])
        grads = [p.grad is not None for p in model.parameters()]
        # mid-cycle every gradient is kept for accumulation; at a cycle end all are applied and freed
        assert all(grads) if (i + 1) % ACCUM else not any(grads)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert_same_state(lw.optimizer, ref_opt)
    assert lw.optimizer_steps == cycles and lw.lr_scheduler.last_epoch == cycles
    assert all(st["step"] == cycles for st in lw.optimizer.state.values())
    assert len(live) == cycles * len(list(model.parameters()))  # one step per parameter per cycle


def test_layerwise_without_accumulation_holds_one_gradient_at_a_time() -> None:
    model = make_model()
    lw = LayerwiseUpdater(build("galore_adamw", model))
    live = count_live_gradients(lw, model)
    x, y = make_data()
    for _ in range(3):
        loss_fn(model, x, y).backward()
    assert live == [1] * (3 * len(list(model.parameters())))
    assert lw.optimizer_steps == 3


def test_layerwise_save_and_resume_exactly() -> None:
    data = batches(ACCUM * 6)
    model, lw = layerwise("galore_adamw")
    run(model, data)
    uninterrupted = [p.clone() for p in model.parameters()]

    model, lw = layerwise("galore_adamw")
    run(model, data[: ACCUM * 3])
    run(model, data[ACCUM * 3: ACCUM * 3 + 1])
    with pytest.raises(RuntimeError, match="cycle"):
        lw.state_dict()  # pending accumulated gradients would be lost
    model, lw = layerwise("galore_adamw")
    run(model, data[: ACCUM * 3])
    saved = roundtrip({"model": model.state_dict(), "layerwise": lw.state_dict()})

    resumed, lw2 = layerwise("galore_adamw")
    resumed.load_state_dict(saved["model"])
    lw2.load_state_dict(saved["layerwise"])
    assert lw2.lr_scheduler.last_epoch == 3
    run(resumed, data[ACCUM * 3:])
    for p, q in zip(resumed.parameters(), uninterrupted, strict=True):
        assert torch.equal(p, q)


def test_layerwise_rejects_bad_input() -> None:
    model = make_model()
    opt = build("galore_adamw", model)
    with pytest.raises(TypeError, match="optimizer"):
        LayerwiseUpdater(torch.optim.SGD(model.parameters(), lr=0.1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="accumulation_steps"):
        LayerwiseUpdater(opt, accumulation_steps=0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        LayerwiseUpdater(opt, max_grad_norm=0.0)
    other = torch.optim.lr_scheduler.LambdaLR(build("galore_adamw", make_model()), lambda s: 1.0)
    with pytest.raises(ValueError, match="lr_scheduler"):
        LayerwiseUpdater(opt, lr_scheduler=other)
    with pytest.raises(ValueError, match="param"):
        opt.step_parameter(torch.nn.Parameter(torch.zeros(2)))
