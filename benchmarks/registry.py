"""Which optimizers the benchmarks run: every registered ``lowrank_optim`` optimizer plus the references.

Every optimizer in :func:`lowrank_optim.available_optimizers` is covered automatically, built with
:func:`lowrank_optim.create_optimizer` from the same param groups. A new optimizer needs at most one line
in :data:`OVERRIDES` (keyword arguments it needs for a fair run: lr, density, ...).

Fixed learning rates (quick mode and the throughput/memory benchmarks, *not tuned*): full-rank AdamW /
AdamW8bit 3e-3, low-rank methods 1e-2 with GaLore's scale 0.25 (GaLore paper, arXiv:2403.03507, pre-training
recipe), unless :data:`OVERRIDES` says otherwise. Low-rank presets apply their lr to the plain parameters
(embedding, head, norms) too, as GaLore's script does, so at these fixed lrs they get a 3x larger step on
those than AdamW: the quick table is not a comparison of methods. The tuned comparison
(``python -m benchmarks.convergence --sweep``, :mod:`benchmarks.sweep`) searches every spec's lr on one grid
instead; ``Spec.documented_lr`` is each constructor's own default, recorded next to the grid.

Every keyword passed below that differs from a constructor's default is named in ``Spec.kwargs`` (and so in
every result record): ``weight_decay=0`` for torch AdamW and bitsandbytes (their default is 1e-2; our presets
and GaLore's recipe use 0), and the references' projection keys (``scale``/``alpha`` 0.25 as GaLore's and
Fira's scripts, APOLLO's ``scale=1``, random projection and channel scaling as HF's ``apollo_adamw``).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import lowrank_optim as lro
from lowrank_optim.registry import OPTIMIZERS

FULL_RANK_LR = 3e-3
LOWRANK_LR = 1e-2
SCALE = 0.25

#: Per-optimizer keyword overrides for ``create_optimizer`` (``lr`` included). One line per optimizer
#: whose defaults do not fit the benchmark; everything else runs with its preset defaults.
OVERRIDES: dict[str, dict[str, Any]] = {}
#: Named option variants of a preset, run only when ``--only`` names them (``--only gum,gum+ns_bf16``): the
#: record's ``optimizer`` is the variant's name and its ``kwargs`` the options.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"gum+ns_bf16": ("gum", {"ns_dtype": "bf16"})}

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
        documented_lr: the constructor's default ``lr`` (None when it has none).
    """

    optimizer: str
    impl: str
    state_dtype: str
    lr: float
    lowrank: bool
    factory: Callable[[Groups, float], torch.optim.Optimizer] = field(repr=False, compare=False)
    kwargs: dict[str, Any] = field(default_factory=dict, compare=False)
    documented_lr: float | None = field(default=None, compare=False)

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
                "state_dtype": self.state_dtype, "lr": self.lr, "documented_lr": self.documented_lr,
                "kwargs": {k: v for k, v in self.kwargs.items() if k != "lr"}}


def default_lr(cls: type) -> float | None:
    """The ``lr`` default of ``cls.__init__`` (None when it has none or it is not a number)."""
    try:
        value = inspect.signature(cls).parameters["lr"].default
    except (KeyError, TypeError, ValueError):
        return None
    return float(value) if isinstance(value, int | float) else None


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
    preset, extra = VARIANTS.get(name, (name, {}))
    kwargs = {**OVERRIDES.get(preset, {}), **extra}
    lr = float(kwargs.pop("lr", LOWRANK_LR))

    def factory(groups: Groups, lr: float) -> torch.optim.Optimizer:
        return lro.create_optimizer(preset, groups, lr=lr, state_dtype=state_dtype, **kwargs)

    return Spec(name, "lowrank_optim", state_dtype, lr, True, factory, kwargs, default_lr(OPTIMIZERS[preset]))


