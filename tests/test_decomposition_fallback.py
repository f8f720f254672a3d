"""Every decomposition in the package survives extreme, rank-deficient and zero inputs (issue 11, fault 8c).

Before: ``rsvd``, ``rsvd_heads`` and ``coap`` raised ``LinAlgError`` on gradient entries ~1e19 (their fp32 Gram
matrix overflowed; the comment said float64), and Newton-Schulz silently returned zero (the Frobenius norm
overflowed). Now every SVD / eigh / QR goes through :func:`lowrank_optim.linalg.robust` (plain, then rescaled by
the largest entry, float64, CPU), a projector whose every path fails keeps its previous basis with a warning,
and the linear transfer's solve falls back to a pseudo-inverse, then resets the moments with a warning.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import lowrank_optim as lro
from lowrank_optim import make_projector
from lowrank_optim.linalg import DecompositionError, robust
from lowrank_optim.projectors.rsvd import randomized_range
from lowrank_optim.rules import TRANSFER_POLICIES, MomentSpec
from lowrank_optim.rules.muon import newton_schulz
from lowrank_optim.rules.transfer import _solve_sym
from lowrank_optim.state import StateStore

#: every projector whose basis comes from a decomposition or a QR (with the options that make it one)
DECOMPOSING = [("svd", {}), ("rsvd", {}), ("rsvd_heads", {"num_heads": 4}), ("coap", {"reproject_factor": 2}),
               ("gum", {}), ("online_pca", {"orthonormalize": True}), ("random", {"distribution": "orthonormal"})]


def _gradient(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if kind == "huge":
        return torch.randn(40, 32, generator=gen) * 1e19
    if kind == "rank1":
        return torch.randn(40, 1, generator=gen) @ torch.randn(1, 32, generator=gen)
    return torch.zeros(40, 32)


def _walk(name: str, options: dict, grads: list[torch.Tensor]) -> list[dict]:
    proj = make_projector(name, 4, **options)
    ctx: dict = {}
    if getattr(proj, "wants_layout", False):
        ctx["layout"] = (0, 1, 0)
    state = proj.init(grads[0], seed=1, **ctx)
    states = [state]
    if getattr(proj, "wants_lr", False):
        ctx["lr"] = 0.01
    for g in grads[1:]:
        if getattr(proj, "wants_moments", False):
            ctx["moments"] = {"exp_avg": torch.ones(proj.low_shape(g.shape, state))}
        state = proj.update(g, state, **ctx)
        states.append(state)
    return states


@pytest.mark.parametrize("kind", ["huge", "rank1", "zero"])
@pytest.mark.parametrize(("name", "options"), DECOMPOSING)
def test_bases_stay_finite_and_orthonormal(name: str, options: dict, kind: str) -> None:
    """Init and two refreshes on entries ~1e19, a rank-1 and an all-zero gradient: finite orthonormal bases,
    no exception, no warning (the rescaled retry succeeds, so nothing is kept or replaced)."""
    g = _gradient(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        states = _walk(name, options, [g, g, g])
    proj = make_projector(name, 4, **options)
    for st in states:
        b = proj.basis_matrix(st, g.device) if proj.matrix_map else st["basis"]
        assert torch.isfinite(b).all()
        if name != "coap" or int(st["refresh"]) % 2 == 0:  # COAP's corrections are not orthonormal by design
            torch.testing.assert_close(b.T @ b, torch.eye(b.shape[1]), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "options"), [("svd", {}), ("rsvd", {}), ("rsvd_heads", {"num_heads": 4}),
                                                ("coap", {}), ("gum", {})])
def test_huge_gradient_gives_the_basis_of_the_rescaled_gradient(name: str, options: dict) -> None:
    """A basis does not depend on the gradient's scale; with canonical signs 1e19 G and G give the same basis."""
    g = torch.randn(40, 32, generator=torch.Generator().manual_seed(2))
    a = _walk(name, options, [g])[0]["basis"]
    b = _walk(name, options, [g * 1e19])[0]["basis"]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_randomized_range_gram_is_float64(monkeypatch) -> None:
    """The small eigenproblem is formed and solved in float64, as the docstring says."""
    seen = []
    real = torch.linalg.eigh

    def spy(x, *args, **kwargs):
        seen.append(x.dtype)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", spy)
    randomized_range(torch.randn(30, 20), 4, oversample=2, power_iters=1, seed=(0,), warm=None)
    assert seen == [torch.float64]


