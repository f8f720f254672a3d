"""Optimizer state as data: exact bytes held, and a state-dict load that keeps every saved dtype."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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


#: Keys of one parameter's state in ``torch.optim.Adam`` / ``AdamW`` (``amsgrad=False``).
TORCH_ADAM_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq"})
#: Keys that mark a parameter's state as this package's: ``inner_step`` (every parameter and matrix) or
#: ``matrices`` (a stack of matrices, MoE experts, each with its own state).
OWN_MARKERS = ("inner_step", "matrices")
#: Group keys of ``torch.optim.AdamW`` with no meaning here: dropped from a loaded foreign group when off.
TORCH_ONLY_FLAGS = ("amsgrad", "capturable", "foreach", "fused", "decoupled_weight_decay")


def adopt_foreign_state(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with a foreign (``torch.optim.AdamW`` / ``Adam``) checkpoint turned into this package's
    state where that is exact, else a ``ValueError`` naming the parameter, the keys found and those expected.

    Groups saved by another optimizer (no ``inner`` key) keep this optimizer's keys and take the saved
    ``lr`` / ``betas`` / ``eps`` / ``weight_decay`` / ``initial_lr`` (torch's load semantics for the keys both
    share, ``maximize`` included); ``amsgrad=True`` and ``torch.optim.Adam``'s coupled (L2) weight decay are
    refused. A parameter's state without ``inner_step`` is converted when it is torch's Adam state (``step``,
    ``exp_avg``, ``exp_avg_sq`` of the parameter's shape) of a parameter this optimizer steps plain with the Adam
    rule in fp32 storage: the same moments (cast to fp32, the rule's dtype) and ``step`` / ``inner_step`` the
    saved step count as ints. A projected parameter's full-size moments have no exact low-rank form: refused.

    Args:
        optimizer: a :class:`~lowrank_optim.engine.LowRankOptimizer` (its groups as constructed).
        state_dict: the state dict to load (torch's format).

    Raises:
        ValueError: a foreign state or group that cannot be converted exactly.
    """
    saved_groups = state_dict.get("param_groups")
    if not isinstance(saved_groups, list) or len(saved_groups) != len(optimizer.param_groups):
        return state_dict  # torch's load raises its own clear error
    groups = []
    for i, (saved, own) in enumerate(zip(saved_groups, optimizer.param_groups, strict=True)):
        if "inner" in saved:
            groups.append(saved)
            continue
        if saved.get("amsgrad"):
            raise ValueError(f"Invalid state_dict: param group {i} was saved with amsgrad=True "
                             f"({sorted(k for k in saved if k != 'params')}); {type(optimizer).__name__} "
                             "has no amsgrad")
        if saved.get("decoupled_weight_decay") is False and saved.get("weight_decay"):
            raise ValueError(f"Invalid state_dict: param group {i} was saved by torch.optim.Adam with weight_decay="
                             f"{saved['weight_decay']!r} added to the gradient (L2); {type(optimizer).__name__}'s "
                             "weight decay is decoupled (AdamW's): load an AdamW checkpoint, or one without decay")
        merged = {k: v for k, v in own.items() if k != "params"}
        merged.update({k: v for k, v in saved.items() if k in own or k == "initial_lr"})
        merged["params"] = saved["params"]
        groups.append(merged)
    params = [(g, p) for g in optimizer.param_groups for p in g["params"]]
    ids = [k for g in saved_groups for k in g["params"]]
    where = {k: (index, g, p) for index, (k, (g, p)) in enumerate(zip(ids, params, strict=False))}
    state = {}
    for key, value in state_dict["state"].items():
        if key in where and isinstance(value, dict) and value and not any(m in value for m in OWN_MARKERS):
            value = _adopt_adam(optimizer, *where[key], value)
        state[key] = value
    return {**state_dict, "param_groups": groups, "state": state}


