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
import signal
import time
from typing import Any

from . import cgroups
from .config import Settings
from .footprint import StatmRss, read_kib_fields
from .logline import emit, logger
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
        state.should_stop = EX_TEMPFAIL


class Brake:
    """Act before the kernel does: keep the cgroup's working set under the limit.

    It runs on the worker's event loop (pool operations belong to the main thread): a
    check every ``brake_interval`` seconds, and every 0.05 s above the low-water mark, each
    reading two cgroup files. Between the marks it does nothing, so a pool that fits
    stays as it is.
    """

    FAST = 0.05  # seconds between checks above the low-water mark
    COOLDOWN = 0.3  # seconds after retiring a child: time for it to exit and free memory
    HARD_COOLDOWN = 0.1  # after stopping one at the hard mark: SIGKILL frees at once
    LOOKAHEAD = 0.5  # seconds: act on where the working set will be, not where it is

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
        self.low = int(limit * settings.low_water)
        self.high = int(limit * settings.high_water)
        self.hard = int(limit * settings.hard_water)
        self.target = target
        self.estimate = estimate
        self.collector = collector
        self.paused = False
        self.stopped = False
        self.quiet_until = 0.0
        self.hard_quiet_until = 0.0
        self.grow_after = 0.0
        self.last: tuple[float, int] | None = None  # (time, working set) at the last check
        self.rate = 0.0  # bytes per second the working set rose by at the last check

    # -- the loop --------------------------------------------------------------------
    def start(self, hub: Any) -> None:
        self.hub = hub
        hub.call_later(self.settings.brake_interval, self.tick)

    def stop(self) -> None:
        self.stopped = True

    def tick(self) -> None:
        if self.stopped:
            return
        delay = self.settings.brake_interval
        try:
            working_set = cgroups.read_usage(self.cgroup).working_set
            if working_set is not None:
                self.check(working_set, time.monotonic())
                delay = self.next_delay(working_set)
        except Exception:  # noqa: BLE001 - the brake must not stop the worker
            logger.exception("celery-guard event=error stage=brake")
        self.hub.call_later(delay, self.tick)

    def next_delay(self, working_set: int) -> float:
        """Check again before the working set can reach the low-water mark at the rate it
        is rising; above that mark, check often."""
        if working_set >= self.low:
            return self.FAST
        interval = self.settings.brake_interval
        if self.rate > 0:
            interval = min(interval, max((self.low - working_set) / self.rate / 2, self.FAST))
        return interval

    def projected(self, working_set: int, now: float) -> int:
        """The working set LOOKAHEAD seconds from now, at the rate it rose since the last
        check: children that copy hundreds of MiB a second outrun a check that waits."""
        last, self.last = self.last, (now, working_set)
        if last is None or now <= last[0]:
            return working_set
        self.rate = max((working_set - last[1]) / (now - last[0]), 0.0)
        return working_set + int(self.rate * self.LOOKAHEAD)

    def check(self, working_set: int, now: float) -> None:
        ahead = self.projected(working_set, now)
        if working_set >= self.high:
            self.grow_after = now + 10 * self.settings.brake_interval
            if not self.paused:
                self.pause(working_set)
            if ahead >= self.hard:
                if now >= self.hard_quiet_until and self.stop_busiest(working_set):
                    self.hard_quiet_until = now + self.HARD_COOLDOWN
                return
            if now >= self.quiet_until and self.retire_idlest(working_set):
                self.quiet_until = now + self.COOLDOWN
        elif self.paused and working_set >= self.low:
            # Paused, idle children keep what they copied: retire them until below the
            # low mark, or the worker would wait for memory that nothing frees.
            if now >= self.quiet_until and self.retire_idlest(working_set, level="low"):
                self.quiet_until = now + self.COOLDOWN
        elif working_set < self.low:
            if self.paused:
                self.resume(working_set)
            if now >= self.grow_after and self.grow(working_set):
                self.grow_after = now + 5 * self.settings.brake_interval

    # -- the actions -----------------------------------------------------------------
    def _pool(self) -> Any:
        return self.w.pool._pool

    def _children(self) -> list[tuple[Any, int, bool]]:
        """(process, private bytes, busy) for each live child; the largest first."""
        pool = self._pool()
        found = []
        for proc in list(pool._pool):
            if proc.exitcode is not None or not proc.pid:
                continue
            private = telemetry_private(proc.pid)
            if private is not None:
                found.append((proc, private, pool._worker_active(proc)))
        return sorted(found, key=lambda item: -item[1])

    def _log(self, level: str, working_set: int, action: str, **extra: Any) -> None:
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

    def pause(self, working_set: int) -> None:
        consumer = getattr(self.w, "consumer", None)
        task_consumer = getattr(consumer, "task_consumer", None)
        if task_consumer is None:
            return
        task_consumer.cancel()
        self.paused = True
        self._log("high", working_set, "pause")

    def resume(self, working_set: int) -> None:
        consumer = getattr(self.w, "consumer", None)
        task_consumer = getattr(consumer, "task_consumer", None)
        if task_consumer is not None:
            task_consumer.consume()
        self.paused = False
        self._log("low", working_set, "resume")

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

    def retire_idlest(self, working_set: int, level: str = "high") -> bool:
        """Retire the idle child holding the most private memory; keep one child."""
        if self.w.pool.num_processes <= 1:
            return False
        for proc, private, busy in self._children():
            if not busy:
                self._remove(proc, kill=False)
                self._log(level, working_set, "retire", pid=proc.pid, private_mib=mib(private))
                return True
        return False

    def stop_busiest(self, working_set: int) -> bool:
        """Near the hard limit: stop the busy child with the most private memory now,
        rather than let the kernel choose (it may choose the main process)."""
        for proc, private, busy in self._children():
            if busy:
                task = running_task(proc.pid)
                self._remove(proc, kill=True)
                self._log(
                    "hard",
                    working_set,
                    "terminate",
                    pid=proc.pid,
                    private_mib=mib(private),
                    task=task[0] if task else None,
                    task_id=task[1] if task else None,
                )
                return True
        return False

    def grow(self, working_set: int) -> bool:
        """One more child, towards the requested concurrency, when it fits under the
        high-water mark at the cost the largest child really has now.

        Young children have not grown yet: the working set is projected as if every
        child had reached that cost, so the pool does not overshoot and shrink again.
        """
        size = self.w.pool.num_processes
        if size >= self.target:
            return False
        privates = [private for _, private, _ in self._children()]
        cost = max(privates) if privates else self.estimate
        projected = working_set + sum(cost - private for private in privates)
        if projected + cost > self.high:
            return False
        self.w.pool.grow(1)
        self._log(
            "low", working_set, "grow", child_cost_mib=mib(cost), projected_mib=mib(projected)
        )
        return True


def telemetry_private(pid: int) -> int | None:
    """A child's private memory now (smaps_rollup): read only when the brake acts."""
    from .telemetry import private_bytes

    return private_bytes(read_kib_fields(f"/proc/{pid}/smaps_rollup"))


def running_task(pid: int) -> tuple[str, str] | None:
    """(name, id) of the task the child ``pid`` had accepted, from the worker's state."""
    from celery.worker import state

    for request in list(state.active_requests):
        if getattr(request, "worker_pid", None) == pid:
            return request.name, request.id
    return None
