"""torch.optim's keyword contract and load hooks, for every preset (review 10, drop-in API).

- ``maximize`` means what it means in ``torch.optim``: maximizing ``-L`` takes exactly the steps of minimizing ``L``,
  a plain parameter matches ``torch.optim.AdamW(maximize=True)`` bit for bit, ``p.grad`` is left unchanged, and a
  ``torch.optim.AdamW(maximize=True)`` checkpoint resumes as AdamW would.
- ``foreach`` / ``fused`` / ``capturable`` / ``differentiable`` at torch's default values run the same steps as
  without them; the values that cannot be honoured are refused by name (never silently ignored, also in a group).
- ``register_load_state_dict_pre_hook`` sees the whole state dict and its returned dict is the one loaded; the
  post-hook sees the loaded state (``torch.optim.AdamW``'s behaviour).
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from helpers import build, loss_fn, make_data, make_model, roundtrip

import lowrank_optim as lro

NAMES = lro.available_optimizers()


def _run(name: str, sign: float, steps: int = 5, **extra: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Weights and last gradients after ``steps`` steps of ``name`` on ``sign * loss``."""
    model = make_model()
    opt = build(name, model, update_proj_gap=2, **extra)
    x, y = make_data()
    for _ in range(steps):
        opt.zero_grad()
        (sign * loss_fn(model, x, y)).backward()
        opt.step()
    return ([p.detach().clone() for p in model.parameters()],
            [p.grad.clone() for p in model.parameters()])


@pytest.mark.parametrize("name", NAMES)
def test_maximize_of_negated_loss_equals_minimize(name: str) -> None:
    """maximize=True on -L steps exactly as the default on L (float negation is exact), refreshes included."""
    ref, ref_grads = _run(name, 1.0)
    got, got_grads = _run(name, -1.0, maximize=True)
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ref_grads, got_grads, strict=True):  # p.grad keeps the user's value: -grad L, not negated back
        assert torch.equal(b, -a)
    moved, _ = _run(name, 1.0, maximize=True)  # and maximizing L goes elsewhere than minimizing it
    assert not torch.equal(moved[0], ref[0])


def _adamw_pair(maximize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.optim.Optimizer, torch.optim.Optimizer]:
    torch.manual_seed(0)
    w0 = torch.randn(6, 5)
    p, q = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    ref = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1, maximize=maximize)
    ours = lro.GaLoreAdamW([q], lr=1e-2, weight_decay=0.1, maximize=maximize)
    return p, q, ref, ours


