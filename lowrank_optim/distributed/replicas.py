"""Checks that an optimizer given to :func:`lowrank_optim.distributed.divide_refresh` is a data-parallel replica.

``divide_refresh`` makes every rank take part in one broadcast per refresh, from the rank that owns the matrix, in
the order of the optimizer's parameters; that order has to be the same on every rank. An optimizer that is not
this package's (``ZeroRedundancyOptimizer`` itself) would silently be left undivided, and the local optimizer of a
``ZeroRedundancyOptimizer`` (``zero.optim``), which holds a different shard of the parameters on each rank, made the
ranks wait on different broadcasts: the job hung at the first refresh. Both are refused when ``divide_refresh`` is
called, with one ``all_gather_object`` of each rank's parameter shapes.
"""

from __future__ import annotations

from typing import Any


def check_replica(optimizer: Any, group: Any) -> None:
    """Raises unless ``optimizer`` is a lowrank_optim optimizer holding the same parameters (shapes and dtypes, in
    order, per param group) on every rank of ``group``. Every rank must call it.

    Raises:
        TypeError: ``optimizer`` is not a lowrank_optim optimizer (``ZeroRedundancyOptimizer`` named).
        ValueError: the ranks hold different parameters (``ZeroRedundancyOptimizer``'s local optimizer).
    """
    import torch.distributed as dist

    from ..engine import LowRankOptimizer

    if not isinstance(optimizer, LowRankOptimizer):
        hint = (" (ZeroRedundancyOptimizer shards whole tensors: each refresh already runs once, on the rank that "
                "holds the tensor; do not call divide_refresh)") if "ZeroRedundancy" in type(optimizer).__name__ \
            else ""
        raise TypeError(f"Invalid optimizer: divide_refresh expects a lowrank_optim optimizer, got "
                        f"{type(optimizer).__name__}{hint}")
    mine = [[(tuple(int(s) for s in p.shape), str(p.dtype)) for p in g["params"]] for g in optimizer.param_groups]
    every: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    differ = [r for r, theirs in enumerate(every) if theirs != every[0]]
    if differ:
        counts = [sum(len(g) for g in theirs) for theirs in every]
        raise ValueError(f"Invalid optimizer: divide_refresh needs the same parameters on every rank (DDP replicas), "
                         f"but rank(s) {differ} hold different ones than rank 0 (parameters per rank: {counts}); "
                         "a ZeroRedundancyOptimizer's local optimizer holds a different shard on each rank and "
                         "needs no divide_refresh")


__all__ = ["check_replica"]
