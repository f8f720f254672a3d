"""Layer-wise updates when the parameter set changes during training (issue 11, fault 7b, and its kind).

``LayerwiseUpdater`` is the package's only hook-based helper (``register_post_accumulate_grad_hook``). It used
to hook parameters once, at construction: a parameter unfrozen later was never stepped and its gradient piled
up. Each change below must give, bit for bit, what the ordinary ``step()`` loop gives on the same gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from helpers import assert_same_state, build, loss_fn, make_data, make_model

from lowrank_optim.layerwise import LayerwiseUpdater

ACCUM = 2
CYCLES = 4
NAMES = ["galore_adamw", "frugal", "gum"]  # plain Adam path, cross-parameter blocks, cross-parameter layer draw

Change = Callable[[torch.nn.Module, torch.optim.Optimizer, int], None]


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = make_data(n=8 * ACCUM * CYCLES)
    return [(x[8 * i: 8 * i + 8], y[8 * i: 8 * i + 8]) for i in range(ACCUM * CYCLES)]


def ordinary(name: str, setup: Change, change: Change) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = make_model()
    opt = build(name, model)
    setup(model, opt, -1)
    for i, (x, y) in enumerate(batches()):
        change(model, opt, i)
        (loss_fn(model, x, y) / ACCUM).backward()
        if (i + 1) % ACCUM == 0:
            opt.step()
            opt.zero_grad()
    return model, opt


def layerwise(name: str, setup: Change, change: Change) -> tuple[torch.nn.Module, LayerwiseUpdater]:
    model = make_model()
    opt = build(name, model)
    setup(model, opt, -1)
    lw = LayerwiseUpdater(opt, accumulation_steps=ACCUM)
    for i, (x, y) in enumerate(batches()):
        change(model, opt, i)
        (loss_fn(model, x, y) / ACCUM).backward()
    return model, lw


def _nothing(model: torch.nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    return None


def _freeze_mlp(model: torch.nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    model.mlp.weight.requires_grad_(False)


def _unfreeze_mlp_at(at: int) -> Change:
    def change(model: torch.nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
        if i == at:
            model.mlp.weight.requires_grad_(True)
    return change


def _freeze_attn_at(at: int) -> Change:
    def change(model: torch.nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
        if i == at:
            model.attn.weight.requires_grad_(False)
    return change


def _without_head(model: torch.nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    head = {id(p) for p in model.head.parameters()}
    for g in opt.param_groups:
        g["params"] = [p for p in g["params"] if id(p) not in head]


def _add_head_at(at: int) -> Change:
    def change(model: torch.nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
        if i == at:
            for p in model.head.parameters():
                p.grad = None  # what piled up while the head was outside the optimizer (same in both loops)
            opt.add_param_group({"params": list(model.head.parameters())})
    return change


CASES = {
    "unfrozen_at_cycle_start": (_freeze_mlp, _unfreeze_mlp_at(2)),
    "unfrozen_mid_cycle": (_freeze_mlp, _unfreeze_mlp_at(3)),
    "frozen_at_cycle_start": (_nothing, _freeze_attn_at(4)),
    "frozen_mid_cycle": (_nothing, _freeze_attn_at(5)),  # holds one micro-batch's gradient at the cycle end
    "add_param_group_later": (_without_head, _add_head_at(2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", NAMES)
def test_changed_parameter_set_equals_ordinary_loop(name: str, case: str) -> None:
    setup, change = CASES[case]
    ref_model, ref_opt = ordinary(name, setup, change)
    model, lw = layerwise(name, setup, change)
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q), n
    assert_same_state(lw.optimizer, ref_opt)
    # nothing piles up: every gradient of an optimizer parameter was applied and freed at the last cycle end
    assert all(p.grad is None for g in lw.optimizer.param_groups for p in g["params"])


def test_unfrozen_parameter_is_stepped_and_hooked() -> None:
    model = make_model()
    opt = build("galore_adamw", model)
    model.mlp.weight.requires_grad_(False)
    lw = LayerwiseUpdater(opt, accumulation_steps=1)
    before = model.mlp.weight.detach().clone()
    model.mlp.weight.requires_grad_(True)
    x, y = make_data(n=8)
    loss_fn(model, x, y).backward()  # no hook on mlp.weight yet: stepped from the end-of-backward callback
    assert model.mlp.weight.grad is None and not torch.equal(model.mlp.weight, before)
    assert opt.state[model.mlp.weight]["step"] == 1
    loss_fn(model, x, y).backward()  # hooked now
    assert opt.state[model.mlp.weight]["step"] == 2 and lw.optimizer_steps == 2


def test_refresh_hooks_when_no_hooked_parameter_trains() -> None:
    """Every hooked parameter frozen, a new one unfrozen: no hook would fire, so ``refresh()`` hooks it."""
    model = make_model()
    opt = build("galore_adamw", model)
    model.mlp.weight.requires_grad_(False)
    lw = LayerwiseUpdater(opt, accumulation_steps=1)
    for p in model.parameters():
        p.requires_grad_(p is model.mlp.weight)
    assert lw.refresh() == 1
    x, y = make_data(n=8)
    loss_fn(model, x, y).backward()
    assert model.mlp.weight.grad is None and opt.state[model.mlp.weight]["step"] == 1


def test_remove_stops_everything() -> None:
    model = make_model()
    opt = build("galore_adamw", model)
    lw = LayerwiseUpdater(opt)
    lw.remove()
    assert lw.refresh() == 0
    x, y = make_data(n=8)
    loss_fn(model, x, y).backward()
    assert all(p.grad is not None for p in model.parameters()) and not opt.state
