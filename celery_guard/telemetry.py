"""What pool children really use: measured in each child per task, aggregated in the main.

The child side runs after every task in every child, so it reads two cheap figures (RSS
from ``/proc/self/statm`` through a kept descriptor, the peak from ``getrusage``) and
writes to the main process only when the peak grew or the child is about to be recycled.
The main side drains those records and samples the cgroup and each child's private
memory on a thread of its own, so the consumer is never blocked, and keeps only bounded
aggregates.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import selectors
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from billiard.pool import EX_RECYCLE

from . import cgroups, heap, history, procfs
from .actuator import Listener
from .config import Settings
from .exits import OOM, ExitCauses, LostJob, MemoryFailures, Outcome
from .ledger import Record, name_key
from .limit import LiveLimit
from .logline import emit, logger
from .protect import signals_to_the_main_thread
from .sizes import MIB, mib
from .stats import ExpHistogram, container_limit, recommend, summary_inputs

#: The child reads its private memory (smaps_rollup, 0.1-5 ms) on every Nth task only.
PRIVATE_EVERY = 100
#: A child's record goes at least this often (in tasks), changed or not: the governor's
#: plan is paced by the CPU and wall time the records carry.
RECORD_EVERY = 32
#: A child reports a task whose figures changed nothing only for the first runs of each
#: name in that child, up to this many names.
NAMES_REPORTED = 256
#: The largest figure a record may carry (bytes): 1 PiB; larger is a forged or broken line.
MAX_FIGURE = 1 << 50
MAX_NAME = 200  # characters of a task name in a record
PID_MAX = 1 << 22  # the kernel's largest pid_max


#: Celery's tracers a prefork child runs a job through (``celery.app.trace``): the
#: first argument is the task's name, the second its id.
TRACERS = ("fast_trace_task", "trace_task_ret")


class ChildProbe:
    """The per-task path, inside each pool child. It must never fail a task."""

    def __init__(
        self, channel: int | None, hostname: str, settings: Settings, max_memory_kib: int
    ) -> None:
        self.channel = channel
        self.hostname = hostname
        self.mode = settings.child_log
        self.step = settings.child_log_step
        self.max_memory_kib = max_memory_kib
        self.trim = heap.malloc_trim() if settings.malloc_trim else None
        self.pid = -1
        self.began: float | None = None  # when the task running now began

    def on_child_start(self, **_: Any) -> None:
        """Fresh state per process: the figures of the parent do not belong to the child."""
        self.pid = os.getpid()
        self.tasks = 0
        self.rss = procfs.StatmRss()
        self.last_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.last_rss = self.sent_rss = self.rss()
        self.logged_peak = self.last_peak
        self.names: set[str] = set()
        self.waited = procfs.SchedWait()
        self.busy = 0.0  # seconds of wall time inside tasks

    def before_task(self, **_: Any) -> None:
        """When a task begins: a task's wall time, measured where it runs (the main
        process's view of it also holds its own delays in handing results over)."""
        self.began = time.perf_counter()

    def after_task(
        self, task_id: str | None = None, task: Any = None, name: str | None = None, **_: Any
    ) -> None:
        try:
            began, self.began = self.began, None
            if self.pid != os.getpid():
                self.on_child_start()
            elif began is not None:
                self.busy += time.perf_counter() - began
            self._after_task(task_id, name or getattr(task, "name", None) or "?")
        except Exception:  # noqa: BLE001 - telemetry must not break the task path
            logger.warning("celery-guard event=error stage=child", exc_info=True)

    def start_in_child(self, **_: Any) -> None:
        """``worker_process_init``: fresh figures, and the hooks around Celery's tracer in
        place of its task signals where the tracer can be wrapped (the signals stay
        elsewhere)."""
        from celery import signals
        from celery.app import trace

        self.on_child_start()
        try:
            wrapped = self.wrap_tracer(trace)
        except Exception:  # noqa: BLE001 - the signals still run the hooks
            logger.warning("celery-guard event=error stage=child_tracer", exc_info=True)
            return
        if wrapped:
            signals.task_prerun.disconnect(dispatch_uid="cg-prerun")
            signals.task_postrun.disconnect(dispatch_uid="cg-postrun")

    def wrap_tracer(self, module: Any) -> bool:
        """In a child: run the hooks around Celery's tracer functions instead of from its
        task signals, whose dispatch costs more than the hooks. The pool sends each job with
        its tracer pickled by name, so the child's own module attribute is what runs.
        False, nothing changed, where the module has not both functions."""
        found: list[Callable[..., Any]] = []
        for name in TRACERS:
            function = getattr(module, name, None)
            if not callable(function):
                return False
            # ours from an earlier call is replaced; another library's wrapper is kept
            found.append(getattr(function, "__celery_guard_traced__", function))
        for name, function in zip(TRACERS, found, strict=True):
            setattr(module, name, self._traced(function))
        return True

    def _traced(self, trace: Callable[..., Any]) -> Callable[..., Any]:
        def traced(task: str, uuid: str, *args: Any, **kwargs: Any) -> Any:
            self.began = time.perf_counter()
            try:
                return trace(task, uuid, *args, **kwargs)
            finally:  # before the pool sends the result: the record comes first
                self.after_task(task_id=uuid, name=task)

        traced.__celery_guard_traced__ = traced.__wrapped__ = trace  # type: ignore[attr-defined]
        traced.__self__ = self  # type: ignore[attr-defined]  # the probe, as a bound hook shows it
        return traced

    def _after_task(self, task_id: str | None, name: str) -> None:
        self.tasks += 1
        rss = self.rss()
        if self.trim is not None and rss - self.last_rss >= heap.TRIM_STEP:
            self.trim()  # what the task freed, back to the system before it is counted
            rss = self.rss()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        peak = usage.ru_maxrss * 1024
        delta, rss_delta = peak - self.last_peak, rss - self.last_rss
        # The task's own peak above where it started: exact when it raised the child's
        # lifetime peak, else the lifetime peak bounds it.
        exact = delta > 0
        task_peak = (peak if exact else self.last_peak) - self.last_rss
        grew = peak - self.logged_peak >= self.step
        logged = self.mode == "all" or (self.mode == "growth" and grew)
        # Private memory (0.15-5 ms) after the first task (the main process takes the
        # child's baseline from it), after the first run of each kind of task (a kind
        # that reads more of the app's data copies more of its pages: the RSS does not
        # show it), and on every PRIVATE_EVERY-th line logged.
        first = self.tasks == 1
        new_name = name not in self.names and len(self.names) < NAMES_REPORTED
        if new_name:
            self.names.add(name)
        again = logged and self.tasks % PRIVATE_EVERY == 1
        private = procfs.known(procfs.private()) if first or new_name or again else None
        recycling = 0 < self.max_memory_kib < peak // 1024
        self.last_peak, self.last_rss = peak, rss
        # And now and then whatever changed: the CPU and wall figures pace the plan
        # (after the 2nd, 4th, 8th, 16th task, then every RECORD_EVERY-th).
        paced = self.tasks & (self.tasks - 1) == 0 or self.tasks % RECORD_EVERY == 0
        if exact or new_name or recycling or paced or abs(rss - self.sent_rss) >= MIB:
            self.sent_rss = rss
            if self.channel is not None:
                cpu = int((usage.ru_utime + usage.ru_stime) * 1e6)
                send(
                    self.channel,
                    f"{'R' if recycling else 'T'} {self.pid} {delta} {int(exact)} {task_peak} "
                    f"{rss_delta} {rss} {-1 if private is None else private} {cpu} "
                    f"{self.waited()} {int(self.busy * 1e6)} {self.tasks} "
                    f"{name[:MAX_NAME].replace(chr(10), '?')}\n",
                )
        if not logged:
            return
        if grew:
            self.logged_peak = peak
        fields: dict[str, Any] = {
            "worker": self.hostname, "pid": self.pid, "task": name, "task_id": task_id,
            "tasks": self.tasks, "rss_mib": mib(rss), "peak_rss_mib": mib(peak),
            "delta_mib": mib(delta), "rss_delta_mib": mib(rss_delta),
        }  # fmt: skip
        if private is not None:
            fields["private_mib"] = mib(private)
        emit(logging.INFO, "child", fields)


