"""Giving freed heap memory back to the system, so the daemon's RSS falls after what it held is freed.

CPython hands blocks above 512 bytes (frames being read, session records, history payloads) to the C
allocator. glibc keeps what is freed in its heap for reuse and returns it to the system only from the top of
the heap, so after a burst of frees (sessions expiring, a storm of connections gone) RSS can stay at its peak
although nothing holds that memory. ``malloc_trim(0)`` returns the free pages of every arena. It costs
about 0.1 ms when there is little to return and ~10 ms per 200 MiB returned, so the sweep calls it at most
once per ``TRIM_INTERVAL_S``. Where the C library has no ``malloc_trim`` (musl, macOS), nothing is done.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

TRIM_INTERVAL_S = 30.0


def _load() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_malloc_trim = _load()


class HeapTrimmer:
    """Calls ``malloc_trim(0)`` at most once per ``interval_s`` of the clock it is given."""

    __slots__ = ("interval_s", "next_at", "trims")

    def __init__(self, interval_s: float = TRIM_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.next_at = 0.0
        self.trims = 0

    def maybe_trim(self, now: float) -> bool:
        if _malloc_trim is None or now < self.next_at:
            return False
        self.next_at = now + self.interval_s
        _malloc_trim(0)
        self.trims += 1
        return True
