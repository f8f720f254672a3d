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


#: Options every projector takes (:meth:`Projector.configure`): basis storage and the lazy refresh schedule.
COMMON_OPTIONS = ("basis_dtype", "lazy_refresh", "lazy_threshold", "lazy_max_multiple")


def make_projector(name: str, rank: int, **options: Any) -> Projector:
    """Builds a projector by name (``"svd"``, ``"rsvd"``, ...).

    ``options`` are the projector's own keyword arguments plus :data:`COMMON_OPTIONS` (``basis_dtype``,
    ``lazy_refresh``, ``lazy_threshold``, ``lazy_max_multiple``; see :meth:`Projector.configure`).

    Raises:
        ValueError: unknown name; ``lazy_threshold`` / ``lazy_max_multiple`` without ``lazy_refresh`` (set
            to False explicitly, they are accepted: a group turning off an inherited lazy schedule).
        TypeError: unknown option.
    """
    if not isinstance(name, str) or name not in PROJECTORS:
        raise ValueError(f"Invalid projector: {name!r} (expected one of {sorted(PROJECTORS)})")
    common = {k: options.pop(k) for k in COMMON_OPTIONS if k in options}
    if "lazy_refresh" not in common:  # the schedule's settings alone would silently do nothing
        for key in ("lazy_threshold", "lazy_max_multiple"):
            if key in common:
                raise ValueError(f"Invalid {key}: {common[key]!r} without lazy_refresh=True (it only tunes the lazy "
                                 "refresh schedule, which is off by default); add lazy_refresh=True or drop it")
    try:
        proj = PROJECTORS[name](rank, **options)
    except TypeError as err:
        if "unexpected keyword" in str(err):
            raise TypeError(f"Invalid projector option for {name!r}: {err}") from None
        raise
    return proj.configure(**common) if common else proj


__all__ = [
    "COMMON_OPTIONS",
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