def _adopt_adam(optimizer: Any, index: int, group: dict[str, Any], p: torch.Tensor, value: dict) -> dict:
    """Our plain Adam state from torch's Adam state ``value`` of parameter ``p`` (position ``index``), or a
    ``ValueError`` saying why it cannot be."""
    parts, kind = optimizer._route(group, p)
    found = sorted(value)
    what = f"parameter {index} (shape {tuple(p.shape)})"
    if kind is not None:
        raise ValueError(f"Invalid state_dict: {what} holds state with keys {found} (a full-size optimizer's, "
                         f"torch.optim.AdamW's?), but {type(optimizer).__name__} projects it (rank "
                         f"{group['rank']}): full-size moments have no exact low-rank form. Load it into a "
                         "group without rank, or start this parameter's state fresh")
    expected = ["step", "inner_step"] + [m.name for m in parts.inner.moments(tuple(p.shape), group)]
    shapes_ok = all(isinstance(value.get(k), torch.Tensor) and tuple(value[k].shape) == tuple(p.shape)
                    for k in ("exp_avg", "exp_avg_sq"))
    step = value.get("step")
    step_ok = isinstance(step, (int, float, torch.Tensor)) and (not isinstance(step, torch.Tensor) or step.numel() == 1)
    if (set(value) != TORCH_ADAM_KEYS or not shapes_ok or not step_ok or parts.inner.name != "adam"
            or group["state_dtype"] != "fp32"):
        raise ValueError(f"Invalid state_dict: {what} holds state with keys {found}"
                         + (f" (exp_avg / exp_avg_sq not of shape {tuple(p.shape)})" if not shapes_ok else "")
                         + f"; {type(optimizer).__name__} expects {sorted(expected)} (inner={parts.inner.name!r}, "
                         f"state_dtype={group['state_dtype']!r}). Only torch.optim.Adam / AdamW state of a "
                         "plain parameter converts, into the Adam rule with state_dtype='fp32'")
    count = float(step.item() if isinstance(step, torch.Tensor) else step)
    if count != int(count) or count < 0:
        raise ValueError(f"Invalid state_dict: {what} has step {count!r}, not a step count")
    return {"step": int(count), "inner_step": int(count),
            "exp_avg": value["exp_avg"].to(torch.float32), "exp_avg_sq": value["exp_avg_sq"].to(torch.float32)}


def closed_form_bytes(numel: int, state_dtype: str) -> int:
    """Bytes of one moment of ``numel`` elements in a store (``8bit``: 1 byte + 4 per 256 block)."""
    return StateStore(state_dtype).bytes_for(numel)


__all__ = ["adopt_foreign_state", "closed_form_bytes", "load_state", "refuse_misfit_state", "state_bytes", "to_device"]


def _misfit(saved: Any, fresh: Any, path: str) -> str | None:
    """The first key path where ``saved`` holds a non-empty tensor whose shape differs from ``fresh``'s non-empty
    tensor at the same path (a list of another length counts), else ``None``; keys only one side has are not
    compared."""
    if isinstance(saved, torch.Tensor) and isinstance(fresh, torch.Tensor):
        # an empty tensor is a placeholder a rule sizes later (FRUGAL's state-free blocks): nothing to compare
        if saved.numel() and fresh.numel() and tuple(saved.shape) != tuple(fresh.shape):
            return f"{path}: saved shape {tuple(saved.shape)}, expected {tuple(fresh.shape)}"
        return None
    if isinstance(saved, dict) and isinstance(fresh, dict):
        for k in saved.keys() & fresh.keys():
            found = _misfit(saved[k], fresh[k], f"{path}[{k!r}]")
            if found:
                return found
        return None
    if isinstance(saved, (list, tuple)) and isinstance(fresh, (list, tuple)):
        if len(saved) != len(fresh):
            return f"{path}: saved {len(saved)} entries, expected {len(fresh)}"
        for i, (a, b) in enumerate(zip(saved, fresh, strict=True)):
            found = _misfit(a, b, f"{path}[{i}]")
            if found:
                return found
    return None


#: Integer dtypes of index tensors in a matrix's state (DCT columns, coordinates, GaLore+'s residual entries); int8 /
#: uint8 tensors are codes (8-bit moments, int8 / int4 bases), not indices.
INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)


def _first_step_state(optimizer: Any, group: dict[str, Any], p: torch.Tensor, index: int,
                      shape: tuple[int, ...]) -> dict[str, Any]:
    """The state a first step would allocate for ``p`` (position ``index``) were it of ``shape``: built on the
    ``meta`` device (no memory, no math) with ``p``'s own group, kind, seed and layout; ``{}`` when some rule cannot
    build it there. ``optimizer.state[p]`` is left as it was."""
    meta = torch.empty(shape, dtype=p.dtype, device="meta")
    saved = optimizer.state.pop(p, None)
    try:
        optimizer._step_group(group, [(p, index)], init_only=True, tensors={id(p): (meta, torch.empty_like(meta))})
        return optimizer.state.pop(p, {})
    except Exception:  # a state some rule cannot build on meta: nothing to compare
        optimizer.state.pop(p, None)
        return {}
    finally:
        if saved is not None:
            optimizer.state[p] = saved


