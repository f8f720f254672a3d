"""DCT-AdamW and Online Subspace Descent: the ``match`` transfer, moments following their columns, P's learning
rate through the engine, state bytes in closed form, and both projectors driving GaLoreAdamW."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_continuation, build, make_model, resume_copy, roundtrip, train
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank_optim as lro
from lowrank_optim.projectors import LEFT, RIGHT, make_projector
from lowrank_optim.projectors.base import oriented
from lowrank_optim.projectors.dct import dct_matrix
from lowrank_optim.projectors.online_pca import reconstruction_grad
from lowrank_optim.rules import TRANSFER_POLICIES, MomentSpec
from lowrank_optim.state import StateStore

MATCH = TRANSFER_POLICIES["match"]


def _indices(d: int, r: int, seed: int) -> torch.Tensor:
    return torch.sort(torch.randperm(d, generator=torch.Generator().manual_seed(seed))[:r]).values


def _proj_state(side: int, d: int, idx: torch.Tensor) -> dict:
    return {"side": side, "rank": idx.numel(), "seed": 0, "refresh": 0, "dim": d, "indices": idx}


# -- the match transfer ------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(d=st.integers(2, 40), r=st.integers(1, 12), other=st.integers(1, 9), side=st.sampled_from((LEFT, RIGHT)),
       dtype=st.sampled_from(("fp32", "bf16")), seed=st.integers(0, 2**16))
def test_match_keeps_surviving_columns_bit_exactly(d: int, r: int, other: int, side: int, dtype: str,
                                                  seed: int) -> None:
    r = min(r, d)
    old_idx, new_idx = _indices(d, r, seed), _indices(d, r, seed + 1)
    shape = (r, other) if side == LEFT else (other, r)
    store = StateStore(dtype)
    specs = [MomentSpec("exp_avg", shape, True), MomentSpec("exp_avg_sq", shape, False)]
    state: dict = {}
    gen = torch.Generator().manual_seed(seed + 2)
    before = {}
    for spec in specs:
        store.create(state, spec.name, shape, torch.device("cpu"))
        value = torch.randn(shape, generator=gen)
        store.save(state, spec.name, value.abs() if not spec.signed else value, spec.signed)
        before[spec.name] = store.load(state, spec.name, spec.signed).clone()
    MATCH.apply(state, _proj_state(side, d, old_idx), _proj_state(side, d, new_idx), make_projector("dct", r),
                specs, store)
    axis = 0 if side == LEFT else 1
    old_pos = {int(k): j for j, k in enumerate(old_idx)}
    for spec in specs:
        after = store.load(state, spec.name, spec.signed)
        assert after.shape == shape and state[spec.name].dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
        for j, k in enumerate(new_idx.tolist()):
            got = after.select(axis, j)
            if k in old_pos:
                assert torch.equal(got, before[spec.name].select(axis, old_pos[k])), (spec.name, k)
            else:
                assert torch.count_nonzero(got) == 0, (spec.name, k)


def test_match_8bit_requantizes_survivors_and_factored_moments() -> None:
    """8-bit: survivors agree to one quantization step; Adafactor's column factor follows too, rows stay."""
    d, r, m = 64, 32, 160  # (160, 32) = 5120 elements >= 4096: quantized
    old_idx, new_idx = torch.arange(0, 64, 2), torch.cat([torch.arange(0, 32, 2), torch.arange(33, 64, 2)])
    store = StateStore("8bit")
    specs = [MomentSpec("exp_avg", (m, r), True), MomentSpec("exp_avg_sq_row", (m,), False),
             MomentSpec("exp_avg_sq_col", (r,), False)]
    state: dict = {}
    gen = torch.Generator().manual_seed(0)
    before = {}
    for spec in specs:
        store.create(state, spec.name, spec.shape, torch.device("cpu"))
        value = torch.rand(spec.shape, generator=gen) + 0.5
        store.save(state, spec.name, value, spec.signed)
        before[spec.name] = store.load(state, spec.name, spec.signed).clone()
    assert state["exp_avg"].dtype == torch.uint8
    MATCH.apply(state, _proj_state(RIGHT, d, old_idx), _proj_state(RIGHT, d, new_idx), make_projector("dct", r),
                specs, store)
    after = {s.name: store.load(state, s.name, s.signed) for s in specs}
    assert state["exp_avg"].dtype == torch.uint8
    # survivors 0, 2, ..., 30 keep their positions 0..15 (one quantization step: <= 1/64 of absmax 1.5 here);
    # new columns 16..31 hold zero as bnb's blockwise 8-bit encodes it (within 1e-4 of the block's absmax)
    torch.testing.assert_close(after["exp_avg"][:, :16], before["exp_avg"][:, :16], rtol=0, atol=0.025)
    assert after["exp_avg"][:, 16:].abs().max() < 1e-4 * 1.5
    assert torch.equal(after["exp_avg_sq_col"][:16], before["exp_avg_sq_col"][:16])  # small: stays fp32
    assert torch.count_nonzero(after["exp_avg_sq_col"][16:]) == 0
    assert torch.equal(after["exp_avg_sq_row"], before["exp_avg_sq_row"])


