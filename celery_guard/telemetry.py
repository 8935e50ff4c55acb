"""What pool children really use: measured in each child per task, aggregated in the main.

The child side runs after every task in every child, so it reads two cheap figures (RSS
from ``/proc/self/statm`` through a kept descriptor, the peak from ``getrusage``) and
writes to the main process only when the peak grew or the child is about to be recycled.
The main side drains those records and samples the cgroup and each child's private
memory on a thread of its own, so the consumer is never blocked, and keeps only bounded
aggregates.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import resource
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import cgroups
from .config import Settings
from .footprint import StatmRss, read_kib_fields
from .logline import emit, logger
from .sizes import mib
from .stats import ExpHistogram, recommend

PAGE = mmap.PAGESIZE
#: The child reads its private memory (smaps_rollup, 0.1-5 ms) on every Nth task only.
PRIVATE_EVERY = 100
#: Distinct task names kept for the growth table; past this, growth goes to "other".
MAX_TASK_NAMES = 200


def private_bytes(fields: dict[str, int]) -> int | None:
    """A process's private memory (USS) from its smaps_rollup fields."""
    if "Private_Dirty" not in fields:
        return None
    return fields["Private_Dirty"] + fields.get("Private_Clean", 0)


def read_private(pid: int | str = "self") -> int | None:
    """A process's private memory now (0.1-5 ms: it walks the page tables); None when
    the process is gone."""
    return private_bytes(read_kib_fields(f"/proc/{pid}/smaps_rollup"))


class ChildProbe:
    """The per-task path, inside each pool child. It must never fail a task."""

    def __init__(
        self, channel: int | None, hostname: str, settings: Settings, max_memory_kib: int
    ) -> None:
        self.channel = channel
        self.hostname = hostname
        self.mode = settings.child_log
        self.step = settings.child_log_step
        self.log_format = settings.log_format
        self.max_memory_kib = max_memory_kib
        self.pid = -1

    def on_child_start(self, **_: Any) -> None:
        """Fresh state per process: the figures of the parent do not belong to the child."""
        self.pid = os.getpid()
        self.tasks = 0
        self.rss = StatmRss()
        self.last_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.last_rss = self.rss()
        self.logged_peak = self.last_peak

    def after_task(self, task_id: str | None = None, task: Any = None, **_: Any) -> None:
        try:
            if self.pid != os.getpid():
                self.on_child_start()
            self._after_task(task_id, getattr(task, "name", None) or "?")
        except Exception:  # noqa: BLE001 - telemetry must not break the task path
            logger.debug("celery-guard event=error stage=child", exc_info=True)

    def _after_task(self, task_id: str | None, name: str) -> None:
        self.tasks += 1
        rss = self.rss()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        delta, rss_delta = peak - self.last_peak, rss - self.last_rss
        self.last_peak, self.last_rss = peak, rss
        recycling = 0 < self.max_memory_kib < peak // 1024
        if delta > 0 or recycling:
            self._send(f"{'R' if recycling else 'G'} {self.pid} {name} {delta} {peak}\n")
        if self.mode == "off":
            return
        grew = peak - self.logged_peak >= self.step
        if not grew and self.mode != "all":
            return
        if grew:
            self.logged_peak = peak
        fields: dict[str, Any] = {
            "worker": self.hostname, "pid": self.pid, "task": name, "task_id": task_id,
            "tasks": self.tasks, "rss_mib": mib(rss), "peak_rss_mib": mib(peak),
            "delta_mib": mib(delta), "rss_delta_mib": mib(rss_delta),
        }  # fmt: skip
        if self.tasks % PRIVATE_EVERY == 1:
            private = read_private()
            if private is not None:
                fields["private_mib"] = mib(private)
        emit(logging.INFO, "child", fields, self.log_format)

    def _send(self, record: str) -> None:
        if self.channel is None:
            return
        try:
            os.write(self.channel, record.encode()[:4000])  # < PIPE_BUF: atomic
        except OSError as error:  # a full pipe drops the record; nothing waits
            if error.errno not in (errno.EAGAIN, errno.EPIPE):
                raise


@dataclass
class TaskGrowth:
    events: int = 0
    total: int = 0
    largest: int = 0


@dataclass
class ChildFigures:
    """A child's last sampled figures, kept to explain its exit."""

    rss: int
    private: int
    peak: int


