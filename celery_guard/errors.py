"""The exceptions a task may see because of memory, importable from ``celery_guard``.

They travel through Celery's result backend by class name (``MemoryLimitExceeded``), so
they take one message argument and nothing else: the backend rebuilds an exception from
its name, module and arguments.
"""

from __future__ import annotations

from billiard.exceptions import WorkerLostError


class MemoryLimitExceeded(Exception):
    """The task was stopped for memory: it passed its own ``memory_limit``, or the guard
    (or the kernel's OOM killer) stopped its child because the worker ran out. The task
    is not re-delivered."""


class SoftMemoryLimitExceeded(Exception):
    """Raised inside a task that passed its ``soft_memory_limit``: catch it to clean up,
    save partial work or retry with less."""


class MemoryKilled(MemoryLimitExceeded, WorkerLostError):
    """A ``MemoryLimitExceeded`` that Celery also reads as a lost worker, so that with
    ``task_acks_late`` and ``task_reject_on_worker_lost`` the message goes back to the
    queue. Used for a task stopped by the guard or the kernel while its retries last."""


__all__ = ["MemoryKilled", "MemoryLimitExceeded", "SoftMemoryLimitExceeded"]