def test_match_needs_indices_and_is_identity_on_same_selection() -> None:
    svd = make_projector("svd", 2)
    grad = torch.randn(6, 4)
    st_svd = svd.init(grad)
    with pytest.raises(ValueError, match="match"):
        MATCH.apply({}, st_svd, svd.update(grad, st_svd), svd, [], StateStore())
    state = {"exp_avg": torch.randn(6, 2)}
    saved = state["exp_avg"]
    old = _proj_state(RIGHT, 4, torch.tensor([1, 3]))
    MATCH.apply(state, old, dict(old), make_projector("dct", 2), [MomentSpec("exp_avg", (6, 2), True)],
                StateStore())
    assert state["exp_avg"] is saved


# -- DCTAdamW: moments follow their columns ----------------------------------------------------------
def _shifting_gradients(steps: int, m: int, d: int) -> list[torch.Tensor]:
    """Right-side gradients (m, d) whose strong DCT columns are {3, 7, 11} plus one that moves every step."""
    gen = torch.Generator().manual_seed(3)
    c = dct_matrix(d, torch.float64)
    out = []
    for t in range(steps):
        coef = 0.01 * torch.randn(m, d, generator=gen, dtype=torch.float64)
        for k in (3, 7, 11, (5 * t + 1) % d):
            coef[:, k] += 1.0 + torch.rand(m, generator=gen, dtype=torch.float64)
        out.append((coef @ c).float())
    return out


@pytest.mark.parametrize("path", ["dense", "fft"])
def test_dct_adamw_moments_follow_their_columns(path: str) -> None:
    """Bookkeeping by column index (a dict) gives bit-for-bit the moments DCTAdamW stores by position."""
    m, d, r, steps = 24, 16, 4, 12
    weight = torch.nn.Parameter(torch.zeros(m, d))
    opt = lro.DCTAdamW([{"params": [weight], "rank": r}], lr=1e-3, dct_path=path)
    proj = make_projector("dct", r, path=path, score="l1")
    beta1, beta2 = opt.param_groups[0]["betas"]
    ref: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    moved = 0
    prev: list[int] = []
    for grad in _shifting_gradients(steps, m, d):
        weight.grad = grad
        opt.step()
        state = opt.state[weight]
        idx = state["projector"]["indices"].tolist()
        assert set(idx) >= {3, 7, 11}
        if prev and idx.index(7) != prev.index(7):
            moved += 1
        low = proj.project(grad, state["projector"])
        exp_avg = torch.stack([ref.get(k, (torch.zeros(m), None))[0] for k in idx], dim=1)
        exp_avg_sq = torch.stack([ref[k][1] if k in ref else torch.zeros(m) for k in idx], dim=1)
        exp_avg.lerp_(low, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1 - beta2)
        ref = {k: (exp_avg[:, j].clone(), exp_avg_sq[:, j].clone()) for j, k in enumerate(idx)}
        assert torch.equal(state["exp_avg"], exp_avg) and torch.equal(state["exp_avg_sq"], exp_avg_sq)
        prev = idx
    assert moved >= 3  # surviving columns really changed position

    # the same run without matching keeps moments by position: they no longer follow their columns
    weight2 = torch.nn.Parameter(torch.zeros(m, d))
    keep = lro.DCTAdamW([{"params": [weight2], "rank": r}], lr=1e-3, dct_path=path, transfer="keep")
    for grad in _shifting_gradients(steps, m, d):
        weight2.grad = grad
        keep.step()
    assert not torch.equal(keep.state[weight2]["exp_avg"], opt.state[weight]["exp_avg"])


