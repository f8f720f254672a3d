"""Named optimizers: thin presets over :class:`lowrank_optim.engine.LowRankOptimizer`."""

from .galore import GaLoreAdafactor, GaLoreAdamW

__all__ = ["GaLoreAdafactor", "GaLoreAdamW"]
