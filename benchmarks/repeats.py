"""Repeated benchmark processes combined into one record per optimizer: medians with the spread of the runs.

On a shared 2-core machine one process's ratio to AdamW moves by up to +-8% from run to run (where its memory
lands, what the neighbours do), more than the per-step noise a median over steps removes: round 10's five runs of
Flora gave 1.26-1.36. ``python -m benchmarks.throughput --repeats N`` runs each allocator regime's child process
``N`` times and reports, per optimizer and regime, the median over the runs of every number, the runs themselves
for the ratios (``runs``), and their range in the summary table. With ``N = 1`` records pass through unchanged.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

#: Fields whose per-run values are kept (``record["runs"][field]``) and shown as a range.
SPREAD_FIELDS = ("amortized_ratio_to_adamw", "amortized_ratio_to_fused_adamw", "median_step_s",
                 "tokens_per_s_ratio_to_adamw", "amortized_tokens_per_s_ratio_to_adamw")


def _key(record: dict[str, Any]) -> tuple[Any, ...]:
    return (record.get("mode", "step"), record.get("label"), record.get("malloc"))


def combine(runs: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One record per ``(mode, label, malloc regime)`` from the records of several runs of the same benchmark,
    in the first run's order.

    Numbers (ints and floats, not bools) become the median over the runs that have them (``statistics.median``: the
    mean of the middle two for an even count); other values are the first run's. ``repeats`` counts the runs of the
    record, ``runs`` maps each of :data:`SPREAD_FIELDS` present to its per-run values in run order. A record with an
    ``error`` in any run keeps that error. One run: the records, unchanged.

    Args:
        runs: each run's records (``benchmarks.throughput`` records: ``label``, ``mode``, ``malloc``, numbers).

    Returns:
        The combined records.

    Raises:
        ValueError: no runs, or a run whose records repeat a ``(mode, label, malloc)`` key.
    """
    if not runs:
        raise ValueError("Invalid runs: need at least one run's records")
    if len(runs) == 1:
        return [dict(r) for r in runs[0]]
    grouped: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for i, records in enumerate(runs):
        seen = set()
        for r in records:
            key = _key(r)
            if key in seen:
                raise ValueError(f"Invalid runs: run {i} has two records for {key}")
            seen.add(key)
            grouped.setdefault(key, []).append(r)
    out = []
    for group in grouped.values():
        merged: dict[str, Any] = {}
        for name in dict.fromkeys(k for r in group for k in r):
            values = [r[name] for r in group if name in r]
            numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
            merged[name] = statistics.median(numbers) if numbers and len(numbers) == len(values) else values[0]
        errors = [r["error"] for r in group if "error" in r]
        if errors:
            merged["error"] = errors[0]
        merged["repeats"] = len(group)
        merged["runs"] = {f: [r[f] for r in group if f in r] for f in SPREAD_FIELDS if any(f in r for r in group)}
        out.append(merged)
    return out


def spread(record: dict[str, Any], field: str) -> str | None:
    """``"lo-hi"`` of ``field`` over the record's runs (3 decimals), or ``None`` for a single run."""
    values = record.get("runs", {}).get(field)
    if not values or len(values) < 2:
        return None
    return f"{min(values):.3f}-{max(values):.3f}"


__all__ = ["SPREAD_FIELDS", "combine", "spread"]
