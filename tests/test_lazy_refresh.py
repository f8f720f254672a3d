"""Lazy refresh: the overlap measure, the doubling schedule, skipped refreshes, resume."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_continuation, make_model, resume_copy, train

import lowrank_optim as lro
from lowrank_optim.projectors import make_projector
from lowrank_optim.projectors.lazy_refresh import LazyRefresh, subspace_overlap


def test_overlap_is_sign_and_rotation_invariant() -> None:
    gen = torch.Generator().manual_seed(0)
    p, _ = torch.linalg.qr(torch.randn(20, 4, generator=gen))
    rot, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen))
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0])
    assert subspace_overlap(p, p) == pytest.approx(1.0, abs=1e-6)
    assert subspace_overlap(p, p * signs) == pytest.approx(1.0, abs=1e-6)
    assert subspace_overlap(p, p @ rot) == pytest.approx(1.0, abs=1e-6)
    # half of the subspace kept, half replaced by an orthogonal direction: overlap 1/2
    full, _ = torch.linalg.qr(torch.randn(20, 8, generator=gen))
    a, b = full[:, :4], torch.cat([full[:, :2], full[:, 4:6]], dim=1)
    assert subspace_overlap(a, b) == pytest.approx(0.5, abs=1e-6)


def test_schedule_doubles_while_still_and_resets_on_a_move() -> None:
    lazy = LazyRefresh(threshold=0.8, max_multiple=4)
    st: dict = {}
    LazyRefresh.start(st)
    assert (st["lazy_multiple"], st["lazy_wait"], st["overlap"]) == (1, 0, -1.0)
    seen = []
    for overlap in (0.9, 0.95, 0.99, 0.85, 0.3, 0.8):
        lazy.record(st, overlap)
        seen.append((st["lazy_multiple"], st["lazy_wait"]))
    assert seen == [(2, 1), (4, 3), (4, 3), (4, 3), (1, 0), (2, 1)]
    skipped = LazyRefresh.skipped(st)
    assert skipped["lazy_wait"] == 0 and st["lazy_wait"] == 1  # a new dict; the old state is untouched


def _svd_run(grads: list[torch.Tensor], gap: int = 1, **options) -> tuple[list[int], dict]:
    """Scheduled refreshes of a bare svd projector (the engine calls ``update`` every ``gap`` steps)."""
    proj = make_projector("svd", 3, lazy_refresh=True, **options)
    st = proj.init(grads[0])
    refreshes = []
    for g in grads[1:]:
        new = proj.update(g, st)
        refreshes.append(int(new["refresh"]))
        if new["refresh"] == st["refresh"]:
            assert new["basis"] is st["basis"]  # a skipped refresh keeps the very same basis tensor
        st = new
    return refreshes, st


def test_still_subspace_skips_refreshes_exactly() -> None:
    """The same gradient every time (overlap 1): real refreshes at scheduled refreshes 1, 3, 7, 15, 23 (multiple
    2, 4, 8, then capped at 8): 5 of 24."""
    g = torch.randn(12, 30, generator=torch.Generator().manual_seed(1))
    refreshes, st = _svd_run([g] * 25)
    real_at = [i + 1 for i in range(24) if refreshes[i] != (refreshes[i - 1] if i else 0)]
    assert real_at == [1, 3, 7, 15, 23]
    assert st["lazy_multiple"] == 8 and st["overlap"] == pytest.approx(1.0, abs=1e-5)


def test_moving_subspace_refreshes_every_time() -> None:
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(12, 30, generator=gen) for _ in range(10)]
    refreshes, st = _svd_run(grads)
    assert refreshes == list(range(1, 10))
    assert st["lazy_multiple"] == 1 and 0.0 <= st["overlap"] < 0.5


@pytest.mark.parametrize("basis_dtype", ["fp32", "int8"])
def test_bit_exact_resume_with_lazy_state(basis_dtype: str) -> None:
    """GaLore with lazy refresh (and an int8 basis): the schedule's ints and float survive a weights_only
    round trip and the continuation is bit-exact across skipped and real refreshes."""

    def make(model: torch.nn.Module) -> torch.optim.Optimizer:
        groups = lro.param_groups(model, rank=8, target_modules=["attn", "mlp"], update_proj_gap=2,
                                  projector_options={"lazy_refresh": True, "lazy_threshold": 0.0,
                                                     "basis_dtype": basis_dtype})
        return lro.GaLoreAdamW(groups, lr=1e-2)

    model = make_model()
    opt = make(model)
    train(model, opt, 7)
    pst = opt.state[model.attn.weight]["projector"]
    assert pst["lazy_multiple"] == 4 and isinstance(pst["overlap"], float)  # threshold 0: always still
    model2, opt2 = resume_copy(model, opt, make)
    assert_same_continuation(model, opt, model2, opt2, 9)


@pytest.mark.parametrize(("name", "why"), [("gum", "full-rank branch"), ("random", "random draw"),
                                           ("columns", "random draw"), ("rows", "random draw"),
                                           ("entries", "random draw"), ("blocks", "schedule"),
                                           ("coap", "incremental correction"), ("online_pca", "incremental")])
def test_refusals_name_the_projector_and_the_reason(name: str, why: str) -> None:
    with pytest.raises(ValueError, match=f"lazy_refresh: True for projector {name!r}: .*{why}"):
        make_projector(name, 4, lazy_refresh=True)
    with pytest.raises(ValueError, match=f"projector {name!r}"):  # through an optimizer: refused at construction
        lro.GaLoreAdamW([{"params": [torch.nn.Parameter(torch.randn(6, 8))], "rank": 2}], projector=name,
                        projector_options={"lazy_refresh": True}, transfer="reset")


def test_every_periodic_projector_takes_lazy_refresh_or_refuses_it() -> None:
    """The registry's projectors split into those that take it and those that refuse it by name (a new
    projector must say which)."""
    from lowrank_optim.projectors import PROJECTORS

    takes = {n for n, cls in PROJECTORS.items() if cls.lazy_refusal is None}
    assert takes == {"svd", "rsvd", "rsvd_heads", "dct"}
    for name in takes:
        assert make_projector(name, 4, lazy_refresh=True).lazy is not None


def test_refusals_name_the_option() -> None:
    with pytest.raises(ValueError, match="lazy_threshold"):
        make_projector("svd", 4, lazy_refresh=True, lazy_threshold=1.5)
    with pytest.raises(ValueError, match="lazy_max_multiple"):
        make_projector("rsvd", 4, lazy_refresh=True, lazy_max_multiple=0)
    with pytest.raises(TypeError, match="lazy_refresh"):
        make_projector("svd", 4, lazy_refresh="yes")


def test_overlap_of_bases_that_are_not_orthonormal() -> None:
    """The measure depends on the subspaces alone: a basis times any invertible r x r matrix (COAP's corrected
    basis, a decoded int4 basis) overlaps its subspace exactly; a quarter of the subspace replaced gives 3/4."""
    gen = torch.Generator().manual_seed(3)
    full, _ = torch.linalg.qr(torch.randn(40, 8, generator=gen))
    p = full[:, :4]
    a = torch.randn(4, 4, generator=gen) + 4 * torch.eye(4)
    assert subspace_overlap(p, p @ a) == pytest.approx(1.0, abs=1e-9)
    assert subspace_overlap(p @ a, p) == pytest.approx(1.0, abs=1e-9)
    moved = torch.cat([full[:, :3], full[:, 5:6]], dim=1) @ a
    assert subspace_overlap(p, moved) == pytest.approx(0.75, abs=1e-9)
    from lowrank_optim.projectors.quantized_basis import decode_basis, encode_basis

    q = decode_basis(encode_basis(p, "int4"))
    assert 0.95 < subspace_overlap(p, q) <= 1.0 + 1e-12


def test_dct_overlap_is_the_fraction_of_indices_kept() -> None:
    proj = make_projector("dct", 4, lazy_refresh=True)
    old = {"indices": torch.tensor([0, 3, 5, 9])}
    assert proj.overlap(old, {"indices": torch.tensor([0, 3, 5, 9])}) == 1.0
    assert proj.overlap(old, {"indices": torch.tensor([1, 3, 9, 12])}) == 0.5
    assert proj.overlap(old, {"indices": torch.tensor([1, 2, 4, 6])}) == 0.0
    # equal to the basis overlap of the selected DCT columns (orthonormal)
    a, b = {"indices": torch.tensor([0, 3, 5, 9]), "dim": 16}, {"indices": torch.tensor([1, 3, 9, 12]), "dim": 16}
    assert subspace_overlap(proj.dense_basis(a), proj.dense_basis(b)) == pytest.approx(0.5, abs=1e-9)


def test_dct_lazy_schedule_skips_exactly() -> None:
    """The same gradient every period: the selection never moves, so the real refreshes are at scheduled
    refreshes 1, 3, 7, 15, 23 as for the svd projector; a skipped refresh keeps the very same indices tensor."""
    g = torch.randn(12, 30, generator=torch.Generator().manual_seed(1))
    proj = make_projector("dct", 3, lazy_refresh=True)
    st = proj.init(g)
    real = []
    for i in range(1, 25):
        new = proj.update(g, st)
        if new["refresh"] != st["refresh"]:
            real.append(i)
        else:
            assert new["indices"] is st["indices"]
        st = new
    assert real == [1, 3, 7, 15, 23] and st["overlap"] == 1.0 and st["lazy_multiple"] == 8


def test_dct_adamw_lazy_resume_is_bit_exact() -> None:
    def make(model: torch.nn.Module) -> torch.optim.Optimizer:
        groups = lro.param_groups(model, rank=8, target_modules=["attn", "mlp"])
        return lro.DCTAdamW(groups, lr=1e-2, update_proj_gap=2,
                            projector_options={"lazy_refresh": True, "lazy_threshold": 0.0})

    model = make_model()
    opt = make(model)
    train(model, opt, 7)
    pst = opt.state[model.attn.weight]["projector"]
    assert pst["lazy_multiple"] == 4 and pst["refresh"] == 2  # refreshes at steps 2 and 4 (then 4x: step 12)
    model2, opt2 = resume_copy(model, opt, make)
    assert_same_continuation(model, opt, model2, opt2, 9)


@pytest.mark.parametrize("transfer", ["reset", "reset_on_change"])
def test_reset_transfers_keep_the_moments_across_a_skipped_refresh(transfer: str) -> None:
    """A skipped refresh changes no subspace: ``reset`` and ``reset_on_change`` keep the moments and the
    bias-correction count there (they reset them on every skipped refresh before); a real refresh still resets."""
    model = make_model()
    groups = lro.param_groups(model, rank=8, target_modules=["attn", "mlp"])
    opt = lro.GaLoreAdamW(groups, lr=1e-2, update_proj_gap=2, transfer=transfer,
                          projector_options={"lazy_refresh": True, "lazy_threshold": 0.0})
    w = model.attn.weight
    seen = []
    for step in range(1, 9):
        before = opt.state[w]["exp_avg"].clone() if "exp_avg" in opt.state[w] else None
        train(model, opt, 1)
        st = opt.state[w]
        seen.append((step, st["projector"]["refresh"], st["inner_step"]))
        if step == 6:  # a scheduled refresh that was skipped: the moments only took this step's update
            assert before is not None and not torch.equal(before, torch.zeros_like(before))
    # refreshes are scheduled at steps 3, 5, 7 (every 2 after the first); with threshold 0 the period doubles:
    # real at 3 (multiple 2: skip 5), real at 7. inner_step restarts at the real ones only.
    assert [r for _, r, _ in seen] == [0, 0, 1, 1, 1, 1, 2, 2]
    assert [i for _, _, i in seen] == [1, 2, 1, 2, 3, 4, 1, 2]


@pytest.mark.parametrize(("projector", "options"), [("rsvd", {}), ("rsvd_heads", {"num_heads": 4})])
def test_each_taking_projector_skips_and_resumes_bit_exactly(projector: str, options: dict) -> None:
    """Through GaLore-AdamW with threshold 0 (every subspace counts as still): scheduled refreshes at steps 3, 5, 7;
    real at 3 (period doubles: 5 skipped) and 7 (period 4: three to skip); then a bit-exact resume."""

    def make(model: torch.nn.Module) -> torch.optim.Optimizer:
        groups = lro.param_groups(model, rank=8, target_modules=["attn", "mlp"])
        return lro.GaLoreAdamW(groups, lr=1e-2, update_proj_gap=2, projector=projector,
                               projector_options={**options, "lazy_refresh": True, "lazy_threshold": 0.0})

    model = make_model()
    opt = make(model)
    train(model, opt, 8)
    pst = opt.state[model.mlp.weight]["projector"]
    assert (pst["refresh"], pst["lazy_multiple"], pst["lazy_wait"]) == (2, 4, 3)
    assert 0.0 <= pst["overlap"] <= 1.0 + 1e-9
    model2, opt2 = resume_copy(model, opt, make)
    assert_same_continuation(model, opt, model2, opt2, 5)
