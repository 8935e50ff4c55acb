"""celery-guard: keep Celery workers inside their memory budget.

Enable it with one line::

    app.steps["worker"].add(MemoryGuard)
"""

from __future__ import annotations

from typing import Any

from . import control  # noqa: F401 - registers `celery inspect guard_stats`
from .bootstep import MemoryGuard

__version__ = "0.1.0"
__all__ = ["MemoryGuard", "__version__", "install"]


def install(app: Any) -> Any:
    """Add the worker step to ``app``; returns the app for chaining."""
    app.steps["worker"].add(MemoryGuard)
    return app