def _references() -> list[Spec]:
    refs: list[Spec] = [Spec("adamw", "torch", "fp32", FULL_RANK_LR, False,
                             lambda g, lr: torch.optim.AdamW(_flat(g), lr=lr, weight_decay=0.0),
                             {"weight_decay": 0.0}, default_lr(torch.optim.AdamW))]

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

        import bitsandbytes as bnb

        refs.append(Spec("adamw8bit", "bitsandbytes", "8bit", FULL_RANK_LR, False, bnb8, {"weight_decay": 0.0},
                         default_lr(bnb.optim.AdamW8bit)))
    if have("galore_torch"):
        def galore(g: Groups, lr: float) -> torch.optim.Optimizer:
            import galore_torch

            return galore_torch.GaLoreAdamW(_rename(g, scale=SCALE, proj_type="std"), lr=lr, weight_decay=0.0)

        import galore_torch

        refs.append(Spec("galore_adamw", "galore_torch", "fp32", LOWRANK_LR, True, galore, {"scale": SCALE},
                         default_lr(galore_torch.GaLoreAdamW)))
    if have("fira"):
        def fira_(g: Groups, lr: float) -> torch.optim.Optimizer:
            import fira

            return fira.FiraAdamW(_rename(g, alpha=SCALE, proj_type="std"), lr=lr, weight_decay=0.0)

        import fira

        refs.append(Spec("fira_adamw", "fira", "fp32", LOWRANK_LR, True, fira_, {"alpha": SCALE},
                         default_lr(fira.FiraAdamW)))
    if have("pytorch_optimizer"):
        def po(cls_name: str, **group_keys: Any) -> Callable[[Groups, float], torch.optim.Optimizer]:
            def factory(g: Groups, lr: float) -> torch.optim.Optimizer:
                import pytorch_optimizer

                extra = {"scale_type": "channel"} if cls_name == "APOLLO" else {}
                return getattr(pytorch_optimizer, cls_name)(_rename(g, **group_keys), lr=lr, weight_decay=0.0,
                                                            **extra)

            return factory

        import pytorch_optimizer as po_

        refs.append(Spec("galore", "pytorch_optimizer", "fp32", LOWRANK_LR, True,
                         po("GaLore", scale=SCALE, projection_type="std"), {"scale": SCALE}, default_lr(po_.GaLore)))
        refs.append(Spec("fira", "pytorch_optimizer", "fp32", LOWRANK_LR, True,
                         po("Fira", scale=SCALE, projection_type="std"), {"scale": SCALE}, default_lr(po_.Fira)))
        refs.append(Spec("apollo", "pytorch_optimizer", "fp32", LOWRANK_LR, True,
                         po("APOLLO", scale=1.0, projection_type="random"),
                         {"scale": 1.0, "projection_type": "random", "scale_type": "channel"},
                         default_lr(po_.APOLLO)))
    return refs


def _adamw_block_scaled(groups: Groups, lr: float) -> torch.optim.Optimizer:
    """torch AdamW with the projected group's lr times GaLore's scale 0.25: a full-rank control with the two
    step sizes a low-rank preset has at one ``lr`` (``lr`` on embeddings, head and norms; ``0.25 lr`` (times a
    projection) on the attention and MLP weights)."""
    out = [{"params": g["params"], **({"lr": lr * SCALE} if "rank" in g else {})} for g in groups]
    return torch.optim.AdamW(out, lr=lr, weight_decay=0.0)


#: Controls the tuned sweep adds (``specs(controls=True)``): full-rank optimizers that isolate one ingredient.
CONTROLS = [Spec("adamw_blocks_x0.25", "torch", "fp32", FULL_RANK_LR, False, _adamw_block_scaled,
                 {"weight_decay": 0.0, "block_lr_factor": SCALE}, default_lr(torch.optim.AdamW))]


def specs(state_dtypes: Sequence[str] = STATE_DTYPES, references: bool = True,
          only: Sequence[str] | None = None, controls: bool = False) -> list[Spec]:
    """Every registered optimizer in every requested state store, then the references (AdamW first).

    Args:
        state_dtypes: state stores to run our optimizers with.
        references: include the reference implementations that are installed.
        only: keep only specs whose optimizer name, impl or label is listed (AdamW is always kept: it is
            the baseline every ratio divides by); names of :data:`VARIANTS` add those variants.
        controls: add :data:`CONTROLS` right after AdamW.
    """
    out = [_ours(name, sd) for name in lro.available_optimizers() for sd in state_dtypes]
    out += [_ours(name, sd) for name in VARIANTS if only and name in only for sd in state_dtypes]
    refs = _references()
    out = refs[:1] + (CONTROLS if controls else []) + out + (refs[1:] if references else [])
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
