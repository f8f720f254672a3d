"""Quantized projector bases as FSDP2 chunks (:mod:`lowrank_optim.distributed.bases`), without processes: each stored
tensor's chunks (torch's chunk rule along its own first axis) put back together are the tensor; an int8 rank's rows
decode from its own codes bit-identically to the whole decoded basis; the complement floor follows the stored form.
The collectives (gather, decode just in time) are covered by ``test_fsdp2.py``'s multi-rank jobs."""

from __future__ import annotations

import math

import pytest
import torch

from lowrank_optim.distributed import bases
from lowrank_optim.distributed.shards import Layout
from lowrank_optim.projectors.quantized_basis import BLOCK, RESIDUAL_FLOORS, decode_basis, encode_basis


def _layout(rank: int, world: int) -> Layout:
    return Layout(None, None, rank, world)


@pytest.mark.parametrize("form", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("d", [1, 7, BLOCK, BLOCK + 3, 520])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_chunks_of_each_tensor_rebuild_it(form: str, d: int, world: int) -> None:
    """``lengths`` gives each stored tensor's whole first axis (codes ``d`` or ``ceil(d / 2)``, scales
    ``ceil(d / 256)``); ``cut`` on every rank keeps chunks that concatenate to the whole tensor, ints untouched."""
    basis = torch.randn(d, 3, generator=torch.Generator().manual_seed(d))
    pst = {"side": 1, "rank": 3, **encode_basis(basis, form)}
    want = {"basis": d if form != "int4" else math.ceil(d / 2)}
    if form != "bf16":
        want["basis_scale"] = math.ceil(d / BLOCK)
    assert bases.lengths(pst, d) == want
    parts = [bases.cut(pst, _layout(i, world)) for i in range(world)]
    for key, length in want.items():
        assert int(pst[key].shape[0]) == length
        assert torch.equal(torch.cat([p[key] for p in parts]), pst[key]), key
        sizes = [len(c) for c in torch.arange(length).chunk(world)]  # torch's chunk rule (DTensor's Shard(0))
        assert [int(p[key].shape[0]) for p in parts] == sizes + [0] * (world - len(sizes)), key
    assert all(p["side"] == 1 and p.get("basis_rows") == pst.get("basis_rows") for p in parts)


@pytest.mark.parametrize("d", [5, BLOCK, BLOCK + 1, 520, 3 * BLOCK])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_int8_rows_decode_from_their_own_codes(d: int, world: int) -> None:
    """A rank's rows ``[o, o + s)`` of an int8 basis (``s`` codes, the whole scales) decode to exactly the same rows
    of the whole decoded basis, also where a block of 256 rows straddles two ranks."""
    basis = torch.randn(d, 4, generator=torch.Generator().manual_seed(world))
    enc = encode_basis(basis, "int8")
    whole = decode_basis(enc)
    for rank in range(world):
        lay = _layout(rank, world)
        offset, size = lay.rows(d)
        mine = bases.cut(enc, lay)["basis"]
        assert int(mine.shape[0]) == size
        assert torch.equal(bases.decode_rows(mine, enc["basis_scale"], offset), whole[offset: offset + size])


def test_step_projector_floor_follows_the_stored_form() -> None:
    """The step's view projector takes the complement floor of the basis's stored form (one process reads it off
    the stored dtype), and out of a sharded context its residual is the one-process rule."""
    for form in ("fp32", "bf16", "int8"):
        pst = {"side": 0, "rank": 2, **encode_basis(torch.eye(6, 2), form)}
        proj = bases.step_projector(pst)
        assert proj.complement_floor(pst) == RESIDUAL_FLOORS[form]
    view = {"side": 0, "rank": 2, "basis": torch.eye(6, 2)}
    proj = bases.STEP_BASES["int8"]
    grad = torch.zeros(6, 5)
    grad[:2] = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    grad[2:] = 1e-3  # a complement of 1e-3 x sqrt(20) / ||G||, below int8's floor: zeroed
    low = grad[:2].clone()
    assert torch.equal(proj.residual(grad, low, view), torch.zeros(6, 5))
    grad[2:] = 1.0  # a complement well above the floor: kept, equal to G - P P^T G
    assert torch.equal(proj.residual(grad, low, view), torch.cat([torch.zeros(2, 5), torch.ones(4, 5)]))
