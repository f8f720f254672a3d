"""FSDP2 (``fully_shard``, DTensor ``Shard(0)``) on CPU with gloo: k ranks equal one process on the same batches.

Workers live in ``fsdp2_worker.py``. Three launches (2, 3 and 4 ranks), each running many cases and bounded
in time; the single-process references run here. What is checked:

* every preset equals one process (fp32: ``||W_k - W_1|| / ||W_1|| <= 1e-5`` per parameter after 30 steps,
  refreshes at 10 and 20) on identical gradients, and the continuous ones also through a real
  ``fully_shard`` model's reduce-scattered gradients; bf16 and 8-bit stores (rounded per element / per
  block of a rank's own chunk) within the difference that store makes in one process;
* uneven shards and a rank holding no rows (3 and 4 ranks);
* state bytes per rank divide by the world size; refreshes are computed once per job;
* quantized projector bases (bf16, int8, int4) run sharded: each stored tensor (codes, scales, int4 bytes) as chunks
  of its own first axis, the first refresh's codes bit-identical to one process's, rank 0's bytes a closed form;
* a first gradient of zeros (the subspace is chosen at the first nonzero one, as in one process);
* GaLore+ (``rsvd_heads`` and the sparse residual) in the sharded mode: parity in every store, with head-shared
  bases and with 8-bit residual moments (``+dense``); its entries split by rows (closed-form bytes per rank, the
  job's total one process's); the entry choice through the collectives equals one process's on tied scores;
* DCP: same-size resume bit-exact (every store, 8-bit included; FRUGAL, GUM, APOLLO, GaLore+; quantized bases),
  2 -> 4 and 2 -> 1 within 1e-6 (bf16: 1e-4, 8-bit requantized: 1e-2), a gathered full optimizer state dict loads
  into a single-process optimizer and continues like the uninterrupted run.
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

import lowrank_optim as lro
from lowrank_optim.distributed.shards import chunk

sys.path.insert(0, os.path.dirname(__file__))
import fsdp2_worker as worker
from helpers import launch_ranks

TIMEOUT_S = 300
CORE = ("galore_adamw", "fira", "flora")
#: Further presets whose state is sharded (APOLLO's residual on a seeded basis; FRUGAL's row-local blocks; DCT-AdamW's
#: indices with owner-computed selections and a row-local ``match`` transfer; OSD's basis and its Adam moments as
#: row chunks, stepped on the owner; COAP's correction on the owner with the first moment gathered).
SHARDED_MORE = ("apollo", "apollo_mini", "frugal", "dct_adamw", "online_subspace_descent", "coap")
#: Presets whose update is continuous in the gradient (no sign / top-k / random layer draw of it): they also
#: run through a real model, whose reduce-scattered gradients differ from one process's in the last bits.
CONTINUOUS = ("galore_adamw", "fira", "flora", "galore_adafactor")
#: Low-rank matrices of ``worker.Net`` (init + two refreshes each in 30 steps).
N_LOWRANK = 4

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def launch(world: int, jobs: list[tuple[str, list[Any]]], out: Path) -> dict[str, Any]:
    return launch_ranks(worker.main, world, jobs, out, TIMEOUT_S)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


_REFS: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}


def reference(name: str, store: str, source: str) -> dict[str, torch.Tensor]:
    key = (name, store, source)
    if key not in _REFS:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _REFS[key] = worker.single(name, store, source)
        finally:
            torch.set_num_threads(threads)
    return _REFS[key]


def worst(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    return max((_rel(got[n], r), n) for n, r in ref.items())


def check_parity(result: dict[str, Any], world: int) -> list[str]:
    """Failures of k ranks vs one process (fp32: 1e-5; other stores: within what the store itself changes)."""
    failures = []
    for key, got in result.items():
        name, store, source = key.split("/")
        ref = reference(name, store, source)
        rel, pname = worst(got["params"], ref)
        # quantized bases (sharded): the codes are one process's bit for bit on the same gradient
        # (test_quantized_bases_sharded); a later refresh sees a W that differs in the last bits (sums in another
        # order), which can flip a code at a rounding boundary: 2 of 4160 int8 codes at step 20, measured 4.6e-6
        bound = 1e-5
        if store == "bf16":  # stochastic rounding keyed by the element's index in the whole moment: k ranks round
            # as one process does, up to flips by the last-bit differences of the reductions (measured <= 3.3e-5,
            # where bf16 itself moves the run 4.3e-3)
            bound = 1e-4
        elif store != "fp32":  # the k-rank run quantizes in its chunks' own 8-bit blocks: other noise, so the
            # bound is a small multiple of what the store changes in one process
            bound = max(bound, 3 * worst(ref, reference(name, "fp32", source))[0])
        if not rel <= bound:
            failures.append(f"{world} ranks {key} {pname}: relative difference {rel:.2e} > {bound:.2e}")
        if name.startswith("galore_plus") and set(got["modes"].values()) != {"sharded"}:  # GaLore+ is sharded now
            failures.append(f"{world} ranks {key}: modes {got['modes']}")
    return failures


def _cases(names: tuple[str, ...] | list[str], stores: tuple[str, ...], source: str) -> list[tuple[str, str, str]]:
    return [(n, s, source) for n in names for s in stores]


#: Quantized projector bases, sharded: ``+reverse`` projects the larger side (bases of 520 rows: three int8 blocks of
#: 256 rows, the first straddling the 2-rank split; int4 bytes of two rows), the plain names the smaller one (24 and 2
#: rows, one block: its scales on rank 0 only).
QUANTIZED = ("galore_adamw+basis_bf16", "galore_adamw+basis_int8", "galore_adamw+reverse+basis_int8",
             "galore_adamw+reverse+basis_int4", "fira+basis_int8", "gum+basis_int8", "coap+basis_int8")
#: The other presets in the low-precision stores (GUM's are in ``tests/test_fsdp2_gum.py``): every preset x store.
OTHER_STORES = ("apollo", "apollo_mini", "coap", "dct_adamw", "frugal", "galore_adafactor", "online_subspace_descent")
PARITY_2 = (_cases([*lro.available_optimizers(), "galore_adafactor+relative", *QUANTIZED, "galore_adamw+stagger",
                    "fira+stagger"], ("fp32",), "synthetic")
            + _cases(CORE, ("bf16", "8bit"), "synthetic")
            + _cases(OTHER_STORES, ("bf16", "8bit"), "synthetic")
            + _cases(("galore_plus",), ("bf16", "8bit"), "synthetic") + _cases(("galore_plus+dense",), ("8bit",),
                                                                                 "synthetic")
            + _cases(("galore_plus+heads",), ("fp32",), "synthetic")
            + _cases(CONTINUOUS, ("fp32",), "model")
            + _cases(("galore_adamw", "fira"), ("fp32",), "zerofirst"))
#: Sharded presets in every store; presets whose state changes shape (FRUGAL's blocks, GUM's full-rank draw) or
#: gains a key after the first step (APOLLO's limiter norm); quantized bases (int8 blocks straddling the ranks' chunks,
#: int4 bytes; GUM's int8 basis through its whole-state form).
CHECKPOINT = (_cases(CORE, ("fp32",), "synthetic") + _cases(("galore_adamw",), ("bf16", "8bit"), "synthetic")
              + _cases(("frugal",), ("fp32", "8bit"), "synthetic")
              + [("gum", "bf16", "synthetic"), ("apollo", "fp32", "synthetic"),
                 ("online_subspace_descent", "fp32", "synthetic"), ("dct_adamw", "8bit", "synthetic"),
                 ("coap", "fp32", "synthetic"), ("galore_plus", "fp32", "synthetic"),
                 ("galore_plus+dense", "8bit", "synthetic")]
              + _cases(("galore_adamw+reverse+basis_int8", "galore_adamw+reverse+basis_int4", "gum+basis_int8"),
                       ("fp32",), "synthetic"))


#: Every preset checkpointed late (after every warm-up, draw and the second refresh); GaLore+, whose state swaps
#: its warm-up score for indices and moments, in every store.
LATE = (_cases(lro.available_optimizers(), ("fp32",), "synthetic") + _cases(("galore_plus",), ("bf16", "8bit"),
                                                                             "synthetic")
        + _cases(("galore_plus+dense",), ("8bit",), "synthetic"))
#: GaLore+'s entry choice through the collectives, ``(m, n, k, levels, seed)``: all scores tied (k of 10, a 2-row
#: matrix: an empty rank from 3 ranks on), few levels, every entry, and the worker's (520, 24) at density 0.01.
SELECT = [(2, 5, 3, 1, 0), (9, 7, 20, 3, 1), (3, 4, 12, 2, 3), (520, 24, 124, 4, 2)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("fsdp2")
    jobs = [("parity", PARITY_2), ("checkpoint_save", CHECKPOINT), ("checkpoint_late", LATE), ("accelerate", []),
            ("select", SELECT)]
    return launch(2, jobs, out), out


def test_two_ranks_equal_one_process(two_ranks: tuple[dict[str, Any], Path]) -> None:
    result = two_ranks[0]["parity"]
    assert sorted(result) == sorted("/".join(c) for c in PARITY_2)
    failures = check_parity(result, 2)
    assert not failures, "\n".join(failures)


def test_sharded_refresh_runs_once_per_job(two_ranks: tuple[dict[str, Any], Path]) -> None:
    """Each matrix's SVD (init + 2 refreshes) is computed once across both ranks, for the sharded presets
    (owner rank) and for the replicated ones (engine refreshes run on the owner and are broadcast)."""
    result = two_ranks[0]["parity"]
    for name in ("galore_adamw", "fira", "galore_adafactor", "dct_adamw", "online_subspace_descent", "coap", "gum",
                 "galore_plus", "galore_plus+heads"):
        calls = result[f"{name}/fp32/synthetic"]["calls"]
        assert (calls["init"], calls["update"], calls["engine"]) == (N_LOWRANK, 2 * N_LOWRANK, 0), (name, calls)
    # every preset: 3 refreshes per matrix in the job; the projectors whose state is ints or a seeded draw (Flora's
    # and APOLLO's random bases, FRUGAL's blocks) compute them on every rank, without traffic
    seeded = ("flora", "apollo", "apollo_mini", "frugal")
    for name in lro.available_optimizers():
        calls = result[f"{name}/fp32/synthetic"]["calls"]
        assert sum(calls.values()) == 3 * N_LOWRANK * (2 if name in seeded else 1), (name, calls)


def test_state_bytes_divide(two_ranks: tuple[dict[str, Any], Path]) -> None:
    """Per-rank state of the sharded presets is about half of the job's total (bases included), and the job's
    total equals one process's state bytes up to the few replicated vectors (Adafactor's column statistics)."""
    result = two_ranks[0]["parity"]
    for name in (*CORE, *SHARDED_MORE):
        got = result[f"{name}/fp32/synthetic"]
        model = worker.make_model()
        opt = worker.build(name, model, "fp32")
        worker.train(model, opt, range(1), source="synthetic")
        single = opt.state_bytes()
        assert got["global_bytes"] <= 1.02 * single, (name, got, single)
        assert got["bytes"] <= 0.52 * single, (name, got, single)


def _galore_bytes(name: str, world: int, rank: int = 0) -> int:
    """Closed form of the state bytes rank ``rank`` of ``world`` holds for a ``galore_adamw+[reverse+]basis_<dtype>``
    case (fp32 store) of ``worker.Net``: every tensor is this rank's chunk (torch's chunk rule) of its own first
    axis (moments ``(m, r)`` / ``(r, n)`` by the split axis of the low-rank gradient; int8 codes ``(d, r)``, int4
    bytes ``(ceil(d / 2), r)``, scales ``(ceil(d / 256), r)``; plain Adam moments ``(rows, ...)``)."""
    from lowrank_optim.distributed.shards import chunk
    from lowrank_optim.projectors.base import LEFT, choose_side

    form = name.rpartition("+basis_")[2]
    rule = "reverse_std" if "+reverse" in name else "std"
    total = 0
    for pname, p in worker.make_model().named_parameters():
        shape = tuple(int(s) for s in p.shape)
        if p.dim() != 2 or not any(t in pname.split(".")[0] for t in ("attn", "mlp")):
            total += 2 * 4 * chunk(shape[0], world, rank)[1] * math.prod(shape[1:])  # Adam's two moments
            continue
        (m, n), r = shape, min(worker.RANK, *shape)
        left = choose_side(shape, rule) == LEFT
        total += 2 * 4 * r * (chunk(n, world, rank)[1] if left else chunk(m, world, rank)[1])
        d = m if left else n
        if form == "bf16":
            total += 2 * r * chunk(d, world, rank)[1]
            continue
        codes = d if form == "int8" else -(-d // 2)
        total += r * chunk(codes, world, rank)[1] + 4 * r * chunk(-(-d // 256), world, rank)[1]
    return total


def test_quantized_bases_sharded(two_ranks: tuple[dict[str, Any], Path]) -> None:
    """Quantized projector bases (bf16, int8, int4) run in the sharded mode: every projected matrix's ``mode`` is
    ``"sharded"``; the codes and scales of the first refresh, gathered from the ranks' chunks, are one process's bit
    for bit (same dtypes); rank 0's state bytes are the closed form of its chunks (:func:`_galore_bytes`, which
    gives one process's ``state_bytes()`` at one rank), at most 0.52 of one process's, and the memory planner
    (``basis_dtype``, ``shards=2``) is within 10% of them."""
    from lowrank_optim.distributed.fsdp import mode

    result = two_ranks[0]["parity"]
    shapes = {n: tuple(p.shape) for n, p in worker.make_model().named_parameters()}
    for name in QUANTIZED:
        got = result[f"{name}/fp32/synthetic"]
        model = worker.make_model()
        opt = worker.build(name, model, "fp32")
        lowrank = [(g, p) for g in opt.param_groups if g.get("rank") for p in g["params"]]
        assert len(lowrank) == N_LOWRANK and all(mode(opt, g, p) == "sharded" for g, p in lowrank), name
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the ranks run (and reference()): the SVD's sums in the same order
        try:
            worker.train(model, opt, range(1), source="synthetic")
        finally:
            torch.set_num_threads(threads)
        one = worker.whole_bases(model, opt)
        assert sorted(got["bases"]) == sorted(one) and len(one) == N_LOWRANK, name
        for pname, ref in one.items():
            assert ref["basis"].dtype != torch.float32, (name, pname)
            for key, t in ref.items():
                assert got["bases"][pname][key].dtype == t.dtype, (name, pname, key)
                assert torch.equal(got["bases"][pname][key], t), (name, pname, key)
        if not name.startswith("galore_adamw"):
            continue
        single = opt.state_bytes()
        assert single == _galore_bytes(name, 1), (name, single)
        assert got["bytes"] == _galore_bytes(name, 2), (name, got["bytes"])
        assert got["global_bytes"] == _galore_bytes(name, 2, 0) + _galore_bytes(name, 2, 1), name
        assert got["bytes"] <= 0.52 * single, (name, got["bytes"], single)
        extra = {"proj_side": "reverse_std"} if "+reverse" in name else {}
        plan = lro.plan_memory(shapes, "galore_adamw", rank=worker.RANK, state_dtype="fp32", weight_dtype="fp32",
                               target_modules=["attn", "mlp"], shards=2, basis_dtype=name.rpartition("_")[2],
                               **extra)
        assert abs(plan.state_total - got["bytes"]) <= 0.1 * got["bytes"], (name, plan.state, got["bytes"])


def galore_plus_bytes(entries: dict[str, list[int]], world: int, rank: int) -> int:
    """Closed-form fp32 state bytes of GaLore+ on ``rank`` of ``world`` for ``worker.Net`` (rank ``r = min(8, m,
    n)``): a right-side matrix (``m >= n``) holds ``2 m_i r`` moments and ``n_i r`` of its basis, a left-side one
    ``2 r n_i`` and ``m_i r``, both 12 bytes per residual entry in its rows (int32 index, two fp32 moments:
    ``entries[name][rank]``); a plain parameter its rows' two Adam moments (``x_i``: this rank's chunk of ``x``)."""
    def part(length: int) -> int:
        return chunk(length, world, rank)[1]

    total = 0
    for name, p in worker.make_model().named_parameters():
        if name in ("attn.weight", "mlp.weight", "mlp_sq.weight", "attn_tiny.weight"):
            m, n = p.shape
            r = min(worker.RANK, m, n)
            low = 2 * part(m) * r + part(n) * r if m >= n else 2 * r * part(n) + part(m) * r
            total += 4 * low + 12 * entries.get(name, [0] * world)[rank]
        else:
            total += 2 * 4 * part(p.shape[0]) * (p.numel() // p.shape[0])
    return total


def test_galore_plus_state_bytes_closed_form(two_ranks: tuple[dict[str, Any], Path]) -> None:
    """GaLore+ (fp32, 30 steps, entries chosen at step 2): every matrix's ``floor(0.01 m n)`` entries are split over
    the ranks by rows (sum = one process's count); rank 0 holds exactly the closed form, and the job's total is one
    process's state bytes exactly (same moments, bases and entries, only divided)."""
    from lowrank_optim.rules.sparse_residual import residual_count

    got = two_ranks[0]["parity"]["galore_plus/fp32/synthetic"]
    shapes = {n: tuple(p.shape) for n, p in worker.make_model().named_parameters()}
    assert sorted(got["entries"]) == ["attn.weight", "mlp.weight", "mlp_sq.weight"]  # attn_tiny: 0.01 * 48 < 1
    for name, counts in got["entries"].items():
        assert sum(counts) == residual_count(0.01, shapes[name]), (name, counts)
    assert got["bytes"] == galore_plus_bytes(got["entries"], 2, 0)
    model = worker.make_model()
    opt = worker.build("galore_plus", model, "fp32")
    worker.train(model, opt, range(worker.STEPS), source="synthetic")
    assert got["global_bytes"] == opt.state_bytes()
    assert got["bytes"] <= 0.52 * opt.state_bytes()


def test_select_entries_collective(two_ranks: tuple[dict[str, Any], Path]) -> None:
    """GaLore+'s entry choice through gloo at 2 ranks equals one process's on scores full of ties (module
    ``tests/test_sparse_select.py``: the rule), each rank's ``first`` its place in the whole sorted list."""
    check_select(two_ranks[0]["select"], 2)


def check_select(result: dict[str, Any], world: int) -> None:
    from lowrank_optim.distributed.sparse import select_entries

    assert sorted(result) == sorted("/".join(map(str, c)) for c in SELECT)
    for key, got in result.items():
        m, n, k, levels, seed = (int(v) for v in key.split("/"))
        score = torch.randint(levels, (m, n), generator=torch.Generator().manual_seed(seed)).float()
        want = select_entries(score, k)[0].tolist()
        assert got["idx"] == want, (world, key)
        sizes = [sum(1 for i in want if chunk(m, world, r)[0] * n <= i < sum(chunk(m, world, r)) * n)
                 for r in range(world)]
        assert got["first"] == [sum(sizes[:r]) for r in range(world)], (world, key, got["first"])


def _exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[n], b[n]) for n in b)


