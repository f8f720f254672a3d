"""LayerwiseUpdater under data parallelism (gloo, 2 ranks, CPU).

The updater steps each parameter from its post-accumulate-grad hook, before DistributedDataParallel all-reduces the
gradient, so each rank stepped on its own gradient: two DDP replicas fed different data ended 3 steps later with
parameter sums 85.81 and 86.65, without an error or a warning. Now an optimizer given to ``divide_refresh`` (a DDP
replica by contract) is refused by name, and any other multi-rank job gets a warning; one process gets neither.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

import lowrank_optim as lro

sys.path.insert(0, os.path.dirname(__file__))
from helpers import launch_ranks, make_model

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _optimizer() -> lro.LowRankOptimizer:
    model = make_model()
    return lro.GaLoreAdamW(lro.param_groups(model, rank=8, target_modules=["attn", "mlp"]), lr=1e-2)


def _job(cases: list[Any], rank: int, world: int, out_dir: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    opt = _optimizer()
    lro.distributed.divide_refresh(opt)
    try:
        lro.LayerwiseUpdater(opt)
        out["divided"] = "accepted"
    except ValueError as err:
        out["divided"] = str(err)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lro.LayerwiseUpdater(_optimizer())
    out["warnings"] = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    return out


def main(rank: int, world: int, init_method: str, jobs: list[tuple[str, list[Any]]], out_dir: str) -> None:
    import fsdp2_worker as base

    base.run_jobs({"layerwise": _job}, rank, world, init_method, jobs, out_dir, prefix="review10-lw-")


def test_data_parallel_layerwise_refused_or_warned(tmp_path: Path) -> None:
    got = launch_ranks(main, 2, [("layerwise", [])], tmp_path, 120, prefix="review10-lw-")["layerwise"]
    assert "divide_refresh" in got["divided"] and "Invalid optimizer" in got["divided"], got
    assert len(got["warnings"]) == 1 and "2 ranks" in got["warnings"][0], got
    assert "DistributedDataParallel" in got["warnings"][0]


def test_one_process_no_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lw = lro.LayerwiseUpdater(_optimizer())
    lw.remove()
