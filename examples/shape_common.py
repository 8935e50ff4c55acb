"""What the workload-shape apps (``examples/shape_*.py``) share: one Celery app per module,
configured from the same environment as ``heavy_app`` so the tests and the benchmarks
start them the same way.

``HEAVY_APP_BROKER`` / ``HEAVY_APP_BACKEND`` (default: a local Redis), ``HEAVY_APP_GUARD=0``
to run without celery-guard, ``HEAVY_APP_ACKS_LATE=1`` for late acks, and ``SHAPE_SCALE``
(default 1) to multiply the size of the data each shape imports: the tests use small
scales, the benchmark the default.

Each shape's ``use`` task reads the data its module imported, the way the app's real
tasks would, and returns the child's pid, so a caller can tell that every child ran.
"""

from __future__ import annotations

import logging
import os

from celery import Celery, signals

SCALE = float(os.environ.get("SHAPE_SCALE", "1"))


def scaled(count: int) -> int:
    """``count`` times ``SHAPE_SCALE``, at least 1."""
    return max(int(count * SCALE), 1)


def make_app(name: str) -> Celery:
    """A Celery app named ``name``, with celery-guard unless ``HEAVY_APP_GUARD=0``."""
    app = Celery(
        name,
        broker=os.environ.get("HEAVY_APP_BROKER", "redis://127.0.0.1:6379/0"),
        backend=os.environ.get("HEAVY_APP_BACKEND", "redis://127.0.0.1:6379/1"),
    )
    app.conf.worker_hijack_root_logger = True
    if os.environ.get("HEAVY_APP_ACKS_LATE") == "1":
        app.conf.task_acks_late = True
        app.conf.task_reject_on_worker_lost = True
    if os.environ.get("HEAVY_APP_GUARD", "1") != "0":
        import celery_guard

        celery_guard.install(app)
    return app


@signals.worker_process_init.connect
def _child_started(**_: object) -> None:
    """One line per forked pool child, as ``heavy_app`` logs, so forks can be counted."""
    logging.getLogger("heavy_app").warning("heavy_app pool child started pid=%d", os.getpid())
