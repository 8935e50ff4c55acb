"""An I/O-bound app for the gevent pool: many green threads in one process.

Pools that do not fork ignore ``worker_max_memory_per_child``; the guard's
``CELERY_GUARD_MAX_WORKER_MEMORY`` takes its place: past it, a warm shutdown (exit 75) for
the supervisor to restart the worker, with no task lost. Run it with::

    CELERY_GUARD_MAX_WORKER_MEMORY=512M celery -A gevent_app worker -P gevent -c 100

``GEVENT_APP_BROKER`` and ``GEVENT_APP_BACKEND`` default to a local Redis.
"""

from __future__ import annotations

import os
import time

from celery import Celery

import celery_guard

app = Celery(
    "gevent_app",
    broker=os.environ.get("GEVENT_APP_BROKER", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("GEVENT_APP_BACKEND", "redis://127.0.0.1:6379/1"),
)
app.conf.task_acks_late = True  # a task cut short by the shutdown runs again elsewhere
app.conf.task_reject_on_worker_lost = True
celery_guard.install(app)

_CACHE: dict[str, bytes] = {}


@app.task
def fetch(url: str, seconds: float = 0.2) -> int:
    """Wait on the network (here: a sleep that gevent makes cooperative) and keep what
    came back: a per-process cache that only grows, the usual leak of I/O workers."""
    time.sleep(seconds)
    _CACHE[url] = b"x" * 256 * 1024
    return len(_CACHE)
