"""Peak and steady optimizer state where a method's state changes size (issue 11, fault 9).

The closed forms of :func:`lowrank_optim.memory.state_phases` (from shapes, meta device) must equal what a real
run's ``state_bytes()`` measures at both points: GaLore+'s warm-up (full-size ``E^2`` score) and after it,
FRUGAL's block switches and GUM's full-rank draws over periods.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowrank_optim as lro
from lowrank_optim.memory import LLAMA_CONFIGS, estimate_state_phases, llama_shapes, state_phases


class Three(nn.Module):
    """Three projected matrices of different sizes (the largest in the middle) and a plain head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.Linear(40, 72, bias=False)
        self.mlp1 = nn.Linear(72, 96)
        self.mlp2 = nn.Linear(96, 40, bias=False)
        self.head = nn.Linear(40, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp2(torch.tanh(self.mlp1(torch.tanh(self.attn(x))))))


def _run(name: str, steps: int, **kwargs: object) -> tuple[list[int], lro.LowRankOptimizer, nn.Module]:
    model = Three()
    opt = lro.create_optimizer(name, lro.param_groups(model, rank=8, target_modules=["attn", "mlp"]), lr=1e-3,
                               **kwargs)
    x = torch.randn(16, 40, generator=torch.Generator().manual_seed(1))
    sizes = []
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        sizes.append(opt.state_bytes())
    return sizes, opt, model


def _closed(name: str, **kwargs: object):
    shapes = {n: tuple(p.shape) for n, p in Three().named_parameters()}
    return estimate_state_phases(shapes, name, rank=8, target_modules=["attn", "mlp"], lr=1e-3, **kwargs)


@pytest.mark.parametrize("state_dtype", ["fp32", "8bit"])
def test_galore_plus_warmup_peak_and_steady(state_dtype: str) -> None:
    kw = {"residual_warmup": 3, "residual_density": 0.05, "state_dtype": state_dtype}
    sizes, _, _ = _run("galore_plus", 5, **kw)
    phases = _closed("galore_plus", **kw)
    assert sizes[0] == sizes[1] == phases.first == phases.peak  # E^2 score held during the warm-up
    assert sizes[2] == sizes[3] == sizes[4] == phases.steady  # indices and two small moments after it
    assert phases.steady < phases.peak
    assert set(phases.varying) == {"attn.weight", "mlp1.weight", "mlp2.weight"}


@pytest.mark.parametrize("state_dtype", ["fp32", "8bit"])
def test_frugal_block_switches_steady_is_the_largest_window(state_dtype: str) -> None:
    kw = {"density": 0.34, "update_gap": 1, "state_dtype": state_dtype}  # one active matrix per period
    sizes, _, _ = _run("frugal", 6, **kw)
    phases = _closed("frugal", **kw)
    assert sizes[0] == phases.first  # descending: the last matrix (mlp2) first
    assert max(sizes) == phases.steady == phases.peak
    if state_dtype == "fp32":  # mlp1, the largest, in its window (in 8-bit mlp2's fp32 moments are larger)
        assert phases.steady > phases.first


@pytest.mark.parametrize("state_dtype", ["fp32", "8bit"])
def test_gum_full_rank_draw_peak(state_dtype: str) -> None:
    kw = {"full_rank_layers": 1, "update_proj_gap": 1, "state_dtype": state_dtype}
    sizes, _, _ = _run("gum", 12, **kw)
    phases = _closed("gum", **kw)
    assert sizes[0] == phases.first
    assert max(sizes) == phases.steady == phases.peak  # mlp1 (the largest increase) drawn at some period
    assert phases.peak > min(sizes)


def test_constant_state_methods_have_equal_phases() -> None:
    for name in ("galore_adamw", "fira", "flora", "coap", "dct_adamw", "online_subspace_descent"):
        phases = _closed(name)
        assert phases.first == phases.peak == phases.steady and not phases.varying, name


def test_state_phases_of_a_live_optimizer_matches_measured() -> None:
    sizes, opt, _ = _run("galore_plus", 1, residual_warmup=2, residual_density=0.05)
    phases = state_phases(opt)
    assert phases.first == sizes[0] == phases.peak
    opt2 = _run("galore_plus", 3, residual_warmup=2, residual_density=0.05)[0]
    assert opt2[-1] == phases.steady


def test_planner_reports_peak_and_steady() -> None:
    shapes = {n: tuple(p.shape) for n, p in Three().named_parameters()}
    kw = {"residual_warmup": 3, "residual_density": 0.05}
    plan = lro.plan_memory(shapes, "galore_plus", rank=8, target_modules=["attn", "mlp"], state_dtype="fp32",
                           weight_dtype="fp32", lr=1e-3, **kw)
    phases = _closed("galore_plus", state_dtype="fp32", **kw)
    assert (plan.state_total, plan.state_peak, plan.state_steady) == (phases.first, phases.peak, phases.steady)
    assert plan.total == plan.weights + plan.gradients + phases.peak
    text = plan.format()
    assert "peak (warm-up / largest draw)" not in text  # the first step is the peak here
    assert "steady (after warm-up)" in text
    flat = lro.plan_memory(shapes, "galore_adamw", rank=8, target_modules=["attn", "mlp"], state_dtype="fp32")
    assert flat.state_peak == flat.state_steady == flat.state_total and "steady" not in flat.format()


def test_state_phases_needs_a_step() -> None:
    with pytest.raises(ValueError, match="no state"):
        state_phases(lro.GaLorePlus([{"params": [nn.Parameter(torch.ones(4, 4))], "rank": 2}]))


@pytest.mark.slow
def test_galore_plus_1b_readme_figures() -> None:
    """The README's row: 8.38 GiB in the warm-up (the old table's only figure), 4.02 GiB after it (fp32)."""
    phases = estimate_state_phases(llama_shapes(**LLAMA_CONFIGS["1B"]), "galore_plus", rank=512, state_dtype="fp32")
    assert round(phases.peak / 2**30, 2) == 8.38
    assert round(phases.steady / 2**30, 2) == 4.02
