"""Named optimizers: thin presets over :class:`lowrank_optim.engine.LowRankOptimizer`."""

from .apollo import APOLLO, APOLLOMini
from .coap import COAP
from .dct_adamw import DCTAdamW
from .fira import Fira
from .flora import Flora
from .frugal import FRUGAL
from .galore import GaLoreAdafactor, GaLoreAdamW
from .galore_plus import GaLorePlus, galore_plus_groups
from .gum import GUM
from .osd import OnlineSubspaceDescent

__all__ = ["APOLLO", "COAP", "FRUGAL", "GUM", "APOLLOMini", "DCTAdamW", "Fira", "Flora", "GaLoreAdafactor",
           "GaLoreAdamW", "GaLorePlus", "OnlineSubspaceDescent", "galore_plus_groups"]
