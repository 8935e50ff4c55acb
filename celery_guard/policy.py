"""The run-time governor's decisions, apart from the pool they act on (pure).

Every rule compares a *projected peak* with the marks: what the cgroup holds now that the
kernel cannot reclaim (``View.unreclaimable``), plus what is still to come from what
already runs (young children that have not copied yet, tasks short of their peak), plus
what a decision would add. The answers are plain values the governor carries out:
nothing here touches a process.

- ``admit``: hand a task to the pool now, or hold it until it fits.
- ``recycle``: after its task, replace a child whose memory has outgrown its share.
- ``target_size`` and ``plan``: how many children the pool should have.
- ``Safety``: the clock-driven net for growth inside running tasks.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from .ledger import BILLIARD_MAINTENANCE, ChildState, Ledger

#: A child is recycled only for what it retained beyond what a new child copies, and only
#: when that is worth a fork: at least this much, and an eighth of its share.
MIN_RETAINED = 4 * 1024 * 1024


@dataclass(frozen=True)
class Marks:
    """The working-set marks, in bytes: low < high < hard < limit."""

    limit: int
    low: int
    high: int
    hard: int

    @classmethod
    def of(cls, limit: int, low: float, high: float, hard: float) -> Marks:
        return cls(limit, int(limit * low), int(limit * high), int(limit * hard))


@dataclass(frozen=True)
class View:
    """What a decision is taken on."""

    #: bytes the cgroup holds that the kernel cannot reclaim: its usage less the page
    #: cache, active and inactive (anonymous, unevictable and kernel memory stay)
    unreclaimable: int
    marks: Marks
    size: int  # the pool's size (children billiard keeps)
    requested: int  # the concurrency asked for: the pool never grows past it
    base: int  # bytes that are not pool children: the main process and the rest
    tasks_per_child: int  # the pool leaves each child room for this many leaky runs
    #: The RSS of a child now, read on demand (None when it is gone).
    rss_now: Callable[[int], int | None] = field(default=lambda pid: None)
    #: The pool's size as the throughput plan chose it (``plan``); None: no plan yet.
    target: int | None = None


# -- the projection ------------------------------------------------------------------------
def to_come(ledger: Ledger, rss_now: Callable[[int], int | None] | None = None) -> int:
    """Bytes the pool will still add at its peak from what it runs now: what the staying
    children will still copy, and each task handed out up to its expected peak, less,
    with ``rss_now``, what a running one grew by so far (it is in the cgroup's figure).
    A task finished since the cgroup was read counts as it ran (``Ledger.unread``)."""
    total = ledger.unread + ledger.starting_peaks + ledger.baseline_gap
    if rss_now is None:
        return total + ledger.running_peaks
    for child in ledger.children.values():  # a re-check, off the per-task path
        if child.task is None or child.leaving:
            continue
        now = rss_now(child.pid)
        if now is not None:  # else gone: taken as at its peak
            grown = now - child.task_rss  # no max(): a third of this loop's time
            rest = child.task_peak - grown if grown > 0 else child.task_peak
            if rest > 0:
                total += rest
    return total


class Admission(NamedTuple):  # a tuple: made at every decision, at a third of the cost
    admit: bool
    reason: str  # fits | idle | learning | no_child | over | no_room
    peak: int  # bytes the task is expected to add
    projected: int  # the cgroup's unreclaimable memory at the peak, with the task


def expected_peak(ledger: Ledger, name: str) -> int:
    """A task's expected growth; one never measured counts at the worst seen."""
    peak = ledger.tasks.peak(name)
    return ledger.tasks.worst_peak if peak is None else peak


def fits(view: View, ledger: Ledger, adding: int, read: bool = False) -> tuple[bool, int]:
    """Does the pool's projected peak, with ``adding`` more, stay under the marks?

    Once the children on their way out are gone, under the high mark; until they are,
    under the hard mark (their memory is freed within a fraction of a second; a task's
    peak may come sooner). With ``read``, running tasks' growth is read (``to_come``).
    Returns the answer and the projection without the leaving children."""
    projected = view.unreclaimable + to_come(ledger, view.rss_now if read else None) + adding
    settled = projected - ledger.leaving_bytes
    return settled <= view.marks.high and projected <= view.marks.hard, settled


def admit(
    view: View, ledger: Ledger, name: str, over: bool = False, fresh: View | None = None
) -> Admission:
    """Hand ``name`` to the pool now?

    - Nothing in flight and no child leaving (its memory is freed only once it exited,
      which took over 90 ms for hundreds of MiB): yes, whatever it costs, so the worker
      always makes progress (a task that alone does not fit is stopped at the hard mark).
    - A run of a task never measured is in flight: hold, so a burst of a new kind of
      task is measured on one run before it is multiplied.
    - No child is free: hold it here, rather than in the pool's buffer (Celery's
      semaphore lets a few more through when children are replaced).
    - Past the high mark (``over``): hold.
    - Else when the projected peak ``fits``: first told cheaply, then, given ``fresh``
      (the cgroup read now), on the running children's RSS.
    """
    peak = expected_peak(ledger, name)
    idle = not ledger.starting and not ledger.busy and not ledger.leaving_bytes
    if idle:
        return Admission(True, "idle", peak, view.unreclaimable + peak)
    if not ledger.tasks.known(name) and ledger.learning(name):
        return Admission(False, "learning", peak, view.unreclaimable)
    if ledger.free() <= 0:
        return Admission(False, "no_child", peak, view.unreclaimable)
    if over:
        return Admission(False, "over", peak, view.unreclaimable)
    ok, projected = fits(view, ledger, peak)
    if not ok and fresh is not None:
        ok, projected = fits(fresh, ledger, peak, read=True)
    return Admission(ok, "fits" if ok else "no_room", peak, projected)


def roomy(view: View, ledger: Ledger) -> bool:
    """Room to spare, so that no decision of the gate or of a task's end could differ
    from handing the task over (``Governor.roomy``): every child the pool has or plans,
    running the worst task seen, each young or new one copying a whole baseline, stays
    under the low mark; and no child holds enough more than a new one to be worth a fork."""
    children = max(view.size, view.target or 0)
    worst = (
        view.unreclaimable
        + ledger.baseline_gap
        + (children - view.size) * ledger.growth_baseline
        + children * ledger.tasks.worst_peak
    )
    if worst >= view.marks.low:
        return False
    expected = ledger.expected_baseline
    return all(c.young or c.private - expected < MIN_RETAINED for c in ledger.live())


# -- recycling -----------------------------------------------------------------------------
def share(view: View) -> int:
    """What one child may hold at its peak: its part of the room the marks leave."""
    return _room(view) // max(view.size, 1)


def recycle(view: View, ledger: Ledger, child: ChildState) -> bool:
    """Replace ``child`` now that its task ended? When what it holds plus the worst peak
    seen would pass its share, and what it holds beyond a new child is worth a fork."""
    if not worth_a_fork(ledger, child):
        return False
    room = share(view)
    if child.private - ledger.expected_baseline < room // 8:
        return False
    return child.private + ledger.tasks.worst_peak > room


def worth_a_fork(ledger: Ledger, child: ChildState) -> bool:
    """Could ``child`` be recycled at all (measured, idle, staying, holding MIN_RETAINED
    more than a new child)? Told without a view: most tasks' ends stop here."""
    if child.young or child.leaving or child.task is not None:
        return False
    return child.private - ledger.expected_baseline >= MIN_RETAINED


# -- the pool's size -----------------------------------------------------------------------
def child_cost(view: View, ledger: Ledger, baseline: int | None = None) -> int:
    """What one child needs at its peak: its baseline, the worst task's peak, and room
    for what ``tasks_per_child - 1`` runs of the leakiest task retain (recycled at most
    every ``tasks_per_child`` tasks: a recycle costs a fork)."""
    retained = ledger.tasks.worst_retained * max(view.tasks_per_child - 1, 0)
    if baseline is None:
        baseline = ledger.expected_baseline
    return max(baseline + ledger.tasks.worst_peak + retained, 1)


def target_size(view: View, ledger: Ledger) -> int:
    """The throughput plan's size once there is one, else the children that fit."""
    return view.target if view.target is not None else _fitting(view, ledger)


# -- the pool's size for throughput ---------------------------------------------------------
#: The most runs between two recycles a plan considers (a child that keeps next to nothing).
MOST_TASKS_PER_CHILD = 1000
#: A plan replaces the current size only when it is expected to run this much faster: a
#: pool that changes for less follows the noise of its own figures.
HYSTERESIS = 0.10
#: Pairs this close to the fastest count as a tie, which goes to the smaller pool: once the
#: CPUs bound the rate, more children only share them (BENCHMARKS.md: on 2 CPUs the best
#: hand-tuned CPU-bound apps had 2 to 4 children where up to 12 fit).
TIE = 0.01
#: Records with CPU figures (tasks after a child's first) before a plan is made.
MEASURED_TASKS = 8
#: Replacements timed before a plan for tasks that keep memory is made: the first ones
#: come in a burst and vary (a plan from one chose 2 children where 5 were faster).
MEASURED_REPLACEMENTS = 3


@dataclass(frozen=True)
class Plan:
    """A pool size and the tasks each child runs between recycles, chosen together for
    the most tasks per second (``tasks_per_child`` None: tasks keep too little to matter)."""

    size: int
    tasks_per_child: int | None
    rate: float | None  # tasks per second expected; None: not measured yet
    reason: str  # measuring | memory | throughput | kept
    room: int = 0  # the bytes the marks left the children when it was chosen (0: unknown)


@dataclass(frozen=True)
class Costs:
    """What a plan weighs: ``ledger.Pace`` and the ledger's peaks."""

    room: int  # bytes the marks leave for the children
    baseline: int  # bytes a new child copies
    peak: int  # bytes the worst task grows a child by while it runs
    first_kept: int  # bytes a child's first task keeps (a cache it builds, a first leak)
    retained: int  # bytes each later task keeps, on average
    task_cpu: float  # CPU seconds per task
    task_idle: float  # seconds per task off the CPU (sleep, I/O): more children overlap it
    start_cpu: float  # CPU seconds a new child spends before its first task
    cpus: float  # CPUs the worker may use
    #: seconds of a replacement off the CPU (exit, fork, a start waiting on I/O)
    replace_idle: float = 0.0
    #: CPU seconds of the main process per task: its one thread bounds short tasks' rate
    main_cpu: float = 0.0
    #: seconds of the main process's thread per child forked: its loop hands nothing over
    fork_main: float = 0.0

    def holds(self, tasks: int) -> int:
        """Bytes a child needs at the peak of its ``tasks``-th task."""
        kept = 0 if tasks <= 1 else self.first_kept + (tasks - 2) * self.retained
        return self.baseline + self.peak + kept

    def most_tasks(self, size: int) -> int:
        """Tasks a child can run before it outgrows its share at ``size`` children."""
        share = self.room // size
        if self.holds(1) > share:
            return 0
        if self.holds(2) > share:
            return 1
        if self.retained <= 0:
            return MOST_TASKS_PER_CHILD
        extra = (share - self.holds(2)) // self.retained
        return int(min(2 + extra, MOST_TASKS_PER_CHILD))

    def rate(self, size: int, tasks: int) -> float:
        """Tasks per second of ``size`` children that each run ``tasks`` tasks, then are
        replaced: bounded by the children (the tasks' wall time, the next child's start),
        by the CPUs (the tasks', the main process' and a share of the start and the fork)
        and by the main process' one thread (a hand-over per task, a fork every ``tasks``:
        no pool size spreads it). Children that run MOST_TASKS_PER_CHILD are not replaced."""
        start_cpu, replace_idle, fork_main = self.start_cpu, self.replace_idle, self.fork_main
        if tasks >= MOST_TASKS_PER_CHILD:
            start_cpu = replace_idle = fork_main = 0.0
        per_task = self.task_cpu + self.task_idle + self.main_cpu
        cpu = tasks * (self.task_cpu + self.main_cpu) + start_cpu + fork_main
        slot = tasks * per_task + start_cpu + replace_idle
        main = tasks * self.main_cpu + fork_main
        by_children = size * tasks / max(slot, 1e-9)
        by_cpus = self.cpus * tasks / max(cpu, 1e-9)
        by_main = tasks / main if main > 0 else by_cpus
        return min(by_children, by_cpus, by_main)


def recycle_rss(found: Costs, rss_at_baseline: int, tasks: int) -> int:
    """The peak RSS (billiard's ``worker_max_memory_per_child``, in bytes) that recycles
    a child after ``tasks`` tasks: billiard checks it after each task, so half-way
    between the peaks of the ``tasks - 1``-th and the ``tasks``-th."""

    def above(runs: int) -> int:
        return found.holds(runs) - found.baseline if runs >= 1 else 0

    return rss_at_baseline + (above(tasks - 1) + above(tasks)) // 2


def costs(view: View, ledger: Ledger, cpus: float, fewest_tasks: int = 1) -> Costs | None:
    """The plan's inputs, or None while the pace is not measured: too few tasks, or
    replacements not timed where their time would change the plan. Until then a
    replacement counts at its longest: tasks that keep little do not wait for
    replacements that may not come before the queue is empty."""
    pace = ledger.pace
    start, idle, task_cpu = pace.start_cpu, pace.idle_wall(), pace.task_cpu.value
    if pace.task_cpu.samples < MEASURED_TASKS or None in (start, idle, task_cpu):
        return None
    assert start is not None and idle is not None and task_cpu is not None
    found = Costs(
        room=_room(view),
        baseline=ledger.expected_baseline,
        peak=ledger.tasks.worst_peak,
        first_kept=int(pace.first_kept.value or 0),
        retained=int(pace.retained.value or 0),
        task_cpu=task_cpu,
        task_idle=idle,
        start_cpu=start,
        cpus=cpus,
        replace_idle=pace.replace_idle() or 0.0,
        main_cpu=pace.main_cpu.value or 0.0,
        fork_main=pace.fork_main.value or 0.0,
    )
    if pace.replace_wall.samples >= MEASURED_REPLACEMENTS:
        return found
    # At its longest, billiard's maintenance interval (a replacement it misses waits that
    # long); where that plan would be HYSTERESIS slower than one on what was timed so
    # far, wait for the timings: a plan made now would change then.
    longest = replace(found, replace_idle=max(found.replace_idle, BILLIARD_MAINTENANCE))
    cautious = best(longest, view.requested, fewest_tasks=fewest_tasks)
    hopeful = best(found, view.requested, fewest_tasks=fewest_tasks)
    cautious_rate = found.rate(cautious.size, cautious.tasks_per_child or MOST_TASKS_PER_CHILD)
    if hopeful.rate is not None and cautious_rate * (1 + HYSTERESIS) < hopeful.rate:
        return None
    return longest


def plan(
    view: View, ledger: Ledger, cpus: float, previous: Plan | None = None, fewest_tasks: int = 1
) -> Plan:
    """The pool size that runs the most tasks per second within the marks.

    A child's share of the room sets how many tasks it runs before it outgrows it, the
    pace the rate of that pair: many children replaced after every task win when a
    child is cheap to start, fewer that keep a few tasks' leaks when it is dear. The
    current size stays unless another is HYSTERESIS faster or it no longer fits (``best``).
    Sizes whose children would run fewer than ``fewest_tasks`` are left out."""
    found = costs(view, ledger, cpus, fewest_tasks)
    if found is None:
        if previous is not None and previous.reason in ("throughput", "kept"):
            # the figures went back to not enough (a mean near a bound): the plan stays
            return replace(previous, reason="kept")
        return Plan(_fitting(view, ledger), None, None, "measuring", _room(view))
    chosen = best(found, view.requested, previous, fewest_tasks)
    first = previous is None or previous.reason not in ("throughput", "kept")
    if first and chosen.size > view.size >= 1:
        # grown as any plan changes a size: for one HYSTERESIS faster (a child costs its start)
        forked = Plan(view.size, None, None, "throughput", found.room)
        return best(found, view.requested, forked, fewest_tasks)
    return chosen


def best(found: Costs, requested: int, previous: Plan | None = None, fewest_tasks: int = 1) -> Plan:
    """The fastest size up to ``requested`` at these costs (see ``plan``).

    As the pool grows the tasks a child holds (``most_tasks``) fall in steps, and within
    a step the rate only grows with the size: each step is weighed by its last size, and
    the smallest that ties is found by bisection in the first step that reaches it (three
    weighings for tasks that keep nothing, where each size took hundreds, at every tick)."""
    if previous is not None and previous.reason not in ("throughput", "kept"):
        previous = None  # a size taken before measuring is no plan to keep
    elif previous is not None and abs(found.room - previous.room) > previous.room * HYSTERESIS:
        # the limit moved: weighed afresh, not kept by a margin meant for noisy figures
        previous = None
    # a set minimum that not even one child could run is lowered to what one can
    fewest = max(min(fewest_tasks, found.most_tasks(1)), 1)
    top = max(requested, 1)
    steps = [
        (first, last, tasks, found.rate(last, tasks))
        for first, last, tasks in _steps(found, top)
        if tasks >= fewest
    ]
    if not steps:
        return Plan(1, 1, None, "memory", found.room)
    best_rate = max(step[3] for step in steps)
    size, tasks = _smallest_reaching(found, steps, best_rate * (1 - TIE))
    rate = found.rate(size, tasks)
    reason = "throughput"
    if previous is not None and 1 <= previous.size <= top:
        kept_tasks = found.most_tasks(previous.size)
        kept_rate = found.rate(previous.size, kept_tasks)
        if kept_tasks >= fewest and kept_rate * (1 + HYSTERESIS) >= best_rate:
            size, rate, tasks, reason = previous.size, kept_rate, kept_tasks, "kept"
    return Plan(size, tasks if tasks < MOST_TASKS_PER_CHILD else None, rate, reason, found.room)


def _smallest_reaching(
    found: Costs, steps: list[tuple[int, int, int, float]], rate: float
) -> tuple[int, int]:
    """(size, tasks) of the smallest size whose rate reaches ``rate``, in the first step
    whose last size does (``steps``: first size, last size, tasks, the last size's rate;
    the rate grows with the size inside a step)."""
    for first, last, tasks, last_rate in steps:
        if last_rate >= rate:
            reaches = bisect_left(
                range(first, last), True, key=lambda n: found.rate(n, tasks) >= rate
            )
            return first + reaches, tasks
    raise ValueError("no step reaches the rate")  # the fastest step's last size does


def _steps(found: Costs, top: int) -> Iterator[tuple[int, int, int]]:
    """(first size, last size, tasks) of each run of sizes up to ``top`` whose children
    hold the same number of tasks (``most_tasks`` never grows with the size): strides that
    double, then bisection, so that short steps cost about what weighing each size would."""
    size = 1
    while size <= top:
        tasks = found.most_tasks(size)
        low, stride = size, 1  # low: the last size known to hold ``tasks``
        while low + stride <= top and found.most_tasks(low + stride) == tasks:
            low, stride = low + stride, stride * 2
        high = min(low + stride, top + 1) - 1  # the step ends in [low, high]
        while low < high:
            middle = (low + high + 1) // 2
            if found.most_tasks(middle) == tasks:
                low = middle
            else:
                high = middle - 1
        yield size, low, tasks
        size = low + 1


def _room(view: View) -> int:
    """The bytes the high mark leaves for the children."""
    return max(view.marks.high - view.base, 0)


def _fitting(view: View, ledger: Ledger) -> int:
    """The children that fit at their peak cost, between 1 and the requested: the pool
    grows only as far as they fit at ``Ledger.growth_baseline``, shrinks only on what was
    measured."""
    measured = children_fitting(view, ledger)
    growth = children_fitting(view, ledger, ledger.growth_baseline)
    return max(1, min(view.requested, measured, max(growth, view.size)))


def waiting_for_the_plan_is_cheaper(ledger: Ledger, children: int) -> bool:
    """Wait for the plan rather than fork more children now? A child forked now that the
    plan then retires costs its start (``Pace.start_and_task``); waiting costs about the
    wall time of the MEASURED_TASKS records still missing on the ``children`` there are.
    So children that load a model are not forked to be retired; cheap ones do not wait."""
    missing = MEASURED_TASKS - ledger.pace.task_cpu.samples
    known = ledger.pace.start_and_task()
    if missing <= 0 or known is None:
        return False
    start, wall = known
    return start > missing * wall / max(children, 1)


def children_fitting(view: View, ledger: Ledger, baseline: int | None = None) -> int:
    """How many children fit under the high mark at their peak cost, whatever was asked."""
    return _room(view) // child_cost(view, ledger, baseline)


# -- the safety net ------------------------------------------------------------------------
@dataclass(frozen=True)
class Action:
    action: str  # kill | shed | grow | retire
    pid: int = 0
    level: str = ""  # the mark that made it: hard | high | low
    child: ChildState | None = None
    count: int = 1  # grow: how many children


def _to_retire(idle: list[ChildState]) -> list[ChildState]:
    """Idle children above the target, the young first (its first task will copy a whole
    baseline the cgroup's figure does not show yet, and it has nothing warm to lose),
    then the largest."""
    return sorted(idle, key=lambda c: (not c.young, -c.private))


class Safety:
    """The clock-driven net, for what the task-boundary rules cannot see: growth inside
    a running task beyond its expected peak. Past the high mark it holds every task,
    sheds idle children (``_shed``) and, with the hard mark ahead, stops running tasks
    (the last resort: the kernel would act next, and it may pick the main process);
    below, it resizes towards the target (``_resize``)."""

    LOOKAHEAD = 0.5  # seconds
    FAST = 0.05  # seconds between checks above the low mark
    COOLDOWN = 0.3  # seconds after shedding: time for the children to exit

    def __init__(self) -> None:
        self.last: tuple[float, int] | None = None
        self.rate = 0.0  # bytes per second the unreclaimable memory rose by
        #: bytes each running task had grown past its expected peak at the last check
        #: past the high mark (none is read below it: taken as none there)
        self.overran: dict[int, int] = {}
        self.quiet_until = 0.0
        self.over = False

    def project(self, held: int, now: float) -> int:
        last, self.last = self.last, (now, held)
        if last is None or now <= last[0]:
            return held
        self.rate = max((held - last[1]) / (now - last[0]), 0.0)
        return held + int(self.rate * self.LOOKAHEAD)

    def next_delay(self, held: int, marks: Marks, interval: float) -> float:
        """Check again before the memory held can reach the low mark at its rate."""
        if held >= marks.low:
            return self.FAST
        if self.rate > 0:
            return min(interval, max((marks.low - held) / self.rate / 2, self.FAST))
        return interval

    def decide(self, view: View, ledger: Ledger, now: float) -> list[Action]:
        """``over`` once the unreclaimable memory, less what leaving children free, passes
        the high mark. Past it, stop running tasks only when the hard mark is ahead by what
        admitted tasks will add and tasks past their peaks add in LOOKAHEAD seconds (not
        the cgroup's rate: admitted tasks reaching their peaks rise as fast)."""
        marks, held = view.marks, view.unreclaimable
        since = self.last[0] if self.last is not None else now
        self.project(held, now)  # the cgroup's rate paces the checks (next_delay)
        settled = held - ledger.leaving_bytes
        self.over = settled >= marks.high
        if held < marks.high:
            self.overran = {}
        else:
            unforeseen = self._unforeseen(view, ledger, now - since)
            ahead = settled + to_come(ledger, view.rss_now) + sum(unforeseen.values())
            if self.over:  # what idle children would copy on a first task is no reason
                ahead -= ledger.idle_gap  # to stop a running one: none reaches them now
            stopping = self._stop(view, ledger, ahead, unforeseen) if ahead >= marks.hard else []
            if stopping:
                return stopping
            # nothing to stop (what is ahead is idle children's copies): shed as below
        if self.over:
            return self._shed(view, ledger, now, "high")
        return self._resize(view, ledger, now)

    def _unforeseen(self, view: View, ledger: Ledger, elapsed: float) -> dict[int, int]:
        """Bytes each running task will grow past its expected peak within LOOKAHEAD, at
        the rate it did since the last check (FAST ago at least: a first overrun read
        soon after another check is no unbounded rate)."""
        before, self.overran = self.overran, {}
        ahead: dict[int, int] = {}
        for child in ledger.children.values():
            if child.task is None or child.leaving:
                continue
            rss = view.rss_now(child.pid)
            if rss is None:
                continue
            past = max(rss - child.task_rss - child.task_peak, 0)
            self.overran[child.pid] = past
            rate = max(past - before.get(child.pid, 0), 0) / max(elapsed, self.FAST)
            ahead[child.pid] = int(rate * self.LOOKAHEAD)
        return ahead

    def _stop(
        self, view: View, ledger: Ledger, ahead: int, unforeseen: dict[int, int]
    ) -> list[Action]:
        """Busy children, the largest first (what each holds, will still add and will
        grow past its peak), until the projection is under the high mark; then idle ones
        that retained memory. One child is always left."""
        actions: list[Action] = []
        left = ahead
        busy = [c for c in ledger.live() if c.task is not None]

        def its_part(child: ChildState) -> int:
            now = view.rss_now(child.pid)
            grown = max(now - child.task_rss, 0) if now is not None else child.task_peak
            held = child.private if not child.young else 0
            return max(grown, child.task_peak) + held + unforeseen.get(child.pid, 0)

        sizes = {c.pid: its_part(c) for c in busy}
        for child in sorted(busy, key=lambda c: sizes[c.pid], reverse=True):
            if left <= view.marks.high or len(ledger.live()) - len(actions) <= 1:
                break
            actions.append(Action("kill", child.pid, "hard", child))
            left -= max(sizes[child.pid], 1)
        if left > view.marks.high:
            for child in self._idle_with_retained(ledger):
                if left <= view.marks.high or len(ledger.live()) - len(actions) <= 1:
                    break
                actions.append(Action("shed", child.pid, "hard", child))
                left -= child.private
        return actions

    def _idle_with_retained(self, ledger: Ledger) -> list[ChildState]:
        idle = [c for c in ledger.live() if worth_a_fork(ledger, c)]
        return sorted(idle, key=lambda c: c.private, reverse=True)

    def _shed(self, view: View, ledger: Ledger, now: float, level: str) -> list[Action]:
        """Past the high mark: recycle idle children that retained memory, the largest
        first; then, above the target size (the limit fell), retire idle ones; as many as
        it takes to be under the mark again."""
        if now < self.quiet_until:
            return []
        actions: list[Action] = []
        over = view.unreclaimable - view.marks.high
        live = len(ledger.live())
        for child in self._idle_with_retained(ledger):
            if over < 0 or live - len(actions) <= 1:
                break
            actions.append(Action("shed", child.pid, level, child))
            over -= child.private - ledger.expected_baseline
        excess = view.size - target_size(view, ledger)
        chosen = {a.pid for a in actions}
        idle = [c for c in ledger.live() if c.task is None and c.pid not in chosen]
        for child in _to_retire(idle)[: max(excess, 0)]:
            if over < 0 or live - len(actions) <= 1:
                break
            actions.append(Action("retire", child.pid, level, child))
            over -= max(child.private, ledger.expected_baseline)
        if actions:
            self.quiet_until = now + self.COOLDOWN
        return actions

    def _resize(self, view: View, ledger: Ledger, now: float) -> list[Action]:
        """Towards the target size: retire an idle child above it; below it, add the
        children that fit, in waves of no more than are ready, less those starting: a dear
        start (a model loaded in ``worker_process_init``) is paid by a few children before
        the plan weighed it. In the first round a wave is the children measured: the
        estimate foresees neither the tasks' peaks nor tasks that copy more of the app."""
        target = target_size(view, ledger)
        if view.size > target and now >= self.quiet_until:
            idle = [c for c in ledger.live() if c.task is None]
            if idle and len(ledger.live()) > 1:
                self.quiet_until = now + self.COOLDOWN
                child = _to_retire(idle)[0]
                return [Action("retire", child.pid, "low", child)]
            return []
        if view.size >= target or ledger.leaving_bytes:
            return []  # children on their way out: grow once their memory is free
        ready, starting = ledger.starting_children()
        if ledger.first_round:  # a wave is the children measured: see above
            ready, starting = ledger.measured_children()
        if waiting_for_the_plan_is_cheaper(ledger, ready):
            return []
        wave = max(ready, 1) - starting
        each = ledger.growth_baseline + ledger.tasks.worst_peak
        count = 0  # as many as fit, up to the target (the tick's reading is fresh)
        while (
            count < wave
            and view.size + count < target
            and fits(view, ledger, each * (count + 1), True)[0]
        ):
            count += 1
        if not count:
            return []
        return [Action("grow", level="low", count=count)]


__all__ = [
    "MEASURED_REPLACEMENTS",
    "MEASURED_TASKS",
    "MIN_RETAINED",
    "Action",
    "Admission",
    "Costs",
    "Marks",
    "Plan",
    "Safety",
    "View",
    "admit",
    "best",
    "child_cost",
    "children_fitting",
    "expected_peak",
    "fits",
    "plan",
    "recycle",
    "recycle_rss",
    "share",
    "target_size",
    "to_come",
    "waiting_for_the_plan_is_cheaper",
]
