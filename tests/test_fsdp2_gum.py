"""GUM under FSDP2 (``fully_shard``, DTensor ``Shard(0)``) runs sharded: k ranks equal one process, the state divides.

Workers live in ``fsdp2_gum_worker.py`` (on top of ``fsdp2_worker.py``'s model and gradients). Two launches (2 ranks;
3 ranks with uneven shards and a rank without rows of the 2-row matrix). Checked:

* GUM variants (one, two and every matrix drawn full-rank, weights before / after / none, independent draws) and
  GaLore-Muon (SVD projector, Muon rule) equal one process over 12 steps (draws and refreshes at 0, 4, 8):
  fp32 within 1e-5 relative per parameter; the bf16 and 8-bit stores within what the store changes in one process;
* the draws exercised cover both branches on both projection sides;
* per-rank state bytes equal the closed form of each rank's chunks (about 1/2 of one process at 2 ranks), and the
  job's total equals one process's;
* the distributed Newton-Schulz equals one process's for both forms (Gram all-reduce, all-gather) and both split
  axes, and moves exactly the bytes its closed form counts;
* each refresh (SVD and draw) is computed once per job.

DCP resume of GUM is covered by ``tests/test_fsdp2.py`` (same-size, late, 2 -> 1, full state dict, 2 -> 4).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lowrank_optim.distributed.newton_schulz import gram_form, traffic_elements
from lowrank_optim.distributed.shards import chunk
from lowrank_optim.rules.muon import newton_schulz

sys.path.insert(0, os.path.dirname(__file__))
import fsdp2_gum_worker as gum_worker
import fsdp2_worker as worker
from helpers import launch_ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

TIMEOUT_S = 240
CASES_2 = [(v, "fp32") for v in gum_worker.VARIANTS] + [("gum", "bf16"), ("gum_two_after", "8bit")]
CASES_3 = [("gum", "fp32"), ("gum_prob", "fp32"), ("gum", "bf16")]
#: Projected matrices of ``fsdp2_worker.Net`` (``target_modules=["attn", "mlp"]``).
LOWRANK = ("attn.weight", "mlp.weight", "mlp_sq.weight", "attn_tiny.weight")


def launch(world: int, jobs: list[tuple[str, list[Any]]], out: Path) -> dict[str, Any]:
    return launch_ranks(gum_worker.main, world, jobs, out, TIMEOUT_S)


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return launch(2, [("parity", CASES_2), ("newton_schulz", [])], tmp_path_factory.mktemp("gum2"))


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return launch(3, [("parity", CASES_3), ("newton_schulz", [])], tmp_path_factory.mktemp("gum3"))


_REFS: dict[tuple[str, str, bool], dict[str, Any]] = {}


def reference(variant: str, store: str, ulp: bool = False) -> dict[str, Any]:
    """One process's run (``ulp``: every gradient perturbed by about one ulp), on one thread as the workers."""
    if (variant, store, ulp) not in _REFS:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _REFS[variant, store, ulp] = gum_worker.single(variant, store, ulp)
        finally:
            torch.set_num_threads(threads)
    return _REFS[variant, store, ulp]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _worst(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    return max((_rel(got[n], r), n) for n, r in ref.items())


def _check(result: dict[str, Any], world: int) -> None:
    failures = []
    for key, got in result["parity"].items():
        variant, store = key.split("/")
        ref = reference(variant, store)["params"]
        rel, name = _worst(got["params"], ref)
        # fp32: 1e-5, or twice what one ulp of the gradient changes in one process when that is more: k ranks sum
        # the projections P^T G and the Grams in another order, and Newton-Schulz's slope at 0 (a^5 ~ 490 for a
        # singular value near 0) amplifies last-bit differences of the full branch's complement G - P P^T G (a
        # small difference of large terms); one process moves as much under a one-ulp perturbation (measured
        # 2.5e-5 for two matrices full-rank, weights after; k ranks 1.2e-5)
        sensitivity = _worst(reference(variant, "fp32", ulp=True)["params"], reference(variant, "fp32")["params"])[0]
        bound = max(1e-5, 2 * sensitivity)
        if store == "bf16":  # rounding keyed by the element's index in the whole moment (measured 3e-5)
            bound = 1e-4
        elif store == "8bit":  # the chunks' own 8-bit blocks: a small multiple of what the store changes
            bound = 3 * _worst(ref, reference(variant, "fp32")["params"])[0]
        if not rel <= bound:
            failures.append(f"{world} ranks {key} {name}: relative difference {rel:.2e} > {bound:.2e}")
        calls = got["calls"]  # each matrix's init and two refreshes, once per job (owner rank)
        assert (calls["init"], calls["update"], calls["engine"]) == (4, 8, 0), (key, calls)
    assert not failures, "\n".join(failures)


def test_two_ranks_equal_one_process(two: dict[str, Any]) -> None:
    assert sorted(two["parity"]) == sorted(f"{v}/{s}" for v, s in CASES_2)
    _check(two, 2)


def test_three_ranks_uneven_equal_one_process(three: dict[str, Any]) -> None:
    """3 ranks: rows 520 / 24 / 2 split unevenly; rank 2 holds no row of the 2-row matrix."""
    _check(three, 3)


def test_draws_cover_both_branches_on_both_sides() -> None:
    """The variants above step every projected matrix in the low-rank and in the full-rank branch (left side:
    ``mlp``, ``attn_tiny``; right side: ``attn``, ``mlp_sq``), and GUM-all in the whole-gradient case (q = 1)."""
    seen: dict[str, set[int]] = {n: set() for n in LOWRANK}
    for variant in ("gum", "gum_two_after", "gum_prob"):
        for period in reference(variant, "fp32")["draws"]:
            for name, full in period.items():
                seen[name].add(full)
    assert all(v == {0, 1} for v in seen.values()), seen
    assert all(all(period.values()) for period in reference("gum_all", "fp32")["draws"])


def _expected_bytes(variant: str, rank: int, world: int) -> int:
    """Closed form of rank ``rank``'s fp32 state at ``world`` ranks after the run: AdamW's two moments of its rows
    of every plain parameter; per projected matrix its rows of the basis (``d x r``, ``d`` = m left, n right) and its
    chunk of the momentum: ``m_i x n`` (full branch), ``m_i x r`` (right) or ``r x n_j`` (left)."""
    model = worker.make_model()
    last = reference(variant, "fp32")["draws"][-1]
    total = 0
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        rows = chunk(shape[0], world, rank)[1]
        if name not in LOWRANK:
            total += 2 * rows * math.prod(shape[1:]) * 4
            continue
        m, n = shape
        r = min(worker.RANK, m, n)
        left = m < n
        total += chunk(m if left else n, world, rank)[1] * r * 4
        if last[name]:
            total += rows * n * 4
        elif left:
            total += r * chunk(n, world, rank)[1] * 4
        else:
            total += rows * r * 4
    return total


def test_state_bytes_divide(two: dict[str, Any]) -> None:
    """Rank 0's state is exactly its chunks (closed form), about half of one process's; the job's total is one
    process's."""
    for variant in ("gum", "gum_two_after", "gum_all"):
        got = two["parity"][f"{variant}/fp32"]
        single = reference(variant, "fp32")["bytes"]
        assert single == _expected_bytes(variant, 0, 1), variant
        assert got["bytes"] == _expected_bytes(variant, 0, 2), (variant, got["bytes"])
        assert got["global_bytes"] == single, (variant, got["global_bytes"], single)
        assert got["bytes"] <= 0.51 * single, (variant, got["bytes"], single)


@pytest.mark.parametrize("world", [2, 3])
def test_newton_schulz_forms(two: dict[str, Any], three: dict[str, Any], world: int) -> None:
    """Both forms of the distributed Newton-Schulz equal one process's (1e-5 relative; the all-gather form exactly),
    in fp32 and with bf16 products, and move exactly the bytes :func:`traffic_elements` counts: a Gram all-reduce
    per iteration (``2 (k-1)/k (5 s^2 + 2)`` elements) or one all-gather."""
    result = (two if world == 2 else three)["newton_schulz"]
    forms = set()
    for shape, dim in gum_worker.NS_SHAPES:
        got = result[f"{shape[0]}x{shape[1]}/{dim}"]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the workers: the same kernels
        try:
            want = newton_schulz(got["x"])
            want16 = newton_schulz(got["x"], dtype=torch.bfloat16)
        finally:
            torch.set_num_threads(threads)
        gram = gram_form(shape, dim, 5)
        forms.add(gram)
        assert got["ns_bf16"].dtype == torch.float32 and _rel(want16, want) > 1e-4  # the products ran in bf16
        if gram:
            assert _rel(got["ns"], want) <= 1e-5, (shape, dim)
            # ns_dtype="bf16": the partial Grams of the bf16 chunks are summed in fp32 and rounded once, as one
            # process's bf16 product rounds its accumulation once; only a summation-order flip across a bf16
            # rounding boundary can differ (measured: equal). Rounding each partial to bf16 first gave 0.7-2.6e-2.
            assert _rel(got["ns_bf16"], want16) <= 1e-3, (shape, dim)
        else:
            assert torch.equal(got["ns"], want), (shape, dim)
            assert torch.equal(got["ns_bf16"], want16), (shape, dim)
        assert got["bytes"] == pytest.approx(4 * traffic_elements(shape, dim, 5, world), rel=1e-12), (shape, dim)
    assert forms == {True, False}


def test_steady_step_traffic(two: dict[str, Any]) -> None:
    """The optimizer's own traffic in a steady step (no refresh) is at most what FSDP2 moves for the projected
    weights (one all-gather and one reduce-scatter: ``2 (k-1)/k m n`` elements each step)."""
    fsdp = sum(2 * 0.5 * math.prod(p.shape) * 4 for n, p in worker.make_model().named_parameters() if n in LOWRANK)
    for key, got in two["parity"].items():
        assert got["traffic"]["refresh"] == 0.0, key
        assert 0 < got["traffic"]["step"] <= fsdp, (key, got["traffic"], fsdp)


def test_planner_divides_gum() -> None:
    """``plan_memory(..., shards=K)`` divides GUM's state by K (it runs sharded), every part of it."""
    import lowrank_optim as lro

    one = lro.plan_memory("llama-60m", "gum", rank=128, state_dtype="8bit")
    eight = lro.plan_memory("llama-60m", "gum", rank=128, state_dtype="8bit", shards=8)
    assert one.state and all(eight.state[k] == -(-v // 8) for k, v in one.state.items())
