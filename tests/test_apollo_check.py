"""benchmarks/apollo_check.py: paired deltas over seeds, how each bar is read, the noise-floor run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import apollo_check as ac


def _run(label: str, seed: int, val: float, refreshes: int | None = 10, diverged: bool = False) -> dict:
    return {"label": label, "seed": seed, "val_loss": val, "refreshes": refreshes, "projected": 2,
            "diverged": diverged, "val_batch_losses": []}


def _runs(rows: list[tuple[str, int, float]], **extra: dict) -> dict:
    runs = {(lab, s): _run(lab, s, v) for lab, s, v in rows}
    for key, fields in extra.items():
        lab, s = key.rsplit("|", 1)
        runs[(lab, int(s))].update(fields)
    return runs


CONF = {"steps": 200, "update_proj_gap": 20}


def test_deltas_are_paired_per_seed_and_averaged() -> None:
    """Seed 1's baseline is 1.0 higher than seed 0's; pairing removes it: deltas -0.004 and -0.008."""
    runs = _runs([("galore fp32", 0, 2.0), ("galore fp32", 1, 3.0), ("galore bf16", 0, 1.996),
                  ("galore bf16", 1, 2.992), ("galore bf16", 2, 9.0)])  # seed 2 has no baseline: left out
    f = ac.summarise(runs, CONF)["figures"]["galore bf16 delta"]
    assert f["seeds"] == [0, 1] and f["n"] == 2
    assert f["mean"] == pytest.approx(-0.006, abs=1e-12)
    assert f["std"] == pytest.approx(math.sqrt(2) * 0.002, abs=1e-12)
    assert (f["min"], f["max"]) == (pytest.approx(-0.008), pytest.approx(-0.004))


def test_basis_bars_are_two_sided_on_the_mean() -> None:
    runs = _runs([("galore fp32", 0, 2.0), ("galore bf16", 0, 1.994), ("galore int8", 0, 2.009)])
    bars = ac.summarise(runs, CONF)["bars"]
    assert not bars["galore bf16: |mean delta| <= 0.005"]["pass"]  # 0.006 lower is still a change
    assert bars["galore int8: |mean delta| <= 0.01"]["pass"]


def test_lazy_bar_is_a_cost_bound() -> None:
    """A lower loss with half the refreshes passes; a loss 0.006 higher fails; too few refreshes saved fails."""
    def bar(delta: float, refreshes: int) -> bool:
        runs = _runs([("galore fp32", 0, 2.0), ("galore lazy", 0, 2.0 + delta)],
                     **{"galore lazy|0": {"refreshes": refreshes}})
        summary = ac.summarise(runs, CONF)
        (b,) = summary["bars"].values()
        assert summary["figures"]["galore lazy saved"]["mean"] == pytest.approx(1 - refreshes / 10)
        return b["pass"]

    assert bar(-0.04, 5)
    assert bar(+0.004, 7)
    assert not bar(+0.006, 5)
    assert not bar(-0.04, 8)  # 20% saved


def test_apollo_bars_are_one_sided_ratios_and_skip_diverged_runs() -> None:
    runs = _runs([("adamw", 0, 2.0), ("adamw", 1, 2.0), ("apollo", 0, 1.6), ("apollo", 1, 2.1),
                  ("apollo_mini", 0, 2.05)], **{"apollo|1": {"diverged": True}})
    s = ac.summarise(runs, CONF)
    assert s["figures"]["apollo vs adamw"]["values"] == [pytest.approx(-0.2)]
    assert s["bars"]["apollo: mean (val / val_adamw - 1) <= 1%"]["pass"]
    assert s["bars"]["apollo_mini: mean (val / val_adamw - 1) <= 3%"]["pass"]  # +2.5%


def test_null_perturbation_is_about_one_ulp_and_seeded() -> None:
    p = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    a, b, c = p.clone(), p.clone(), p.clone()
    ac._perturb([a], 0)
    ac._perturb([b], 0)
    ac._perturb([c], 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    rel = (a - p).abs() / p.abs()
    assert float(rel.min()) > 0 and float(rel.max()) <= 2.0 ** -22  # every entry moved, by 1-2 ulp


def test_gradient_null_moves_every_gradient_entry_by_about_one_ulp() -> None:
    p = torch.nn.Parameter(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))
    ac._perturb_gradients([p], 0)
    g = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    (p * g).sum().backward()
    rel = (p.grad - g).abs() / g.abs()
    assert float(rel.min()) > 0 and float(rel.max()) <= 2.0 ** -22


def test_tiny_run_writes_the_summary_and_resumes(tmp_path) -> None:
    argv = ["--steps", "2", "--seeds", "0", "--jobs", "1", "--eval-batches", "2", "--only",
            "galore fp32,galore fp32 null", "--out", str(tmp_path)]
    threads = torch.get_num_threads()
    try:
        result = ac.main(argv)
        assert set(result["runs"]) == {"galore fp32|seed0", "galore fp32 null|seed0"}
        floor = result["figures"]["noise_floor"]
        assert floor["n"] == 1 and floor["values"][0] != 0.0  # the perturbation reaches the loss
        assert "cost bound" in result["how_bars_are_read"]
        lines = (tmp_path / "apollo_check_runs.jsonl").read_text().splitlines()
        assert len(lines) == 2 and len(json.loads(lines[0])["val_batch_losses"]) == 2
        again = ac.main([*argv, "--resume"])  # nothing left to run: the same figures from the runs file
        assert again["figures"]["noise_floor"]["values"] == floor["values"]
        assert len(again["commands"]) == 2 and again["commands"][1].endswith("--resume")
        assert len((tmp_path / "apollo_check_runs.jsonl").read_text().splitlines()) == 2
    finally:
        torch.set_num_threads(threads)
