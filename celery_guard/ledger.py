"""What each pool child may cost at its peak: the model the run-time governor plans with.

A child costs its *baseline* (its private memory after its first task: what it copied
from the main process), plus what its tasks *retained* since (a leak), plus, while it
runs a task, that task's *peak growth*, learnt per task name from the children's
records. No I/O, no clock of its own: fed by the governor on the event loop, read by
the policy.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Distinct task names kept; past this, a name is measured under OTHER.
MAX_TASK_NAMES = 200
OTHER = "other"


def name_key(table: Mapping[str, Any], name: str) -> str:
    """``name``, or OTHER once the table holds MAX_TASK_NAMES names (a worker may run any
    number)."""
    if name in table or len(table) < MAX_TASK_NAMES:
        return name
    return OTHER


#: Baselines of the last children kept to predict the next child's.
BASELINES_KEPT = 32
#: Seconds a task handed to the pool may wait for a child to accept it before it is
#: forgotten: handed over only when a child is free, one that waits this long was lost.
ACCEPT_WITHIN = 10.0
#: Tasks finished before the pool grows on a measured baseline below the startup estimate:
#: a child measured after a task that reads little of the app's data copied a tenth of
#: what the children running its reports did (bench/corpus.py).
PRIOR_TASKS = 8
#: Seconds between billiard's periodic maintenance of the pool, which joins exited
#: children and forks their replacements (celery.concurrency.asynpool.AsynPool.timers).
BILLIARD_MAINTENANCE = 5.0


@dataclass(frozen=True)
class Handed:
    """A task handed to the pool, not yet accepted by a child."""

    name: str
    peak: int  # bytes reserved for it
    when: float  # monotonic seconds


@dataclass(frozen=True)
class Record:
    """What a child reports after a task (see ``telemetry.ChildProbe``)."""

    pid: int
    name: str
    peak: int  # bytes the task grew the child by at its peak, or at most that (``exact``)
    exact: bool  # False: the child's lifetime peak did not rise, ``peak`` is a bound
    retained: int  # bytes the child's RSS grew by over the task (negative: it shrank)
    rss: int  # bytes: the child's RSS after the task
    private: int | None  # bytes: its private memory, when the child read it
    cpu: int | None = None  # microseconds of CPU the child used since it was forked
    wait: int | None = None  # microseconds it waited for a CPU since (None: unknown)
    busy: int | None = None  # microseconds of wall time inside tasks since
    tasks: int = 0  # tasks the child has finished, this one included


@dataclass
class TaskMemory:
    """What runs of one task name did to their child."""

    runs: int = 0
    peak: int = 0  # the largest growth during one run
    retained: int = 0  # bytes kept after runs, summed (only growth counts)


class TaskTable:
    """Peak growth and retention by task name, bounded at MAX_TASK_NAMES names."""

    def __init__(self, limits: dict[str, int] | None = None) -> None:
        self.by_name: dict[str, TaskMemory] = {}
        #: Declared hard limits (bytes) by task name: an upper bound on an unmeasured peak.
        self.limits = dict(limits or {})
        self._worst_peak = 0  # a name's peak only rises: the largest so far, kept

    def observe(self, name: str, peak: int, retained: int) -> None:
        memory = self.by_name.setdefault(name_key(self.by_name, name), TaskMemory())
        memory.runs += 1
        memory.peak = max(memory.peak, peak, 0)
        self._worst_peak = max(self._worst_peak, memory.peak)
        memory.retained += max(retained, 0)

    def known(self, name: str) -> bool:
        return name in self.by_name or name in self.limits

    def peak(self, name: str) -> int | None:
        """The growth to expect from one run of ``name``; None when nothing says."""
        memory = self.by_name.get(name)
        return memory.peak if memory is not None else self.limits.get(name)

    @property
    def worst_peak(self) -> int:
        """What an unknown task may do. Declared limits bound only their own task (a large
        limit is not a large peak)."""
        return self._worst_peak

    @property
    def worst_retained(self) -> int:
        """What a run of the leakiest task keeps, on average."""
        return max((m.retained // m.runs for m in self.by_name.values() if m.runs), default=0)


#: Weight an old sample keeps at each new one: the means follow the last few dozen, so the
#: start's contention (every child forked at once) is soon forgotten.
DECAY = 0.95


@dataclass
class Mean:
    """A decayed mean of samples that each cover ``weight`` units (tasks, children)."""

    total: float = 0.0
    weight: float = 0.0
    samples: int = 0

    def add(self, total: float, weight: float = 1.0) -> None:
        self.total = self.total * DECAY + total
        self.weight = self.weight * DECAY + weight
        self.samples += 1

    @property
    def value(self) -> float | None:
        return self.total / self.weight if self.weight > 0 else None


@dataclass
class Pace:
    """How fast the pool goes, in the units a hand-tuner weighs (a new child's cost in CPU
    seconds before its first task: the fork's real price)."""

    task_wall: Mean = field(default_factory=Mean)  # seconds a task runs (in its child)
    task_cpu: Mean = field(default_factory=Mean)  # CPU seconds per task
    task_wait: Mean = field(default_factory=Mean)  # seconds per task waiting for a CPU
    retained: Mean = field(default_factory=Mean)  # bytes a task keeps, after the first
    first_kept: Mean = field(default_factory=Mean)  # bytes a child's first task kept
    first_cpu: Mean = field(default_factory=Mean)  # CPU seconds to a child's first record
    first_tasks: Mean = field(default_factory=Mean)  # tasks in that first record
    first_wait: Mean = field(default_factory=Mean)  # seconds waited for a CPU by then
    first_busy: Mean = field(default_factory=Mean)  # seconds inside its tasks by then
    #: seconds from a child told to leave to its replacement ready for work
    replace_wall: Mean = field(default_factory=Mean)
    main_cpu: Mean = field(default_factory=Mean)  # the main process' CPU seconds per task
    #: seconds of the main process's thread per child forked: once per replacement
    fork_main: Mean = field(default_factory=Mean)
    #: bytes of the pages a full collection writes that a child still shares after its
    #: first task: what it copies more without gc.freeze, as a vanilla worker's do
    unfrozen: Mean = field(default_factory=Mean)
    replacements: int = 0  # replacements timed
    #: of them, joined only when the governor asked (``PoolControl.replace_exited``)
    late_joins: int = 0

    @property
    def start_cpu(self) -> float | None:
        """CPU seconds a child spends before its first task."""
        first, tasks, per_task = (
            self.first_cpu.value, self.first_tasks.value, self.task_cpu.value,
        )  # fmt: skip
        if first is None or tasks is None or per_task is None:
            return None
        return max(first - tasks * per_task, 0.0)

    def start_and_task(self) -> tuple[float, float] | None:
        """(a start's CPU seconds, a task's wall seconds); before any task is timed, from
        the first records alone: their CPU less their tasks' wall time (a start at least
        that dear)."""
        start, wall = self.start_cpu, self.task_wall.value
        if start is not None and wall is not None:
            return start, wall
        first, busy, tasks = self.first_cpu.value, self.first_busy.value, self.first_tasks.value
        if first is None or busy is None or not tasks:
            return None
        return max(first - busy, 0.0), busy / tasks

    def replace_idle(self) -> float | None:
        """Seconds of a replacement neither on a CPU nor waiting for one (children replaced
        at once wait for each other: the CPUs bound that apart)."""
        wall, start, wait = self.replace_wall.value, self.start_cpu, self.first_wait.value
        if wall is None or start is None:
            return None
        if wait is not None and self.first_tasks.value is not None:
            wait = max(wait - self.first_tasks.value * (self.task_wait.value or 0.0), 0.0)
        return max(wall - start - (wait or 0.0), 0.0)

    def vanilla_replace_idle(self) -> float | None:
        """``replace_idle`` without the guard: a replacement billiard missed (as often as
        here) waits for its next maintenance, half of BILLIARD_MAINTENANCE on average."""
        idle = self.replace_idle()
        if idle is None or self.replacements <= 0:
            return idle
        return idle + self.late_joins / self.replacements * BILLIARD_MAINTENANCE / 2

    def idle_wall(self) -> float | None:
        """Seconds of a task neither on a CPU nor waiting for one (sleep, I/O): what more
        children than CPUs can overlap."""
        wall, cpu = self.task_wall.value, self.task_cpu.value
        if wall is None or cpu is None:
            return None
        return max(wall - cpu - (self.task_wait.value or 0.0), 0.0)

    def from_record(self, child: ChildState, record: Record) -> None:
        """A child's first record gives what it cost to start; each later one what the
        tasks in between used and kept."""
        if record.cpu is None or record.tasks <= 0:
            return
        last = child.last_record
        child.last_record = record
        if last is None:
            self.first_cpu.add(record.cpu / 1e6)
            self.first_tasks.add(record.tasks)
            if record.wait is not None:
                self.first_wait.add(record.wait / 1e6)
            if record.busy is not None:
                self.first_busy.add(record.busy / 1e6)
            return
        tasks = record.tasks - last.tasks
        if tasks <= 0 or last.cpu is None or record.cpu < last.cpu:
            return
        self.task_cpu.add((record.cpu - last.cpu) / 1e6, tasks)
        if record.busy is not None and last.busy is not None and record.busy >= last.busy:
            self.task_wall.add((record.busy - last.busy) / 1e6, tasks)
        if record.wait is not None and last.wait is not None and record.wait >= last.wait:
            self.task_wait.add((record.wait - last.wait) / 1e6, tasks)
        self.retained.add(max(record.rss - last.rss, 0), tasks)


@dataclass
class ChildState:
    pid: int
    baseline: int | None = None  # private memory after its first task
    rss_at_baseline: int = 0
    rss: int = 0  # RSS after its last task
    tasks: int = 0  # tasks it finished
    task: str | None = None  # the task it runs now
    task_id: str | None = None
    task_peak: int = 0  # the growth reserved for that task
    task_rss: int = 0  # its RSS when that task started
    leaving: bool = False  # recycled, retired or killed: on its way out
    last_record: Record | None = None  # its last record that carried its CPU time
    private_read: tuple[int, int] | None = None  # (private, RSS) when it last read both
    ready: bool = False  # billiard's WORKER_UP or a record came: its start is paid

    @property
    def young(self) -> bool:
        """No first task measured yet: it has not copied what it will copy."""
        return self.baseline is None

    @property
    def private(self) -> int:
        """Its private memory now, as far as its records tell (0 while young)."""
        if self.baseline is None:
            return 0
        return self.baseline + max(self.rss - self.rss_at_baseline, 0)


@dataclass
class Ledger:
    """Every live child, the tasks in flight and the task table.

    The sums a hand-over weighs are kept as the events come, so that no decision walks
    the children: change a child only through the events below, never by its fields."""

    estimate: int  # bytes: the startup estimate of a child's baseline
    tasks: TaskTable = field(default_factory=TaskTable)
    children: dict[int, ChildState] = field(default_factory=dict)
    #: Tasks handed to the pool and not yet accepted by a child, by id.
    starting: OrderedDict[str, Handed] = field(default_factory=OrderedDict)
    baselines: deque[int] = field(default_factory=lambda: deque(maxlen=BASELINES_KEPT))
    pace: Pace = field(default_factory=Pace)
    finished: int = 0  # tasks finished in any child
    #: bytes reserved for the tasks finished since the cgroup was read: not in the reading
    unread: int = 0
    # -- kept as the events come (see ``_count``) --
    busy: int = field(default=0, init=False)  # children running a task, leaving ones too
    idle: int = field(default=0, init=False)  # staying children with no task
    running_peaks: int = field(default=0, init=False)  # reserved for staying children's tasks
    starting_peaks: int = field(default=0, init=False)  # reserved for tasks not accepted yet
    leaving_bytes: int = field(default=0, init=False)  # held by children on their way out
    #: tasks in flight (handed or running) by name
    in_flight: Counter[str] = field(default_factory=Counter, init=False)
    _expected: int | None = field(default=None, init=False)  # max(baselines), once per change
    _gap: int | None = field(default=None, init=False)  # baseline_gap, once per change

    # -- the figures the policy reads ----------------------------------------------------
    @property
    def expected_baseline(self) -> int:
        """The largest of the last children's baselines, else the startup estimate."""
        if self._expected is None:
            self._expected = max(self.baselines, default=self.estimate)
        return self._expected

    @property
    def first_round(self) -> bool:
        """Fewer than PRIOR_TASKS tasks finished: the first tasks may read less of the
        app's data, so the children may copy more than they did so far."""
        return self.finished < PRIOR_TASKS

    @property
    def growth_baseline(self) -> int:
        """What each child, staying or added, is taken to copy: not below the startup
        estimate in the first round."""
        measured = self.expected_baseline
        return max(measured, self.estimate) if self.first_round else measured

    @property
    def baseline_gap(self) -> int:
        """Bytes the staying children will still copy: all of ``growth_baseline`` for a
        young one, the rest of it for one that copied less so far. Summed again only when
        a child comes, goes, leaves or is measured, or the first round ends: not per task."""
        if self._gap is None:
            self._gap = self._gap_of(lambda c: True)
        return self._gap

    @property
    def idle_gap(self) -> int:
        """The part of ``baseline_gap`` idle children hold back (copied only when a task
        reaches them); summed when asked, past the high mark."""
        return self._gap_of(lambda c: c.task is None)

    def _gap_of(self, counted: Callable[[ChildState], bool]) -> int:
        expected = self.growth_baseline
        return sum(
            expected if c.baseline is None else max(expected - c.baseline, 0)
            for c in self.children.values()
            if not c.leaving and counted(c)
        )

    def young_only(self) -> bool:
        """No child has reported yet: nothing measured."""
        return not self.baselines

    def live(self) -> list[ChildState]:
        return [c for c in self.children.values() if not c.leaving]

    def free(self) -> int:
        """Children that could take a task now: idle, staying, none promised to them."""
        return self.idle - len(self.starting)

    def learning(self, name: str) -> bool:
        """A run of ``name``, never measured, is already in flight."""
        return self.in_flight[name] > 0

    # -- the sums ----------------------------------------------------------------------
    def _count(self, child: ChildState, sign: int) -> None:
        """Take out (``sign`` -1, before a child changes) or add (1, after) its part of
        the sums."""
        if child.task is not None:
            self.busy += sign
            self.in_flight[child.task] += sign
        if child.leaving:
            self.leaving_bytes += sign * child.private
        elif child.task is None:
            self.idle += sign
        else:
            self.running_peaks += sign * child.task_peak

    def _handed(self, handed: Handed, sign: int) -> None:
        self.starting_peaks += sign * handed.peak
        self.in_flight[handed.name] += sign

    def _add_baseline(self, baseline: int) -> None:
        self.baselines.append(baseline)
        self._expected = None
        self._gap = None

    # -- events -----------------------------------------------------------------------
    def child_up(self, pid: int, rss: int = 0) -> None:
        self.child_down(pid)  # a pid seen again: the old child is gone
        child = self.children[pid] = ChildState(pid, rss=rss)
        self._count(child, 1)
        self._gap = None

    def child_down(self, pid: int) -> ChildState | None:
        child = self.children.pop(pid, None)
        if child is not None:
            self._count(child, -1)
            self._gap = None
        return child

    def child_ready(self, pid: int) -> None:
        child = self.children.get(pid)
        if child is not None:
            child.ready = True

    def starting_children(self) -> tuple[int, int]:
        """(ready, still starting) of the staying children."""
        return self._staying_split(lambda c: c.ready)

    def measured_children(self) -> tuple[int, int]:
        """(measured, not yet) of the staying children: measured once a task finished."""
        return self._staying_split(lambda c: not c.young)

    def _staying_split(self, counted: Callable[[ChildState], bool]) -> tuple[int, int]:
        live = self.live()
        yes = sum(1 for c in live if counted(c))
        return yes, len(live) - yes

    def leave(self, pid: int) -> None:
        """The child is on its way out (recycled, retired, killed): what it holds is
        freed when it exits, and no task is given to it."""
        child = self.children.get(pid)
        if child is None or child.leaving:
            return
        self._count(child, -1)
        child.leaving = True
        self._count(child, 1)
        self._gap = None

    def untrack(self) -> None:
        """Forget the tasks in flight, while the pool has room to spare
        (``Governor.roomy``); ``task_handed`` and ``task_accepted`` enter them again."""
        while self.starting:
            self._handed(self.starting.popitem()[1], -1)
        for child in self.children.values():
            if child.task is not None:
                self._no_task(child)

    def _no_task(self, child: ChildState) -> None:
        self._count(child, -1)
        child.task = child.task_id = None
        child.task_peak = 0
        self._count(child, 1)

    def task_handed(self, task_id: str, name: str, peak: int, now: float) -> None:
        old = self.starting.pop(task_id, None)
        if old is not None:
            self._handed(old, -1)
        handed = self.starting[task_id] = Handed(name, peak, now)
        self._handed(handed, 1)

    def forget_stale(self, now: float) -> None:
        """Tasks handed over that no child accepted in ACCEPT_WITHIN seconds, the oldest
        first (run at every decision: most often one look at the oldest)."""
        starting = self.starting
        while starting:
            task_id = next(iter(starting))
            handed = starting[task_id]
            if now - handed.when < ACCEPT_WITHIN:
                return
            del starting[task_id]
            self._handed(handed, -1)

    def task_accepted(self, pid: int, task_id: str, name: str) -> None:
        entry = self.starting.pop(task_id, None)
        if entry is not None:
            self._handed(entry, -1)
        child = self.children.get(pid)
        if child is None:
            return
        peak = entry.peak if entry else (self.tasks.peak(name) or self.tasks.worst_peak)
        self._count(child, -1)
        child.task, child.task_id, child.task_peak, child.task_rss = name, task_id, peak, child.rss
        self._count(child, 1)

    def task_finished(self, pid: int) -> None:
        child = self.children.get(pid)
        if child is not None:
            if child.task is not None:  # else untracked: the sums do not change
                self.unread += child.task_peak
                self._no_task(child)
            child.tasks += 1
        self.finished += 1
        if self.finished == PRIOR_TASKS and self.expected_baseline < self.estimate:
            self._gap = None  # the first round ended: growth_baseline falls to the measure

    def after_task(self, record: Record) -> None:
        """A child's report after a task: its figures, and the task's."""
        if record.exact or not self.tasks.known(record.name):
            self.tasks.observe(record.name, record.peak, record.retained)
        child = self.children.get(record.pid)
        if child is None:
            return
        self._count(child, -1)
        try:
            self._measured(child, record)
        finally:
            self._count(child, 1)

    def _measured(self, child: ChildState, record: Record) -> None:
        child.rss = record.rss
        child.ready = True
        self.pace.from_record(child, record)
        if record.private is None:
            return
        if child.baseline is None:
            # What it copied from the main process: its private memory less what the
            # task it just ran kept (a leak is not part of the next child's baseline).
            kept = max(record.retained, 0)
            child.baseline = max(record.private - kept, 0)
            child.rss_at_baseline = record.rss - kept
            self._add_baseline(child.baseline)
            self.pace.first_kept.add(kept)
        elif child.private_read is not None:
            # Private memory that grew more than the RSS did since it was last read:
            # pages shared with the main process that its tasks wrote to (a task that
            # reads more of the app's data than the first one did), copied for good.
            last_private, last_rss = child.private_read
            copied = (record.private - last_private) - (record.rss - last_rss)
            if copied > 0:
                child.baseline += copied
                self._add_baseline(child.baseline)
        child.private_read = (record.private, record.rss)


__all__ = [
    "MAX_TASK_NAMES",
    "OTHER",
    "ChildState",
    "Handed",
    "Ledger",
    "Mean",
    "Pace",
    "Record",
    "TaskMemory",
    "TaskTable",
    "name_key",
]