@dataclass
class Collector:
    """The main process's view: growth by task, children's memory, recycles."""

    hostname: str
    settings: Settings
    limit: int
    headroom: int
    parent_rss: int
    cgroup: cgroups.Cgroup | None
    children: Callable[[], list[int]]
    concurrency: Callable[[], int]
    max_memory_kib: int = 0
    private: ExpHistogram = field(default_factory=ExpHistogram)
    peak_rss: ExpHistogram = field(default_factory=ExpHistogram)
    tasks: dict[str, TaskGrowth] = field(default_factory=dict)
    last_task: dict[int, tuple[str, int]] = field(default_factory=dict)
    child_figures: dict[int, ChildFigures] = field(default_factory=dict)
    recycles: int = 0
    oom_kills: int = 0
    pressure: dict[str, int] = field(default_factory=dict)  # event=pressure lines by action
    stopped_by_brake: set[int] = field(default_factory=set)
    oom_kills_seen: int | None = None  # the cgroup's counter when last read
    samples: int = 0
    usage: int | None = None
    working_set: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    # -- records from the children -------------------------------------------------
    def take(self, data: bytes) -> None:
        for line in data.decode(errors="replace").splitlines():
            parts = line.split(" ")
            if len(parts) != 5 or parts[0] not in ("G", "R"):
                continue
            kind, pid_text, name, delta_text, peak_text = parts
            try:
                pid, delta, peak = int(pid_text), int(delta_text), int(peak_text)
            except ValueError:
                continue
            with self.lock:
                if name not in self.tasks and len(self.tasks) >= MAX_TASK_NAMES:
                    name = "other"
                growth = self.tasks.setdefault(name, TaskGrowth())
                if delta > 0:
                    growth.events += 1
                    growth.total += delta
                    growth.largest = max(growth.largest, delta)
                if kind == "R":
                    self.last_task[pid] = (name, peak)

    def count_pressure(self, action: str) -> None:
        with self.lock:
            self.pressure[action] = self.pressure.get(action, 0) + 1

    # -- sampling -------------------------------------------------------------------
    def sample(self) -> None:
        if self.cgroup is not None:
            usage = cgroups.read_usage(self.cgroup)
            self.usage, self.working_set = usage.usage, usage.working_set
        for pid in self.children():
            rollup = read_kib_fields(f"/proc/{pid}/smaps_rollup")
            status = read_kib_fields(f"/proc/{pid}/status")
            private = private_bytes(rollup)
            if private is None or "VmHWM" not in status or "Rss" not in rollup:
                continue  # the child exited between the listing and the read
            with self.lock:
                self.private.add(private)
                self.peak_rss.add(status["VmHWM"])
                self.child_figures[pid] = ChildFigures(rollup["Rss"], private, status["VmHWM"])
                self.samples += 1
        with self.lock:  # forget children that are gone: the dict stays bounded
            alive = set(self.children())
            for pid in [p for p in self.child_figures if p not in alive]:
                del self.child_figures[pid]

    # -- what is logged -------------------------------------------------------------
    def read_oom_kills(self) -> int | None:
        return cgroups.read_oom_kills(self.cgroup)[0] if self.cgroup is not None else None

    def on_exit(self, pid: int, exitcode: int | None, task: tuple[str, str] | None) -> None:
        """A pool child is gone: say why when memory was the reason.

        ``task`` is (name, id) of the task it was running, if any.
        """
        if exitcode == -signal.SIGKILL and pid not in self.stopped_by_brake:
            self._on_sigkill(pid, task)
        self.stopped_by_brake.discard(pid)
        with self.lock:
            last = self.last_task.pop(pid, None)  # whatever the exit: the dict stays bounded
        if exitcode != 155:  # billiard's EX_RECYCLE
            return
        with self.lock:
            figures = self.child_figures.get(pid)
            name, peak = last or ("?", figures.peak if figures else 0)
            self.recycles += 1
        emit(
            logging.WARNING,
            "recycle",
            {
                "worker": self.hostname, "pid": pid, "exitcode": exitcode,
                "peak_rss_mib": mib(peak), "last_task": name,
                "max_memory_per_child_kib": self.max_memory_kib,
            },
            self.settings.log_format,
        )  # fmt: skip

    def _on_sigkill(self, pid: int, task: tuple[str, str] | None) -> None:
        """SIGKILL and the cgroup's OOM-kill counter rose: the kernel killed it."""
        before, now = self.oom_kills_seen, self.read_oom_kills()
        self.oom_kills_seen = now
        if before is None or now is None or now <= before:
            return  # a kill -9 from someone else is not an OOM kill
        usage = cgroups.read_usage(self.cgroup) if self.cgroup is not None else None
        with self.lock:
            figures = self.child_figures.get(pid)
            self.oom_kills += 1
        fields: dict[str, Any] = {
            "worker": self.hostname,
            "pid": pid,
            "task": task[0] if task else None,
            "task_id": task[1] if task else None,
            "rss_mib": mib(figures.rss) if figures else None,
            "private_mib": mib(figures.private) if figures else None,
            "usage_mib": _mib_or_none(usage.usage if usage else None),
            "limit_mib": mib(self.limit),
            "oom_kills": now,
        }
        emit(logging.ERROR, "oom", fields, self.settings.log_format)

    def summary_fields(self, final: bool = False) -> dict[str, Any]:
        with self.lock:
            private = {p: self.private.percentile(p) for p in (50, 95)}
            peak = {p: self.peak_rss.percentile(p) for p in (50, 95)}
            top = sorted(self.tasks.items(), key=lambda item: -item[1].total)[:3]
            fields: dict[str, Any] = {
                "worker": self.hostname,
                "final": final,
                "limit_mib": mib(self.limit),
                "headroom_mib": mib(self.headroom),
                "parent_rss_mib": mib(self.parent_rss),
                "usage_mib": _mib_or_none(self.usage),
                "working_set_mib": _mib_or_none(self.working_set),
                "concurrency": self.concurrency(),
                "children": len(self.children()),
                "samples": self.samples,
                "private_p50_mib": _mib_or_none(private[50]),
                "private_p95_mib": _mib_or_none(private[95]),
                "private_max_mib": _mib_or_none(self.private.max),
                "peak_rss_p50_mib": _mib_or_none(peak[50]),
                "peak_rss_p95_mib": _mib_or_none(peak[95]),
                "peak_rss_max_mib": _mib_or_none(self.peak_rss.max),
                "top_tasks": ",".join(f"{n}:{mib(g.total)}" for n, g in top if g.total),
                "recycles": self.recycles,
                "oom_kills": self.oom_kills,
            }
        advice = recommend(
            limit_mib=fields["limit_mib"],
            headroom_mib=fields["headroom_mib"],
            parent_rss_mib=fields["parent_rss_mib"],
            concurrency=fields["concurrency"],
            private_p50_mib=fields["private_p50_mib"],
            private_p95_mib=fields["private_p95_mib"],
            peak_rss_p50_mib=fields["peak_rss_p50_mib"],
            peak_rss_p95_mib=fields["peak_rss_p95_mib"],
        )
        fields["recommended_max_memory_per_child_kib"] = advice.max_memory_per_child_kib
        fields["recommended_concurrency"] = advice.concurrency
        if advice.note:
            fields["recommendation_note"] = advice.note
        return fields

    def log_summary(self, final: bool = False) -> dict[str, Any]:
        fields = self.summary_fields(final)
        emit(logging.INFO, "summary", fields, self.settings.log_format)
        return fields

    def stats(self) -> dict[str, Any]:
        """The live figures for ``celery inspect guard_stats``."""
        fields = self.summary_fields()
        with self.lock:
            fields["tasks"] = {
                name: {"events": g.events, "total_mib": mib(g.total), "max_mib": mib(g.largest)}
                for name, g in self.tasks.items()
            }
            fields["held"] = {  # what the guard keeps: bounded whatever the task count
                "task_names": len(self.tasks),
                "children": len(self.child_figures),
                "last_tasks": len(self.last_task),
                "private_buckets": len(self.private.buckets()),
                "peak_rss_buckets": len(self.peak_rss.buckets()),
            }
        return fields


