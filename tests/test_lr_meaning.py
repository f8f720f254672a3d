"""One ``lr`` meaning across presets: at a shared absolute ``lr`` every preset's first step is AdamW-sized.

Swapping one registered preset for another at the same ``lr`` must not change the step by orders of
magnitude (issue 15: Flora's ``lr x RMS(W)`` trained 0.6 nats behind AdamW at a shared lr). For every
registered optimizer, one step from the same weights and gradients is compared with ``torch.optim.AdamW``'s
first step, parameter by parameter: the update's RMS must be within 10x of AdamW's, unless the preset warns
at construction that its ``lr`` means something else.

Adafactor with a first moment (Flora's default ``beta1=0.9``) averages lr-sized updates without bias
correction, as HF's Adafactor does, so its first step is ``1 - beta1 = 0.1`` of its steady step: on the
bound by construction, hence the 1e-6 slack.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import TinyNet, loss_fn, make_data

import lowrank_optim as lro

LR = 1e-3
RANK = 32  # of 80 and 96: a quarter to a third of the smaller side, as GaLore's recipes
BOUND = 10.0
SLACK = 1e-6


def _first_step_rms(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, float]:
    """RMS of each parameter's change over one step on the fixed batch."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = make_data()
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    opt.step()
    return {n: float((p.detach() - before[n]).pow(2).mean().sqrt()) for n, p in model.named_parameters()}


def _adamw_rms() -> dict[str, float]:
    torch.manual_seed(0)
    model = TinyNet()
    return _first_step_rms(model, torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0))


def _ratios(name: str, **kwargs: object) -> tuple[dict[str, float], list[warnings.WarningMessage]]:
    torch.manual_seed(0)
    model = TinyNet()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = lro.create_optimizer(name, model, **{"lr": LR, "rank": RANK, **kwargs})
    ours = _first_step_rms(model, opt)
    ref = _adamw_rms()
    return {n: ours[n] / ref[n] for n in ref}, list(caught)


@pytest.mark.parametrize("name", lro.available_optimizers())
def test_first_step_is_adamw_sized_or_warns(name: str) -> None:
    ratios, caught = _ratios(name)
    lr_warnings = [w for w in caught if "lr" in str(w.message)]
    if lr_warnings:
        assert len(lr_warnings) == 1, [str(w.message) for w in lr_warnings]  # once, at construction
        return
    for param, ratio in ratios.items():
        assert math.isfinite(ratio), (name, param)
        assert (1 - SLACK) / BOUND <= ratio <= BOUND * (1 + SLACK), (name, param, ratio)


def test_flora_reference_relative_step_is_an_option_and_much_smaller() -> None:
    """flora-opt's ``lr x RMS(W)`` stays available, and it is the kind of step the check above catches:
    >10x smaller than AdamW's at the same ``lr`` on every matrix (weights of RMS ~0.06; the norm's weight,
    RMS 1, is the one parameter where the two meanings agree)."""
    ratios, _ = _ratios("flora", scale_parameter=True)
    assert max(ratios[n] for n in ("attn.weight", "mlp.weight", "head.weight")) < 1 / BOUND, ratios


def test_galore_adafactor_reference_relative_step_is_an_option_and_ignores_lr() -> None:
    """HF Adafactor's relative step stays available; it ignores ``lr`` (a 100x larger ``lr`` moves nothing
    differently), which is why it cannot be the default of a preset swapped in at a shared ``lr``."""
    relative = {"relative_step": True, "scale_parameter": True}
    small, _ = _ratios("galore_adafactor", **relative)
    large, _ = _ratios("galore_adafactor", **{**relative, "lr": 100 * LR})
    assert small == large
    absolute, _ = _ratios("galore_adafactor", lr=100 * LR)
    assert absolute["mlp.weight"] > 50 * small["mlp.weight"]


def test_defaults_are_absolute() -> None:
    """The defaults named in the docstrings: absolute step for Flora and GaLore-Adafactor."""
    model = TinyNet()
    groups = lro.param_groups(model, rank=RANK, target_modules=["attn", "mlp"])
    for opt in (lro.Flora(groups), lro.GaLoreAdafactor(groups)):
        for group in opt.param_groups:
            assert group["scale_parameter"] is False
            assert group["relative_step"] is False
            assert group["lr"] == 1e-3
