"""Handing a process's freed heap memory back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


def release_memory() -> None:
    """Return the heap memory freed after a big task's log: glibc keeps what its per-thread arenas freed (a flood
    of short-lived line strings and buffers on the pool's threads) mapped for reuse, so a worker's RSS stayed at
    its peak after one task printed hundreds of MB. ``malloc_trim(0)`` is glibc's documented call for this;
    elsewhere (musl, macOS) nothing is done."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None
