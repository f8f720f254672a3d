"""Optimizer state as data: exact bytes held, and a state-dict load that keeps every saved dtype."""

from __future__ import annotations

from typing import Any

import torch

from .state import StateStore


def state_bytes(states: Any) -> int:
    """Exact bytes of every tensor reachable from ``states`` (dicts, lists, tuples), storage shared by
    tensors counted once."""
    seen: set[tuple[str, int]] = set()
    total = 0

    def visit(obj: Any) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            key = (str(obj.device), storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    visit(states)
    return total


def to_device(obj: Any, device: torch.device) -> Any:
    """Deep copy of plain state with tensors moved (never cast) to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, copy=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_device(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_device(v, device) for v in obj)
    return obj


def load_state(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Loads ``state_dict`` into ``optimizer`` keeping every saved tensor's dtype (only the device follows the
    parameter).

    ``torch.optim.Optimizer.load_state_dict`` casts each state tensor of a floating-point parameter to the
    parameter's dtype, which would turn 8-bit codes, int indices and fp32 moments of bf16 parameters into
    something else; here the groups load through torch and the state is copied to each parameter's device.
    """
    saved = state_dict["state"]
    torch.optim.Optimizer.load_state_dict(optimizer, {**state_dict, "state": {}})
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    id_map = dict(zip(saved_ids, params, strict=True))
    for key, value in saved.items():
        if key in id_map:
            p = id_map[key]
            optimizer.state[p] = to_device(value, p.device)


def closed_form_bytes(numel: int, state_dtype: str) -> int:
    """Bytes of one moment of ``numel`` elements in a store (``8bit``: 1 byte + 4 per 256 block)."""
    return StateStore(state_dtype).bytes_for(numel)


__all__ = ["closed_form_bytes", "load_state", "state_bytes", "to_device"]