def test_checkpoint_same_size_resume(two_ranks: tuple[dict[str, Any], Path]) -> None:
    """DCP save at step 15 and load into a fresh model and optimizer on 2 ranks: bit-exact for every store, 8-bit
    included (codes saved as they are, with their block scales), for the replicated presets whose state
    changes shape or keys (FRUGAL, GUM, APOLLO), and for quantized projector bases (int8 and int4 codes and their
    scales, each ``Shard(0)`` of its own shape)."""
    result = two_ranks[0]["checkpoint_save"]
    assert sorted(result) == sorted("/".join(c) for c in CHECKPOINT)
    for key, got in result.items():
        rel, pname = worst(got["resumed"], got["uninterrupted"])
        assert _exact(got["resumed"], got["uninterrupted"]), (key, pname, rel)


def test_checkpoint_late_resume_every_preset(two_ranks: tuple[dict[str, Any], Path]) -> None:
    """DCP save at step 25 (GaLore+'s residual entries chosen, FRUGAL's and GUM's draws made, two refreshes
    done), ``dcp.load`` into a fresh optimizer's template on 2 ranks: every preset resumes bit-exactly (the state
    skeleton a fresh optimizer exports matches a late one's)."""
    result = two_ranks[0]["checkpoint_late"]
    assert sorted(result) == sorted("/".join(c) for c in LATE)
    for key, got in result.items():
        rel, pname = worst(got["resumed"], got["uninterrupted"])
        assert _exact(got["resumed"], got["uninterrupted"]), (key, pname, rel)


