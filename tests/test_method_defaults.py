"""Method-defining defaults survive every way a param group can carry a value (issue 11, fault 7a).

A group key overrides the optimizer's value (torch semantics). Groups built with GaLore's keys used to turn
OSD's and DCT-AdamW's period 1, COAP's 32 and Flora's 1000 into 200 without a word. Following the README
(groups carry ``rank``, the optimizer carries the method's hyper-parameters) gives every preset its own values;
a group that contradicts one of them warns, naming the key, the group's value and the method's value.
"""

from __future__ import annotations

import itertools
import re
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import lowrank_optim as lro
from lowrank_optim.engine import ENGINE_DEFAULTS
from lowrank_optim.groups import METHOD_KEYS, MethodDefaultWarning

#: Each preset's own refresh period and back-projection scale (papers / reference code, see each class).
OWN: dict[str, tuple[int, float]] = {
    "galore_adamw": (200, 0.25), "galore_adafactor": (200, 0.25), "fira": (200, 0.25), "galore_plus": (200, 0.25),
    "online_subspace_descent": (1, 0.25), "dct_adamw": (1, 1.0), "coap": (32, 1.0), "flora": (1000, 1.0),
    "frugal": (200, 1.0), "gum": (200, 1.0),
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.Linear(24, 32)
        self.mlp = nn.Linear(32, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.tanh(self.attn(x)))


def _lowrank_group(opt: torch.optim.Optimizer) -> dict[str, Any]:
    return next(g for g in opt.param_groups if g.get("rank") is not None)


def test_every_preset_is_listed() -> None:
    assert set(OWN) == set(lro.available_optimizers())


@pytest.mark.parametrize("name", sorted(OWN))
def test_readme_pattern_keeps_each_method_own_values(name: str) -> None:
    groups = lro.param_groups(Net(), rank=4, target_modules=["attn", "mlp"])  # the README's quick start
    with warnings.catch_warnings():
        warnings.simplefilter("error", MethodDefaultWarning)
        opt = lro.create_optimizer(name, groups, lr=1e-3)
    group = _lowrank_group(opt)
    assert (group["update_proj_gap"], group["scale"]) == OWN[name]


def test_readme_pattern_osd_moves_p_every_step() -> None:
    model = Net()
    opt = lro.OnlineSubspaceDescent(lro.param_groups(model, rank=4, target_modules=["attn", "mlp"]), lr=1e-2)
    x = torch.randn(16, 24, generator=torch.Generator().manual_seed(1))
    bases = []
    for _ in range(4):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        bases.append(opt.state[model.attn.weight]["projector"]["basis"].clone())
    assert opt.state[model.attn.weight]["projector"]["p_step"] == 3  # one P step on each step after the first
    assert all(not torch.equal(a, b) for a, b in itertools.pairwise(bases))


def _contradictions(name: str) -> list[tuple[str, Any, Any]]:
    """(key, a contradicting group value, the method's value) for every method-defining key of a preset."""
    opt = lro.create_optimizer(name, [torch.zeros(2, requires_grad=True)])
    alternatives = {"update_proj_gap": lambda v: v + 7, "scale": lambda v: v / 2,
                    "projector": lambda v: "rsvd" if v != "rsvd" else "svd",
                    "inner": lambda v: "sgd" if v != "sgd" else "adam",
                    "plain_inner": lambda v: "sgd" if v != "sgd" else "adam",
                    "residual": lambda v: "drop" if v != "drop" else "sign",
                    "transfer": lambda v: "reset" if v != "reset" else "keep",
                    "residual_density": lambda v: v * 2, "residual_warmup": lambda v: v + 1,
                    "beta1": lambda v: 0.5, "relative_step": lambda v: not v,
                    "scale_parameter": lambda v: not v}
    out = []
    keys = (set(METHOD_KEYS) | set(type(opt).preset_defaults)) & set(opt.defaults)
    missing = object()
    for key in sorted(keys):
        own = opt.defaults[key]
        if ENGINE_DEFAULTS.get(key, missing) == own:
            continue
        out.append((key, alternatives[key](own), own))
    return out


CONTRADICTIONS = [(n, k, g, m) for n in sorted(OWN) for k, g, m in _contradictions(n)]


def test_contradiction_table_covers_the_issue_examples() -> None:
    keys = {(n, k) for n, k, _, _ in CONTRADICTIONS}
    for name in ("online_subspace_descent", "dct_adamw", "coap", "flora"):
        assert (name, "update_proj_gap") in keys
    for name in ("frugal", "flora", "coap", "dct_adamw", "gum"):
        assert (name, "scale") in keys


def _pattern(key: str, group_value: Any, method_value: Any) -> str:
    return re.escape(f"{key}={group_value!r} (the method's value: {method_value!r})")


@pytest.mark.parametrize(("name", "key", "group_value", "method_value"), CONTRADICTIONS)
def test_hand_made_group_contradiction_warns(name: str, key: str, group_value: Any, method_value: Any) -> None:
    model = Net()
    group = {"params": [model.attn.weight, model.mlp.weight], "rank": 4, key: group_value}
    with pytest.warns(MethodDefaultWarning, match=_pattern(key, group_value, method_value)):
        try:
            opt = lro.create_optimizer(name, [group], lr=1e-3)
        except TypeError as err:  # another projector cannot take the preset's projector options: refused
            assert key == "projector" and "projector option" in str(err)
            return
    assert opt.param_groups[0][key] == group_value  # torch semantics kept: the group's value wins, loudly


@pytest.mark.parametrize("name", ["online_subspace_descent", "dct_adamw", "coap", "flora"])
def test_issue_example_param_groups_helper_warns(name: str) -> None:
    groups = lro.param_groups(Net(), rank=4, target_modules=["attn", "mlp"], update_proj_gap=200)
    period = OWN[name][0]
    with pytest.warns(MethodDefaultWarning, match=_pattern("update_proj_gap", 200, period)):
        lro.create_optimizer(name, groups)


def test_create_optimizer_group_options_warns() -> None:
    with pytest.warns(MethodDefaultWarning, match=_pattern("scale", 0.25, 1.0)):
        lro.create_optimizer("frugal", Net(), rank=4, group_options={"scale": 0.25})


def test_create_optimizer_kwargs_reach_the_method_silently() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", MethodDefaultWarning)
        opt = lro.create_optimizer("flora", Net(), rank=4, kappa=50)
    assert _lowrank_group(opt)["update_proj_gap"] == 50


def test_add_param_group_later_warns() -> None:
    model = Net()
    opt = lro.COAP([{"params": [model.attn.weight], "rank": 4}])
    with pytest.warns(MethodDefaultWarning, match=_pattern("update_proj_gap", 200, 32)):
        opt.add_param_group({"params": [model.mlp.weight], "rank": 4, "update_proj_gap": 200})


def test_constructor_value_contradicted_by_group_warns() -> None:
    """The method's value is the optimizer's (constructor argument over preset): a group contradicting it warns."""
    model = Net()
    with pytest.warns(MethodDefaultWarning, match=_pattern("update_proj_gap", 200, 50)):
        lro.GaLoreAdamW([{"params": [model.attn.weight], "rank": 4, "update_proj_gap": 200}], update_proj_gap=50)


def test_silent_cases() -> None:
    """No warning: galore-torch's per-group period under GaLore, a group repeating the method's value, and
    HF Trainer's ``optimizer_cls_and_kwargs`` route (the kwargs go to the constructor, groups carry weight decay)."""
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("error", MethodDefaultWarning)
        lro.GaLoreAdamW([{"params": [model.attn.weight], "rank": 4, "update_proj_gap": 50, "scale": 0.5}])
        lro.OnlineSubspaceDescent([{"params": [model.attn.weight], "rank": 4, "update_proj_gap": 1}])
        trainer_groups = [{"params": [model.attn.weight, model.mlp.weight], "weight_decay": 0.01},
                          {"params": [model.attn.bias, model.mlp.bias], "weight_decay": 0.0}]
        opt = lro.DCTAdamW(trainer_groups, lr=1e-3, rank=4, target_modules=["attn", "mlp"], module=model)
    assert all(g["update_proj_gap"] == 1 and g["scale"] == 1.0 for g in opt.param_groups)


def test_planner_does_not_override_method_period() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", MethodDefaultWarning)
        plan = lro.plan_memory({"attn.weight": (32, 24), "mlp.weight": (24, 32)}, "online_subspace_descent", rank=4,
                               state_dtype="fp32")
    assert plan.state_total > 0


def test_resume_does_not_warn() -> None:
    model = Net()
    opt = lro.Flora([{"params": [model.attn.weight], "rank": 4}], kappa=10)
    model(torch.randn(3, 24)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error", MethodDefaultWarning)
        other = lro.Flora([{"params": [model.attn.weight], "rank": 4}], kappa=10)
        other.load_state_dict(sd)
    assert other.param_groups[0]["update_proj_gap"] == 10
