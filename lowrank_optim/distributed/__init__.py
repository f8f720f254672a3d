"""Data-parallel and sharded training: FSDP2 parameters (``DTensor``), collectives, DCP checkpoints.

:mod:`.comm` is what rules call for sums over a shard's ranks (identity in one process); :mod:`.fsdp` runs an
FSDP2 parameter's step and divides refreshes (:func:`divide_refresh` for DDP); :mod:`.checkpoint` wraps sharded
state for ``torch.distributed.checkpoint``; :mod:`.shards` holds layouts and row collectives.
"""

from . import comm
from .fsdp import REFRESH_CALLS, divide_refresh

__all__ = ["REFRESH_CALLS", "comm", "divide_refresh"]