def test_dct_adamw_paths_agree_and_options_named() -> None:
    runs = []
    for path in ("dense", "fft"):
        model = make_model()
        opt = build("dct_adamw", model, dct_path=path)
        runs.append((train(model, opt, 6), opt, model))
    (_, oa, ma), (_, ob, mb) = runs
    for p, q in zip(ma.parameters(), mb.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-4)
    for p, q in zip(ma.parameters(), mb.parameters(), strict=True):
        if p in oa.state and "projector" in oa.state[p]:
            assert torch.equal(oa.state[p]["projector"]["indices"], ob.state[q]["projector"]["indices"])
    for key, value in (("dct_path", "gpu"), ("dct_score", "l0")):
        with pytest.raises(ValueError, match=key):
            build("dct_adamw", make_model(), **{key: value})


# -- Online Subspace Descent: P's learning rate through the engine -----------------------------------
@pytest.mark.parametrize("rule", ["ratio", "reference"])
def test_osd_p_learning_rate_follows_the_group(rule: str) -> None:
    """One SGD step on P at the first refresh, with the engine's lr (and a scheduler's initial_lr)."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(12, 10))
    opt = lro.OnlineSubspaceDescent([{"params": [weight], "rank": 3}], lr=0.02, p_optimizer="sgd",
                                    p_lr_rule=rule, p_lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5**epoch)
    grads = [torch.randn(12, 10) for _ in range(2)]
    weight.grad = grads[0]
    opt.step()
    sched.step()  # lr 0.02 -> 0.01
    basis = opt.state[weight]["projector"]["basis"].clone()
    weight.grad = grads[1]
    opt.step()
    a = oriented(grads[1], opt.state[weight]["projector"]["side"])
    lr_p = 5.0 * 0.01 if rule == "ratio" else 0.01 * 0.01 / 0.02
    expected = basis - lr_p * reconstruction_grad(a / a.norm(), basis)
    torch.testing.assert_close(opt.state[weight]["projector"]["basis"], expected, rtol=0, atol=1e-6)


# -- state bytes in closed form --------------------------------------------------------------------------
def _lowrank_dims(opt: torch.optim.Optimizer) -> list[tuple[int, int]]:
    """(projected dimension d, rank r) of every projected parameter."""
    out = []
    for p, pstate in opt.state.items():
        if "projector" in pstate:
            ps = pstate["projector"]
            d = p.shape[0] if ps["side"] == LEFT else p.shape[1]
            out.append((d, ps["rank"]))
    return out


def test_state_bytes_closed_form_against_galore() -> None:
    """DCTAdamW stores r int64 indices instead of a d x r fp32 basis; OSD stores P's two Adam moments on top."""
    results = {}
    for name in ("galore_adamw", "dct_adamw", "online_subspace_descent"):
        model = make_model()
        opt = build(name, model)
        train(model, opt, 2)
        results[name] = (opt.state_bytes(), _lowrank_dims(opt))
    galore, dims = results["galore_adamw"]
    assert len(dims) == 2 and results["dct_adamw"][1] == dims == results["online_subspace_descent"][1]
    assert galore - results["dct_adamw"][0] == sum(4 * d * r - 8 * r for d, r in dims)
    assert results["online_subspace_descent"][0] - galore == sum(2 * 4 * d * r for d, r in dims)


# -- both projectors drive GaLoreAdamW (conformance-style, fp32 and 8-bit) ------------------------------
CONFIGS = [("dct", "keep"), ("dct", "match"), ("online_pca", "keep")]


@pytest.mark.parametrize("state_dtype", ["fp32", "8bit"])
@pytest.mark.parametrize(("projector", "transfer"), CONFIGS)
def test_projectors_drive_galore(projector: str, transfer: str, state_dtype: str) -> None:
    """Goes the right way; resumes bit-exactly from a weights_only checkpoint with every dtype kept."""
    kwargs = {"rank": 64, "projector": projector, "transfer": transfer}  # (80|96) x 64 moments: 8-bit codes
    model = make_model()
    opt = build("galore_adamw", model, state_dtype, **kwargs)
    losses = train(model, opt, 20)
    assert losses[-1] < 0.8 * losses[0], losses
    saved = roundtrip(opt.state_dict())
    dtypes = {(i, k): v.dtype for i, st in saved["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    if state_dtype == "8bit":
        assert torch.uint8 in dtypes.values()
    model2, opt2 = resume_copy(model, opt, lambda m: build("galore_adamw", m, state_dtype, **kwargs))
    proj_dtypes = {k: v.dtype for st in opt2.state.values() if "projector" in st
                   for k, v in st["projector"].items() if torch.is_tensor(v)}
    assert proj_dtypes == ({"indices": torch.int64} if projector == "dct" else
                           dict.fromkeys(("basis", "p_exp_avg", "p_exp_avg_sq"), torch.float32))
    assert_same_continuation(model, opt, model2, opt2, 7)
