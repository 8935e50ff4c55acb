"""Protections of a process, apart from the pool's budget: when memory runs short, lose a
child, not the worker; copy less at each fork; stop a pool that does not fork in time.

The kernel's OOM killer picks its victim by size and ``oom_score_adj``. The main process
is usually the largest process of a worker, so without help it is the one killed, and the
whole worker goes with it. Raising each child's ``oom_score_adj`` (no privilege needed to
raise it) makes the kernel pick a child instead, which billiard replaces.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

from celery.worker import state

from . import procfs
from .config import Settings
from .logline import emit
from .sizes import mib

#: Signals a thread raises by its own fault: never blocked.
_SYNCHRONOUS = frozenset(
    getattr(signal, name)
    for name in ("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGTRAP", "SIGABRT", "SIGSYS")
    if hasattr(signal, name)
)
#: What the guard's threads block: every other signal goes to the main thread.
_FOR_THE_MAIN_THREAD = frozenset(signal.valid_signals()) - _SYNCHRONOUS


def signals_to_the_main_thread() -> None:
    """Block process-directed signals in the calling thread (one of the guard's): the
    kernel delivers a signal to any thread that does not block it, and Python runs the
    handler only once the main thread wakes, so a SIGTERM would wait out the event loop's
    poll, a child's SIGUSR1 (Celery's soft time limit) the task's sleep."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, _FOR_THE_MAIN_THREAD)


@contextlib.contextmanager
def threads_without_signals() -> Iterator[None]:
    """Threads started inside inherit a mask that sends signals to the main thread."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _FOR_THE_MAIN_THREAD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def set_oom_score_adj(value: int, path: str = procfs.path("self", "oom_score_adj")) -> str:
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

    def __call__(self, **_: object) -> None:
        if self.value is None:
            return
        why = set_oom_score_adj(self.value)
        if why:
            fields = {"pid": os.getpid(), "oom_score_adj": self.value, "reason": why}
            emit(logging.WARNING, "oom_score_adj_failed", fields)


class FreezeBeforeFirstFork:
    """``worker_before_create_process`` receiver: before the first child, collect, then
    ``gc.freeze``: no child's collector copies the pages it shares with the main process,
    and the full collection Celery runs before *every* fork (AsynPool, Celery issue #2927),
    most of what a fork costs with a large app, skips what the worker imported. Once only:
    freezing at each fork would keep cycles that die later alive for good."""

    def __init__(self) -> None:
        self.frozen = False
        #: seconds that first full collection took: what a worker without the freeze
        #: spends in it before every fork (the throughput plan's vanilla pair)
        self.collect_seconds = 0.0

    def __call__(self, **_: object) -> None:
        if self.frozen:
            return
        began = time.thread_time()
        gc.collect()
        self.collect_seconds = time.thread_time() - began
        gc.freeze()
        self.frozen = True


EX_TEMPFAIL = 75  # sysexits.h: a temporary failure; the supervisor should start it again


class WorkerMemoryLimit:
    """``CELERY_GUARD_MAX_WORKER_MEMORY`` for pools that do not fork, where
    ``worker_max_memory_per_child`` does nothing: past the limit, a warm shutdown (Celery's
    consumer loop checks ``state.should_stop`` on every cycle: it stops consuming, lets
    active tasks finish, returns unacknowledged messages and exits with that status)."""

    def __init__(self, limit: int, hostname: str, collector: Any = None) -> None:
        self.limit = limit
        self.hostname = hostname
        self.collector = collector
        self.tripped = False
        self.rss = procfs.StatmRss()

    def check(self) -> None:
        if self.tripped:
            return
        rss = self.rss()
        if rss <= self.limit:
            return
        # The stop flag first: nothing that follows (a log line, a set other threads
        # change) can leave the watch tripped and the worker running.
        state.should_stop = EX_TEMPFAIL  # type: ignore[assignment]  # celery-types: None; an exit code
        self.tripped = True
        fields = {
            "worker": self.hostname,
            "level": "max_worker_memory",
            "rss_mib": mib(rss),
            "max_worker_memory_mib": mib(self.limit),
            "action": "warm_shutdown",
            "pid": os.getpid(),
            "task": ",".join(active_task_names(state.active_requests)) or None,
            "exit_status": EX_TEMPFAIL,
        }
        emit(logging.WARNING, "pressure", fields)
        if self.collector is not None:
            self.collector.count_pressure("warm_shutdown")


def active_task_names(requests: Any, attempts: int = 5) -> list[str]:
    """The names of the running tasks, from a set that other threads change while it is
    read (``RuntimeError: set changed size``): try again, then give up on the names."""
    for _ in range(attempts):
        try:
            return sorted(request.name for request in list(requests))
        except RuntimeError:
            continue
    return []


__all__ = [
    "EX_TEMPFAIL",
    "ChildOomScore",
    "FreezeBeforeFirstFork",
    "WorkerMemoryLimit",
    "active_task_names",
    "set_oom_score_adj",
]