def _dcp_one_process(name: str, save_at: int, steps: int, tmp: Path, **extra: Any) -> tuple[Any, Any]:
    """One process (no process group): ``save_at`` steps, a DCP save, ``steps`` more; a fresh model and optimizer
    loaded from the checkpoint (raises what the load raises), continued ``steps``."""
    model = worker.make_model()
    opt = worker.build(name, model, "fp32", **extra)
    worker.train(model, opt, range(save_at), source="synthetic")
    worker._dcp_save(model, opt, str(tmp))
    worker.train(model, opt, range(save_at, save_at + steps), source="synthetic")
    model2 = worker.make_model()
    opt2 = worker.build(name, model2, "fp32", **extra)
    worker.dcp_load(model2, opt2, str(tmp))
    worker.train(model2, opt2, range(save_at, save_at + steps), source="synthetic")
    return worker.whole(model), worker.whole(model2)


def test_sparse_residual_checkpoint_phases(tmp_path: Path) -> None:
    """GaLore+'s exported state has one skeleton in every phase: DCP after the warm-up resumes bit-exactly in one
    process; a checkpoint taken during the warm-up (a nonzero score a fresh skeleton cannot hold) is refused by
    name on load, and the same state through ``torch.save`` of ``state_dict()`` resumes bit-exactly."""
    import helpers

    a, b = _dcp_one_process("galore_plus", 3, 2, tmp_path / "late", residual_warmup=2)
    assert _exact(b, a)
    with pytest.raises(ValueError, match="warm-up"):
        _dcp_one_process("galore_plus", 1, 1, tmp_path / "warm", residual_warmup=2)
    model = worker.make_model()
    opt = worker.build("galore_plus", model, "fp32", residual_warmup=2)
    worker.train(model, opt, range(1), source="synthetic")
    assert any("residual_score" in st for st in opt.state.values())

    def make(m: torch.nn.Module) -> torch.optim.Optimizer:
        return worker.build("galore_plus", m, "fp32", residual_warmup=2)

    model2, opt2 = helpers.resume_copy(model, opt, make)
    for m, o in ((model, opt), (model2, opt2)):
        worker.train(m, o, range(1, 4), source="synthetic")
    assert _exact(worker.whole(model2), worker.whole(model))
    helpers.assert_same_state(opt, opt2)


