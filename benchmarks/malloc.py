"""Pins glibc malloc's thresholds so that CPU step times do not depend on what ran before in the process.

glibc serves large blocks with ``mmap`` and raises its mmap threshold (up to 32 MiB) each time such a block is
freed, and trims the heap top above a threshold that moves with it. An optimizer's temporaries therefore cost
fresh page faults or nothing depending on the allocation history: torch AdamW's CPU step measured 250 ms or
540-740 ms at LLaMA-60M shapes in the same run, depending on which benchmark or optimizer ran before it.
Setting both thresholds explicitly switches the adjustment off; we set glibc's documented starting values
(128 KiB), so every optimizer runs as in a fresh process: a temporary above 128 KiB is new pages, every step.
That is also the regime in which avoiding full-size temporaries pays on the CPU (on a GPU the caching allocator
makes them cheap in time, but they still count in peak memory).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 128 * 1024

_state = {"pinned": False}


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
    if _state["pinned"]:
        return f"glibc mmap/trim thresholds pinned at {THRESHOLD_BYTES // 1024} KiB"
    return "allocator defaults (glibc dynamic thresholds or another malloc)"
