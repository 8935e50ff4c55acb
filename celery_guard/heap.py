"""Give the C heap that a task freed back to the system, where the C library allows it.

glibc's malloc serves a large request with a mapping of its own, but each free of one
raises its threshold (up to 32 MiB), so the next blocks of that size come from the heap,
and what a task frees there mostly stays in the process: in a pool, in every child (see
the heap per child that ``bench/estimate.py --shape pandas --detail`` prints, with
``--malloc-trim 0`` and without). ``malloc_trim(0)`` returns the free pages; it is cheap
when there is little to return, and it runs only after a task that left RSS higher.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

#: A task that leaves its child's RSS at least this much higher has the heap trimmed.
TRIM_STEP = 2 * 1024 * 1024


def malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, or None where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)