def send(channel: int, record: str) -> None:
    """A child's record to the main process, in one write below ``PIPE_BUF`` (records
    never interleave). A full pipe or a main process gone drops it: nothing waits."""
    try:
        os.write(channel, record.encode()[:4000])
    except OSError as error:
        if error.errno not in (errno.EAGAIN, errno.EPIPE):
            raise


def parse_record(line: str) -> tuple[str, int, Record] | None:
    """A child's record, checked field by field; None for anything else.

    ``KIND PID DELTA EXACT PEAK RETAINED RSS PRIVATE CPU WAIT BUSY TASKS NAME``: the
    name comes last and may hold spaces (Celery allows them); CPU (on a CPU), WAIT (for
    a CPU) and BUSY (wall time inside tasks) are microseconds since the child was forked
    (-1: unknown). Figures are plain ASCII integers within MAX_FIGURE: the pipe is open
    to every process a child forks, so nothing is trusted."""
    parts = line.split(" ", 12)
    if len(parts) != 13 or parts[0] not in ("T", "R") or not parts[12]:
        return None
    numbers = []
    for text in parts[1:12]:
        digits = text[1:] if text[:1] == "-" else text
        if not (0 < len(digits) <= 16 and digits.isascii() and digits.isdigit()):
            return None
        numbers.append(int(text))
    pid, delta, exact, peak, retained, rss, private, cpu, wait, busy, tasks = numbers
    name = parts[12]
    if not 0 < pid < PID_MAX or exact not in (0, 1) or not name.isprintable():
        return None
    if len(name) > MAX_NAME or private < -1 or not 0 <= rss < MAX_FIGURE:
        return None
    if not all(-MAX_FIGURE < n < MAX_FIGURE for n in (delta, peak, retained, private)):
        return None
    if not all(-1 <= n < MAX_FIGURE for n in (cpu, wait, busy)) or not 0 <= tasks < MAX_FIGURE:
        return None
    record = Record(
        pid, name, max(peak, 0), bool(exact), retained, rss,
        None if private < 0 else private,
        None if cpu < 0 else cpu, None if wait < 0 else wait, None if busy < 0 else busy,
        tasks,
    )  # fmt: skip
    return parts[0], delta, record


