"""Run-time protection: when memory runs short, lose a child, not the worker.

The kernel's OOM killer picks its victim by size and ``oom_score_adj``. The main process
is usually the largest process of a worker, so without help it is the one killed, and the
whole worker goes with it. Raising each child's ``oom_score_adj`` (no privilege needed to
raise it) makes the kernel pick a child instead, which billiard replaces.
"""

from __future__ import annotations

import gc
import logging
import mmap
import os

from .config import Settings
from .logline import emit
from .sizes import mib

PAGE = mmap.PAGESIZE


def set_oom_score_adj(value: int, path: str = "/proc/self/oom_score_adj") -> str:
    """Write ``value``; return "" or why it could not be written (lowering needs privilege)."""
    try:
        with open(path, "w") as file:
            file.write(str(value))
    except OSError as error:
        return f"{type(error).__name__}: {error.strerror or error}"
    return ""


class ChildOomScore:
    """``worker_process_init`` receiver: make every pool child the OOM killer's first pick."""

    def __init__(self, settings: Settings) -> None:
        self.value = settings.child_oom_score_adj
        self.log_format = settings.log_format

    def __call__(self, **_: object) -> None:
        if self.value is None:
            return
        why = set_oom_score_adj(self.value)
        if why:
            fields = {"pid": os.getpid(), "oom_score_adj": self.value, "reason": why}
            emit(logging.WARNING, "oom_score_adj_failed", fields, self.log_format)


def freeze_before_fork(**_: object) -> None:
    """``worker_before_create_process`` receiver: collect, then move every object to the
    permanent generation, so the collector in a child never writes to (and copies) the
    pages it shares with the parent. The recipe of the ``gc.freeze`` documentation."""
    gc.collect()
    gc.freeze()


EX_TEMPFAIL = 75  # sysexits.h: a temporary failure; the supervisor should start it again


class WorkerMemoryLimit:
    """``CELERY_GUARD_MAX_WORKER_MEMORY`` for pools that do not fork, where
    ``worker_max_memory_per_child`` does nothing: past the limit, a warm shutdown.

    Celery's consumer loop checks ``state.should_stop`` on every cycle; setting it stops
    consuming, lets active tasks finish, returns unacknowledged messages to the broker and
    exits with the status given.
    """

    def __init__(self, limit: int, hostname: str, settings: Settings) -> None:
        self.limit = limit
        self.hostname = hostname
        self.log_format = settings.log_format
        self.tripped = False
        self.statm = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)

    def rss(self) -> int:
        return int(os.pread(self.statm, 64, 0).split()[1]) * PAGE

    def check(self) -> None:
        if self.tripped:
            return
        rss = self.rss()
        if rss <= self.limit:
            return
        from celery.worker import state

        self.tripped = True
        active = sorted(request.name for request in list(state.active_requests))
        fields = {
            "worker": self.hostname,
            "level": "max_worker_memory",
            "usage_mib": mib(rss),
            "limit_mib": mib(self.limit),
            "action": "warm_shutdown",
            "pid": os.getpid(),
            "task": ",".join(active) or None,
            "exit_status": EX_TEMPFAIL,
        }
        emit(logging.WARNING, "pressure", fields, self.log_format)
        state.should_stop = EX_TEMPFAIL
