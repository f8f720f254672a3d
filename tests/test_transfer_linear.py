"""The ``linear`` transfer policy: identity on an unchanged basis, closed forms otherwise."""

from __future__ import annotations

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lowrank_optim import make_projector
from lowrank_optim.projectors import LEFT
from lowrank_optim.rules import TRANSFER_POLICIES, MomentSpec
from lowrank_optim.state import StateStore

LINEAR = TRANSFER_POLICIES["linear"]
SETTINGS = settings(max_examples=30, deadline=None)
shapes = st.tuples(st.integers(3, 90), st.integers(3, 90))
sides = st.sampled_from(["std", "reverse_std"])


def _matrix(m: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


def _moments(store: StateStore, low: tuple[int, int], seed: int) -> tuple[dict, list[MomentSpec]]:
    """Adam-like moments (signed first, non-negative second) plus Adafactor-like 1-D statistics."""
    specs = [MomentSpec("exp_avg", low, True), MomentSpec("exp_avg_sq", low, False),
             MomentSpec("row", (low[0],), False)]
    state: dict = {}
    values = {"exp_avg": _matrix(*low, seed), "exp_avg_sq": _matrix(*low, seed + 1).square(),
              "row": _matrix(1, low[0], seed + 2).abs().flatten()}
    for s in specs:
        store.create(state, s.name, s.shape, torch.device("cpu"))
        store.save(state, s.name, values[s.name], s.signed)
    return state, specs


def _resampled(shape: tuple[int, int], rank: int, side: str, seed: int, distribution: str) -> tuple:
    """A random projector resampled once, an fp32 store and seeded moments in the old subspace:
    ``(proj, g, old, new, store, state, specs)``."""
    proj = make_projector("random", rank, side=side, distribution=distribution)
    g = _matrix(*shape, seed)
    old = proj.init(g, seed=seed)
    new = proj.update(g, old)
    store = StateStore("fp32")
    state, specs = _moments(store, proj.low_shape(g.shape, old), seed)
    return proj, g, old, new, store, state, specs


def _snapshot(state: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


@SETTINGS
@given(shape=shapes, rank=st.integers(1, 12), side=sides, seed=st.integers(0, 2**16),
       name=st.sampled_from(["svd", "rsvd", "random", "coap"]), dtype=st.sampled_from(["fp32", "bf16", "8bit"]))
def test_unchanged_basis_is_bit_exact_identity(shape, rank, side, seed, name, dtype) -> None:
    proj = make_projector(name, rank, side=side)
    g = _matrix(*shape, seed)
    old = proj.init(g, seed=seed)
    # Flora with an unchanged seed and refresh count; for stored bases, a refresh that finds the same basis
    same = proj.update(g, old) if name == "svd" else dict(old)
    assert name != "svd" or same["refresh"] == 1
    store = StateStore(dtype, min_8bit_size=16)
    state, specs = _moments(store, proj.low_shape(g.shape, old), seed)
    before = _snapshot(state)
    LINEAR.apply(state, old, same, proj, specs, store)
    assert state.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(state[k], v) and state[k].dtype == v.dtype, k


@SETTINGS
@given(shape=shapes, rank=st.integers(1, 12), side=sides, seed=st.integers(0, 2**16))
def test_orthonormal_closed_form_first_and_second_moment(shape, rank, side, seed) -> None:
    """M' = M C with C = P_old^T P_new (left: C^T M); V' = V (C o C) (left: (C o C)^T V), the second moment of
    a linear map of independent coordinates; 1-D statistics kept."""
    proj, _g, old, new, store, state, specs = _resampled(shape, rank, side, seed, "orthonormal")
    m, v, row = state["exp_avg"].clone(), state["exp_avg_sq"].clone(), state["row"].clone()
    LINEAR.apply(state, old, new, proj, specs, store)
    po, pn = proj.basis(old).double(), proj.basis(new).double()
    t = po.T @ pn
    if old["side"] == LEFT:
        m_exp, v_exp = t.T @ m.double(), t.T.square() @ v.double()
    else:
        m_exp, v_exp = m.double() @ t, v.double() @ t.square()
    torch.testing.assert_close(state["exp_avg"].double(), m_exp, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state["exp_avg_sq"].double(), v_exp, rtol=1e-4, atol=1e-5)
    assert torch.equal(state["row"], row)


@SETTINGS
@given(shape=shapes, rank=st.integers(1, 12), side=sides, seed=st.integers(0, 2**16),
       dist=st.sampled_from(["gaussian", "orthonormal"]))
def test_new_moment_decodes_to_the_projection_of_the_old_one(shape, rank, side, seed, dist) -> None:
    """decode_new(M') = decode_old(M) projected orthogonally onto the new subspace: the transfer loses
    exactly the projection error, for non-orthonormal (Gaussian) bases too."""
    proj, _g, old, new, store, state, specs = _resampled(shape, rank, side, seed, dist)
    full_old = proj.project_back(state["exp_avg"], old).double()
    LINEAR.apply(state, old, new, proj, specs, store)
    full_new = proj.project_back(state["exp_avg"], new).double()
    pn = proj.basis(new).double()
    assume(float(torch.linalg.cond(pn)) < 100)  # fp32 products of an ill-conditioned square Gaussian basis
    proj_new = pn @ torch.linalg.solve(pn.T @ pn, pn.T)
    expect = proj_new @ full_old if old["side"] == LEFT else full_old @ proj_new
    scale = float(full_old.abs().max()) + 1e-12
    torch.testing.assert_close(full_new, expect, rtol=0, atol=2e-4 * scale)


@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**16), side=sides)
def test_full_rank_change_of_basis_is_lossless(shape, seed, side) -> None:
    """A full-rank change of orthonormal basis loses nothing (square Gaussian bases are too ill-conditioned
    for an fp32 closed form and are covered by the projection test above)."""
    rank = min(shape)
    proj, g, old, new, store, state, specs = _resampled(shape, rank, side, seed, "orthonormal")
    d = g.shape[0] if old["side"] == LEFT else g.shape[1]
    if d != rank:  # the square case only: the subspace is the whole space
        return
    full_old = proj.project_back(state["exp_avg"], old)
    LINEAR.apply(state, old, new, proj, specs, store)
    full_new = proj.project_back(state["exp_avg"], new)
    torch.testing.assert_close(full_new, full_old, rtol=1e-3, atol=1e-3 * float(full_old.abs().max()))


def test_eight_bit_store_matches_fp32_transfer() -> None:
    proj = make_projector("svd", 16)
    g, g2 = _matrix(300, 200, 0), _matrix(300, 200, 1)
    old = proj.init(g)
    new = proj.update(g2, old)
    low = proj.low_shape(g.shape, old)
    results = {}
    for dtype in ("fp32", "8bit"):
        store = StateStore(dtype)
        state, specs = _moments(store, low, 3)
        LINEAR.apply(state, old, new, proj, specs, store)
        assert state["exp_avg"].dtype == (torch.uint8 if dtype == "8bit" else torch.float32)
        results[dtype] = {s.name: store.load(state, s.name, s.signed).clone() for s in specs}
    for k, v in results["fp32"].items():
        torch.testing.assert_close(results["8bit"][k], v, rtol=0.1, atol=0.05 * float(v.abs().max()))