@dataclass(frozen=True)
class LimitHit:
    """A task passed a memory limit of its own (see ``watchdog``)."""

    pid: int
    kind: str  # soft | hard | kill (the child asks the main process to stop it)
    limit: int  # bytes
    held: int  # bytes the task added since it started
    task_id: str
    name: str


LIMIT_KINDS = ("soft", "hard", "kill")


def parse_limit_hit(line: str) -> LimitHit | None:
    """``L PID KIND LIMIT HELD TASK_ID NAME``, checked as ``parse_record`` checks."""
    parts = line.split(" ", 6)
    if len(parts) != 7 or parts[0] != "L" or parts[2] not in LIMIT_KINDS:
        return None
    numbers = []
    for text in (parts[1], parts[3], parts[4]):
        if not (0 < len(text) <= 16 and text.isascii() and text.isdigit()):
            return None
        numbers.append(int(text))
    pid, limit, held = numbers
    task_id, name = parts[5], parts[6]
    if not 0 < pid < PID_MAX or not 0 < limit < MAX_FIGURE or held >= MAX_FIGURE:
        return None
    if not (0 < len(task_id) <= MAX_NAME and task_id.isprintable() and " " not in task_id):
        return None
    if not (0 < len(name) <= MAX_NAME and name.isprintable()):
        return None
    return LimitHit(pid, parts[2], limit, held, task_id, name)


#: Upper bounds (bytes) of the per-task peak histogram's buckets; the last is open.
PEAK_BUCKETS = tuple(mib << 20 for mib in (1, 4, 16, 64, 256, 1024))


@dataclass
class TaskFigures:
    """What the collector keeps of one task name, in one table bounded by ``name_key``:
    what its runs kept, their peaks, its task-limit hits and its ``count_task`` counts."""

    events: int = 0  # runs that kept memory
    total: int = 0
    largest: int = 0
    #: runs whose own peak (exact) fell in each of PEAK_BUCKETS, then above them
    peaks: list[int] = field(default_factory=lambda: [0] * (len(PEAK_BUCKETS) + 1))
    peaks_sum: int = 0
    limit_hits: dict[str, int] = field(default_factory=dict)  # by LIMIT_KINDS
    counts: dict[str, int] = field(default_factory=dict)  # by kind

    def copy(self) -> TaskFigures:
        return replace(
            self, peaks=list(self.peaks), limit_hits=dict(self.limit_hits), counts=dict(self.counts)
        )

    def observe_peak(self, peak: int) -> None:
        index = next((i for i, bound in enumerate(PEAK_BUCKETS) if peak <= bound), -1)
        self.peaks[index] += 1
        self.peaks_sum += peak


