"""HF Transformers Trainer: ``optimizer_cls_and_kwargs`` from the strings HF users already write.

HF's ``TrainingArguments`` name a low-rank optimizer with ``optim`` (``"galore_adamw"``), its options with
``optim_args`` (``"rank=128,update_proj_gap=200,scale=0.25"``) and the projected modules with
``optim_target_modules`` (a list of name fragments, a regex, or ``"all-linear"``). The same three values
give this package's optimizer here::

    cls, kwargs = lro.hf.optimizer_cls_and_kwargs("galore_adamw_8bit", model, "rank=128,update_proj_gap=200",
                                                  ["self_attn", "mlp"], lr=args.learning_rate)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizer_cls_and_kwargs=(cls, kwargs))

or :func:`from_training_args` reads them (and ``learning_rate``) from a ``TrainingArguments``.

Parsing follows HF's Trainer: ``optim_args`` is split on ``,`` and ``=`` with spaces removed, and the HF
defaults of its GaLore / APOLLO handlers apply to HF's names when a key is absent (``rank=128``,
``update_proj_gap=200``; GaLore ``scale=0.25``; APOLLO ``scale=1.0``); our registry and class names keep the
preset's defaults (and HF's ``rank=128``). Each value is typed from the constructor's default for that
keyword (``int("128")``, ``float("0.25")``, ``"true"``/``"false"`` for flags), the group keys ``rank`` and
``update_proj_gap`` as ints and ``scale`` as a float; a keyword the optimizer does not take is refused when
the optimizer is built. Names follow :func:`lowrank_optim.resolve_optimizer` (registry, class and HF
names); HF's ``*_layerwise`` forms are refused with the layer-wise recipe (:class:`LayerwiseUpdater`).

HF's names take HF's keys (:data:`HF_KEYS`): GaLore's and APOLLO's ``proj_type`` is our ``proj_side``,
APOLLO's ``proj`` (``random`` / ``svd``) our ``projector``, and APOLLO's ``scale`` is applied as
``sqrt(scale)`` by the authors' code and ``pytorch-optimizer`` (HF's APOLLO-Mini recipe passes ``scale=128``
for the paper's ``sqrt(128)``), so an HF name's ``scale`` becomes our ``scale = sqrt(value)``, the multiplier
itself. A keyword given directly (``**extra``) is ours and is passed unchanged.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch

from .registry import _LAYERWISE, HF_OPTIM, OPTIMIZERS, _merge_implied, resolve_optimizer

#: HF's defaults for the keys its GaLore / APOLLO handlers always set (``transformers.trainer_optimizer``).
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "galore": {"rank": 128, "update_proj_gap": 200, "scale": 0.25},
    "apollo": {"rank": 128, "update_proj_gap": 200, "scale": 1.0},
}
_GROUP_TYPES: dict[str, type] = {"rank": int, "update_proj_gap": int, "scale": float}
#: HF's ``optim_args`` keys that have another name here, per HF handler (``transformers.trainer_optimizer``).
HF_KEYS: dict[str, dict[str, str]] = {"galore": {"proj_type": "proj_side"},
                                      "apollo": {"proj": "projector", "proj_type": "proj_side"}}
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def parse_optim_args(optim_args: str | None) -> dict[str, str]:
    """``"rank=128, scale=0.25"`` -> ``{"rank": "128", "scale": "0.25"}`` (HF's parsing; spaces removed).

    Raises:
        TypeError: ``optim_args`` is neither a str nor None.
        ValueError: an item without exactly one ``=`` or with an empty key.
    """
    if optim_args is None:
        return {}
    if not isinstance(optim_args, str):
        raise TypeError(f"Invalid optim_args: expected a str like 'rank=128,update_proj_gap=200', got {optim_args!r}")
    out: dict[str, str] = {}
    for item in optim_args.replace(" ", "").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key or "=" in value:
            raise ValueError(f"Invalid optim_args: {item!r} in {optim_args!r} (expected key=value items)")
        out[key] = value
    return out


def _typed(cls: type, key: str, value: str) -> Any:
    """``value`` converted to the type of ``cls``'s default for ``key`` (group keys: int/float)."""
    default = inspect.signature(cls).parameters.get(key)
    kind: Any = _GROUP_TYPES.get(key)
    if kind is None and default is not None and default.default is not inspect.Parameter.empty:
        kind = type(default.default)
    try:
        if kind is bool:
            if value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            raise ValueError(value)
        if kind is int:
            return int(value)
        if kind is float:
            return float(value)
    except ValueError:
        raise ValueError(f"Invalid optim_args: {key}={value!r} is not a {kind.__name__}") from None
    # a keyword passed through **kwargs (rule options) or one whose default is None (a number or a choice, such
    # as APOLLO's ``scale`` and ``scale_type``): the value's own look decides
    if kind is None or kind is type(None):
        for convert in (int, float):
            try:
                return convert(value)
            except ValueError:
                pass
        if value.lower() in {"true", "false"}:
            return value.lower() == "true"
        if value.lower() == "none":
            return None
    return value


def optimizer_cls_and_kwargs(optim: str, model: torch.nn.Module, optim_args: str | None = None,
                             optim_target_modules: str | Sequence[str] | None = None, *, lr: float | None = None,
                             **extra: Any) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """``(cls, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    The Trainer builds its decay / no-decay groups of bare tensors and calls ``cls(groups, **kwargs)``;
    ``kwargs`` carry ``module=model`` and ``target_modules`` so the optimizer projects exactly the weights
    of the selected ``nn.Linear`` modules (see :mod:`lowrank_optim.targets`).

    Args:
        optim: an HF ``optim`` name (``galore_adamw``, ``galore_adamw_8bit``, ``galore_adafactor``,
            ``apollo_adamw``), a registry name or a class name.
        model: the model the Trainer trains.
        optim_args: HF's ``optim_args`` string (``"rank=128,update_proj_gap=200"``).
        optim_target_modules: HF's ``optim_target_modules``: fragments, a regex or ``"all-linear"``
            (required, as in HF).
        lr: learning rate (``TrainingArguments.learning_rate``); None keeps the constructor's default.
        **extra: further keyword arguments for the optimizer (win over ``optim_args``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, bad ``optim_args`` or ``optim_target_modules`` type.
        ValueError: unknown name, a ``*_layerwise`` name, a malformed ``optim_args`` item, no target modules.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
    name, implied, layerwise = resolve_optimizer(optim)
    if layerwise:
        raise ValueError(f"Invalid optim: {optim!r} (layer-wise updates) cannot go through "
                         "optimizer_cls_and_kwargs; train without the Trainer's optimizer: "
                         f"opt = lowrank_optim.create_optimizer({optim.strip()[: -len(_LAYERWISE)]!r}, model, ...), "
                         "updater = lowrank_optim.LayerwiseUpdater(opt), then only loss.backward() per step")
    if optim_target_modules is None:
        raise ValueError(f"Invalid optim_target_modules: None; {optim!r} needs the modules to project "
                         "(e.g. ['attn', 'mlp'] or 'all-linear'), as in HF's Trainer")
    cls = OPTIMIZERS[name]
    key = optim.strip().lower().replace("-", "_")
    hf_name = key.removesuffix(_LAYERWISE) in HF_OPTIM
    handler = "apollo" if key.startswith("apollo") else "galore"
    if hf_name:  # HF's name: HF's defaults for the keys its handler sets, HF's key names and units
        kwargs: dict[str, Any] = dict(HF_DEFAULTS[handler])
        renames = HF_KEYS[handler]
    else:  # our name: the preset's own defaults, and HF's rank (a Trainer group has none)
        kwargs = {"rank": HF_DEFAULTS["galore"]["rank"]}
        renames = {}
    for k, v in parse_optim_args(optim_args).items():
        ours = renames.get(k, k)
        kwargs[ours] = _typed(cls, ours, v)
    if hf_name and handler == "apollo" and isinstance(kwargs.get("scale"), int | float):
        if kwargs["scale"] < 0:
            raise ValueError(f"Invalid optim_args: scale={kwargs['scale']!r} (APOLLO applies sqrt(scale): it must "
                             "be >= 0)")
        kwargs["scale"] = math.sqrt(kwargs["scale"])
    kwargs.update(extra)
    if lr is not None:
        kwargs["lr"] = lr
    kwargs = _merge_implied(optim, implied, kwargs)
    target = optim_target_modules if isinstance(optim_target_modules, str) else list(optim_target_modules)
    kwargs.update({"target_modules": target, "module": model})
    return cls, kwargs


def from_training_args(args: Any, model: torch.nn.Module,
                       **extra: Any) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """:func:`optimizer_cls_and_kwargs` from a ``TrainingArguments`` (``optim``, ``optim_args``,
    ``optim_target_modules``, ``learning_rate``)."""
    optim = getattr(args.optim, "value", args.optim)  # HF keeps an OptimizerNames enum
    return optimizer_cls_and_kwargs(str(optim), model, args.optim_args, args.optim_target_modules,
                                    lr=args.learning_rate, **extra)


__all__ = ["HF_DEFAULTS", "HF_KEYS", "from_training_args", "optimizer_cls_and_kwargs", "parse_optim_args"]
