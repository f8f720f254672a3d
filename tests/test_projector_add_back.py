"""``Projector.add_back``: one ``addmm_`` into the parameter equals adding ``project_back`` (every projector)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_optim import make_projector
from lowrank_optim.projectors import LEFT, PROJECTORS, Projector, ProjState


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(sorted(PROJECTORS)), m=st.integers(2, 24), n=st.integers(2, 24),
       rank=st.integers(1, 8), side=st.sampled_from(["std", "reverse_std", "left", "right"]),
       alpha=st.floats(-2.0, 2.0), seed=st.integers(0, 2**16))
def test_add_back_equals_adding_project_back(name, m, n, rank, side, alpha, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(m, n, generator=gen)
    options = {} if name in ("blocks", "gum") else {"side": side}
    proj = make_projector(name, rank, **options)
    state = proj.init(g, seed=seed)
    low = proj.project(g, state)
    target = torch.randn(m, n, generator=gen)
    expected = target + alpha * proj.project_back(low, state)
    proj.add_back(target, low, state, alpha)
    torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-5)
    dropped = proj.residual(g, low, state, alpha)
    torch.testing.assert_close(dropped, g - alpha * proj.project_back(low, state), rtol=1e-5, atol=1e-5)
    assert dropped.is_contiguous() and dropped.data_ptr() != g.data_ptr()


def test_matrix_projectors_take_the_addmm_path() -> None:
    """svd/rsvd/random/dct have a back matrix; selections do not (their ``project_back`` is used)."""
    g = torch.randn(12, 7)
    for name in ("svd", "rsvd", "random", "dct", "online_pca", "coap"):
        proj = make_projector(name, 3)
        b = proj.back_matrix(proj.init(g), g.device)
        assert b is not None and tuple(b.shape) == (7, 3), name
    for name in ("columns", "rows", "entries", "blocks", "gum"):
        proj = make_projector(name, 3)
        assert proj.back_matrix(proj.init(g), g.device) is None, name


class _Scaled(Projector):
    """A user projector that overrides ``project_back`` only: ``add_back`` must use it, not ``state["basis"]``."""

    name = "scaled-test"

    def _basis(self, grad: torch.Tensor, state: ProjState, previous: torch.Tensor | None) -> torch.Tensor:
        return torch.eye(grad.shape[0] if state["side"] == LEFT else grad.shape[1])[:, : state["rank"]]

    def project_back(self, low: torch.Tensor, state: ProjState) -> torch.Tensor:
        return 3.0 * super().project_back(low, state)


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_subclass_overriding_project_back_keeps_its_map(side) -> None:
    proj = _Scaled(2, side)
    g = torch.randn(5, 4)
    state = proj.init(g)
    low = proj.project(g, state)
    target = torch.zeros(5, 4)
    proj.add_back(target, low, state, 1.0)
    torch.testing.assert_close(target, proj.project_back(low, state))
    assert proj.back_matrix(state, g.device) is None
