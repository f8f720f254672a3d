"""torch.compile: a compiled function that calls ``opt.step()`` works and matches eager bit for bit.

The engine's ``step`` is ``torch.compiler.disable``d (a graph break): refreshes, 8-bit codecs and the int
counters are data-dependent and stay outside compiled regions, while the model code around it compiles.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_state, build, loss_fn, make_data, make_model

import lowrank_optim as lro

STEPS = 4  # helpers.GROUP_OPTIONS refreshes every 3 steps: one refresh inside the compiled run


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", lro.available_optimizers())
def test_compiled_step_function_matches_eager(name: str) -> None:
    torch._dynamo.reset()
    x, y = make_data()
    runs = []
    for compiled in (False, True):
        model = make_model()
        opt = build(name, model, state_dtype="8bit")

        def step(opt: torch.optim.Optimizer = opt) -> None:
            opt.step()

        fn = torch.compile(step) if compiled else step
        for _ in range(STEPS):
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            fn()
        runs.append((model, opt))
    (m0, o0), (m1, o1) = runs
    assert all(torch.equal(a, b) for a, b in zip(_weights(m0), _weights(m1), strict=True))
    assert_same_state(o0, o1)


@pytest.mark.slow
def test_compiled_train_step_matches_eager() -> None:
    """Forward, backward and step in one compiled function (aot_eager: the same aten ops as eager, so the
    comparison is exact; inductor fuses kernels and changes the forward's rounding)."""
    torch._dynamo.reset()
    x, y = make_data()
    runs = []
    for compiled in (False, True):
        model = make_model()
        opt = build("galore_adamw", model, state_dtype="8bit", rank=64)

        def train_step(model: torch.nn.Module = model, opt: torch.optim.Optimizer = opt) -> torch.Tensor:
            opt.zero_grad()
            loss = loss_fn(model, x, y)
            loss.backward()
            opt.step()
            return loss.detach()

        fn = torch.compile(train_step, backend="aot_eager") if compiled else train_step
        losses = [float(fn()) for _ in range(STEPS)]
        runs.append((model, opt, losses))
    (m0, o0, l0), (m1, o1, l1) = runs
    assert l0 == l1 and l1[-1] < l1[0]
    assert all(torch.equal(a, b) for a, b in zip(_weights(m0), _weights(m1), strict=True))
    assert_same_state(o0, o1)