def test_robust_retries_then_raises() -> None:
    calls = []

    def fp64_only(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.dtype)
        if x.dtype != torch.float64:
            raise torch.linalg.LinAlgError("failed to converge")
        return x * 2

    out = robust(fp64_only, torch.full((2, 2), 4.0), what="test")
    assert calls == [torch.float32, torch.float32, torch.float64]
    assert out.dtype == torch.float32 and torch.equal(out, torch.full((2, 2), 2.0))  # on the rescaled input

    def never(x: torch.Tensor) -> torch.Tensor:
        raise torch.linalg.LinAlgError("no")

    with pytest.raises(DecompositionError, match="test failed"):
        robust(never, torch.ones(2, 2), what="test")
    plain = robust(lambda x: x.sqrt(), torch.tensor([4.0]), what="sqrt")
    assert torch.equal(plain, torch.tensor([2.0]))  # a finite first result is returned unchanged


@pytest.mark.parametrize("name", ["rsvd", "rsvd_heads", "coap"])
def test_every_path_failing_keeps_the_previous_basis(name: str, monkeypatch) -> None:
    g = torch.randn(40, 32)
    proj = make_projector(name, 4, **({"reproject_factor": 1} if name == "coap" else {}))
    good = proj.init(g, seed=0)

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.warns(RuntimeWarning, match="keeping the previous basis"):
        fresh = proj.update(g, good, moments={})
    assert torch.equal(fresh["basis"], good["basis"])
    with pytest.warns(RuntimeWarning, match="first coordinate vectors"):
        first = proj.init(g, seed=0)
    torch.testing.assert_close(first["basis"].T @ first["basis"], torch.eye(4))


@pytest.mark.parametrize("kind", ["huge", "zero", "rank1"])
def test_newton_schulz_is_scale_free_and_handles_zero(kind: str) -> None:
    g = _gradient(kind)
    o = newton_schulz(g)
    assert torch.isfinite(o).all()
    if kind == "zero":
        assert torch.equal(o, torch.zeros_like(g))
        return
    ref = newton_schulz(g / g.abs().max())
    torch.testing.assert_close(o, ref, atol=1e-5, rtol=0)
    assert float(o.abs().max()) > 0.1  # before: 0 for entries ~1e19 (the norm overflowed to inf)


def test_linear_transfer_solve_falls_back(monkeypatch) -> None:
    """Singular Gram -> pseudo-inverse; every solve failing -> the moments are reset, with a warning."""
    gram = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    out = _solve_sym(gram, torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(out, torch.full((2, 2), 0.25, dtype=torch.float64))
    proj = make_projector("random", 3, distribution="orthonormal")
    g = torch.randn(10, 8)
    old = proj.init(g, seed=0)
    new = proj.update(g, old)
    store = StateStore("fp32")
    low = proj.low_shape(g.shape, old)
    specs = [MomentSpec("exp_avg", low, True), MomentSpec("exp_avg_sq", low, False)]
    state: dict = {"inner_step": 7}
    for s in specs:
        store.create(state, s.name, s.shape, torch.device("cpu"))
        state[s.name].fill_(1.0)

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("singular")

    monkeypatch.setattr(torch.linalg, "solve", broken)
    monkeypatch.setattr(torch.linalg, "pinv", broken)
    with pytest.warns(RuntimeWarning, match="moments are reset"):
        TRANSFER_POLICIES["linear"].apply(state, old, new, proj, specs, store)
    assert state["inner_step"] == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()


@pytest.mark.parametrize("make", [
    lambda g: lro.GaLoreAdamW(g, projector="rsvd", update_proj_gap=1),
    lambda g: lro.GaLorePlus(g, update_proj_gap=1, num_heads=4),
    lambda g: lro.COAP(g, update_proj_gap=1, reproject_factor=2),
    lambda g: lro.GUM(g, update_proj_gap=1),
])
def test_optimizers_step_through_huge_and_zero_gradients(make) -> None:
    """Before: ``rsvd`` and GaLore+ raised ``LinAlgError`` at the step with entries ~1e19."""
    p = torch.nn.Parameter(torch.randn(40, 32))
    opt = make([{"params": [p], "rank": 4}])
    for scale in (1.0, 1e19, 0.0, 1.0):
        p.grad = torch.randn(40, 32) * scale
        opt.step()
    assert torch.isfinite(p).all()