@dataclass
class ChildFigures:
    """A child's last sampled figures, kept to explain its exit."""

    rss: int
    private: int
    peak: int


class ExitListener(Listener):
    """Tells the collector of children come and gone (the rest of the pool's events it
    reads from the children's own records); a ``PoolControl`` listener."""

    def __init__(self, collector: Collector):
        self.collector = collector

    def child_up(self, pid: int) -> None:
        self.collector.on_child_up(pid)

    def child_down(self, pid: int, exitcode: int | None, task: tuple[str, str] | None) -> None:
        self.collector.on_exit(pid, exitcode, task)


@dataclass
class Heard:
    """What one read of the children's lines brought that other parts act on."""

    records: list[Record] = field(default_factory=list)
    hits: list[LimitHit] = field(default_factory=list)
    calibrated: int | None = None  # the first child's measured cost, when it came now


@dataclass
class Collector:
    """The main process's view: growth by task, children's memory, recycles."""

    hostname: str
    settings: Settings
    live: LiveLimit  # the limit now (the limit watch replaces it)
    parent_rss: int
    cgroup: cgroups.Cgroup | None
    children: Callable[[], list[int]]
    concurrency: Callable[[], int]
    max_memory_kib: int = 0
    max_tasks_per_child: int = 0  # billiard's recycle after so many tasks (0: none)
    private: ExpHistogram = field(default_factory=ExpHistogram)
    peak_rss: ExpHistogram = field(default_factory=ExpHistogram)
    tasks: dict[str, TaskFigures] = field(default_factory=dict)  # by task name
    last_task: dict[int, tuple[str, int]] = field(default_factory=dict)
    child_figures: dict[int, ChildFigures] = field(default_factory=dict)
    recycles: int = 0
    oom_kills: int = 0
    pressure: dict[str, int] = field(default_factory=dict)  # event=pressure lines by action
    #: Is this pid one of ours (a pool child, or this process for pools that do not fork)?
    known: Callable[[int], bool] = lambda pid: True
    exits: ExitCauses = field(default_factory=lambda: ExitCauses(None))
    #: A task's memory kills, kept beside the state file: the next worker counts on.
    failures: MemoryFailures = field(init=False)
    kills_path: str | None = field(init=False)
    #: The startup estimate of one child's cost, and what the first child measured: its
    #: private memory after its first task, less what that task kept (``event=calibration``).
    estimate: int = 0
    calibration: int | None = None
    #: The concurrency asked for, and the largest peak one run of a task reached (bytes):
    #: for the container limit that would run it (``recommended_memory_limit_mib``).
    requested: int = 0
    peak_max: int = 0
    dropped: int = 0  # records refused
    samples: int = 0
    usage: int | None = None
    working_set: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.exits.seen = self.read_oom_kills()
        self.kills_path = history.kills_path(self.settings.state_file)
        known = history.recall_kills(self.kills_path) if self.kills_path else None
        self.failures = MemoryFailures(self.exit_cause, self.settings.max_memory_kills, known)

    # -- records from the children -------------------------------------------------
    def read_lines(self, lines: list[str]) -> Heard:
        """Take the children's lines into the figures; what else is to be told of them
        (to the governor, the task limits' enforcer, the resizer) is returned: the guard
        tells them (``Guard.read_lines``)."""
        heard = Heard()
        for line in lines:
            if line.startswith("L "):
                hit = self._read_limit_hit(line)
                if hit is not None:
                    heard.hits.append(hit)
                continue
            parsed = parse_record(line)
            if parsed is None or not self.known(parsed[2].pid):
                self.dropped += 1
                continue
            kind, delta, record = parsed
            with self.lock:
                name, growth = self._task(record.name)
                if delta > 0:
                    growth.events += 1
                    growth.total += delta
                    growth.largest = max(growth.largest, delta)
                if record.exact:
                    growth.observe_peak(record.peak)
                    self.peak_max = max(self.peak_max, record.peak)
                if kind == "R" and (record.pid in self.last_task or len(self.last_task) < 4096):
                    self.last_task[record.pid] = (name, record.rss + record.peak)
            if record.private is not None and self.calibration is None:
                heard.calibrated = self._calibrate(record)
            heard.records.append(record)
        return heard

    def _calibrate(self, record: Record) -> int | None:
        """The first child's real cost, known after its first task: how good the startup
        estimate was, in one line; the cost is returned, for whoever acts on it."""
        measured = max(record.private or 0, 0) - max(record.retained, 0)
        if measured <= 0:
            return None
        self.calibration = measured
        fields = {
            "worker": self.hostname,
            "pid": record.pid,
            "task": record.name,
            "estimated_mib": mib(self.estimate),
            "measured_mib": mib(measured),
            "ratio": round(self.estimate / measured, 3),
        }
        emit(logging.INFO, "calibration", fields)
        return measured

    def _read_limit_hit(self, line: str) -> LimitHit | None:
        hit = parse_limit_hit(line)
        if hit is None or not self.known(hit.pid):
            self.dropped += 1
            return None
        with self.lock:
            counts = self._task(hit.name)[1].limit_hits
            counts[hit.kind] = counts.get(hit.kind, 0) + 1
        return hit

    def _task(self, name: str) -> tuple[str, TaskFigures]:
        """The name kept for task ``name`` (``OTHER`` past MAX_TASK_NAMES names) and its
        figures; under the lock."""
        kept = name_key(self.tasks, name)
        return kept, self.tasks.setdefault(kept, TaskFigures())

    def count_pressure(self, action: str) -> None:
        with self.lock:
            self.pressure[action] = self.pressure.get(action, 0) + 1

    def count_task(self, kind: str, name: str | None) -> None:
        """One more ``kind`` (recycle, hold, memory_kill, oom_kill) for the task ``name``."""
        with self.lock:
            counts = self._task(name or "?")[1].counts
            counts[kind] = counts.get(kind, 0) + 1

    # -- sampling -------------------------------------------------------------------
    def sample(self) -> None:
        if self.cgroup is not None:
            usage = cgroups.read_usage(self.cgroup)
            self.usage, self.working_set = usage.usage, usage.working_set
        for pid in self.children():
            rollup = procfs.kib_fields(pid, "smaps_rollup")
            status = procfs.kib_fields(pid, "status")
            if isinstance(rollup, procfs.Unread) or isinstance(status, procfs.Unread):
                continue  # the child exited between the listing and the read
            private = procfs.private_bytes(rollup)
            if private is None or "VmHWM" not in status or "Rss" not in rollup:
                continue
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

    def exit_cause(self, pid: int, exitcode: int | None) -> str:
        """GUARD, OOM or OTHER, decided once per exit (see ``exits.ExitCauses``)."""
        sigkill = exitcode is not None and exitcode < 0 and -exitcode == 9
        counter = self.read_oom_kills() if sigkill else None
        return self.exits.cause(pid, exitcode, counter)

    def on_lost(self, lost: LostJob) -> Exception | None:
        """The pool lost a task with its child: ``MemoryLimitExceeded`` when memory was
        why (see ``exits.MemoryFailures``)."""
        with self.lock:
            error = self.failures.on_lost(lost, self.exits)
            if error is not None and self.kills_path is not None:  # a memory kill counted
                history.keep_kills(self.kills_path, self.failures.kills)
            return error

    def on_child_up(self, pid: int) -> None:
        """A new child: the pid may have been an exited one's (pids are reused)."""
        self.exits.forget(pid)
        self.failures.forget(pid)

    def on_exit(self, pid: int, exitcode: int | None, task: tuple[str, str] | None) -> None:
        """A pool child is gone: say why when memory was the reason. ``task`` is (name, id)
        of the task it was running, if any."""
        with self.lock:
            cause = self.exit_cause(pid, exitcode)
            outcome = self.failures.outcome(pid)
            last = self.last_task.pop(pid, None)  # whatever the exit: the dict stays bounded
            figures = self.child_figures.get(pid)
        if cause == OOM:
            self.count_task("oom_kill", task[0] if task else None)
            self._on_oom(pid, task, outcome)
        if exitcode != EX_RECYCLE:
            return
        if last is None and self.max_tasks_per_child:
            # no record said its memory passed the limit: it ran its tasks
            # (``--max-tasks-per-child``), which billiard ends with the same status
            emit(
                logging.INFO, "recycle",
                {"worker": self.hostname, "pid": pid, "reason": "max_tasks_per_child",
                 "exitcode": exitcode, "max_tasks_per_child": self.max_tasks_per_child},
            )  # fmt: skip
            return
        name, peak = last or ("?", figures.peak if figures else 0)
        with self.lock:
            self.recycles += 1
        self.count_task("recycle", name)
        emit(
            logging.WARNING,
            "recycle",
            {
                "worker": self.hostname, "pid": pid, "reason": "max_memory_per_child",
                "exitcode": exitcode, "peak_rss_mib": mib(peak), "last_task": name,
                "max_memory_per_child_kib": self.max_memory_kib,
            },
        )  # fmt: skip

    def _on_oom(self, pid: int, task: tuple[str, str] | None, outcome: Outcome | None) -> None:
        """The kernel's OOM killer took this child: name the task, with the figures."""
        now = self.exits.seen
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
            "limit_mib": mib(self.live.limit),
            "cgroup_oom_kills": now,
        }
        if outcome is not None:  # what becomes of the task (see exits.MemoryFailures)
            fields.update(then=outcome.then, memory_kills=outcome.kills)
        emit(logging.ERROR, "oom", fields)

    def snapshot(self, final: bool = False, more: Mapping[str, Any] | None = None) -> Snapshot:
        """The figures now, read under the lock once; ``more`` (the governor's) joins the
        summary's before the recommendation, which weighs its plan."""
        with self.lock:
            private = {p: self.private.percentile(p) for p in (50, 95)}
            peak = {p: self.peak_rss.percentile(p) for p in (50, 95)}
            tasks = {name: f.copy() for name, f in self.tasks.items()}
            held = {  # what the collector keeps: bounded whatever the task count
                "task_names": len(self.tasks),
                "children": len(self.child_figures),
                "last_tasks": len(self.last_task),
                "private_buckets": len(self.private.buckets()),
                "peak_rss_buckets": len(self.peak_rss.buckets()),
            }
            pressure = dict(self.pressure)
            fields: dict[str, Any] = {
                "worker": self.hostname,
                "final": final,
                "limit_mib": mib(self.live.limit),
                "headroom_mib": mib(self.live.headroom),
                "parent_rss_mib": mib(self.parent_rss),
                "usage_mib": _mib_or_none(self.usage),
                "working_set_mib": _mib_or_none(self.working_set),
                "concurrency": self.concurrency(),
                "requested": self.requested or None,
                "children": len(self.children()),
                "samples": self.samples,
                "private_p50_mib": _mib_or_none(private[50]),
                "private_p95_mib": _mib_or_none(private[95]),
                "private_max_mib": _mib_or_none(self.private.max),
                "peak_rss_p50_mib": _mib_or_none(peak[50]),
                "peak_rss_p95_mib": _mib_or_none(peak[95]),
                "peak_rss_max_mib": _mib_or_none(self.peak_rss.max),
                "top_tasks": "",
                "recycles": self.recycles,
                "oom_kills": self.oom_kills,
                "child_cost_measured_mib": _mib_or_none(self.calibration),
            }
        snapshot = Snapshot(
            self.hostname, self.live.limit, fields, tasks, pressure, held, self.dropped
        )
        top = sorted(tasks.items(), key=lambda item: -item[1].total)[:3]
        fields["top_tasks"] = ",".join(f"{n}:{mib(g.total)}" for n, g in top if g.total)
        hits = [(n, c.get("soft", 0), c.get("hard", 0)) for n, c in snapshot.limit_hits().items()]
        if hits:  # tasks that passed their own memory limits
            fields["task_limit_soft"] = sum(soft for _, soft, _ in hits)
            fields["task_limit_hard"] = sum(hard for _, _, hard in hits)
            worst = sorted(hits, key=lambda hit: -(hit[1] + hit[2]))[:3]
            fields["task_limit_top"] = ",".join(f"{n}:{soft}/{hard}" for n, soft, hard in worst)
        fields.update(more or {})
        advice = recommend(**summary_inputs(fields))
        fields["recommended_max_memory_per_child_kib"] = advice.max_memory_per_child_kib
        fields["recommended_concurrency"] = advice.concurrency
        fields["recommended_memory_limit_mib"] = self._container_limit(fields)
        if advice.note:
            fields["recommendation_note"] = advice.note
        if advice.alternative_concurrency is not None:
            fields["alternative_concurrency"] = advice.alternative_concurrency
            fields["alternative_max_memory_per_child_kib"] = (
                advice.alternative_max_memory_per_child_kib
            )
        return snapshot

    def _container_limit(self, fields: dict[str, Any]) -> float | None:
        """The limit that would run the requested concurrency: every child at its p95
        private memory and the largest task peak seen, the main process, the headroom."""
        private = fields.get("private_p95_mib") or (
            mib(self.calibration) if self.calibration else None
        )
        if private is None or not self.requested:
            return None
        return container_limit(
            parent=fields["parent_rss_mib"], requested=self.requested,
            child_peak=private + mib(self.peak_max),
            headroom_fraction=self.settings.headroom,
        )  # fmt: skip


