"""GaLore+'s choice of sparse-residual entries (:func:`lowrank_optim.distributed.sparse.select_entries`): one rule
for one process and k ranks.

The rule: with ``t`` the ``k``-th largest score (NaN as ``+inf``), every entry ``> t`` and, of the entries ``== t``,
the lowest flat indices. Checked against its definition (sort by ``(-score, index)``, take ``k``) on scores drawn
from a few levels (many ties), and a row split over 1..4 simulated ranks (torch's chunk rule, empty ranks included)
composed from the same stages as the collective path (:func:`candidates` all-gathered, :func:`threshold`,
:func:`counts` all-gathered, :func:`choose`) gives the same set, with each rank's ``first`` its place in the
whole sorted list. The real collectives run in ``tests/test_fsdp2.py`` (``select`` job).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_optim.distributed.shards import chunk
from lowrank_optim.distributed.sparse import candidates, choose, counts, select_entries, threshold


def definition(score: torch.Tensor, k: int) -> list[int]:
    """The rule written out: sort flat indices by ``(-score, index)`` (NaN as +inf), keep the first ``k``."""
    flat = score.reshape(-1).nan_to_num(nan=float("inf"), posinf=float("inf")).tolist()
    return sorted(sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:k])


def simulated(score: torch.Tensor, k: int, world: int) -> tuple[list[int], list[int]]:
    """The k-rank path on ``world`` simulated ranks (rows split by torch's chunk rule): the global flat indices of
    every rank's choice, in rank order, and each rank's ``first``."""
    m, n = score.shape
    if k == 0:  # select_entries returns before any collective
        return [], [0] * world
    parts = [score[o: o + s].reshape(-1).nan_to_num(nan=float("inf"), posinf=float("inf"))
             for o, s in (chunk(m, world, i) for i in range(world))]
    length = min(k, -(-m // world) * n)
    t = threshold(torch.cat([candidates(f, length) for f in parts]), k)
    table = [counts(f, t) for f in parts]
    out, firsts = [], []
    for i, f in enumerate(parts):
        idx, first = choose(f, t, table, i, k)
        out += (idx + chunk(m, world, i)[0] * n).tolist()
        firsts.append(first)
    return out, firsts


@settings(max_examples=150, deadline=None)
@given(m=st.integers(1, 9), n=st.integers(1, 7), levels=st.integers(1, 4), world=st.integers(1, 4),
       frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**16), nan=st.booleans())
def test_one_process_and_split_choose_the_defined_entries(m: int, n: int, levels: int, world: int, frac: float,
                                                          seed: int, nan: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    score = torch.randint(levels, (m, n), generator=gen).float()
    if nan:
        score.view(-1)[int(torch.randint(m * n, (1,), generator=gen))] = float("nan")
    k = int(frac * m * n)
    want = definition(score, k)
    idx, first = select_entries(score, k)
    assert idx.tolist() == want and first == 0 and idx.dtype == torch.int64
    got, firsts = simulated(score, k, world)
    assert got == want  # rank order = row order: the concatenation is already sorted
    sizes = [sum(1 for i in got if chunk(m, world, r)[0] * n <= i < sum(chunk(m, world, r)) * n)
             for r in range(world)]
    assert firsts == [sum(sizes[:r]) for r in range(world)]


def test_ties_take_the_lowest_flat_indices() -> None:
    """All-equal scores: the first k flat indices; one score above: it, then the lowest ties; at 3 ranks the ties
    are taken from rank 0 first (rank 2 holds no row of a 2-row matrix)."""
    ones = torch.ones(2, 5)
    assert select_entries(ones, 3)[0].tolist() == [0, 1, 2]
    ones[1, 4] = 2.0
    assert select_entries(ones, 3)[0].tolist() == [0, 1, 9]
    assert simulated(ones, 3, 3) == ([0, 1, 9], [0, 2, 3])
    assert simulated(ones, 7, 2) == ([0, 1, 2, 3, 4, 5, 9], [0, 5])


def test_bad_k_and_meta() -> None:
    with pytest.raises(ValueError, match="Invalid k: 11"):
        select_entries(torch.zeros(2, 5), 11)
    with pytest.raises(ValueError, match="Invalid k: -1"):
        select_entries(torch.zeros(2, 5), -1)
    idx, first = select_entries(torch.zeros(2, 5, device="meta"), 4)
    assert idx.shape == (4,) and idx.device.type == "meta" and first == 0
    assert select_entries(torch.zeros(2, 5), 0)[0].numel() == 0
