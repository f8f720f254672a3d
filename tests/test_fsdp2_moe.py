"""FSDP2 (``fully_shard``, gloo, CPU) with MoE expert stacks ``(E, m, n)`` and ``nn.Conv2d`` weights: sharded, and
k ranks equal one process.

Workers live in ``fsdp2_moe_worker.py`` (two launches: 2 ranks, and 3 ranks with uneven shards and a rank without
an expert). What is checked:

* every preset on identical gradients, 12 steps with refreshes at 5 and 10, equals one process (fp32: relative
  1e-5 per parameter; bf16 within 1e-4; 8-bit within a small multiple of what the store changes in one process,
  as ``tests/test_fsdp2.py``), with the expert stacks in the expert-sharded mode (every preset) and the convs in
  the row-sharded mode (every preset whose 2-D matrices shard, GaLore+ included);
* Flora through the real model's reduce-scattered gradients (the SVD presets are shown on identical gradients:
  on this small model one process itself moves by 1e-4..1e-3 when its batch gradient is summed in two halves);
* each expert's refresh is computed on one rank of the job;
* per-rank state bytes in closed form: an expert stack holds ``count_i / E`` of one process's state, a conv its
  rows' moments and its chunk of the basis;
* DCP: same-size resume bit-exact (3 ranks: one holds no expert of a stack), 2 -> 1 and 2 -> 3 resharded resumes
  and the gathered full state dict in one process continue within 1e-6 of the uninterrupted run (8-bit: 1e-2).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import lowrank_optim as lro
from lowrank_optim.distributed.shards import chunk

sys.path.insert(0, os.path.dirname(__file__))
import fsdp2_moe_worker as worker
import fsdp2_worker as base
from helpers import launch_ranks

TIMEOUT_S = 300
CORE = ("galore_adamw", "fira", "flora")
#: Expert stacks of the worker's model: name -> (E, m, n).
STACKS = {"experts": (5, 520, 16), "experts_out": (2, 16, 520)}

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _cases(names: tuple[str, ...] | list[str], stores: tuple[str, ...], source: str = "synthetic") \
        -> list[tuple[str, str, str]]:
    return [(n, s, source) for n in names for s in stores]


PARITY_2 = (_cases(lro.available_optimizers(), ("fp32",)) + _cases((*CORE, "gum"), ("bf16", "8bit"))
            + _cases(("flora",), ("fp32",), "model"))
PARITY_3 = _cases((*CORE, "gum", "galore_plus"), ("fp32",)) + _cases(("galore_adamw",), ("8bit",))
CHECKPOINT_2 = _cases(CORE, ("fp32",)) + _cases(("galore_adamw",), ("8bit",)) + _cases(("gum",), ("bf16",))
CHECKPOINT_3 = _cases(("galore_adamw", "frugal"), ("fp32",))


def launch(world: int, jobs: list[tuple[str, list[Any]]], out: Path) -> dict[str, Any]:
    return launch_ranks(worker.main, world, jobs, out, TIMEOUT_S, prefix="moe-")


_REFS: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}


def reference(name: str, store: str, source: str) -> dict[str, torch.Tensor]:
    key = (name, store, source)
    if key not in _REFS:
        _REFS[key] = worker.single(name, store, source)
    return _REFS[key]


def worst(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    return max((float((got[n].float() - r.float()).norm() / r.float().norm().clamp_min(1e-30)), n)
               for n, r in ref.items())


def check_parity(result: dict[str, Any], world: int) -> list[str]:
    failures = []
    for key, got in result.items():
        name, store, source = key.split("/")
        ref = reference(name, store, source)
        rel, pname = worst(got["params"], ref)
        bound = {"bf16": 1e-4}.get(store, 1e-5)  # bf16: rounding keyed by the element's global index, as one process
        if store == "8bit":  # the convs quantize in their row chunks' own blocks (each expert: its own blocks)
            bound = max(bound, 3 * worst(ref, reference(name, "fp32", source))[0])
        if not rel <= bound:
            failures.append(f"{world} ranks {key} {pname}: relative difference {rel:.2e} > {bound:.2e}")
        modes = got["modes"]
        if modes["experts"] != "experts" or modes["experts_out"] != "experts":
            failures.append(f"{world} ranks {key}: expert stacks ran {modes}")
        if modes["conv_a.weight"] != "sharded" or modes["conv_b.weight"] != "sharded":  # GaLore+'s too
            failures.append(f"{world} ranks {key}: convs ran {modes}, expected sharded")
    return failures


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("fsdp2_moe")
    return launch(2, [("parity", PARITY_2), ("checkpoint_save", CHECKPOINT_2)], out), out


def test_two_ranks_equal_one_process(two_ranks: tuple[dict[str, Any], Path]) -> None:
    result = two_ranks[0]["parity"]
    assert sorted(result) == sorted("/".join(c) for c in PARITY_2)
    failures = check_parity(result, 2)
    assert not failures, "\n".join(failures)


def test_expert_refresh_runs_once_per_job(two_ranks: tuple[dict[str, Any], Path]) -> None:
    """Each expert's init and two refreshes run once in the job (on the rank holding it: 7 experts x 3); the convs'
    on their owner rank (every sharded preset, GaLore+ included)."""
    result = two_ranks[0]["parity"]
    experts = sum(s[0] for s in STACKS.values())
    for name in ("galore_adamw", "fira", "coap", "dct_adamw", "online_subspace_descent", "gum", "galore_plus"):
        calls = result[f"{name}/fp32/synthetic"]["calls"]
        assert (calls["engine"], calls["init"], calls["update"]) == (3 * experts, 2, 4), (name, calls)


def _single_bytes(name: str, store: str) -> dict[str, int]:
    model = worker.make_model()
    opt = worker.build(name, model, store)
    worker.train(model, opt, range(worker.STEPS))  # GUM's draw (which experts are full-rank) as at the end
    return worker.param_bytes(model, opt)


def test_state_bytes_divide(two_ranks: tuple[dict[str, Any], Path]) -> None:
    """GaLoreAdamW (fp32) per rank in closed form (rank r = 8, 4-byte moments): an expert stack holds its experts'
    ``(2 m r + d r) 4`` bytes each (``d`` the basis side), the right-side conv ``(2 m_i r + n_i r) 4`` (its rows'
    moments, its chunk of the ``n x r`` basis), the left-side conv ``(2 r n_j + m_i r) 4``. For every measured
    preset and store: an expert stack's bytes on a rank are exactly ``count_i / E`` of one process's; the convs
    hold about half (their bases and Adafactor's column statistics are split unevenly or replicated). Summed over
    the ranks, an expert stack's bytes are one process's exactly."""
    result = two_ranks[0]["parity"]
    r = worker.RANK
    got = result["galore_adamw/fp32/synthetic"]["bytes"]
    for rank, mine in enumerate(got):
        expect = {}
        for pname, (e, m, n) in STACKS.items():
            d = n if m >= n else m
            expect[pname] = chunk(e, 2, rank)[1] * (2 * max(m, n) * r + d * r) * 4
        expect["conv_a.weight"] = (2 * chunk(64, 2, rank)[1] * r + chunk(27, 2, rank)[1] * r) * 4
        expect["conv_b.weight"] = (2 * r * chunk(576, 2, rank)[1] + chunk(16, 2, rank)[1] * r) * 4
        assert mine == expect, (rank, mine, expect)
    for name, store in [(n, "fp32") for n in (*CORE, "gum", "galore_plus", "frugal")] + [
            (n, s) for n in (*CORE, "gum") for s in ("bf16", "8bit")]:
        got = result[f"{name}/{store}/synthetic"]["bytes"]
        single = _single_bytes(name, store)
        for pname in STACKS:  # each expert's state lives on exactly one rank
            assert sum(mine[pname] for mine in got) == single[pname], (name, store, pname, got, single)
        for rank, mine in enumerate(got):
            for pname, (e, _, _) in STACKS.items():
                if name not in ("gum", "frugal"):  # their draws give experts states of different sizes (GUM's
                    # full-rank experts, FRUGAL's active blocks): not proportional
                    assert mine[pname] * e == single[pname] * chunk(e, 2, rank)[1], (name, store, rank, pname, mine,
                                                                                   single)
            if name in ("gum", "frugal"):  # FRUGAL, GUM: a conv's block may be inactive, its draw full-rank
                continue
            for pname in ("conv_a.weight", "conv_b.weight"):
                assert mine[pname] <= 0.56 * single[pname], (name, store, rank, pname, mine, single)


def _exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[n], b[n]) for n in b)


def test_checkpoint_same_size_resume(two_ranks: tuple[dict[str, Any], Path]) -> None:
    """DCP at step 7 (after a refresh), a fresh sharded model and optimizer at 2 ranks: bit-exact."""
    for key, got in two_ranks[0]["checkpoint_save"].items():
        assert _exact(got["resumed"], got["uninterrupted"]), (key, worst(got["resumed"], got["uninterrupted"]))


def _one_process(name: str, store: str, load: Any) -> dict[str, torch.Tensor]:
    model = worker.make_model()
    opt = worker.build(name, model, store)
    load(model, opt)
    worker.train(model, opt, range(worker.SAVE_AT, worker.STEPS))
    return base.whole(model)


def _to_one_process(saved: dict[str, Any], world: int) -> None:
    """The DCP checkpoint and the gathered full state dicts saved at ``world`` ranks load into one plain process
    (the expert stacks' state stacked along the expert axis in both) and continue within 1e-6 of the
    uninterrupted run (8-bit: 1e-2, the convs' codes requantized in one process's blocks)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    for key, got in saved.items():
        name, store, _ = key.split("/")
        bound = {"8bit": 1e-2, "bf16": 1e-4}.get(store, 1e-6)
        planner = lro.distributed.LoadPlanner() if store == "8bit" else None

        def dcp(m: torch.nn.Module, o: torch.optim.Optimizer, p: str = got["path"], pl: Any = planner) -> None:
            base.dcp_load(m, o, p, pl)

        def full(m: torch.nn.Module, o: torch.optim.Optimizer, g: dict[str, Any] = got) -> None:
            m.load_state_dict(g["full_model"])
            set_optimizer_state_dict(m, o, g["full_optim"])

        for how, load in (("dcp", dcp), ("full state dict", full)):
            rel, pname = worst(_one_process(name, store, load), got["uninterrupted"])
            assert rel <= bound, (key, f"{world} -> 1 ({how})", pname, rel)


def test_checkpoint_two_ranks_to_one_process(two_ranks: tuple[dict[str, Any], Path]) -> None:
    _to_one_process(two_ranks[0]["checkpoint_save"], 2)


@pytest.mark.slow
def test_three_ranks(two_ranks: tuple[dict[str, Any], Path]) -> None:
    """3 ranks: 5 experts split 2 + 2 + 1 and 2 experts 1 + 1 + 0 (rank 2 holds none), conv rows 22 + 22 + 20 and
    6 + 6 + 4. Parity with one process; the 2-rank checkpoints resharded to 3 continue within 1e-6 (8-bit: 1e-2);
    a 3-rank checkpoint (a rank exporting an empty expert stack) resumes bit-exactly and loads into one process."""
    saved, out = two_ranks
    result = launch(3, [("parity", PARITY_3), ("checkpoint_load", CHECKPOINT_2), ("checkpoint_save", CHECKPOINT_3)],
                    out)
    failures = check_parity(result["parity"], 3)
    assert not failures, "\n".join(failures)
    for key, got in result["checkpoint_load"].items():
        bound = {"8bit": 1e-2, "bf16": 1e-4}.get(key.split("/")[1], 1e-6)
        rel, pname = worst(got["resumed"], saved["checkpoint_save"][key]["uninterrupted"])
        assert rel <= bound, (key, "dcp 2 -> 3", pname, rel)
    for key, got in result["checkpoint_save"].items():
        assert _exact(got["resumed"], got["uninterrupted"]), (key, worst(got["resumed"], got["uninterrupted"]))
    _to_one_process(result["checkpoint_save"], 3)


#: 4 ranks: the core presets and GUM on identical gradients; the 2-rank fp32 and 8-bit checkpoints resharded.
PARITY_4 = _cases(("galore_adamw", "gum"), ("fp32",))
CHECKPOINT_4 = _cases(("galore_adamw", "flora"), ("fp32",)) + _cases(("galore_adamw",), ("8bit",))


@pytest.mark.slow
def test_four_ranks(two_ranks: tuple[dict[str, Any], Path]) -> None:
    """4 ranks: 5 experts split 2 + 2 + 1 + 0 and 2 experts 1 + 1 + 0 + 0 (torch's chunking: rank 3 holds no
    expert), conv rows 16 each. Parity with one process; the 2-rank checkpoints resharded to 4 continue within 1e-6
    (8-bit: 1e-2) of the uninterrupted run."""
    saved, out = two_ranks
    assert [chunk(5, 4, r)[1] for r in range(4)] == [2, 2, 1, 0]
    assert [chunk(2, 4, r)[1] for r in range(4)] == [1, 1, 0, 0]
    result = launch(4, [("parity", PARITY_4), ("checkpoint_load", CHECKPOINT_4)], out)
    failures = check_parity(result["parity"], 4)
    assert not failures, "\n".join(failures)
    assert sorted(result["checkpoint_load"]) == sorted("/".join(c) for c in CHECKPOINT_4)
    for key, got in result["checkpoint_load"].items():
        bound = {"8bit": 1e-2, "bf16": 1e-4}.get(key.split("/")[1], 1e-6)
        rel, pname = worst(got["resumed"], saved["checkpoint_save"][key]["uninterrupted"])
        assert rel <= bound, (key, "dcp 2 -> 4", pname, rel)


def test_expert_state_dict_round_trip_one_process() -> None:
    """In one process an expert stack's state is exported stacked (``(E, ...)`` tensors, its ints as ``int64``
    listed in ``python_scalars``) and loads back to the same per-expert states, bit-exactly; a state dict in the
    earlier per-expert list form still loads."""
    import io

    import helpers

    model = worker.make_model()
    opt = worker.build("fira", model, "8bit")
    worker.train(model, opt, range(6))
    sd = opt.state_dict()
    index = [id(p) for g in opt.param_groups for p in g["params"]].index(id(model.experts))
    st = sd["state"][index]
    assert isinstance(st["matrices"], dict) and st["matrices"]["exp_avg"].shape == (5, 520, worker.RANK)
    assert st["matrices"]["exp_avg"].dtype == torch.uint8 and st["matrices"]["step"].dtype == torch.int64
    assert "projector.rank" in st["matrices"]["python_scalars"].split(",")
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    model2 = worker.make_model()
    model2.load_state_dict(model.state_dict())
    opt2 = worker.build("fira", model2, "8bit")
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    helpers.assert_same_state(opt, opt2)
    listed = {**sd, "state": {**sd["state"]}}
    opt3 = worker.build("fira", worker.make_model(), "8bit")
    listed["state"][index] = {**st, "matrices": [dict(sub) for sub in opt.state[model.experts]["matrices"]]}
    opt3.load_state_dict(listed)
    for a, b in zip(opt3.state[opt3.param_groups[1]["params"][2]]["matrices"], opt.state[model.experts]["matrices"],
                    strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and a["projector"]["rank"] == b["projector"]["rank"]


def test_planner_divides_expert_stacks_with_every_preset() -> None:
    """``plan_memory(shards=K)``: an expert stack's state is the fullest rank's ``ceil(E / K)`` experts with every
    preset (sharded ones included: it used to divide their stacks by K, 1 / 4 where rank 0 holds 2 / 6); bases of
    experts are counted as bases; GaLore+ and a quantized basis divide their 2-D state by K (their 2-D weights run
    sharded: GaLore+'s entries by rows, a quantized basis's codes and scales as chunks)."""
    experts = {"layers.0.mlp.experts.gate_up_proj": (6, 64, 32)}
    dense = {"layers.0.self_attn.q_proj.weight": (64, 48), "layers.0.norm.weight": (64,)}
    kw: dict[str, Any] = {"rank": 8, "state_dtype": "fp32", "target_modules": ["mlp", "self_attn"]}
    plus = lro.plan_memory(experts, "galore_plus", **kw)
    assert plus.state["projector bases"] == 6 * 32 * 8 * 4  # each expert's 32 x 8 basis, counted as a basis
    # 6 experts on 4 ranks: chunks 2, 2, 2, 0, so the fullest rank holds 2 / 6 of the stack (not 1 / 4); the dense
    # matrix and the norm (first axes of 64) divide by 4
    dense_plus = lro.plan_memory(dense, "galore_plus", **kw)
    plus4 = lro.plan_memory({**experts, **dense}, "galore_plus", shards=4, **kw)
    stack_plus = lro.plan_memory(experts, "galore_plus", **kw)
    assert stack_plus.state["projector bases"] > 0
    assert all(plus4.state[k] == -(-(4 * stack_plus.state[k] + 3 * v) // 12)  # ceil(stack / 3 + dense / 4)
               for k, v in dense_plus.state.items())
    adam4 = lro.plan_memory({**experts, **dense}, "galore_adamw", shards=4, **kw)
    # GaLore fp32, r = 8: an expert 64 x 32 (right side) holds a 32 x 8 basis and two 64 x 8 moments; q_proj 64 x 48
    # a 48 x 8 basis and two 64 x 8 moments; the norm two moments of 64
    assert adam4.state == {"projector bases": 2 * 32 * 8 * 4 + 48 * 8 * 4 // 4,
                           "low-rank moments": 2 * 2 * 64 * 8 * 4 + 2 * 64 * 8 * 4 // 4,
                           "plain moments (embeddings, head, norms, ...)": 2 * 64 * 4 // 4}
    int8 = lro.plan_memory(dense, "galore_adamw", basis_dtype="int8", **kw)
    int8_4 = lro.plan_memory(dense, "galore_adamw", basis_dtype="int8", shards=4, **kw)
    assert all(int8_4.state[k] == -(-v // 4) for k, v in int8.state.items())
    assert int8.state["projector bases"] == 48 * 8 + 4 * 8  # q_proj (64, 48): right side, int8 codes + one scale row
