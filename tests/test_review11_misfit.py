"""A checkpoint of another model is refused at load by name, for every preset and every kind of misfit (review 11).

``checkpoint.refuse_misfit_state`` compared tensor shapes only, so a state whose shapes happen to fit loaded and
stepped on the wrong values, or failed later: FRUGAL's moments are sized late (an inactive block's are empty), so
a (16, 32) matrix's checkpoint loaded into a (16, 40) one; a projector without a stored basis (APOLLO's and Flora's
seeded one: ``dim``; DCT-AdamW's columns: ``dim`` and ``indices`` of an unchanged shape) loaded into a matrix with
more or fewer rows; GUM's parameters were not checked at all, and the import unpacked a larger matrix's packed
moments as the new matrix's (it refused a buffer too small only). Now every int of a projector state that depends on
the matrix's shape is compared, index tensors are range-checked against the parameter's dims, GUM's projector state
is compared and its packed moments must have their exact size, and the check runs under DDP's ``divide_refresh``
too (it was skipped there), with no collective. A checkpoint of the same model still loads at every
phase (before the first step, after it, around refreshes), for matrices, expert stacks and conv weights, and
resumes bit-exactly.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist

import lowrank_optim as lro
from lowrank_optim.projectors import PROJECTORS

sys.path.insert(0, os.path.dirname(__file__))
from helpers import CASES, flat_state, launch_ranks, roundtrip

NAMES = lro.available_optimizers()
GAP = 3  # refreshes at steps 3 and 6
#: kind of misfit -> (shape saved, shape loaded into); the low-rank group also holds an (8, 12) matrix, so FRUGAL
#: (density 0.5) has one active and one inactive block in every period.
MISFITS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "taller": ((16, 32), (20, 32)),
    "shorter": ((16, 32), (12, 32)),
    "wider": ((16, 32), (16, 40)),
    "narrower": ((16, 32), (16, 24)),
    "more_experts": ((3, 16, 32), (4, 16, 32)),
    "experts_taller": ((3, 16, 32), (3, 20, 32)),
    "experts_wider": ((3, 16, 32), (3, 16, 40)),
    "conv_more_in": ((8, 4, 3, 3), (8, 5, 3, 3)),
    "conv_more_out": ((8, 4, 3, 3), (10, 4, 3, 3)),
}
#: Misfits the old check let through (it raised for every other pair): the holes this review closes.
HOLES = {
    ("apollo", "taller"), ("apollo", "shorter"), ("apollo_mini", "taller"), ("apollo_mini", "shorter"),
    ("flora", "taller"), ("flora", "shorter"), ("dct_adamw", "taller"), ("dct_adamw", "shorter"),
    ("apollo", "experts_taller"), ("apollo_mini", "experts_taller"), ("flora", "experts_taller"),
    ("dct_adamw", "experts_taller"), ("apollo", "conv_more_out"), ("apollo_mini", "conv_more_out"),
    ("flora", "conv_more_out"), ("dct_adamw", "conv_more_out"),
    *(("frugal", kind) for kind in MISFITS if kind != "more_experts"),
    ("gum", "more_experts"),
}
#: GUM's packed moments (a buffer of the size the matrix's widest moment takes, :mod:`.distributed.checkpoint`) of
#: another matrix that the import used to unpack: it refused a buffer smaller than the new matrix's moment only, so
#: a larger matrix's buffer was read as the new matrix's moment (the first bytes of another layout).
GUM_PACKED_HOLES = ("taller", "shorter", "wider", "narrower", "conv_more_in", "conv_more_out")


def _options(name: str) -> dict[str, Any]:
    return {**CASES.get(name, {}), "update_proj_gap": GAP}


def _make(name: str, shape: tuple[int, ...], seed: int = 0, **extra: Any
          ) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    """``[w (shape), v (8 x 12), b (5,)]``: ``w`` and ``v`` in the low-rank group (``w`` is parameter 0)."""
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(*shape))
    v, b = torch.nn.Parameter(torch.randn(8, 12)), torch.nn.Parameter(torch.randn(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a preset's own period changed to GAP (MethodDefaultWarning)
        opt = lro.create_optimizer(name, [{"params": [w, v], "rank": 4}, {"params": [b]}], **{**_options(name),
                                                                                              **extra})
    return [w, v, b], opt


def _train(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        w, v, b = params
        (w.sin().sum() + (v * v.roll(1, 1)).sum() + b.cos().sum()).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()


def _refused(name: str, loaded: tuple[int, ...], projector: str | None = None) -> str:
    """The error of a refused load: parameter 0, its shape, the state key and both values / shapes (the packed
    moments of GUM's projector are refused by their byte count at the import, before this check)."""
    shape = str(tuple(loaded)).replace("(", r"\(").replace(")", r"\)")
    named = (rf"Invalid state_dict: the state loaded for parameter 0 \(shape {shape}\) does not fit it \(state\[.*\]: "
             r"saved (shape )?\S.*, expected ")
    return rf"({named}|Invalid state_dict: packed moment )" if "gum" in (name, projector) else named


@pytest.mark.parametrize("kind", list(MISFITS))
@pytest.mark.parametrize("name", NAMES)
def test_other_models_checkpoint_refused(name: str, kind: str) -> None:
    """Saved after a refresh (step 4), loaded into a fresh optimizer of the misfit model: a ValueError naming
    parameter 0, its shape, the key and both values; the loading optimizer is left as it was (no state)."""
    saved_shape, loaded_shape = MISFITS[kind]
    src, opt = _make(name, saved_shape)
    _train(src, opt, 4)
    sd = roundtrip(opt.state_dict())
    params, other = _make(name, loaded_shape)
    with pytest.raises(ValueError, match=_refused(name, loaded_shape)):
        other.load_state_dict(sd)
    assert not other.state  # refused before anything reached it
    _train(params, other, 1)  # and it still steps


def _old_check(opt: torch.optim.Optimizer) -> str | None:
    """Review 10's check, verbatim: tensor shapes against a first step's on meta, GUM's projected parameters skipped
    (the first misfit found, else ``None``)."""
    from lowrank_optim.checkpoint import _first_step_state, _misfit
    from lowrank_optim.distributed.checkpoint import _variable

    index = 0
    for group in opt.param_groups:
        variable = opt._parts(group)[0] is not None and _variable(opt, group)
        for p in group["params"]:
            saved = opt.state.get(p)
            if saved and not (variable and opt._planner.kind(group, p)):
                found = _misfit(saved, _first_step_state(opt, group, p, index, tuple(p.shape)), "state")
                if found:
                    return found
            index += 1
    return None


def test_holes_are_the_old_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """:data:`HOLES` is exactly the set of (preset, misfit) pairs that review 10's check lets load after today's
    import (which refuses GUM's packed moments of another matrix first, :func:`test_gum_packed_moment_of_another_
    matrix_refused`)."""
    import lowrank_optim.engine as engine

    monkeypatch.setattr(engine, "refuse_misfit_state", lambda opt: None)
    holes = set()
    for name in NAMES:
        for kind, (saved_shape, loaded_shape) in MISFITS.items():
            src, opt = _make(name, saved_shape)
            _train(src, opt, 4)
            _, other = _make(name, loaded_shape)
            try:
                other.load_state_dict(roundtrip(opt.state_dict()))
            except ValueError:
                continue
            if _old_check(other) is None:
                holes.add((name, kind))
    assert holes == HOLES, (sorted(holes - HOLES), sorted(HOLES - holes))


@pytest.mark.parametrize("kind", GUM_PACKED_HOLES)
def test_gum_packed_moment_of_another_matrix_refused(kind: str) -> None:
    """A GUM checkpoint of another matrix whose packed buffer holds at least the bytes the new matrix's moment needs
    (what the import checked) is refused by its exact size now (review 10's check skipped GUM's parameters)."""
    saved_shape, loaded_shape = MISFITS[kind]
    src, opt = _make("gum", saved_shape)
    _train(src, opt, 4)
    _, other = _make("gum", loaded_shape)
    with pytest.raises(ValueError, match=r"Invalid state_dict: packed moment 'momentum_buffer' holds (\d+) bytes, a "
                                         r"moment of shape \(\d+, \d+\) for a \(\d+, \d+\) matrix needs (\d+) "
                                         r"\(packed in (\d+)\)") as err:
        other.load_state_dict(roundtrip(opt.state_dict()))
    held, need, size = (int(x) for x in re.search(r"holds (\d+) .* needs (\d+) \(packed in (\d+)\)",
                                                  str(err.value)).groups())
    assert held >= need and held != size, (held, need, size)  # enough bytes: only the exact size refuses it


@pytest.mark.parametrize("shape", [(16, 32), (32, 16), (3, 16, 32), (8, 4, 3, 3)],
                         ids=["matrix", "matrix_t", "experts", "conv"])
@pytest.mark.parametrize("name", NAMES)
def test_own_checkpoint_loads_and_resumes_bit_exactly(name: str, shape: tuple[int, ...]) -> None:
    """No false refusal: a checkpoint taken before the first step, after it, on a refresh step and after two
    refreshes loads (no warning) and the next 4 steps (another refresh among them) equal the uninterrupted run,
    weights and state bit for bit."""
    for steps in (0, 1, 3, 7):
        src, opt = _make(name, shape)
        _train(src, opt, steps)
        params, other = _make(name, shape, seed=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            other.load_state_dict(roundtrip(opt.state_dict()))
        for p, q in zip(src, params, strict=True):
            q.data.copy_(p.data)
        _train(src, opt, 4)
        _train(params, other, 4)
        for p, q in zip(src, params, strict=True):
            assert torch.equal(p, q), (name, shape, steps)
        a, b = flat_state(opt), flat_state(other)
        assert [k for k, _ in a] == [k for k, _ in b]
        for (k, x), (_, y) in zip(a, b, strict=True):
            assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y), (name, shape, steps, k)


#: Every projector on a preset that takes it: (preset, projector, projector_options); blocks and GUM's draw change
#: the moments' shape and need a reset transfer (their presets', or ``transfer="reset"``: GUM's draw under Adafactor's
#: two factored moments, each packed).
PROJECTOR_RUNS = [("galore_adamw", p, {}) for p in sorted(PROJECTORS) if p not in ("blocks", "gum", "rsvd_heads")] + [
    ("frugal", "blocks", {}), ("gum", "gum", {}), ("galore_adafactor", "gum", {}),
    ("galore_plus", "rsvd_heads", {"num_heads": 4}),
    ("galore_adamw", "svd", {"basis_dtype": "int4"}), ("galore_adamw", "svd", {"basis_dtype": "int8"}),
    ("galore_adamw", "rsvd", {"basis_dtype": "bf16"}), ("galore_adamw", "svd", {"lazy_refresh": True}),
]


@pytest.mark.parametrize("kind", ["taller", "shorter", "wider", "narrower"])
@pytest.mark.parametrize(("preset", "projector", "options"), PROJECTOR_RUNS,
                         ids=[f"{p}-{q}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for p, q, o in PROJECTOR_RUNS])
def test_every_projector_refuses_another_shape(preset: str, projector: str, options: dict[str, Any],
                                               kind: str) -> None:
    """The same kinds of misfit on every registered projector (and the quantized and lazy forms of the basis):
    refused by name; and the model's own checkpoint after two refreshes resumes bit-exactly."""
    saved_shape, loaded_shape = MISFITS[kind]
    extra = {"projector": projector, "projector_options": options or None,
             **({"transfer": "reset"} if projector == "gum" and preset != "gum" else {})}
    src, opt = _make(preset, saved_shape, **extra)
    _train(src, opt, 7)
    sd = roundtrip(opt.state_dict())
    _, other = _make(preset, loaded_shape, **extra)
    with pytest.raises(ValueError, match=_refused(preset, loaded_shape, projector)):
        other.load_state_dict(sd)
    params, same = _make(preset, saved_shape, seed=1, **extra)
    same.load_state_dict(roundtrip(opt.state_dict()))
    for p, q in zip(src, params, strict=True):
        q.data.copy_(p.data)
    _train(src, opt, 3)
    _train(params, same, 3)
    assert all(torch.equal(p, q) for p, q in zip(src, params, strict=True))


def _edited(name: str, key_path: tuple[Any, ...], value: int, shape: tuple[int, ...] = (16, 32), steps: int = 4,
            **extra: Any) -> tuple[dict[str, Any], torch.optim.Optimizer]:
    """A checkpoint of parameter 0 with the last entry of the index tensor at ``key_path`` set to ``value``, and a
    fresh optimizer of the same model."""
    src, opt = _make(name, shape, **extra)
    _train(src, opt, steps)
    sd = roundtrip(opt.state_dict())
    target = sd["state"][0]
    for k in key_path:
        target = target[k]
    assert target.dtype in (torch.int32, torch.int64)
    target[-1] = value
    return sd, _make(name, shape, seed=1, **extra)[1]


@pytest.mark.parametrize(("name", "key_path", "value", "bound", "extra"), [
    ("galore_plus", ("residual_index",), 512, 512, {}),  # flat entries of the 16 x 32 matrix
    ("galore_plus", ("residual_index",), -1, 512, {}),
    ("dct_adamw", ("projector", "indices"), 16, 16, {}),  # DCT columns of the 16 rows (left side)
    ("galore_adamw", ("projector", "indices"), 32, 32, {"projector": "columns"}),  # columns of 32
    ("galore_adamw", ("projector", "indices"), 16, 16, {"projector": "rows"}),
    ("galore_adamw", ("projector", "indices"), 512, 512, {"projector": "entries"}),
])
def test_index_out_of_range_refused(name: str, key_path: tuple[Any, ...], value: int, bound: int,
                                    extra: dict[str, Any]) -> None:
    """An index tensor with an entry outside the parameter's dims (it indexed another matrix) is refused at load,
    naming the key, the range found and the range expected; the old check loaded it and the step raised an
    IndexError deep inside (or, on a GPU, an index kernel's device assert)."""
    sd, other = _edited(name, key_path, value, **extra)
    path = "".join(f"\\[{k!r}\\]" for k in key_path)
    with pytest.raises(ValueError, match=rf"parameter 0 \(shape \(16, 32\)\) does not fit it \(state{path}: saved "
                                         rf"indices in \[-?\d+, \d+\], expected in \[0, {bound}\) for a 16 x 32 "
                                         r"matrix\)"):
        other.load_state_dict(sd)


def test_index_at_the_bound_loaded_by_the_old_check() -> None:
    """The old check (shapes only) let a DCT column index equal to the axis length through: same shape."""
    from lowrank_optim.checkpoint import _misfit

    sd, _ = _edited("dct_adamw", ("projector", "indices"), 16)
    fresh = _make("dct_adamw", (16, 32), seed=2)
    _train(fresh[0], fresh[1], 1)
    assert _misfit(sd["state"][0], fresh[1].state[fresh[0][0]], "state") is None


def test_frugal_rows_and_cols_named() -> None:
    """FRUGAL's projector state names the matrix (``rows``, ``cols``): a wider matrix's checkpoint is refused by
    ``cols`` even while the block is inactive (empty moments, nothing else to compare)."""
    src, opt = _make("frugal", (16, 32))
    _train(src, opt, 7)
    assert opt.state[src[0]]["exp_avg"].numel() == 0  # parameter 0 is the inactive block of period 2
    _, other = _make("frugal", (16, 40))
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \(16, 40\)\) does not fit it \(state\['projector'\]"
                                         r"\['cols'\]: saved 32, expected 40\)"):
        other.load_state_dict(roundtrip(opt.state_dict()))


def test_dct_dim_named() -> None:
    """DCT-AdamW's taller matrix: ``dim`` (the projected axis) names it; indices and moments have the same shape."""
    src, opt = _make("dct_adamw", (16, 32))
    _train(src, opt, 4)
    _, other = _make("dct_adamw", (20, 32))
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \(20, 32\)\) does not fit it \(state\['projector'\]"
                                         r"\['dim'\]: saved 16, expected 20\)"):
        other.load_state_dict(roundtrip(opt.state_dict()))


def test_int4_basis_rows_named() -> None:
    """An int4 basis packs two rows per byte: 15 and 16 rows pack alike, ``basis_rows`` names the misfit."""
    extra = {"projector_options": {"basis_dtype": "int4"}}
    src, opt = _make("galore_adamw", (16, 32), **extra)
    _train(src, opt, 4)
    _, other = _make("galore_adamw", (15, 32), **extra)
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \(15, 32\)\) does not fit it \(state\['projector'\]"
                                         r"\['basis_rows'\]: saved 16, expected 15\)"):
        other.load_state_dict(roundtrip(opt.state_dict()))