def _single_resume(name: str, store: str, source: str, load: Any) -> dict[str, torch.Tensor]:
    model = worker.make_model()
    opt = worker.build(name, model, store)
    load(model, opt)
    worker.train(model, opt, range(worker.SAVE_AT, worker.STEPS), source=source)
    return worker.whole(model)


def test_checkpoint_two_ranks_to_one_process(two_ranks: tuple[dict[str, Any], Path]) -> None:
    """The 2-rank DCP checkpoint (strict load: the template's keys and shapes match the checkpoint's), and the
    gathered full state dicts, load into one plain process and continue within 1e-6 of the uninterrupted 2-rank
    run (quantized bases too: codes and scales arrive as saved; measured <= 4.0e-7) (bf16: 1e-4, rounding keyed by
    the global element index; 8-bit: requantized in one process's blocks, 1e-2).
    A sharded 8-bit checkpoint (one scale per code) goes into a plain template (one ``absmax`` per block) through
    ``lro.distributed.LoadPlanner``; torch's default planner refuses the pair by size."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    for key, got in two_ranks[0]["checkpoint_save"].items():
        name, store, source = key.split("/")
        bound = {"8bit": 1e-2, "bf16": 1e-4}.get(store, 1e-6)
        for planner in (None, lro.distributed.LoadPlanner()):
            def load(m: torch.nn.Module, o: torch.optim.Optimizer, p: str = got["path"], pl: Any = planner) -> None:
                worker.dcp_load(m, o, p, pl)

            if store == "8bit" and planner is None:
                with pytest.raises(CheckpointException, match=r"Size mismatch.*_absmax"):
                    _single_resume(name, store, source, load)
                continue
            resumed = _single_resume(name, store, source, load)
            rel, pname = worst(resumed, got["uninterrupted"])
            assert rel <= bound, (key, "dcp 2 -> 1", planner, pname, rel)

        def full(m: torch.nn.Module, o: torch.optim.Optimizer, g: dict[str, Any] = got) -> None:
            m.load_state_dict(g["full_model"])
            set_optimizer_state_dict(m, o, g["full_optim"])

        resumed = _single_resume(name, store, source, full)
        rel, pname = worst(resumed, got["uninterrupted"])
        assert rel <= bound, (key, "full state dict", pname, rel)


@pytest.mark.slow
def test_four_ranks(two_ranks: tuple[dict[str, Any], Path]) -> None:
    """4 ranks (two of them hold no row of the 2-row matrix): the 2-rank checkpoint resharded to 4 continues
    within 1e-6 (quantized bases too); parity with one process; per-rank state <= 0.30 of one process's for GaLore,
    Fira, Flora, APOLLO, FRUGAL, DCT-AdamW, Online Subspace Descent, COAP, GaLore with int8 bases (the closed form of
    rank 0's chunks) and GaLore+ (rank 0 holds its closed form); the memory planner's ``shards=4`` agrees within 10%
    for GaLore, Fira, Flora, GaLore+ and the int8 bases."""
    saved, out = two_ranks
    cases = _cases((*CORE, "apollo", "frugal", "dct_adamw", "online_subspace_descent", "coap", "galore_plus",
                    "galore_adamw+reverse+basis_int8"), ("fp32",), "synthetic")
    result = launch(4, [("checkpoint_load", CHECKPOINT), ("parity", cases)], out)
    for key, got in result["checkpoint_load"].items():
        # fp32: the 1e-6, quantized bases included (their codes and scales move as bytes: measured 4.0e-7
        # for GUM's int8, 5.2e-8 for GaLore's int8 and int4). bf16's stochastic rounding is keyed by each element's
        # index in the whole moment, so 4 ranks round as 2 do: only the last-bit differences of the reductions
        # (sums in another order) can flip a rounding (measured 8e-6). 8-bit codes are requantized in the 4 ranks'
        # own blocks: within what the 8-bit store itself changes in one process (DCT-AdamW: 1.9e-2; resumed 1.2e-2).
        name, store, source = key.split("/")
        bound = {"bf16": 1e-4}.get(store, 1e-6)
        if store == "8bit":
            bound = max(1e-2, worst(reference(name, "8bit", source), reference(name, "fp32", source))[0])
        rel, pname = worst(got["resumed"], saved["checkpoint_save"][key]["uninterrupted"])
        assert rel <= bound, (key, "dcp 2 -> 4", pname, rel)
    failures = check_parity(result["parity"], 4)
    assert not failures, "\n".join(failures)
    shapes = {n: tuple(p.shape) for n, p in worker.make_model().named_parameters()}
    for name in (*CORE, "apollo", "frugal", "dct_adamw", "online_subspace_descent", "coap", "galore_plus"):
        got = result["parity"][f"{name}/fp32/synthetic"]
        single = saved["parity"][f"{name}/fp32/synthetic"]["global_bytes"]
        assert got["bytes"] <= 0.30 * single, (name, got["bytes"], single)
        if name == "galore_plus":  # rank 0's closed form; the job's total is one process's (as at 2 ranks)
            assert got["bytes"] == galore_plus_bytes(got["entries"], 4, 0) and got["global_bytes"] == single
        if name not in (*CORE, "galore_plus"):
            continue
        # the planner's closed form per rank agrees with rank 0's measured bytes (chunks here are nearly even; GaLore+:
        # its steady state, after the warm-up score is freed)
        plan = lro.plan_memory(shapes, name, rank=worker.RANK, state_dtype="fp32", weight_dtype="fp32",
                               target_modules=["attn", "mlp"], shards=4)
        planned = plan.state_total if plan.state_steady is None else plan.state_steady
        assert abs(planned - got["bytes"]) <= 0.1 * got["bytes"], (name, plan.state, planned, got["bytes"])
    name = "galore_adamw+reverse+basis_int8"  # int8 bases of 520 rows: codes 130 rows per rank, scales 1 / 1 / 1 / 0
    got = result["parity"][f"{name}/fp32/synthetic"]["bytes"]
    assert got == _galore_bytes(name, 4) <= 0.30 * saved["parity"][f"{name}/fp32/synthetic"]["global_bytes"]
    plan = lro.plan_memory(shapes, "galore_adamw", rank=worker.RANK, state_dtype="fp32", weight_dtype="fp32",
                           target_modules=["attn", "mlp"], shards=4, basis_dtype="int8", proj_side="reverse_std")
    assert abs(plan.state_total - got) <= 0.1 * got, (plan.state, got)


@pytest.mark.slow
def test_three_ranks_uneven_shards(tmp_path: Path) -> None:
    """3 ranks: 520, 24 and 2 rows split unevenly (the 2-row matrix leaves rank 2 empty), every preset (GaLore+
    sharded, also with head-shared bases); quantized bases (bf16, int8 and int4 with 520-row bases: 174 / 174 / 172
    rows, int4 bytes 87 / 87 / 86, int8 scales 1 / 1 / 1 rows) with rank 0's bytes the closed form of its chunks;
    GaLore+'s entry choice through the collectives with an empty rank."""
    quantized = ("galore_adamw+basis_bf16", "galore_adamw+reverse+basis_int8", "galore_adamw+reverse+basis_int4")
    cases = (_cases(tuple(lro.available_optimizers()), ("fp32",), "synthetic")
             + _cases(("galore_adamw",), ("fp32",), "model") + _cases(("galore_plus+heads",), ("fp32",), "synthetic")
             + _cases(quantized, ("fp32",), "synthetic"))
    result = launch(3, [("parity", cases), ("select", SELECT)], tmp_path)
    failures = check_parity(result["parity"], 3)
    assert not failures, "\n".join(failures)
    check_select(result["select"], 3)
    for name in quantized:
        assert result["parity"][f"{name}/fp32/synthetic"]["bytes"] == _galore_bytes(name, 3), name


def test_planner_shards() -> None:
    """``shards=K`` divides weights, gradients and the state of sharded presets by K (GaLore+ and quantized bases
    included); layer-wise updates are refused under FSDP2."""
    from lowrank_optim.projectors.quantized_basis import basis_bytes

    one = lro.plan_memory("llama-60m", "galore_adamw", rank=128, state_dtype="8bit")
    eight = lro.plan_memory("llama-60m", "galore_adamw", rank=128, state_dtype="8bit", shards=8)
    assert eight.weights == -(-one.weights // 8) and eight.gradients == -(-one.gradients // 8)
    assert all(eight.state[k] == -(-v // 8) for k, v in one.state.items())
    for name in ("apollo", "frugal", "dct_adamw", "online_subspace_descent", "coap", "galore_plus"):  # sharded too
        one = lro.plan_memory("llama-60m", name, rank=128, state_dtype="8bit")
        eight = lro.plan_memory("llama-60m", name, rank=128, state_dtype="8bit", shards=8)
        assert all(eight.state[k] == -(-v // 8) for k, v in one.state.items()), name
    shapes = {"layers.0.self_attn.q_proj.weight": (640, 600), "layers.0.mlp.down_proj.weight": (600, 1000),
              "layers.0.norm.weight": (600,)}
    for basis in ("int8", "int4"):  # quantized bases (d = 600: three blocks): codes and scales chunked like fp32
        one = lro.plan_memory(shapes, "galore_adamw", rank=128, state_dtype="8bit", basis_dtype=basis)
        eight = lro.plan_memory(shapes, "galore_adamw", rank=128, state_dtype="8bit", basis_dtype=basis, shards=8)
        assert one.state["projector bases"] == 2 * basis_bytes(600, 128, basis), basis
        assert all(eight.state[k] == -(-v // 8) for k, v in one.state.items()), basis
    one = lro.plan_memory("llama-60m", "galore_plus", rank=128, state_dtype="8bit")  # the warm-up score: row chunks
    eight = lro.plan_memory("llama-60m", "galore_plus", rank=128, state_dtype="8bit", shards=8)
    assert one.state_peak > one.state_steady and eight.state_peak == -(-one.state_peak // 8)
    assert eight.state_steady == -(-one.state_steady // 8)
    with pytest.raises(ValueError, match="shards"):
        lro.plan_memory("llama-60m", "galore_adamw", rank=128, layerwise=True, shards=2)
    with pytest.raises(ValueError, match="shards"):
        lro.plan_memory("llama-60m", "galore_adamw", rank=128, shards=0)


def test_accelerate_fsdp2_plugin(two_ranks: tuple[dict[str, Any], Path]) -> None:
    """accelerate (``FullyShardedDataParallelPlugin(fsdp_version=2)``) shards the model and hands the optimizer
    DTensors; 6 steps (a refresh at 3) equal one process on the same global batches."""
    got = two_ranks[0]["accelerate"]
    assert got["sharded"]
    model = worker.accelerate_net()
    opt = worker.accelerate_opt(model)
    worker.accelerate_train(model, opt, lambda loss: loss.backward(), 0, 1)
    rel, pname = worst(got["params"], worker.whole(model))
    assert rel <= 1e-5, (pname, rel)


@pytest.mark.parametrize("store", ["bf16", "8bit"])
@pytest.mark.parametrize("dim", [0, 1])
def test_shard_rounds_like_the_whole_moment(store: str, dim: int) -> None:
    """A rank's chunk of a moment, saved through its ``ShardStore``, gets the stochastic rounding bits of the same
    elements in the whole moment (keyed by the global index): bf16 chunks are bit-identical to the whole
    moment's rows (dim 0) or columns (dim 1); 8-bit chunks whose blocks coincide with the whole's blocks (rows of
    64 elements, 8 rows from row 8: blocks 2 and 3) have the whole's codes and absmax."""
    from lowrank_optim.distributed.fsdp import ShardStore
    from lowrank_optim.distributed.shards import Split
    from lowrank_optim.state import StateStore

    whole_shape = (32, 64) if dim == 0 else (64, 32)
    value = torch.randn(whole_shape, generator=torch.Generator().manual_seed(3))
    base = StateStore(store, min_8bit_size=1)
    full: dict[str, Any] = {"round_seed": 11, "step": 4}
    base.create(full, "exp_avg", whole_shape, torch.device("cpu"))
    base.save(full, "exp_avg", value)
    cut = [slice(None), slice(None)]
    cut[dim] = slice(8, 16)
    part = value[tuple(cut)].contiguous()
    st: dict[str, Any] = {"round_seed": 11, "step": 4}
    shard = ShardStore(base, value.numel(), Split(dim, 8, whole_shape))
    shard.create(st, "exp_avg", tuple(part.shape), torch.device("cpu"))
    shard.save(st, "exp_avg", part)
    if store == "bf16" or dim == 0:
        assert torch.equal(st["exp_avg"], full["exp_avg"][tuple(cut)])
    if store == "8bit" and dim == 0:
        assert torch.equal(st["exp_avg_absmax"], full["exp_avg_absmax"][2:4])
    unkeyed: dict[str, Any] = {"round_seed": 11, "step": 4}
    base.create(unkeyed, "exp_avg", tuple(part.shape), torch.device("cpu"))
    base.save(unkeyed, "exp_avg", part)  # keyed by the chunk's local index: other bits
    assert not torch.equal(unkeyed["exp_avg"], st["exp_avg"])


def test_8bit_scales_round_trip() -> None:
    """Per-code scales (the checkpoint form of 8-bit moments) give back the block absmax exactly in the blocks
    they were made in, and ``None`` (requantize) when a block mixes scales (another split)."""
    from lowrank_optim.distributed.checkpoint import block_absmax, element_scales

    codes = torch.zeros(10, 60, dtype=torch.uint8)  # 600 codes: blocks of 256, 256 and a ragged 88
    absmax = torch.tensor([0.5, 2.0, 3.0])
    scales = element_scales(absmax, codes)
    assert scales.shape == codes.shape and float(scales[4, 15]) == 0.5 and float(scales[4, 16]) == 2.0
    assert torch.equal(block_absmax(scales), absmax)
    assert block_absmax(scales[2:]) is None  # rows 2..9 start at code 120: the blocks straddle two scales
