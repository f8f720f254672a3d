"""The projector contract, with no context, for every registered projector (issue 11, fault 9), and online PCA's
default learning rate at d >= 1024 (fault 8a).

``make_projector(name, rank)`` then ``init(grad)``, ``project``, ``project_back`` and ``update(grad, state)``
must work for every projector with its defaults: the engine's extras (``lr``, ``moments``, ``layout``) are
optional. Before, ``online_pca`` raised in ``update`` without ``lr``.
"""

from __future__ import annotations

import math

import pytest
import torch

from lowrank_optim.projectors import LEFT, PROJECTORS, make_projector
from lowrank_optim.projectors.online_pca import OnlinePCAProjector

SHAPES = [(12, 20), (20, 12), (16, 16)]


def _grad(shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_every_registered_projector_is_covered() -> None:
    assert len(PROJECTORS) >= 12  # svd rsvd dct online_pca random columns rows entries blocks gum coap rsvd_heads


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_contract_without_context(name: str, shape: tuple[int, int]) -> None:
    proj = make_projector(name, 4)
    g0, g1 = _grad(shape, 0), _grad(shape, 1)
    state = proj.init(g0)
    assert isinstance(state, dict)
    low = proj.project(g0, state)
    assert tuple(low.shape) == tuple(proj.low_shape(shape, state))
    back = proj.project_back(low, state)
    assert tuple(back.shape) == shape and bool(torch.isfinite(back).all())
    new = proj.update(g1, state)  # no lr, no moments, no layout
    assert isinstance(new, dict) and new is not state
    assert int(new["refresh"]) == int(state["refresh"]) + 1
    low1 = proj.project(g1, new)
    assert tuple(low1.shape) == tuple(proj.low_shape(shape, new))
    assert tuple(proj.project_back(low1, new).shape) == shape
    # every state value is a tensor or a plain int/float/bool (weights_only-safe)
    assert all(isinstance(v, (torch.Tensor, int, float, bool)) for v in new.values())


# -- online PCA's default P learning rate tracks the subspace at d >= 1024 ----------------------------------------
D, N, R = 1024, 64, 16


def _stream(steps: int, drift: float = 0.02, noise: float = 0.6):
    """Gradients ``U_t S V^T + noise`` whose top-``R`` left subspace drifts (a random walk, re-orthonormalised)."""
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(D, R, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(N, R, generator=gen))
    s = torch.linspace(1.0, 0.3, R)
    for _ in range(steps):
        u, _ = torch.linalg.qr(u + drift / math.sqrt(D) * torch.randn(D, R, generator=gen))
        yield (u * s) @ v.T + noise / math.sqrt(D) * torch.randn(D, N, generator=gen)


def _track(proj: OnlinePCAProjector, steps: int = 240, lr: float = 0.01) -> tuple[float, torch.Tensor]:
    """Mean captured energy fraction ``||Q^T G||^2 / ||G||^2`` (``Q`` spans P) over the second half, and P's
    final column norms. The weight lr passed is the published 0.01."""
    state, caps = None, []
    for g in _stream(steps):
        if state is None:
            state = proj.init(g)
            assert state["side"] == LEFT
            continue
        state = proj.update(g, state, lr=lr, initial_lr=lr)
        q, _ = torch.linalg.qr(state["basis"])
        caps.append(float((q.T @ g).square().sum() / g.square().sum()))
    half = caps[len(caps) // 2:]
    return sum(half) / len(half), state["basis"].norm(dim=0)


@pytest.mark.slow
def test_online_pca_default_lr_tracks_the_subspace_at_d_1024() -> None:
    default, norms = _track(OnlinePCAProjector(R, side="left"))
    still, _ = _track(OnlinePCAProjector(R, side="left", lr_rule="fixed", lr=0.0))
    paper, paper_norms = _track(OnlinePCAProjector(R, side="left", lr_rule="ratio", lr_ratio=5.0))
    assert default > 1.5 * still  # measured 0.25 vs 0.14
    assert default > paper  # the former default (5 x 0.01 = 0.05): 0.21
    assert float((norms - 1).abs().max()) < 0.05  # column norms stay near 1 (former default: up to 1.18 here)
    assert float((paper_norms - 1).abs().max()) > float((norms - 1).abs().max())


@pytest.mark.parametrize("name", ["svd", "rsvd", "online_pca", "random", "coap", "rsvd_heads", "dct"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_basis_projectors_take_gradients_of_any_float_dtype(name: str, dtype: torch.dtype) -> None:
    """A standalone projector fed a bf16 / fp16 / fp64 gradient projects and lifts in fp32, as it does the gradient
    cast to fp32 (a user's report: ``project`` raised "expected m1 and m2 to have the same dtype")."""
    g = torch.randn(24, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    proj = make_projector(name, 4)
    st = proj.init(g)
    low = proj.project(g, st)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, proj.project(g.float(), st), rtol=0, atol=0)
    back = proj.project_back(low.to(dtype), st)
    assert back.dtype == torch.float32 and back.shape == g.shape
