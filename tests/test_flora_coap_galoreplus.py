"""Method tests of the Flora, COAP and GaLorePlus presets."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_same_continuation, make_model, resume_copy, train
from torch import nn

import lowrank_optim as lro
from lowrank_optim.projectors import RIGHT, make_projector
from lowrank_optim.projectors.base import canonical_signs, oriented
from lowrank_optim.projectors.rsvd import randomized_range
from lowrank_optim.rules import TRANSFER_POLICIES
from lowrank_optim.rules.sparse_residual import residual_count
from lowrank_optim.state import StateStore


def _groups(model: nn.Module, **options):
    return lro.param_groups(model, rank=8, target_modules=["attn", "mlp"], **options)


def _lowrank(opt) -> list[torch.Tensor]:
    return [p for p in opt.param_groups[-1]["params"] if p in opt.state]


# -- Flora ---------------------------------------------------------------------------------------
def test_flora_defaults_and_state_holds_no_projection() -> None:
    model = make_model()
    opt = lro.Flora(_groups(model), lr=1e-2, scale_parameter=False)
    g = opt.param_groups[-1]
    assert (g["projector"], g["transfer"], g["inner"], g["update_proj_gap"], g["beta1"]) == (
        "random", "linear", "adafactor", 1000, 0.9)
    train(model, opt, 3)
    expect = 0
    for group in opt.param_groups:
        store = StateStore(group["state_dtype"])
        for p in group["params"]:
            st = opt.state[p]
            if "projector" in st:
                assert all(type(v) is int for v in st["projector"].values())  # seed and counters only
                proj, *_ = opt._parts(group)
                a, b = proj.low_shape(p.shape, st["projector"])
                assert st["exp_avg"].shape == (a, b) and min(a, b) == st["projector"]["rank"]
                expect += store.bytes_for(a * b) + store.bytes_for(a) + store.bytes_for(b)
            else:
                shape = tuple(p.shape)
                numel = p.numel()
                expect += store.bytes_for(numel)  # momentum
                expect += (store.bytes_for(shape[0]) + store.bytes_for(shape[1])) if len(shape) == 2 \
                    else store.bytes_for(numel)
    assert opt.state_bytes() == expect  # nothing else: no projection stored


def test_flora_transfer_with_unchanged_seed_is_identity() -> None:
    model = make_model()
    opt = lro.Flora(_groups(model), lr=1e-2, scale_parameter=False)
    train(model, opt, 3)
    proj, *_ = opt._parts(opt.param_groups[-1])
    for p in _lowrank(opt):
        st = opt.state[p]
        before = {k: v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)}
        old = st["projector"]
        specs = lro.engine.INNER_RULES["adafactor"].moments(tuple(st["exp_avg"].shape), opt.param_groups[-1])
        assert [s.name for s in specs] == ["exp_avg_sq_row", "exp_avg_sq_col", "exp_avg"]
        TRANSFER_POLICIES["linear"].apply(st, old, dict(old), proj, specs, StateStore("fp32"))
        for k, v in before.items():
            assert torch.equal(st[k], v), k


@pytest.mark.parametrize("inner", ["adafactor", "adam"])
def test_flora_resample_decodes_to_the_same_momentum_up_to_projection_error(inner) -> None:
    """On a resample the new momentum decodes to the old decoded momentum projected onto the new random
    subspace, i.e. it changes by exactly the projection error (never more than the momentum itself)."""
    model = make_model()
    extra = {"scale_parameter": False} if inner == "adafactor" else {}
    opt = lro.Flora(_groups(model, update_proj_gap=3), lr=1e-2, inner=inner, **extra)
    train(model, opt, 3)
    proj, *_ = opt._parts(opt.param_groups[-1])
    for p in _lowrank(opt):
        st = opt.state[p]
        old = st["projector"]
        full_old = proj.project_back(st["exp_avg"], old).double()
        new = proj.update(p.grad, old)
        specs = lro.engine.INNER_RULES[inner].moments(proj.low_shape(p.shape, new), opt.param_groups[-1])
        TRANSFER_POLICIES["linear"].apply(st, old, new, proj, specs, StateStore("fp32"))
        full_new = proj.project_back(st["exp_avg"], new).double()
        pn = proj.basis(new).double()
        pi = pn @ torch.linalg.solve(pn.T @ pn, pn.T)
        expect = pi @ full_old if new["side"] == 0 else full_old @ pi
        torch.testing.assert_close(full_new, expect, rtol=0, atol=1e-4 * float(full_old.abs().max()))
        assert not torch.allclose(full_new, full_old)  # a new random subspace: the error is real, and bounded
        assert (full_new - full_old).norm() <= full_old.norm()


def test_flora_engine_moves_momentum_on_resample() -> None:
    """Inside the engine (Adam variant, kappa=3): at step 4 the momentum is first transferred, then updated
    with the new projected gradient, so (m_4 - (1 - b1) P_new^T g_4) / b1 is the transferred momentum."""
    model = make_model()
    opt = lro.Flora(_groups(model, update_proj_gap=3), lr=1e-2, inner="adam")
    train(model, opt, 3)
    proj, *_ = opt._parts(opt.param_groups[-1])
    before = {p: (proj.project_back(opt.state[p]["exp_avg"], opt.state[p]["projector"]).double(),
                  opt.state[p]["projector"]["refresh"]) for p in _lowrank(opt)}
    train(model, opt, 1)
    b1 = opt.param_groups[-1]["betas"][0]
    for p, (full_old, refresh) in before.items():
        st = opt.state[p]
        new = st["projector"]
        assert new["refresh"] == refresh + 1
        moved = (st["exp_avg"] - (1 - b1) * proj.project(p.grad, new)) / b1
        full_new = proj.project_back(moved, new).double()
        pn = proj.basis(new).double()
        pi = pn @ torch.linalg.solve(pn.T @ pn, pn.T)
        expect = pi @ full_old if new["side"] == 0 else full_old @ pi
        torch.testing.assert_close(full_new, expect, rtol=0, atol=1e-3 * float(full_old.abs().max()))


def test_flora_adam_variant_compresses_both_moments() -> None:
    model = make_model()
    opt = lro.Flora(_groups(model, update_proj_gap=3), lr=1e-2, inner="adam")
    losses = train(model, opt, 20)
    assert losses[-1] < 0.8 * losses[0]
    for p in _lowrank(opt):
        st = opt.state[p]
        proj, *_ = opt._parts(opt.param_groups[-1])
        low = proj.low_shape(p.shape, st["projector"])
        assert st["exp_avg"].shape == low and st["exp_avg_sq"].shape == low


def test_flora_kappa_and_bad_inner() -> None:
    model = make_model()
    assert lro.Flora(_groups(model), kappa=7).param_groups[0]["update_proj_gap"] == 7
    with pytest.raises(ValueError, match="kappa"):
        lro.Flora(list(model.parameters()), kappa=0)
    with pytest.raises(ValueError, match="inner"):
        lro.Flora(list(model.parameters()), inner="lion")
    with pytest.raises(ValueError, match="distribution"):
        lro.Flora(_groups(model), distribution="cauchy")


# -- COAP ----------------------------------------------------------------------------------------
def test_coap_projection_changes_between_refreshes() -> None:
    """update_interval=2, reproject_factor=3: corrections at steps 3, 5, 9, 11; randomized SVD at 7."""
    model = make_model()
    opt = lro.COAP(_groups(model), lr=1e-2, update_interval=2, reproject_factor=3)
    g = opt.param_groups[-1]
    assert (g["projector"], g["update_proj_gap"], g["transfer"], g["projector_options"]["reproject_factor"]) == (
        "coap", 2, "keep", 3)
    bases: list[dict] = []
    for _ in range(12):
        train(model, opt, 1)
        bases.append({p: opt.state[p]["projector"]["basis"].clone() for p in _lowrank(opt)})
    for p in _lowrank(opt):
        for t in range(1, 12):
            changed = not torch.equal(bases[t][p], bases[t - 1][p])
            assert changed == (t % 2 == 0), t  # step t+1 refreshes when t is even
        # a correction step moves the basis by a visible amount
        rel = (bases[2][p] - bases[1][p]).norm() / bases[1][p].norm()
        assert rel > 1e-4


def test_coap_restore_state_uses_linear_transfer() -> None:
    model = make_model()
    opt = lro.COAP(_groups(model), restore_state=True)
    assert opt.param_groups[-1]["transfer"] == "linear"
    assert lro.COAP(_groups(model, update_proj_gap=3), update_interval=5).param_groups[-1]["update_proj_gap"] == 3
    assert lro.COAP(list(model.parameters()), update_interval=5).param_groups[0]["update_proj_gap"] == 5
    with pytest.raises(TypeError, match="restore_state"):
        lro.COAP(_groups(model), restore_state="yes")
    with pytest.raises(ValueError, match="reproject_factor"):
        lro.COAP(_groups(model), reproject_factor=0)


def test_coap_restore_state_trains() -> None:
    model = make_model()
    opt = lro.COAP(_groups(model, update_proj_gap=2), lr=1e-2, restore_state=True, reproject_factor=2)
    losses = train(model, opt, 20)
    assert losses[-1] < 0.8 * losses[0]


# -- GaLore+ -------------------------------------------------------------------------------------
def _run(opt_factory, steps: int = 9):
    model = make_model()
    opt = opt_factory(model)
    train(model, opt, steps)
    return model, opt


def test_galore_plus_one_head_equals_galore_on_rsvd() -> None:
    a, oa = _run(lambda m: lro.GaLorePlus(_groups(m, update_proj_gap=3), lr=1e-2, residual_density=0.0,
                                           num_heads=1))
    b, ob = _run(lambda m: lro.GaLoreAdamW(_groups(m, update_proj_gap=3), lr=1e-2, projector="rsvd"))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(_lowrank(oa), _lowrank(ob), strict=True):
        assert torch.equal(oa.state[p]["projector"]["basis"], ob.state[q]["projector"]["basis"])


def test_galore_plus_density_zero_equals_no_residual() -> None:
    a, oa = _run(lambda m: lro.GaLorePlus(_groups(m, update_proj_gap=3), lr=1e-2, residual_density=0.0,
                                           residual_warmup=0))
    b, ob = _run(lambda m: lro.GaLorePlus(_groups(m, update_proj_gap=3), lr=1e-2, residual="drop"))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert oa.state_bytes() == ob.state_bytes()


def test_sparse_residual_acts_only_on_its_entries_after_warmup() -> None:
    """Same run with and without the residual: identical through the warm-up; after it, the weights differ
    exactly at the chosen entries, which are the top ones of the accumulated dropped-gradient energy."""
    warm = 3

    def make(residual: str):
        def factory(m):
            return lro.GaLorePlus(_groups(m, update_proj_gap=100), lr=1e-2, residual=residual,
                                  residual_density=0.05, residual_warmup=warm)
        return factory

    a, oa = _run(make("sparse"), warm)
    b, ob = _run(make("drop"), warm)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    energy = {}
    for p in _lowrank(oa):
        st = oa.state[p]
        assert "residual_score" not in st and st["residual_index"].dtype == torch.int32
        assert st["residual_index"].numel() == residual_count(0.05, p.shape)
        assert torch.equal(st["residual_index"], st["residual_index"].sort().values)
        energy[p] = st["residual_index"].long()
    train(a, oa, 1, data_seed=1)
    train(b, ob, 1, data_seed=1)
    for (p, q) in zip(_lowrank(oa), _lowrank(ob), strict=True):
        diff = (p - q).flatten().ne(0).nonzero().flatten()
        assert diff.numel() > 0 and set(diff.tolist()) <= set(energy[p].tolist())


def test_sparse_residual_selects_the_top_energy_entries() -> None:
    torch.manual_seed(0)
    w = nn.Linear(40, 30, bias=False)
    opt = lro.GaLorePlus([{"params": [w.weight], "rank": 4}], lr=1e-2, residual_density=0.1, residual_warmup=2)
    proj, *_ = opt._parts(opt.param_groups[0])
    grads = [torch.randn(30, 40) for _ in range(2)]
    score = torch.zeros(30, 40)
    for g in grads:
        w.weight.grad = g.clone()
        opt.step()
        pst = opt.state[w.weight]["projector"]
        score += (g - proj.project_back(proj.project(g, pst), pst)).square()
    idx = opt.state[w.weight]["residual_index"].long()
    expect = torch.topk(score.flatten(), residual_count(0.1, (30, 40))).indices.sort().values
    assert torch.equal(idx, expect)


def test_head_shared_basis_comes_from_one_head_block() -> None:
    h, d_head, d = 4, 6, 20
    g = torch.randn(h * d_head, d, generator=torch.Generator().manual_seed(0))
    proj = make_projector("rsvd_heads", 10, num_heads=h)
    state = proj.init(g, seed=11)
    assert state["side"] == RIGHT and state["rank"] == d_head  # clamped: one head's block has rank <= d_head
    j = state["head"]
    assert 0 <= j < h
    block = g[j * d_head:(j + 1) * d_head]
    expect = randomized_range(oriented(block, RIGHT), d_head, oversample=8, power_iters=1, seed=(11, 0), warm=None)
    expect = canonical_signs(expect)  # a first basis takes the canonical sign
    assert torch.equal(state["basis"], expect)
    low = proj.project(g, state)
    assert low.shape == proj.low_shape(g.shape) == (h * d_head, d_head)
    for i in range(h):  # every head is projected by the same basis
        torch.testing.assert_close(low[i * d_head:(i + 1) * d_head], g[i * d_head:(i + 1) * d_head] @ expect)
    # the chosen head's block is captured exactly (rank = d_head)
    torch.testing.assert_close(proj.project_back(low, state)[j * d_head:(j + 1) * d_head], block, atol=1e-4, rtol=0)
    # shapes that do not split into heads get the plain rsvd basis
    odd = torch.randn(22, 20)
    plain = make_projector("rsvd", 10).init(odd, seed=3)
    assert torch.equal(proj.init(odd, seed=3)["basis"], plain["basis"])
    with pytest.raises(ValueError, match="num_heads"):
        make_projector("rsvd_heads", 4, num_heads=0)


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(32, 32, bias=False)
        self.k_proj = nn.Linear(32, 16, bias=False)
        self.up_proj = nn.Linear(32, 64, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.q_proj(x) * self.k_proj(x).repeat(1, 2)).sum(-1, keepdim=True) + self.up_proj(x).mean(-1, True)


class _Cfg:
    num_attention_heads = 4
    num_key_value_heads = 2


def test_galore_plus_groups_reads_heads_from_config_and_trains() -> None:
    torch.manual_seed(0)
    model = _Attn()
    model.config = _Cfg()
    groups = lro.galore_plus_groups(model, rank=4, target_modules="all-linear", update_proj_gap=2)
    heads = {id(p): g.get("projector_options", {}).get("num_heads") for g in groups for p in g["params"]}
    assert heads[id(model.q_proj.weight)] == 4 and heads[id(model.k_proj.weight)] == 2
    assert heads[id(model.up_proj.weight)] is None
    opt = lro.GaLorePlus(groups, lr=1e-2, residual_warmup=1)
    x = torch.randn(16, 32)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert opt.state[model.q_proj.weight]["projector"]["rank"] == 4
    assert "head" in opt.state[model.k_proj.weight]["projector"]
    assert "head" not in opt.state[model.up_proj.weight]["projector"]
    assert copy.deepcopy(opt.state_dict()) is not None


@pytest.mark.parametrize("state_dtype", ["fp32", "8bit"])
def test_head_shared_projector_drives_galore_adamw_with_resume(state_dtype) -> None:
    """rsvd_heads with 4 heads on both TinyNet matrices (80 rows = 4 x 20), sparse residual on top: trains,
    resumes bit-exactly from a weights_only checkpoint with dtypes kept."""
    def make(m):
        groups = _groups(m, update_proj_gap=3, projector="rsvd_heads", projector_options={"num_heads": 4})
        return lro.GaLoreAdamW(groups, lr=1e-2, state_dtype=state_dtype)

    model = make_model()
    opt = make(model)
    losses = train(model, opt, 20)
    assert losses[-1] < 0.8 * losses[0]
    assert all("head" in opt.state[p]["projector"] for p in _lowrank(opt))
    model2, opt2 = resume_copy(model, opt, make)
    assert_same_continuation(model, opt, model2, opt2, 4)


def test_stack_draws_equal_serial_draws_on_any_thread_count(monkeypatch) -> None:
    """A Gaussian stack's bases are each generator's own draw whether the CPU draws run on one thread or several
    (``parallel_draws``), and equal :meth:`RandomProjector.basis` matrix by matrix; a pool made before a fork is
    not reused in the child (its threads do not exist there)."""
    import os

    from lowrank_optim.projectors import random as rnd

    proj = rnd.RandomProjector(3)
    states = [proj.init(torch.zeros(7, 11), seed=s) for s in range(5)]
    serial = proj.stack_basis(states, torch.device("cpu"))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    threaded = proj.stack_basis(states, torch.device("cpu"))
    assert torch.equal(serial, threaded)
    for st, b in zip(states, threaded, strict=True):
        proj._cache.clear()
        assert torch.equal(proj.basis(st, "cpu"), b)
    pool = rnd._POOL
    assert pool is not None
    monkeypatch.setattr(os, "getpid", lambda: -1)  # as in a forked child
    assert torch.equal(proj.stack_basis(states, torch.device("cpu")), serial)
    assert rnd._POOL is not pool
