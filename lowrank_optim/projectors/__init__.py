"""Projectors: how the subspace is chosen and refreshed. ``make_projector(name, rank, **options)``."""

from __future__ import annotations

from typing import Any

from .base import LEFT, RIGHT, SIDE_RULES, Projector, ProjState, choose_side
from .blocks import BlockProjector
from .coap import COAPProjector
from .coords import ColumnsProjector, EntriesProjector, RowsProjector
from .dct import DCTProjector
from .gum import GUMProjector
from .heads import HeadSharedRSVDProjector
from .online_pca import OnlinePCAProjector
from .random import RandomProjector
from .rsvd import RandomizedSVDProjector
from .svd import SVDProjector

PROJECTORS: dict[str, type[Projector]] = {}


def register_projector(cls: type[Projector]) -> type[Projector]:
    """Adds a projector class to the registry under ``cls.name``."""
    PROJECTORS[cls.name] = cls
    return cls


for _cls in (SVDProjector, RandomizedSVDProjector):
    register_projector(_cls)
register_projector(DCTProjector)
register_projector(OnlinePCAProjector)
register_projector(RandomProjector)
for _cls in (ColumnsProjector, RowsProjector, EntriesProjector, BlockProjector, GUMProjector):
    register_projector(_cls)
register_projector(COAPProjector)
register_projector(HeadSharedRSVDProjector)


def make_projector(name: str, rank: int, **options: Any) -> Projector:
    """Builds a projector by name (``"svd"``, ``"rsvd"``, ...).

    Raises:
        ValueError: unknown name. TypeError: unknown option.
    """
    if not isinstance(name, str) or name not in PROJECTORS:
        raise ValueError(f"Invalid projector: {name!r} (expected one of {sorted(PROJECTORS)})")
    try:
        return PROJECTORS[name](rank, **options)
    except TypeError as err:
        if "unexpected keyword" in str(err):
            raise TypeError(f"Invalid projector option for {name!r}: {err}") from None
        raise


__all__ = [
    "LEFT",
    "PROJECTORS",
    "RIGHT",
    "SIDE_RULES",
    "COAPProjector",
    "DCTProjector",
    "HeadSharedRSVDProjector",
    "OnlinePCAProjector",
    "ProjState",
    "Projector",
    "RandomProjector",
    "RandomizedSVDProjector",
    "SVDProjector",
    "choose_side",
    "make_projector",
    "register_projector",
]