def _mib_or_none(value: float | None) -> float | None:
    return None if value is None else mib(value)


class Sampler(threading.Thread):
    """Drains the children's records and samples memory, off the consumer's loop."""

    #: How often the watches (limits that act) run, whatever the sample interval.
    WATCH_INTERVAL = 1.0
    WAKE = 0.5  # seconds: the longest wait, so that stop() is heard

    def __init__(
        self,
        collector: Collector,
        channel: int | None,
        on_summary: Callable[[], object],
        watches: list[Callable[[], None]] | None = None,
    ) -> None:
        super().__init__(name="celery-guard-sampler", daemon=True)
        self.collector = collector
        self.channel = channel
        self.on_summary = on_summary
        self.watches = watches or []
        self.stopping = threading.Event()

    def drain(self) -> None:
        """Read what is there and return: under eventlet and gevent ``os.read`` waits
        for data instead of failing on an empty pipe, so ask ``select`` first."""
        if self.channel is None:
            return
        while True:
            try:
                readable, _, _ = select.select([self.channel], [], [], 0)
                if not readable:
                    return
                data = os.read(self.channel, 65536)
            except (OSError, ValueError):
                return
            if not data:
                return
            self.collector.take(data)

    def run(self) -> None:
        settings = self.collector.settings
        next_sample = next_watch = time.monotonic()
        next_summary = next_sample + settings.summary_interval
        while not self.stopping.is_set():
            now = time.monotonic()
            try:
                if self.watches and now >= next_watch:
                    for watch in self.watches:
                        watch()
                    next_watch = now + self.WATCH_INTERVAL
                if now >= next_sample:
                    self.collector.sample()
                    next_sample = now + settings.sample_interval
                if now >= next_summary:
                    self.on_summary()
                    next_summary = now + settings.summary_interval
            except Exception:  # noqa: BLE001 - a failed sample must not end the sampler
                logger.exception("celery-guard event=error stage=sampler")
            deadlines = [next_sample, next_summary] + ([next_watch] if self.watches else [])
            # at most WAKE: a green thread (gevent, eventlet) in select() misses stop()
            timeout = min(max(min(deadlines) - time.monotonic(), 0.01), self.WAKE)
            if self.channel is None:
                self.stopping.wait(timeout)
                continue
            with contextlib.suppress(OSError, ValueError):
                readable, _, _ = select.select([self.channel], [], [], timeout)
                if readable:
                    self.drain()

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)
        if not self.is_alive():  # one reader at a time: green threads insist on it
            self.drain()


def open_channel() -> tuple[int, int]:
    """A pipe from every child to the main process; both ends non-blocking."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    return read_end, write_end


__all__ = ["ChildProbe", "Collector", "Sampler", "open_channel", "private_bytes", "read_private"]
