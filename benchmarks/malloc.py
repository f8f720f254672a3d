"""Pins glibc malloc's thresholds so that CPU step times do not depend on what ran before in the process.

glibc serves large blocks with ``mmap`` and raises its mmap threshold (up to 32 MiB) each time such a block is
freed, and trims the heap top above a threshold that moves with it. An optimizer's temporaries therefore cost
fresh page faults or nothing depending on the allocation history: torch AdamW's CPU step measured 250 ms or
540-740 ms at LLaMA-60M shapes in the same run, depending on which benchmark or optimizer ran before it.
Setting both thresholds explicitly switches the adjustment off; we set glibc's documented starting values
(128 KiB), so every optimizer runs as in a fresh process: a temporary above 128 KiB is new pages, every step.
That is also the regime in which avoiding full-size temporaries pays on the CPU (on a GPU the caching allocator
makes them cheap in time, but they still count in peak memory).

The second regime, the **warm heap**, is the opposite extreme: glibc's tunables
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=17179869184`` serve every
block from the heap and never give memory back, so a temporary reuses pages that an earlier step touched: the
regime of a long training run, and of jemalloc / tcmalloc. glibc reads tunables once, at process start, so this
regime needs a fresh process (:func:`warm_env` builds its environment; ``benchmarks.throughput`` runs one
child process per regime). :func:`minor_faults_per_alloc` measures which regime a process is in.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
from collections.abc import Mapping

import torch

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 128 * 1024

#: glibc tunables of the warm-heap regime: no mmap for any block below 4 GiB, no trim below 16 GiB.
WARM_HEAP_TUNABLES = "glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=17179869184"
#: The allocator regimes ``benchmarks.throughput`` reports, headline first.
REGIMES = ("warm", "pinned")

_state = {"pinned": False}


def is_warm(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process (or ``environ``) started with the warm-heap tunables."""
    tunables = (os.environ if environ is None else environ).get("GLIBC_TUNABLES", "")
    return all(t in tunables.split(":") for t in WARM_HEAP_TUNABLES.split(":"))


def warm_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` (default ``os.environ``) whose ``GLIBC_TUNABLES`` adds the warm-heap tunables."""
    env = dict(os.environ if environ is None else environ)
    kept = [t for t in env.get("GLIBC_TUNABLES", "").split(":")
            if t and not t.startswith(("glibc.malloc.mmap_threshold=", "glibc.malloc.trim_threshold="))]
    env["GLIBC_TUNABLES"] = ":".join([*kept, WARM_HEAP_TUNABLES])
    return env


def cold_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` without the warm-heap tunables (for a pinned or dynamic child process)."""
    env = dict(os.environ if environ is None else environ)
    kept = [t for t in env.get("GLIBC_TUNABLES", "").split(":")
            if t and not t.startswith(("glibc.malloc.mmap_threshold=", "glibc.malloc.trim_threshold="))]
    if kept:
        env["GLIBC_TUNABLES"] = ":".join(kept)
    else:
        env.pop("GLIBC_TUNABLES", None)
    return env


def regime() -> str:
    """``"warm"`` (warm-heap tunables), ``"pinned"`` (:func:`pin` succeeded) or ``"dynamic"`` (glibc defaults)."""
    if is_warm():
        return "warm"
    return "pinned" if _state["pinned"] else "dynamic"


def minor_faults_per_alloc(nbytes: int = 64 * 2**20, repeats: int = 4) -> float:
    """Minor page faults per allocate-touch-free of an ``nbytes`` tensor, after one warm-up round.

    About ``nbytes / 4096`` when every temporary is fresh pages (pinned or dynamic thresholds: a 64 MiB block
    is above glibc's largest dynamic mmap threshold, 32 MiB), about 0 on a warm heap.
    """
    def once() -> None:
        t = torch.empty(nbytes // 4, dtype=torch.float32)
        t.fill_(1.0)
        del t

    once()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        once()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / repeats


def pin() -> bool:
    """Sets glibc's mmap and trim thresholds to 128 KiB; False (and nothing changed) off glibc."""
    if _state["pinned"]:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, THRESHOLD_BYTES) == 1
    _state["pinned"] = ok
    return ok


def describe() -> str:
    """What the results' ``environment`` records about the allocator."""
    if is_warm():
        return f"warm heap (GLIBC_TUNABLES={WARM_HEAP_TUNABLES})"
    if _state["pinned"]:
        return f"glibc mmap/trim thresholds pinned at {THRESHOLD_BYTES // 1024} KiB"
    return "allocator defaults (glibc dynamic thresholds or another malloc)"
