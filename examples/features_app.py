"""Ordinary Celery features, for the feature matrix (tests/integration/test_celery_features.py).

Each task counts its runs in the result backend's Redis (``runs:<task id>``), so a test
can tell a task lost from one run twice. Settings come from the environment:
``FEATURES_BROKER``, ``FEATURES_BACKEND`` (a Redis URL: the run counter lives there too),
``FEATURES_PREFETCH`` (``worker_prefetch_multiplier``), ``FEATURES_SOFT_SHUTDOWN_TIMEOUT``
(``worker_soft_shutdown_timeout``, Celery 5.5), and ``FEATURES_GUARD=0`` to run the
same app without celery-guard.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import redis
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

app = Celery(
    "features_app",
    broker=os.environ.get("FEATURES_BROKER", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("FEATURES_BACKEND", "redis://127.0.0.1:6379/1"),
)
app.conf.worker_hijack_root_logger = True
app.conf.worker_prefetch_multiplier = int(os.environ.get("FEATURES_PREFETCH", "4"))
app.conf.result_extended = True
app.conf.worker_soft_shutdown_timeout = float(os.environ.get("FEATURES_SOFT_SHUTDOWN_TIMEOUT", "0"))

if os.environ.get("FEATURES_GUARD", "1") != "0":
    import celery_guard

    celery_guard.install(app)

_counter: redis.Redis | None = None


def counted(task_id: str | None) -> int:
    """Count one run of the task ``task_id``; the runs so far, this one included."""
    global _counter
    if _counter is None:
        _counter = redis.Redis.from_url(app.conf.result_backend)
    return int(_counter.incr(f"runs:{task_id}"))


@app.task(bind=True)
def add(self: Any, x: int, y: int) -> int:
    counted(self.request.id)
    return x + y


@app.task(bind=True)
def tsum(self: Any, numbers: list[int]) -> int:
    counted(self.request.id)
    return sum(numbers)


@app.task(bind=True)
def sleep(self: Any, seconds: float) -> float:
    counted(self.request.id)
    time.sleep(seconds)
    return seconds


@app.task(bind=True, max_retries=3)
def flaky(self: Any, failures: int) -> int:
    """Fails ``failures`` times, retrying each time after 0.1 s."""
    runs = counted(self.request.id)
    if self.request.retries < failures:
        raise self.retry(countdown=0.1)
    return runs


@app.task(bind=True, autoretry_for=(ValueError,), retry_kwargs={"max_retries": 3, "countdown": 0.1})
def autoretried(self: Any, failures: int) -> int:
    runs = counted(self.request.id)
    if self.request.retries < failures:
        raise ValueError("not yet")
    return runs


@app.task(bind=True, soft_time_limit=0.5)
def soft_limited(self: Any) -> str:
    counted(self.request.id)
    try:
        time.sleep(5)
    except SoftTimeLimitExceeded:
        return "soft"
    return "slept"


@app.task(bind=True, time_limit=0.5)
def hard_limited(self: Any) -> str:
    counted(self.request.id)
    time.sleep(5)
    return "slept"


@app.task(bind=True, acks_late=True, acks_on_failure_or_timeout=False)
def fails_unacked(self: Any) -> None:
    """``task_acks_on_failure_or_timeout=False``, per task: the failure rejects the
    message (no requeue) instead of acknowledging it."""
    counted(self.request.id)
    raise ValueError("fails")


@app.task(bind=True, acks_late=True, acks_on_failure_or_timeout=False, time_limit=0.5)
def times_out_unacked(self: Any) -> str:
    counted(self.request.id)
    time.sleep(5)
    return "slept"


@app.task(bind=True, rate_limit="20/s")
def rated(self: Any) -> int:
    return counted(self.request.id)


@app.task(bind=True, acks_late=True, reject_on_worker_lost=True)
def dies_once(self: Any) -> int:
    """Its child dies (SIGKILL) on the first run; the message goes back to the queue and
    the second run returns."""
    runs = counted(self.request.id)
    if runs == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return runs
