"""celery-guard: keep Celery workers inside their memory budget.

Enable it with one line::

    app.steps["worker"].add(MemoryGuard)
"""

from __future__ import annotations

from typing import Any

from . import control  # noqa: F401 - registers `celery inspect guard_stats`
from .errors import MemoryLimitExceeded, SoftMemoryLimitExceeded
from .steps import MemoryGuard

__version__ = "0.1.0"
__all__ = [
    "MemoryGuard",
    "MemoryLimitExceeded",
    "SoftMemoryLimitExceeded",
    "__version__",
    "install",
]


def install(app: Any) -> Any:
    """Add the worker step to ``app``, and a ``--guard-<name>`` ``celery worker`` option
    for every setting (an option wins over the environment and app.conf); returns the
    app for chaining."""
    from celery.bin.base import CeleryOption

    from .config import OPTIONS

    app.steps["worker"].add(MemoryGuard)
    known = {param.name for param in app.user_options["worker"]}
    for option in OPTIONS:
        if "guard_" + option.name in known:
            continue  # installed twice
        app.user_options["worker"].add(
            CeleryOption(  # grouped in `celery worker --help`, as Celery groups its own
                [option.flag],
                default=None,
                help=f"{option.accepted} (else ${option.variable}, "
                f"app.conf.{option.setting}, default {option.default or 'none'})",
                help_group="celery-guard Options",
            )
        )
    return app
