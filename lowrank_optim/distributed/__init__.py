"""Data-parallel and sharded training: FSDP2 parameters (``DTensor``), collectives, DCP checkpoints.

:mod:`.comm` is what rules call for sums over a shard's ranks (identity in one process); :mod:`.fsdp` runs an
FSDP2 parameter's step and divides refreshes (:func:`divide_refresh` for DDP); :mod:`.checkpoint` wraps sharded
state for ``torch.distributed.checkpoint``, and :class:`LoadPlanner` (:mod:`.planner`) loads a sharded 8-bit
checkpoint into a plain optimizer; :mod:`.shards` holds layouts and row collectives; :mod:`.bases` keeps projector bases
(fp32, bf16, int8, int4) as chunks of each stored tensor and decodes them just in time; :mod:`.local` joins k local
processes over gloo (tests, benchmarks).
"""

from typing import Any

from . import comm
from .fsdp import REFRESH_CALLS, divide_refresh


def __getattr__(name: str) -> Any:  # torch.distributed.checkpoint is imported when the planner is asked for
    if name == "LoadPlanner":
        from .planner import LoadPlanner

        return LoadPlanner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["REFRESH_CALLS", "LoadPlanner", "comm", "divide_refresh"]
