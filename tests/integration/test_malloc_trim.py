"""A child gives back the C heap a task freed (``CELERY_GUARD_MALLOC_TRIM``, on by default).

``heavy_app.churn(n)`` keeps n MiB and frees n MiB into glibc's heap between the blocks it
keeps, which glibc does not return on its own. The same worker with the trim turned off
is the control: the difference is the trim's.
"""

from __future__ import annotations

from collections.abc import Callable

import harness
from harness import Worker

MakeWorker = Callable[..., Worker]

CHURN_MIB = 64
SMALL_APP = {"HEAVY_APP_OBJECTS": "1000", "HEAVY_APP_BUFFER_MIB": "1"}


def _left_after_churn(redis: harness.RedisServer, make_worker: MakeWorker, trim: str) -> float:
    """How much higher (MiB) the child's RSS is after a churn task than before it."""
    env = harness.worker_env(
        redis, {**SMALL_APP, "CELERY_GUARD_CHILD_LOG": "all", "CELERY_GUARD_MALLOC_TRIM": trim}
    )
    worker = make_worker(["-c", "1"], env)
    worker.wait_ready(60)
    (done,) = harness.send_tasks(redis, worker.queue, "churn", 1, (CHURN_MIB,))
    assert done.get(timeout=60)
    assert harness.eventually(lambda: worker.events("child"))
    worker.stop()
    (line,) = [line for line in worker.events("child") if line["task"] == "heavy_app.churn"]
    return float(line["rss_delta_mib"])


def test_a_child_gives_back_the_heap_a_task_freed(
    redis: harness.RedisServer, make_worker: MakeWorker
) -> None:
    kept = _left_after_churn(redis, make_worker, trim="0")
    given_back = _left_after_churn(redis, make_worker, trim="1")
    # the control: glibc keeps what the task freed as well as what it kept
    assert kept >= 2 * CHURN_MIB * 0.95, kept
    assert CHURN_MIB * 0.95 <= given_back <= CHURN_MIB * 1.05, given_back
