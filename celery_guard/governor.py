"""Run-time protection: when memory runs short, lose a child, not the worker.

The kernel's OOM killer picks its victim by size and ``oom_score_adj``. The main process
is usually the largest process of a worker, so without help it is the one killed, and the
whole worker goes with it. Raising each child's ``oom_score_adj`` (no privilege needed to
raise it) makes the kernel pick a child instead, which billiard replaces.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from typing import Any

from . import cgroups
from .config import Settings
from .footprint import StatmRss
from .logline import emit, logger
from .pressure import Action, Child, Marks, Policy
from .sizes import mib
from .telemetry import read_private


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

    def __init__(
        self, limit: int, hostname: str, settings: Settings, collector: Any = None
    ) -> None:
        self.limit = limit
        self.hostname = hostname
        self.collector = collector
        self.log_format = settings.log_format
        self.tripped = False
        self.rss = StatmRss()

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
        if self.collector is not None:
            self.collector.count_pressure("warm_shutdown")
        state.should_stop = EX_TEMPFAIL


class LimitWatch:
    """The cgroup's limit can change while the worker runs (``docker update --memory``,
    an in-place pod resize, an operator's echo): read it again every second, and carry a
    new figure to the collector and the brake, with one line."""

    def __init__(
        self,
        cgroup: cgroups.Cgroup,
        physical: int,
        limit: int,
        hostname: str,
        settings: Settings,
        collector: Any,
        brake: Any,
    ) -> None:
        self.cgroup = cgroup
        self.physical = physical
        self.limit = limit
        self.hostname = hostname
        self.settings = settings
        self.collector = collector
        self.brake = brake  # a callable: the Brake once the event loop started it, or None

    def check(self) -> None:
        found = cgroups.read_limit(self.cgroup, self.physical)
        new = found.bytes or self.physical  # no limit any more: physical memory
        if new == self.limit:
            return
        fields = {
            "worker": self.hostname,
            "action": "changed",
            "old_mib": mib(self.limit),
            "new_mib": mib(new),
            "limit_source": found.source if found.bytes else "physical",
            "limit_detail": found.reason,
        }
        emit(logging.WARNING, "limit", fields, self.settings.log_format)
        self.limit = new
        self.collector.limit = new
        brake = self.brake()
        if brake is not None:
            brake.set_limit(new)


class Brake:
    """Act before the kernel does: carry out ``pressure.Policy`` on the worker.

    It runs on the worker's event loop (pool operations belong to the main thread): a
    check every ``brake_interval`` seconds, and every 0.05 s above the low-water mark, each
    reading two cgroup files; the children's private memory is read only when a rule
    needs it.
    """

    def __init__(
        self,
        w: Any,
        settings: Settings,
        cgroup: cgroups.Cgroup,
        limit: int,
        target: int,
        estimate: int,
        collector: Any,
    ) -> None:
        self.w = w
        self.settings = settings
        self.cgroup = cgroup
        self.limit = limit
        marks = Marks.of(limit, settings.low_water, settings.high_water, settings.hard_water)
        self.policy = Policy(marks, settings.brake_interval, target, estimate)
        self.collector = collector
        self.stopped = False

    # -- the loop --------------------------------------------------------------------
    def start(self, hub: Any) -> None:
        self.hub = hub
        hub.call_later(self.settings.brake_interval, self.tick)

    def set_limit(self, limit: int) -> None:
        """From the limit watch's thread: one assignment, read whole by the next tick."""
        settings = self.settings
        self.limit = limit
        self.policy.marks = Marks.of(
            limit, settings.low_water, settings.high_water, settings.hard_water
        )

    def stop(self) -> None:
        self.stopped = True

    def tick(self) -> None:
        if self.stopped:
            return
        delay = self.settings.brake_interval
        try:
            working_set = cgroups.read_usage(self.cgroup).working_set
            if working_set is not None:
                size = self.w.pool.num_processes
                for action in self.policy.decide(
                    working_set, time.monotonic(), size, self._children
                ):
                    self._carry_out(action, working_set)
                delay = self.policy.next_delay(working_set)
        except Exception:  # noqa: BLE001 - the brake must not stop the worker
            logger.exception("celery-guard event=error stage=brake")
        self.hub.call_later(delay, self.tick)

    # -- the pool --------------------------------------------------------------------
    def _pool(self) -> Any:
        return self.w.pool._pool

    def _children(self, busy: bool | None = None) -> list[Child]:
        """The live children (only the busy or the idle ones when asked), with their
        private memory read now: smaps_rollup costs about 1.5 ms for a large child."""
        pool = self._pool()
        found = []
        for proc in list(pool._pool):
            if proc.exitcode is not None or not proc.pid:
                continue
            active = bool(pool._worker_active(proc))
            if busy is not None and active != busy:
                continue
            private = read_private(proc.pid)
            if private is not None:
                found.append(Child(proc.pid, private, active))
        return found

    def _process(self, pid: int) -> Any:
        for proc in list(self._pool()._pool):
            if proc.pid == pid and proc.exitcode is None:
                return proc
        return None

    def _carry_out(self, action: Action, working_set: int) -> None:
        extra: dict[str, Any] = {}
        child = action.child
        if action.action == "pause":
            if not self._consume(False):
                self.policy.paused = False  # no consumer yet: nothing to pause
                return
        elif action.action == "resume":
            self._consume(True)
        elif action.action == "grow":
            self.w.pool.grow(1)
            extra = {"child_cost_mib": mib(action.cost), "projected_mib": mib(action.projected)}
        elif child is not None:
            proc = self._process(child.pid)
            if proc is None:
                return  # it exited since it was read
            task = running_task(child.pid) if action.action == "terminate" else None
            # at the hard mark even idle children go at once: SIGKILL frees without waiting
            self._remove(proc, kill=action.level == "hard")
            extra = {"pid": child.pid, "private_mib": mib(child.private)}
            if action.action == "terminate":
                extra.update(task=task[0] if task else None, task_id=task[1] if task else None)
        self._log(action.level, working_set, action.action, **extra)

    def _consume(self, on: bool) -> bool:
        consumer = getattr(self.w, "consumer", None)
        task_consumer = getattr(consumer, "task_consumer", None)
        if task_consumer is None:
            return False
        if on:
            task_consumer.consume()
        else:
            task_consumer.cancel()
        return True

    def _remove(self, proc: Any, kill: bool) -> None:
        """Take one child out of the pool (billiard would replace it otherwise); the last
        child is only replaced, so that the pool never stops."""
        pool = self._pool()
        shrink = self.w.pool.num_processes > 1
        if shrink:
            pool._processes -= 1
            if pool._putlock:
                pool._putlock.shrink()
        if kill:
            self.collector.stopped_by_brake.add(proc.pid)  # not an OOM kill: ours
            os.kill(proc.pid, signal.SIGKILL)
        else:
            proc.terminate_controlled()
        if shrink:
            pool.on_shrink(1)

    def _log(self, level: str, working_set: int, action: str, **extra: Any) -> None:
        self.collector.count_pressure(action)
        fields = {
            "worker": self.w.hostname,
            "level": level,
            "usage_mib": mib(working_set),
            "limit_mib": mib(self.limit),
            "action": action,
            "concurrency": self.w.pool.num_processes,
            **extra,
        }
        emit(logging.WARNING, "pressure", fields, self.settings.log_format)


def running_task(pid: int) -> tuple[str, str] | None:
    """(name, id) of the task the child ``pid`` had accepted, from the worker's state."""
    from celery.worker import state

    for request in list(state.active_requests):
        if getattr(request, "worker_pid", None) == pid:
            return request.name, request.id
    return None
