"""Generic checks every registered optimizer and every state store must pass (torch's optimizer suite style)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    STATE_DTYPES,
    assert_same_continuation,
    assert_same_state,
    build,
    loss_fn,
    make_data,
    make_model,
    resume_copy,
    roundtrip,
    train,
)

import lowrank_optim as lro

NAMES = lro.available_optimizers()
ALL = [(n, s) for n in NAMES for s in STATE_DTYPES]


@pytest.mark.parametrize(("name", "state_dtype"), ALL)
def test_goes_right_direction(name: str, state_dtype: str) -> None:
    model = make_model()
    opt = build(name, model, state_dtype)
    losses = train(model, opt, 25)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize(("name", "state_dtype"), ALL)
def test_state_dict_resume_is_bit_exact(name: str, state_dtype: str) -> None:
    """Train k steps, save, load (weights_only) into a fresh optimizer on a copied model, continue."""
    model = make_model()
    opt = build(name, model, state_dtype)
    train(model, opt, 7)
    model2, opt2 = resume_copy(model, opt, lambda m: build(name, m, state_dtype))
    assert_same_continuation(model, opt, model2, opt2, 8)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_params_resume_keeps_dtypes(name: str) -> None:
    model = make_model(dtype=torch.bfloat16)
    opt = build(name, model, "8bit")
    train(model, opt, 4)
    dtypes = {k: v.dtype for st in opt.state_dict()["state"].values() for k, v in _tensors(st)}
    saved = roundtrip(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = build(name, model2, "8bit")
    opt2.load_state_dict(saved)
    dtypes2 = {k: v.dtype for st in opt2.state_dict()["state"].values() for k, v in _tensors(st)}
    assert dtypes == dtypes2
    assert torch.bfloat16 not in set(dtypes.values())  # torch's default load would cast fp32 state to bf16
    train(model, opt, 4, data_seed=2)
    train(model2, opt2, 4, data_seed=2)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def _tensors(st: dict, prefix: str = ""):
    for k, v in st.items():
        if isinstance(v, torch.Tensor):
            yield prefix + k, v
        elif isinstance(v, dict):
            yield from _tensors(v, prefix + k + ".")


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_is_deterministic(name: str) -> None:
    model = make_model()
    opt = build(name, model)
    train(model, opt, 5)
    a = roundtrip(opt.state_dict())
    b = roundtrip(opt.state_dict())
    opt2 = build(name, copy.deepcopy(model))
    opt2.load_state_dict(a)
    c = roundtrip(opt2.state_dict())
    for x in (b, c):
        assert repr(x["param_groups"]) == repr(a["param_groups"])


@pytest.mark.parametrize("name", NAMES)
def test_no_grad_params_untouched(name: str) -> None:
    model = make_model()
    opt = build(name, model)
    before = model.mlp.weight.detach().clone()
    x, y = make_data()
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        model.mlp.weight.grad = None
        opt.step()
    assert torch.equal(model.mlp.weight, before)
    assert model.mlp.weight not in opt.state


@pytest.mark.parametrize("name", NAMES)
def test_param_group_lr_respected(name: str) -> None:
    """A group with a vanishing lr must not move (torch's 'irrelevant param' check)."""
    model = make_model()
    opt = build(name, model)
    opt.param_groups[-1]["lr"] = 1e-30
    lowrank = [p.detach().clone() for p in opt.param_groups[-1]["params"]]
    train(model, opt, 3)
    for p, b in zip(opt.param_groups[-1]["params"], lowrank, strict=True):
        torch.testing.assert_close(p, b, rtol=0, atol=1e-20)


@pytest.mark.parametrize("name", NAMES)
def test_printable_and_counts_steps_once(name: str) -> None:
    model = make_model()
    opt = build(name, model)
    assert type(opt).__name__ in repr(opt)
    train(model, opt, 4)
    assert all(st["step"] == 4 for st in opt.state.values())


@pytest.mark.parametrize("name", NAMES)
def test_closure_returns_loss(name: str) -> None:
    model = make_model()
    opt = build(name, model)
    x, y = make_data()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("key", "value", "exc"), [
    ("lr", -1.0, ValueError), ("lr", "fast", TypeError), ("weight_decay", -0.1, ValueError),
    ("update_proj_gap", 0, ValueError), ("update_proj_gap", 2.5, TypeError), ("scale", -1.0, ValueError),
    ("scale", float("nan"), ValueError), ("state_dtype", "int4", ValueError), ("projector", "magic", ValueError),
    ("proj_side", "up", ValueError), ("nonfinite", "maybe", ValueError), ("no_such_option", 1, TypeError),
])
def test_bad_input_named(name: str, key: str, value: object, exc: type) -> None:
    model = make_model()
    with pytest.raises(exc, match=key):
        build(name, model, **{key: value})


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rank", [0, -3, 2.0])
def test_bad_rank_named(name: str, rank: object) -> None:
    model = make_model()
    groups = [{"params": list(model.parameters()), "rank": rank}]
    with pytest.raises((ValueError, TypeError), match="rank"):
        lro.create_optimizer(name, groups)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_never_corrupts_state(name: str, bad: float) -> None:
    model = make_model()
    opt = build(name, model, "8bit")
    train(model, opt, 4)
    snapshot = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in model.parameters()]
    x, y = make_data()
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    model.mlp.weight.grad[3, 4] = bad
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    for p, w in zip(model.parameters(), weights, strict=True):
        assert torch.equal(p, w)
    ref = build(name, copy.deepcopy(model), "8bit")
    ref.load_state_dict(snapshot)
    assert_same_state(opt, ref)
    opt.param_groups[-1]["nonfinite"] = "raise"
    with pytest.raises(FloatingPointError):
        opt.step()
    assert_same_state(opt, ref)


@pytest.mark.parametrize("name", NAMES)
def test_sparse_gradient_rejected(name: str) -> None:
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = lro.create_optimizer(name, [emb.weight], **{**_lr(name)})
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


def _lr(name: str) -> dict:
    from helpers import CASES

    return CASES.get(name, {})
