"""Data-parallel and sharded training: FSDP2 parameters (``DTensor``), collectives, DCP checkpoints.

:mod:`.comm` is imported by rules (identity in one process); :mod:`.fsdp` runs an FSDP2 parameter's step;
:mod:`.checkpoint` wraps sharded state for ``torch.distributed.checkpoint``; :mod:`.shards` holds layouts.
"""

from . import comm

__all__ = ["comm"]
