"""Inside a pool child: follow each run of a task that declares a memory limit.

The main process wraps the ``run`` of every limited task before the pool forks, so each
child's tracer calls the wrapper, which arms the watchdog while the task runs. Tasks
without a limit are not wrapped and pay nothing.

While armed, a thread of the child reads the child's private memory (``smaps_rollup``,
0.15 to 5 ms, off the task's thread) as often as the task's growth needs
(``task_limits.next_check``). Its first read may come after the task allocated, so the
anonymous resident memory at the task's start (``statm``, about 1.5 us) bounds the growth
too: the larger counts (``task_limits.decide``). To raise in the task it sends the task's
thread ``WATCHDOG_SIGNAL`` (real-time: Celery's soft time limit uses SIGUSR1, nothing in
Celery or billiard a real-time signal), whose handler raises the pending exception only
while that run is armed. A signal interrupts a blocking system call; a task that holds
the interpreter in C code for long is stopped by the cgroup-level safety net instead.

``Enforcer`` is the main process's half: told of each limit a task passed (the child's
records, read by the collector), it kills a child whose task did not stop and has a child
whose task passed its hard limit replaced after it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .actuator import Listener, PoolControl
from .errors import MemoryLimitExceeded, SoftMemoryLimitExceeded
from .exits import ExitCauses, Kill
from .logline import emit, logger
from .procfs import StatmAnon
from .protect import signals_to_the_main_thread
from .sizes import mib
from .task_limits import HARD, KILL, SOFT, Run, TaskLimit, decide, growth_rate, next_check

if TYPE_CHECKING:
    from .telemetry import LimitHit

WATCHDOG_SIGNAL = signal.SIGRTMIN + 2


@dataclass(frozen=True)
class Armed:
    """One run as the task's thread armed it: what the watchdog compares and names is
    this run's, never the next one's."""

    run: Run
    name: str
    task_id: str
    anon_at_start: int


class Watchdog:
    """Made before the pool forks (the TaskLimits step's), started in each child, inert
    elsewhere."""

    def __init__(self) -> None:
        self.active = False  # only in a child, once started
        self.armed: Armed | None = None
        #: the exception to raise in the task's thread, and the run it is about
        self.pending: tuple[Armed, BaseException] | None = None
        #: the task's thread is inside arm/disarm (their lock and Event): no raise there
        self.busy = False
        self.wake = threading.Event()
        self.lock = threading.Lock()
        self.send: Callable[[str], None] = lambda record: None
        self.hostname = ""
        self.read_private: Callable[[], int | None] = lambda: None
        self.read_anon: Callable[[], int] = lambda: 0
        self.main = 0  # the thread the tasks run in

    # -- in the child ----------------------------------------------------------------
    def start(
        self, send: Callable[[str], None], read_private: Callable[[], int | None], hostname: str
    ) -> None:
        """At ``worker_process_init``, in the child's main thread."""
        self.send, self.read_private = send, read_private
        self.read_anon = StatmAnon()
        self.hostname = hostname
        self.main = threading.main_thread().ident or 0
        signal.signal(WATCHDOG_SIGNAL, self._on_signal)
        threading.Thread(target=self._loop, name="celery-guard-watchdog", daemon=True).start()
        self.active = True

    def arm(self, name: str, task_id: str, limit: TaskLimit) -> None:
        self._set(Armed(Run(limit), name, task_id, self.read_anon()))  # as the task starts

    def disarm(self) -> None:
        self._set(None)

    def _set(self, armed: Armed | None) -> None:
        """The run followed now, and no exception pending for the one before."""
        self.busy = True
        try:
            with self.lock:
                self.armed, self.pending = armed, None
            self.wake.set()
        finally:
            self.busy = False

    def _on_signal(self, signum: int, frame: Any) -> None:
        """Raise the pending exception in the run it is about; not inside arm/disarm, where
        it could leave the Event half updated (the signal is sent again at the next check)."""
        if self.busy:
            return
        with self.lock:
            pending, self.pending = self.pending, None
            armed = self.armed
        if pending is not None and pending[0] is armed:
            raise pending[1]

    def _raise(self, armed: Armed, error: BaseException) -> None:
        with self.lock:
            if self.armed is not armed:  # that run ended: not the next task's business
                return
            self.pending = (armed, error)
        signal.pthread_kill(self.main, WATCHDOG_SIGNAL)

    def _send_again(self, armed: Armed) -> None:
        """A signal that came while the task's thread was in arm/disarm raised nothing."""
        with self.lock:
            again = self.pending is not None and self.pending[0] is armed
        if again:
            signal.pthread_kill(self.main, WATCHDOG_SIGNAL)

    def _loop(self) -> None:
        signals_to_the_main_thread()  # Celery's soft time limit (SIGUSR1) wakes the task
        followed: Armed | None = None
        while True:
            armed = self.armed
            if armed is None or armed is followed:
                self.wake.wait()
                self.wake.clear()
                continue
            followed = armed  # a run armed while the last one was followed starts here
            try:
                self._follow(armed)
            except Exception:  # noqa: BLE001 - the watchdog follows the next run
                logger.warning("celery-guard event=error stage=watchdog", exc_info=True)

    def _follow(self, armed: Armed) -> None:
        start = self.read_private()
        if start is None or self.armed is not armed:
            return
        run, name, task_id = armed.run, armed.name, armed.task_id
        started = last_time = time.monotonic()
        last_held = 0
        delay = 0.02
        while self.armed is armed:
            self.wake.wait(delay)
            self.wake.clear()
            if self.armed is not armed:
                return
            self._send_again(armed)
            now_private = self.read_private()
            if now_private is None:
                return
            held = max(now_private - start, self.read_anon() - armed.anon_at_start)
            now = time.monotonic()
            rate = growth_rate(held, last_held, now - last_time, now - started)
            last_time, last_held = now, held
            action = decide(run, held, now)
            if action == SOFT:
                run.soft_raised = True
                self._report(SOFT, run.limit.soft or 0, held, name, task_id, "raised")
                self._raise(armed, SoftMemoryLimitExceeded(self._message(
                    name, task_id, "soft_memory_limit", run.limit.soft or 0, held)))  # fmt: skip
            elif action == HARD:
                run.hard_raised_at = now
                self._report(HARD, run.limit.hard or 0, held, name, task_id, "raised")
                self._raise(armed, MemoryLimitExceeded(self._message(
                    name, task_id, "memory_limit", run.limit.hard or 0, held)))  # fmt: skip
            elif action == KILL:
                self._report(KILL, run.limit.hard or 0, held, name, task_id, "stop_requested")
                run.hard_raised_at = now  # ask again after another grace period
            delay = next_check(run, held, rate)

    @staticmethod
    def _message(name: str, task_id: str, option: str, limit: int, held: int) -> str:
        return (
            f"{name}[{task_id}] passed its {option} of {mib(limit)} MiB: it held "
            f"{mib(held)} MiB more than when it started"
        )

    def _report(
        self, kind: str, limit: int, held: int, name: str, task_id: str, action: str
    ) -> None:
        """One line in the child's log, and a record for the main process (which counts
        it, recycles the child after a hard limit, stops it when asked)."""
        fields = {
            "worker": self.hostname, "pid": os.getpid(), "task": name, "task_id": task_id,
            "kind": kind, "task_limit_mib": mib(limit), "held_mib": mib(held), "action": action,
        }  # fmt: skip
        level = logging.WARNING if kind == SOFT else logging.ERROR
        emit(level, "task_memory_limit", fields)
        self.send(f"L {os.getpid()} {kind} {limit} {max(held, 0)} {task_id} {name}\n")


def wrap(task: Any, name: str, limit: TaskLimit, dog: Watchdog) -> None:
    """Make ``task.run`` arm ``dog`` for its runs (before the pool forks, so that every
    child's tracer calls it); where it is not started, only call through."""
    original = task.run
    if getattr(original, "__celery_guard_limit__", None) is not None:
        return  # wrapped already

    def run(*args: Any, **kwargs: Any) -> Any:
        if not dog.active:
            return original(*args, **kwargs)
        task_id = getattr(getattr(task, "request", None), "id", None) or "?"
        dog.arm(name, task_id, limit)
        try:
            return original(*args, **kwargs)
        finally:
            dog.disarm()

    run.__celery_guard_limit__ = limit  # type: ignore[attr-defined]
    run.__wrapped__ = original  # type: ignore[attr-defined]
    task.run = run


class Enforcer(Listener):
    """In the main process: what a child's watchdog could not do itself. Hears the pool
    and the children's limit records, read before the end of every limited task
    (``records_before_end``), so that a hit recycles the child at that end."""

    def __init__(
        self, hostname: str, control: PoolControl, exits: ExitCauses, limited: Collection[str] = ()
    ) -> None:
        self.hostname = hostname
        self.control = control
        self.exits = exits
        self.records_before_end = frozenset(limited)
        self.recycle_after: set[int] = set()  # children whose task passed its hard limit

    def on_hit(self, hit: LimitHit) -> None:
        """From the sampler's thread: a task passed its own limit."""
        if hit.kind == HARD:
            self.recycle_after.add(hit.pid)
        if hit.kind != KILL:
            return
        reason = (
            f"passed its memory_limit of {mib(hit.limit)} MiB (held {mib(hit.held)} MiB) and "
            "did not stop when MemoryLimitExceeded was raised in it"
        )
        self.exits.killing(hit.pid, Kill(reason, hit.limit))
        stopped = self.control.kill(hit.pid, shrink=False)  # a signal: from any thread
        fields = {
            "worker": self.hostname, "pid": hit.pid, "task": hit.name,
            "task_id": hit.task_id, "kind": HARD, "task_limit_mib": mib(hit.limit),
            "held_mib": mib(hit.held), "action": "killed" if stopped else "gone",
        }  # fmt: skip
        emit(logging.ERROR, "task_memory_limit", fields)

    # -- PoolControl's listener ----------------------------------------------------------
    def child_down(self, pid: int, exitcode: int | None, task: tuple[str, str] | None) -> None:
        self.recycle_after.discard(pid)

    def task_ready(self, pid: int, task_id: str) -> bool:
        """Replace a child whose task passed its hard limit: what its allocator kept of
        what the task held is not worth keeping."""
        if pid not in self.recycle_after:  # its record was read first (PoolControl)
            return False
        self.recycle_after.discard(pid)
        fields = {"worker": self.hostname, "pid": pid, "reason": "task_memory_limit",
                  "task_id": task_id}  # fmt: skip
        emit(logging.INFO, "recycle", fields)
        return True


__all__ = ["WATCHDOG_SIGNAL", "Armed", "Enforcer", "Watchdog", "wrap"]