def test_expert_stack_named_by_matrix() -> None:
    """An expert stack's misfit names the matrix: ``state['matrices'][0]['projector']['dim']``."""
    src, opt = _make("apollo", (3, 16, 32))
    _train(src, opt, 4)
    _, other = _make("apollo", (3, 20, 32))
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \(3, 20, 32\)\) does not fit it \(state\['matrices'\]"
                                         r"\[0\]\['projector'\]\['dim'\]: saved 16, expected 20\)"):
        other.load_state_dict(roundtrip(opt.state_dict()))


def test_no_refresh_counted_by_the_check() -> None:
    """The expected state is built on the meta device: no refresh is counted (``REFRESH_CALLS``) by a load."""
    src, opt = _make("galore_adamw", (16, 32))
    _train(src, opt, 4)
    _, other = _make("galore_adamw", (16, 32))
    before = dict(lro.distributed.REFRESH_CALLS)
    other.load_state_dict(roundtrip(opt.state_dict()))
    assert before == lro.distributed.REFRESH_CALLS


# -- DDP: refreshes divided over 2 gloo ranks ---------------------------------------------------------------------
WORLD = 2
DDP_NAMES = ["galore_adamw", "frugal", "dct_adamw", "apollo", "gum", "galore_plus"]


def _ddp_job(names: list[str], rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """Per preset, on every rank with ``divide_refresh``: a (16, 32) model's checkpoint (saved after 4 divided
    steps) loaded into a (20, 32) and a (16, 40) model (the errors); a (20, 32) model's checkpoint loaded into a
    (16, 32) model on rank 0 only, its own on rank 1; and the (16, 32) checkpoint into the same model, then 4 more
    steps (weights and state, gathered from every rank)."""
    out: dict[str, Any] = {}
    for name in names:
        src, opt = _make(name, (16, 32))
        lro.distributed.divide_refresh(opt)
        _train(src, opt, 4)
        sd = roundtrip(opt.state_dict())
        errors = []
        for shape in ((20, 32), (16, 40)):
            _, other = _make(name, shape)
            lro.distributed.divide_refresh(other)
            try:
                other.load_state_dict(sd)
                errors.append(None)
            except ValueError as err:
                errors.append(str(err))
        # one rank refuses, the other loads: a check with a collective would leave the other rank waiting in a
        # broadcast of its next parameter (a hang until the gloo timeout), or pair it with the gather below
        src_other, opt_other = _make(name, (20, 32))
        lro.distributed.divide_refresh(opt_other)
        _train(src_other, opt_other, 4)
        _, mixed = _make(name, (16, 32))
        lro.distributed.divide_refresh(mixed)
        try:
            mixed.load_state_dict(roundtrip(opt_other.state_dict()) if rank == 0 else sd)
            alone = None
        except ValueError as err:
            alone = str(err)
        params, same = _make(name, (16, 32), seed=1)
        lro.distributed.divide_refresh(same)
        before = dict(lro.distributed.REFRESH_CALLS)
        same.load_state_dict(sd)
        calls_unchanged = before == lro.distributed.REFRESH_CALLS
        for p, q in zip(src, params, strict=True):
            q.data.copy_(p.data)
        _train(params, same, 4)
        got: list[Any] = [None] * world
        state = [(k, v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in flat_state(same)]
        dist.all_gather_object(got, {"errors": errors, "alone": alone, "calls_unchanged": calls_unchanged,
                                     "weights": [p.detach().tolist() for p in params], "state": state})
        out[name] = got
    return out


def main(rank: int, world: int, init_method: str, jobs: list[tuple[str, list[Any]]], out_dir: str) -> None:
    import fsdp2_worker as base

    base.run_jobs({"ddp": _ddp_job}, rank, world, init_method, jobs, out_dir, prefix="review11-misfit-")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs gloo")
    out = tmp_path_factory.mktemp("review11_misfit")
    return launch_ranks(main, WORLD, [("ddp", DDP_NAMES)], out, 180, prefix="review11-misfit-")["ddp"]


@pytest.mark.parametrize("name", DDP_NAMES)
def test_divided_refresh_checked_without_a_collective(ddp_results: dict[str, Any], name: str) -> None:
    """Under ``divide_refresh`` (the check used to be skipped there) every rank refuses both misfits by name (GUM's
    by its packed moments' size, at the import), with no collective: rank 0 refusing alone while rank 1 loads ends
    on both ranks (a check that broadcast would hang); the same model's checkpoint loads and resumes on every rank
    exactly as one process does from the same checkpoint, and the load counts no refresh."""
    src, opt = _make(name, (16, 32))
    _train(src, opt, 4)
    params, one = _make(name, (16, 32), seed=1)
    one.load_state_dict(roundtrip(opt.state_dict()))
    for p, q in zip(src, params, strict=True):
        q.data.copy_(p.data)
    _train(params, one, 4)
    want_weights = [p.detach().tolist() for p in params]
    want_state = [(k, v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in flat_state(one)]
    for rank, got in enumerate(ddp_results[name]):
        taller, wider = got["errors"]
        checks = [(taller, "(20, 32)"), (wider, "(16, 40)")] + ([(got["alone"], "(16, 32)")] if rank == 0 else [])
        for error, shape in checks:
            assert error is not None and (f"parameter 0 (shape {shape}) does not fit it" in error
                                          or (name == "gum" and "Invalid state_dict: packed moment" in error)), \
                (rank, error)
        assert rank == 0 or got["alone"] is None, got["alone"]
        assert got["calls_unchanged"], rank
        assert got["weights"] == want_weights, rank
        assert got["state"] == want_state, rank
