"""lowrank_optim: memory-efficient optimizers that keep their state in a low-rank gradient subspace.

>>> import lowrank_optim as lro
>>> groups = lro.param_groups(model, rank=128, target_modules=["attn", "mlp"])  # doctest: +SKIP
>>> opt = lro.GaLoreAdamW(groups, lr=1e-2, state_dtype="8bit")  # doctest: +SKIP
"""

from . import hf
from .engine import LowRankOptimizer
from .groups import MethodDefaultWarning, param_groups, select_lowrank_modules, select_lowrank_params
from .layerwise import LayerwiseUpdater
from .optimizers import (
    APOLLO,
    COAP,
    FRUGAL,
    GUM,
    APOLLOMini,
    DCTAdamW,
    Fira,
    Flora,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLorePlus,
    OnlineSubspaceDescent,
    galore_plus_groups,
)
from .projectors import Projector, make_projector
from .registry import available_optimizers, create_optimizer, register_optimizer, resolve_optimizer
from .state import StateStore

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``plan_memory`` is imported on first use, so ``python -m lowrank_optim.planner`` runs the planner module
    once (an eager import here made runpy warn that it was already in ``sys.modules``)."""
    if name == "plan_memory":
        from .planner import plan_memory

        return plan_memory
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "APOLLO",
    "COAP",
    "FRUGAL",
    "GUM",
    "APOLLOMini",
    "DCTAdamW",
    "Fira",
    "Flora",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLorePlus",
    "LayerwiseUpdater",
    "LowRankOptimizer",
    "MethodDefaultWarning",
    "OnlineSubspaceDescent",
    "Projector",
    "StateStore",
    "__version__",
    "available_optimizers",
    "create_optimizer",
    "galore_plus_groups",
    "hf",
    "make_projector",
    "param_groups",
    "plan_memory",
    "register_optimizer",
    "resolve_optimizer",
    "select_lowrank_modules",
    "select_lowrank_params",
]