def _feed(params_opts: list[tuple[torch.Tensor, torch.optim.Optimizer]], steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        for p, opt in params_opts:
            opt.zero_grad()
            (p.sin() * (t + 1)).sum().backward()
            opt.step()


def test_maximize_plain_matches_torch_adamw_bitwise() -> None:
    p, q, ref, ours = _adamw_pair(True)
    _feed([(p, ref), (q, ours)], 4)
    assert torch.equal(p, q)
    ours.param_groups[0]["maximize"] = False  # toggled mid-run by the user: takes effect at the next step
    ref.param_groups[0]["maximize"] = False
    _feed([(p, ref), (q, ours)], 3, start=4)
    assert torch.equal(p, q)


def test_torch_adamw_maximize_checkpoint_resumes_as_adamw() -> None:
    p, q, ref, _ = _adamw_pair(True)
    _feed([(p, ref)], 3)
    q.data.copy_(p.data)
    fresh = lro.GaLoreAdamW([q], lr=1e-2, weight_decay=0.1)  # built without maximize: the saved group's value wins
    fresh.load_state_dict(roundtrip(ref.state_dict()))
    assert fresh.param_groups[0]["maximize"] is True
    _feed([(p, ref), (q, fresh)], 3, start=3)
    assert torch.equal(p, q)


def test_checkpoint_without_maximize_key_loads_as_minimize() -> None:
    """A state dict saved before ``maximize`` was a group key resumes exactly (the key defaults to False)."""
    p, q, _, ours = _adamw_pair(False)
    _feed([(q, ours)], 2)
    sd = roundtrip(ours.state_dict())
    for g in sd["param_groups"]:
        del g["maximize"]
    p.data.copy_(q.data)
    other = lro.GaLoreAdamW([p], lr=1e-2, weight_decay=0.1)
    other.load_state_dict(sd)
    assert other.param_groups[0]["maximize"] is False
    _feed([(p, other), (q, ours)], 2, start=2)
    assert torch.equal(p, q)


@pytest.mark.parametrize("name", NAMES)
def test_torch_default_flags_change_nothing(name: str) -> None:
    ref, _ = _run(name, 1.0, steps=3)
    for flags in ({"foreach": None, "fused": None, "capturable": False, "differentiable": False, "maximize": False},
                  {"foreach": True, "fused": False}, {"foreach": False}):
        got, _ = _run(name, 1.0, steps=3, **flags)
        for a, b in zip(ref, got, strict=True):
            assert torch.equal(a, b), flags


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("key", "value", "exc", "match"), [
    ("fused", True, ValueError, "Invalid fused: True"),
    ("capturable", True, ValueError, "Invalid capturable: True"),
    ("differentiable", True, ValueError, "Invalid differentiable: True"),
    ("foreach", "yes", TypeError, "Invalid foreach: expected None or a bool, got 'yes'"),
    ("maximize", 1, TypeError, "Invalid maximize: expected a bool, got 1"),
])
def test_unsupported_torch_flags_refused_by_name(name: str, key: str, value: object, exc: type,
                                                 match: str) -> None:
    with pytest.raises(exc, match=match):
        build(name, make_model(), **{key: value})
    model = make_model()
    with pytest.raises(exc, match=match):  # in a group (a torch.optim.AdamW group copied over): refused, not ignored
        lro.create_optimizer(name, [{"params": list(model.parameters()), key: value}], lr=1e-3)
    opt = build(name, model)
    opt.param_groups[0][key] = value  # set by the user mid-run: refused at the step, before any state changes
    x, y = make_data()
    loss_fn(model, x, y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(exc, match=match):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not opt.state


def _hooked(opt: torch.optim.Optimizer, seen: dict[str, Any]) -> None:
    def pre(o: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
        seen["pre_state"] = len(sd["state"])
        out = {**sd, "param_groups": [{**g, "lr": 0.125} for g in sd["param_groups"]]}
        return out

    def post(o: torch.optim.Optimizer) -> None:
        seen["post_state"] = len(o.state)
        seen["post_lr"] = [g["lr"] for g in o.param_groups]

    opt.register_load_state_dict_pre_hook(pre)
    opt.register_load_state_dict_post_hook(post)


@pytest.mark.parametrize("name", NAMES)
def test_load_hooks_see_the_whole_state_as_in_torch(name: str) -> None:
    model = make_model()
    opt = build(name, model)
    x, y = make_data()
    for _ in range(2):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    sd = roundtrip(opt.state_dict())
    n = len(sd["state"])
    assert n == len(list(model.parameters()))
    seen: dict[str, Any] = {}
    fresh = build(name, model)
    _hooked(fresh, seen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the lr a hook sets is not a method change: no warning
        fresh.load_state_dict(sd)
    assert seen == {"pre_state": n, "post_state": n, "post_lr": [0.125] * len(fresh.param_groups)}
    assert [g["lr"] for g in fresh.param_groups] == [0.125] * len(fresh.param_groups)
    assert len(sd["state"]) == n  # the caller's dict is not modified

    ref_seen: dict[str, Any] = {}  # torch.optim.AdamW with the same hooks: the same observations
    p = torch.nn.Parameter(torch.ones(3))
    ref = torch.optim.AdamW([p])
    p.sum().backward()
    ref.step()
    ref2 = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    _hooked(ref2, ref_seen)
    ref2.load_state_dict(ref.state_dict())
    assert ref_seen == {"pre_state": 1, "post_state": 1, "post_lr": [0.125]}
