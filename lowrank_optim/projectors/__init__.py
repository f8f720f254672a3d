"""Projectors: how the subspace is chosen and refreshed. ``make_projector(name, rank, **options)``."""

from __future__ import annotations

import inspect
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


def option_names(projector: Projector) -> set[str]:
    """Keyword options ``projector``'s class takes (its ``__init__``'s, ``rank`` and ``side`` aside) plus
    :data:`COMMON_OPTIONS`: what goes in a group's ``projector_options``."""
    params = inspect.signature(type(projector).__init__).parameters
    own = {k for k, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return (own - {"self", "rank", "side"}) | set(COMMON_OPTIONS)


def refuse_misplaced_options(group: dict[str, Any], projector: Projector, known: set[str],
                             options: dict[str, Any]) -> None:
    """Refuses a param-group key that is an option of the group's projector and not a group key (``known``) when
    its value is not the one the projector got: a group key is never passed to the projector, so ``{"params": ...,
    "weighting": "after"}`` for GUM or ``"density"`` for FRUGAL would be ignored without a word. A key equal to the
    projector's value is harmless and kept (``ZeroRedundancyOptimizer`` copies the optimizer's keyword arguments into
    every group it hands its local optimizer).

    Args:
        group: the param group.
        projector: the group's projector.
        known: keys the engine and the group's rules read.
        options: the options the projector was built with (``projector_options``, inherited ones included).

    Raises:
        ValueError: names the key, its value and where it belongs (``projector_options``).
    """
    params = inspect.signature(type(projector).__init__).parameters

    def built_with(k: str) -> Any:
        return options[k] if k in options else (params[k].default if k in params else None)

    misplaced = sorted(k for k in group if k not in known and k in option_names(projector)
                       and group[k] != built_with(k))
    if misplaced:
        k = misplaced[0]
        raise ValueError(f"Invalid param group key {k!r}: {group[k]!r} is an option of the {projector.name!r} "
                         f"projector, which reads only the group's projector_options; write "
                         f"projector_options={{{k!r}: {group[k]!r}}} in the group")


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
    "option_names",
    "refuse_misplaced_options",
    "register_projector",
]
