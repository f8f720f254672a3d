"""Which optimizers the benchmarks run: every registered ``lowrank_optim`` optimizer plus the references.

Every optimizer in :func:`lowrank_optim.available_optimizers` is covered automatically, built with
:func:`lowrank_optim.create_optimizer` from the same param groups. A new optimizer needs at most one line
in :data:`OVERRIDES` (keyword arguments it needs for a fair run: lr, density, ...).

Learning rates (kept the same in every benchmark and run): full-rank AdamW / AdamW8bit 3e-3, low-rank
methods 1e-2 with GaLore's scale 0.25 (GaLore paper, arXiv:2403.03507, pre-training recipe), unless
:data:`OVERRIDES` says otherwise. Light tuning on the quick convergence run (100 steps, val loss): AdamW
1e-3 / 3e-3 / 1e-2 -> 2.79 / 2.74 / 2.85, so 3e-3; GaLore 1e-2 / 3e-2 -> 2.33 / 2.29, kept at the paper's
1e-2. Low-rank presets apply their lr to the plain parameters (embedding, head, norms) too, as GaLore's
script does, which is part of why they beat AdamW on short runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import lowrank_optim as lro

FULL_RANK_LR = 3e-3
LOWRANK_LR = 1e-2
SCALE = 0.25

#: Per-optimizer keyword overrides for ``create_optimizer`` (``lr`` included). One line per optimizer
#: whose defaults do not fit the benchmark; everything else runs with its preset defaults.
OVERRIDES: dict[str, dict[str, Any]] = {}

STATE_DTYPES = ("fp32", "bf16", "8bit")

Groups = list[dict[str, Any]]


@dataclass(frozen=True)
class Spec:
    """One optimizer configuration to benchmark.

    Attributes:
        optimizer: optimizer name (registry name for ours; the reference's own name otherwise).
        impl: ``lowrank_optim``, ``torch``, ``bitsandbytes``, ``galore_torch``, ``fira`` or
            ``pytorch_optimizer``.
        state_dtype: how moments are stored (``fp32``, ``bf16``, ``8bit``).
        lr: learning rate.
        lowrank: whether the low-rank group is projected (False: one plain full-rank optimizer).
        kwargs: extra keyword arguments passed to the constructor.
        factory: ``(groups, lr) -> optimizer``; ``groups`` is ``[{"params": plain}, {"params": lowrank,
            "rank": r, "update_proj_gap": T}]``.
    """

    optimizer: str
    impl: str
    state_dtype: str
    lr: float
    lowrank: bool
    factory: Callable[[Groups, float], torch.optim.Optimizer] = field(repr=False, compare=False)
    kwargs: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def label(self) -> str:
        """Short unique display name, e.g. ``galore_adamw[8bit]`` or ``galore_torch:galore_adamw``."""
        if self.impl == "lowrank_optim":
            return f"{self.optimizer}[{self.state_dtype}]"
        return f"{self.impl}:{self.optimizer}"

    def build(self, groups: Groups, lr: float | None = None) -> torch.optim.Optimizer:
        """The optimizer over ``groups`` (copied, so one group list can serve several specs)."""
        return self.factory([dict(g) for g in groups], self.lr if lr is None else lr)

    def record(self) -> dict[str, Any]:
        """The identifying fields every result record starts with."""
        return {"label": self.label, "optimizer": self.optimizer, "impl": self.impl,
                "state_dtype": self.state_dtype, "lr": self.lr,
                "kwargs": {k: v for k, v in self.kwargs.items() if k != "lr"}}


def _flat(groups: Groups) -> list[torch.Tensor]:
    return [p for g in groups for p in g["params"]]


def _rename(groups: Groups, **extra: Any) -> Groups:
    """Reference-style groups: the low-rank group gets the reference's own keys."""
    out = []
    for g in groups:
        g = dict(g)
        if "rank" in g:
            g.update(extra)
        out.append(g)
    return out


def _ours(name: str, state_dtype: str) -> Spec:
    kwargs = dict(OVERRIDES.get(name, {}))
    lr = float(kwargs.pop("lr", LOWRANK_LR))

    def factory(groups: Groups, lr: float) -> torch.optim.Optimizer:
        return lro.create_optimizer(name, groups, lr=lr, state_dtype=state_dtype, **kwargs)

    return Spec(name, "lowrank_optim", state_dtype, lr, True, factory, kwargs)


def _references() -> list[Spec]:
    refs: list[Spec] = [Spec("adamw", "torch", "fp32", FULL_RANK_LR, False,
                             lambda g, lr: torch.optim.AdamW(_flat(g), lr=lr, weight_decay=0.0),
                             {"weight_decay": 0.0})]

    def have(module: str) -> bool:
        try:
            importlib.import_module(module)
        except Exception:  # any import failure means "not installed here"
            return False
        return True

    if have("bitsandbytes"):
        def bnb8(g: Groups, lr: float) -> torch.optim.Optimizer:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(_flat(g), lr=lr, weight_decay=0.0)

        refs.append(Spec("adamw8bit", "bitsandbytes", "8bit", FULL_RANK_LR, False, bnb8, {"weight_decay": 0.0}))
    if have("galore_torch"):
        def galore(g: Groups, lr: float) -> torch.optim.Optimizer:
            import galore_torch

            return galore_torch.GaLoreAdamW(_rename(g, scale=SCALE, proj_type="std"), lr=lr, weight_decay=0.0)

        refs.append(Spec("galore_adamw", "galore_torch", "fp32", LOWRANK_LR, True, galore, {"scale": SCALE}))
    if have("fira"):
        def fira_(g: Groups, lr: float) -> torch.optim.Optimizer:
            import fira

            return fira.FiraAdamW(_rename(g, alpha=SCALE, proj_type="std"), lr=lr, weight_decay=0.0)

        refs.append(Spec("fira_adamw", "fira", "fp32", LOWRANK_LR, True, fira_, {"alpha": SCALE}))
    if have("pytorch_optimizer"):
        def po(cls_name: str, **group_keys: Any) -> Callable[[Groups, float], torch.optim.Optimizer]:
            def factory(g: Groups, lr: float) -> torch.optim.Optimizer:
                import pytorch_optimizer

                extra = {"scale_type": "channel"} if cls_name == "APOLLO" else {}
                return getattr(pytorch_optimizer, cls_name)(_rename(g, **group_keys), lr=lr, weight_decay=0.0,
                                                            **extra)

            return factory

        refs.append(Spec("galore", "pytorch_optimizer", "fp32", LOWRANK_LR, True,
                         po("GaLore", scale=SCALE, projection_type="std"), {"scale": SCALE}))
        refs.append(Spec("fira", "pytorch_optimizer", "fp32", LOWRANK_LR, True,
                         po("Fira", scale=SCALE, projection_type="std"), {"scale": SCALE}))
        refs.append(Spec("apollo", "pytorch_optimizer", "fp32", LOWRANK_LR, True,
                         po("APOLLO", scale=1.0, projection_type="random"),
                         {"scale": 1.0, "projection_type": "random", "scale_type": "channel"}))
    return refs


def specs(state_dtypes: Sequence[str] = STATE_DTYPES, references: bool = True,
          only: Sequence[str] | None = None) -> list[Spec]:
    """Every registered optimizer in every requested state store, then the references (AdamW first).

    Args:
        state_dtypes: state stores to run our optimizers with.
        references: include the reference implementations that are installed.
        only: keep only specs whose optimizer name, impl or label is listed (AdamW is always kept: it is
            the baseline every ratio divides by).
    """
    out = [_ours(name, sd) for name in lro.available_optimizers() for sd in state_dtypes]
    refs = _references()
    out = refs[:1] + out + (refs[1:] if references else [])
    if only:
        keep = set(only)
        out = [s for s in out if s.impl == "torch" or keep & {s.optimizer, s.impl, s.label}]
    return out


def baseline(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The torch AdamW record of a list (the denominator of every ratio)."""
    for r in records:
        if r.get("impl") == "torch" and r.get("optimizer") == "adamw":
            return r
    return None
