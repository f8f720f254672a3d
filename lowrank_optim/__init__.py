"""lowrank_optim: memory-efficient optimizers that keep their state in a low-rank gradient subspace.

>>> import lowrank_optim as lro
>>> groups = lro.param_groups(model, rank=128, target_modules=["attn", "mlp"])  # doctest: +SKIP
>>> opt = lro.GaLoreAdamW(groups, lr=1e-2, state_dtype="8bit")  # doctest: +SKIP
"""

from .engine import LowRankOptimizer
from .groups import MethodDefaultWarning, param_groups, select_lowrank_modules, select_lowrank_params
from .layerwise import LayerwiseUpdater
from .optimizers import (
    COAP,
    FRUGAL,
    GUM,
    DCTAdamW,
    Fira,
    Flora,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLorePlus,
    OnlineSubspaceDescent,
    galore_plus_groups,
)
from .planner import plan_memory
from .projectors import Projector, make_projector
from .registry import available_optimizers, create_optimizer, register_optimizer
from .state import StateStore

__version__ = "0.1.0"

__all__ = [
    "COAP",
    "FRUGAL",
    "GUM",
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
    "make_projector",
    "param_groups",
    "plan_memory",
    "register_optimizer",
    "select_lowrank_modules",
    "select_lowrank_params",
]
