"""``celery -A proj inspect guard_stats``: each worker's live figures.

``celery inspect NAME`` checks NAME in the CLI process, so this module is imported with
``celery_guard`` itself: the app module that adds the step registers the command too.
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import inspect_command

from . import steps


@inspect_command()
def guard_stats(state: Any, **_: Any) -> dict[str, Any]:
    """Limit, usage, children's memory, growth by task and the recommendations. The
    worker is reached the way Celery's own commands reach it: the consumer's controller."""
    worker = getattr(getattr(state, "consumer", None), "controller", None)
    guard = steps.state_of(worker)
    if guard is None or guard.collector is None:
        return {"error": "celery-guard collects nothing in this worker (mode off or not a worker)"}
    return guard.stats()
