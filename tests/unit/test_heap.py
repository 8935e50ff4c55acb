"""The heap trim a child runs after a task that left its RSS higher: glibc's
``malloc_trim(0)`` where the C library has it (this machine's does)."""

from __future__ import annotations

import ctypes

from celery_guard.heap import malloc_trim


def test_trim_is_glibcs_where_it_exists() -> None:
    trim = malloc_trim()
    has = hasattr(ctypes.CDLL(None), "malloc_trim")
    assert (trim is not None) == has
    if trim is not None:
        assert trim() in (0, 1)  # 1: memory was given back, 0: there was none to give