@dataclass(frozen=True)
class Snapshot:
    """The collector's figures at one moment: the one thing the summary line,
    ``guard_stats`` (and ``celery-guard report`` through it) and the metrics render, so
    that no two of them show a figure read at two moments."""

    hostname: str
    limit: int  # bytes
    summary: dict[str, Any]  # the summary line's fields, the recommendation included
    tasks: dict[str, TaskFigures]  # copies, by task name (bounded by ``name_key``)
    pressure: dict[str, int]  # event=pressure lines by action
    held: dict[str, int]  # the sizes of what the collector keeps
    dropped: int  # records refused: not a record of a child

    def limit_hits(self) -> dict[str, dict[str, int]]:
        """Task-limit hits by task name and kind, of the names that had any."""
        return {name: f.limit_hits for name, f in self.tasks.items() if f.limit_hits}

    def task_counts(self) -> dict[str, dict[str, int]]:
        """``Collector.count_task``'s counts by task name, of the names that had any."""
        return {name: f.counts for name, f in self.tasks.items() if f.counts}

    def stats(self, sections: Mapping[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """The figures for ``celery inspect guard_stats``: the summary's, the tables
        behind them, and other parts' ``sections`` by name."""
        fields = dict(self.summary)
        fields["tasks"] = {
            name: {"events": g.events, "total_mib": mib(g.total), "max_mib": mib(g.largest)}
            for name, g in self.tasks.items()
        }
        fields["task_memory_limits"] = {
            name: {kind: counts.get(kind, 0) for kind in ("soft", "hard")}
            for name, counts in self.limit_hits().items()
        }
        fields["held"] = dict(self.held)
        fields["records_dropped"] = self.dropped
        fields.update(sections or {})
        return fields


def _mib_or_none(value: float | None) -> float | None:
    return None if value is None else mib(value)


class Sampler(threading.Thread):
    """Drains the children's records and samples memory, off the consumer's loop.

    It never spins: a step that fails has its deadline moved on (further each time it
    fails again, up to MAX_BACKOFF), and a pipe it cannot wait on (a descriptor select()
    refuses, EBADF) is given up with one line, the sampling going on by the clock."""

    #: How often the watches (limits that act) run, whatever the sample interval.
    WATCH_INTERVAL = 1.0
    WAKE = 0.5  # seconds: the longest wait, so that stop() is heard
    MAX_BACKOFF = 60.0  # seconds: the longest a failing step waits before it runs again
    READ = 65536

    def __init__(
        self,
        collector: Collector,
        channel: int | None,
        on_summary: Callable[[], object],
        watches: list[Callable[[], None]] | None = None,
        on_lines: Callable[[list[str]], object] | None = None,
    ) -> None:
        super().__init__(name="celery-guard-sampler", daemon=True)
        self.collector = collector
        #: Who takes the children's lines (the guard, which tells the parts that act on
        #: them); the collector alone by default.
        self.on_lines = on_lines or collector.read_lines
        self.channel = channel
        self.on_summary = on_summary
        self.watches = watches or []
        self.stopping = threading.Event()
        self.reading = threading.Lock()  # one reader at a time: the event loop drains too
        self.partial = b""  # the start of a record cut by the end of a read
        self.failures: dict[str, int] = {}
        #: The event loop reads the channel (``on_loop``): this thread no longer waits on
        #: it, so a record does not wake a second thread that contends for the GIL.
        self.loop_reads = False
        #: epoll or poll where there is one (no limit on the descriptor's number); green
        #: runtimes leave only select(), which refuses descriptors >= 1024.
        self.selector: selectors.BaseSelector | None = None
        try:
            if channel is not None:
                self.selector = selectors.DefaultSelector()
                self.selector.register(channel, selectors.EVENT_READ)
        except (OSError, ValueError) as error:
            self._give_up(error)

    def _give_up(self, error: BaseException) -> None:
        self.channel = None
        emit(
            logging.ERROR,
            "error",
            {"stage": "channel", "error": f"{type(error).__name__}: {error}",
             "effect": "children's records are no longer read; sampling goes on"},
        )  # fmt: skip

    def drain(self) -> None:
        """Read what is there and return. Under eventlet and gevent ``os.read`` waits for
        data instead of failing on an empty pipe, so the selector is asked first."""
        with self.reading:
            while self.channel is not None and self.selector is not None:
                try:
                    if not self.selector.select(0):
                        return
                    data = os.read(self.channel, self.READ)
                except (OSError, ValueError) as error:
                    if getattr(error, "errno", None) not in (errno.EAGAIN, errno.EINTR):
                        self._give_up(error)
                    return
                if not data:
                    return
                lines = (self.partial + data).split(b"\n")
                self.partial = lines.pop()[-4096:]  # a record never spans more than that
                self.on_lines([line.decode(errors="replace") for line in lines])

    def on_loop(self, hub: Any) -> None:
        """Let the worker's event loop read the children's records as they come: the
        governor reads them there anyway, at each task's end."""
        if self.channel is None or self.selector is None:
            return
        hub.add_reader(self.channel, self.drain)
        self.loop_reads = True

    def _step(self, name: str, now: float, interval: float, step: Callable[[], object]) -> float:
        """Run one step; return when it runs next (later after each failure in a row)."""
        try:
            step()
        except Exception:  # noqa: BLE001 - a failed step must not end the sampler
            failures = self.failures[name] = self.failures.get(name, 0) + 1
            if failures <= 3 or failures % 100 == 0:  # say it, but not 100 times a second
                logger.exception("celery-guard event=error stage=%s failures=%d", name, failures)
            return now + min(interval * 2 ** min(failures, 16), max(interval, self.MAX_BACKOFF))
        self.failures.pop(name, None)
        return now + interval

    def _watch(self) -> None:
        for watch in self.watches:
            watch()

    def run(self) -> None:
        signals_to_the_main_thread()
        sample_every = self.collector.settings.sample_interval
        summary_every = self.collector.settings.summary_interval
        next_sample = next_watch = time.monotonic()
        next_summary = next_sample + summary_every
        while not self.stopping.is_set():
            now = time.monotonic()
            if self.watches and now >= next_watch:
                next_watch = self._step("watch", now, self.WATCH_INTERVAL, self._watch)
            if now >= next_sample:
                next_sample = self._step("sample", now, sample_every, self.collector.sample)
            if now >= next_summary:
                next_summary = self._step("summary", now, summary_every, self.on_summary)
            deadlines = [next_sample, next_summary] + ([next_watch] if self.watches else [])
            # at most WAKE: a green thread (gevent, eventlet) in select() misses stop()
            timeout = min(max(min(deadlines) - time.monotonic(), 0.01), self.WAKE)
            selector = self.selector
            if self.channel is None or selector is None or self.loop_reads:
                self.stopping.wait(timeout)
                continue
            try:
                ready = selector.select(timeout)
            except (OSError, ValueError) as error:
                self._give_up(error)
                continue
            if ready:
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


__all__ = [
    "ChildProbe",
    "Collector",
    "ExitListener",
    "Heard",
    "Sampler",
    "Snapshot",
    "open_channel",
    "send",
]
