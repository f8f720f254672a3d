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


def test_refusals_name_the_option() -> None:
    for name in ("random", "dct", "columns", "gum"):
        with pytest.raises(ValueError, match="lazy_refresh"):
            make_projector(name, 4, lazy_refresh=True)
    with pytest.raises(ValueError, match="lazy_threshold"):
        make_projector("svd", 4, lazy_refresh=True, lazy_threshold=1.5)
    with pytest.raises(ValueError, match="lazy_max_multiple"):
        make_projector("rsvd", 4, lazy_refresh=True, lazy_max_multiple=0)
    with pytest.raises(TypeError, match="lazy_refresh"):
        make_projector("svd", 4, lazy_refresh="yes")