@contextlib.contextmanager
def _local_refreshes() -> Iterator[None]:
    """Projector ``init``s inside run here, never on an owner rank with a broadcast (``divide_refresh``'s
    :func:`lowrank_optim.distributed.fsdp.once`): a state built on the meta device has the same keys, shapes and ints
    on every rank, so no collective is needed. The refresh counters are left as they were (no real refresh ran)."""
    from .distributed import fsdp
    from .distributed.shards import Layout

    calls = dict(fsdp.REFRESH_CALLS)
    token = fsdp._ONCE.set(Layout(None, None, 0, 1))
    try:
        yield
    finally:
        fsdp._ONCE.reset(token)
        fsdp.REFRESH_CALLS.update(calls)


def _matrices(state: Any, kind: str) -> list[tuple[str, Any]]:
    """``(key path, state)`` of each matrix of a projected parameter's state (an expert stack's ``matrices``)."""
    if kind != "experts":
        return [("state", state)]
    subs = state.get("matrices") if isinstance(state, dict) else None
    return [(f"state['matrices'][{e}]", sub) for e, sub in enumerate(subs if isinstance(subs, list) else [])]


def _as_int(value: Any) -> int | None:
    """``value`` as an int (a Python int, or a one-element integer tensor), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point() \
            and value.device.type != "meta":
        return int(value.item())
    return None


def _int_misfit(saved: Any, fresh: Any, other: Any, varying: frozenset[str], path: str) -> str | None:
    """The first int of the projector state ``fresh`` (built for the parameter's shape) that depends on the shape
    (``other``, built for every dimension one larger, holds another int there) and that ``saved`` holds with another
    value; ints a refresh may change for the same shape (``varying``: FRUGAL's ``rank`` of an active or inactive
    block) are not compared, and the others (seed, refresh count, chosen block / head, step counters) never differ
    between the two shapes."""
    if not (isinstance(saved, dict) and isinstance(fresh, dict) and isinstance(other, dict)):
        return None
    for key, want in fresh.items():
        if type(want) is not int or key in varying or key not in saved or type(other.get(key)) is not int \
                or other[key] == want:  # a key only one shape has (GaLore+'s head of a split matrix): its value
            continue  # is the draw's, not the shape's
        got = _as_int(saved[key])
        if got != want:
            return f"{path}[{key!r}]: saved {saved[key]!r}, expected {want}"
    return None


def _index_misfit(saved: Any, bound: int, shape: tuple[int, ...], path: str) -> str | None:
    """The first index tensor (:data:`INDEX_DTYPES`) in ``saved`` with an entry outside ``[0, bound)``: a column,
    coordinate or flat entry index of a matrix of ``shape`` is always inside (``bound``: ``m * n`` for flat entries,
    the indexed axis's length for a projector's columns,
    :meth:`~lowrank_optim.projectors.base.Projector.index_bound`)."""
    if isinstance(saved, torch.Tensor):
        if saved.dtype in INDEX_DTYPES and saved.numel() and saved.device.type != "meta":
            lo, hi = int(saved.min()), int(saved.max())
            if lo < 0 or hi >= bound:
                return (f"{path}: saved indices in [{lo}, {hi}], expected in [0, {bound}) for a "
                        f"{' x '.join(map(str, shape))} matrix")
        return None
    items = saved.items() if isinstance(saved, dict) else enumerate(saved) if isinstance(saved, (list, tuple)) else ()
    for k, v in items:
        found = _index_misfit(v, bound, shape, f"{path}[{k!r}]")
        if found:
            return found
    return None


def _index_bound(projector: Any, shape: tuple[int, ...], state: Any) -> int:
    """``projector.index_bound(shape, state)``; ``m * n`` for a state it cannot read (its ints were compared
    first)."""
    try:
        return int(projector.index_bound(shape, state))
    except (AttributeError, KeyError, TypeError, ValueError):
        return int(shape[0]) * int(shape[1])


def _param_misfit(optimizer: Any, group: dict[str, Any], p: torch.Tensor, index: int, saved: dict[str, Any],
                  variable: bool) -> str | None:
    """Where the loaded ``saved`` state of ``p`` does not fit it (:func:`refuse_misfit_state`), else ``None``."""
    from .plan import matrix_shape

    projector = optimizer._parts(group)[0]
    kind = optimizer._planner.kind(group, p) if projector is not None else None
    fresh = _first_step_state(optimizer, group, p, index, tuple(p.shape))
    if not fresh:
        return None
    if not (variable and kind):  # GUM's moments change shape on a refresh: its projector state alone is compared
        found = _misfit(saved, fresh, "state")
        if found:
            return found
    if kind is None:
        return None
    other = _first_step_state(optimizer, group, p, index, tuple(int(s) + 1 for s in p.shape))
    shape = matrix_shape(p, kind)[-2:]
    varying = frozenset(getattr(projector, "varying_ints", ()))
    saved_subs, fresh_subs, other_subs = _matrices(saved, kind), _matrices(fresh, kind), _matrices(other, kind)
    if len(saved_subs) != len(fresh_subs):
        return f"state['matrices']: saved {len(saved_subs)} entries, expected {len(fresh_subs)}"
    for e, (path, sub) in enumerate(saved_subs):
        if not isinstance(sub, dict):
            continue
        want = fresh_subs[e][1] if isinstance(fresh_subs[e][1], dict) else {}
        got_other = other_subs[e][1] if e < len(other_subs) else None
        found = (_misfit(sub.get("projector"), want.get("projector"), f"{path}['projector']") if variable else None) \
            or _int_misfit(sub.get("projector"), want.get("projector"),
                           got_other.get("projector") if isinstance(got_other, dict) else None, varying,
                           f"{path}['projector']") \
            or _index_misfit(sub.get("projector"), _index_bound(projector, shape, sub.get("projector")), shape,
                             f"{path}['projector']") \
            or _index_misfit({k: v for k, v in sub.items() if k != "projector"}, shape[0] * shape[1], shape, path)
        if found:
            return found
    return None


def refuse_misfit_state(optimizer: Any) -> None:
    """Raises when a loaded parameter's state does not fit the parameter it was loaded for.

    ``torch.optim`` maps saved state to parameters by position only, so a checkpoint of another model (same
    number of parameters, other shapes) loads; its moments, bases and indices then meet the new weights in the
    step: a shape error deep inside, silently wrong values, or (unchecked index and arena kernels) a crash. Here
    each loaded state is compared with the state a first step would allocate for the parameter (built on the
    ``meta`` device: no memory, no math):

    * every tensor's shape (an empty tensor is a placeholder sized later: FRUGAL's state-free blocks);
    * every int of a projected matrix's projector state that depends on the shape (its value differs in a state
      built for every dimension one larger: ``dim``, ``rows``, ``cols``, ``side``, a clamped ``rank``, an int4
      basis's ``basis_rows``), which must be equal; ints a refresh changes (refresh count, seed, FRUGAL's active
      block, GUM's draw, GaLore+'s head, online PCA's step) take the same value at both shapes and are not
      compared, nor are a projector's :attr:`~lowrank_optim.projectors.base.Projector.varying_ints`;
    * every index tensor (int16 / int32 / int64) of a projected matrix: inside ``[0, bound)``, the projector's
      :meth:`~lowrank_optim.projectors.base.Projector.index_bound` for its own (DCT columns: the projected axis;
      coordinates: columns, rows or entries) and ``m n`` for the rest (GaLore+'s flat residual entries).

    A projector whose moments change shape on a refresh (GUM) has its projector state compared only (its packed
    moments are checked for size by the import, :func:`lowrank_optim.distributed.checkpoint._unpack`). With
    refreshes divided over ranks (``divide_refresh``) the expected state is built on each rank on its own (no
    collective: it is the same on every rank). Skipped for FSDP2 (``DTensor``) parameters.

    Raises:
        ValueError: naming the parameter's position and shape, the state key and both shapes or values.
    """
    from .distributed import shards
    from .distributed.checkpoint import _variable

    index = 0
    with _local_refreshes():
        for group in optimizer.param_groups:
            variable = optimizer._parts(group)[0] is not None and _variable(optimizer, group)
            for p in group["params"]:
                saved = optimizer.state.get(p)
                if saved and not shards.is_dtensor(p):
                    found = _param_misfit(optimizer, group, p, index, saved, variable)
                    if found:
                        raise ValueError(f"Invalid state_dict: the state loaded for parameter {index} (shape "
                                         f"{tuple(p.shape)}) does not fit it ({found}): a checkpoint of another "
                                         "model, or of these parameters in another order?")
                index += 1
