"""The run-time budget on the worker's event loop: ledger and policy, carried out.

Decisions are taken where memory changes: when a task is handed to the pool (admit or
hold), when it ends (recycle the child if it outgrew its share, release held tasks), and
when a child comes or goes. A check of the cgroup every ``brake_interval`` seconds (0.05
s above the low mark) is the net for growth inside a running task. ``policy`` decides,
``ledger`` remembers, ``actuator.PoolControl`` acts; this class passes the figures.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from . import brokers, cgroups, policy
from .actuator import Listener, PoolControl, Verdict
from .config import Settings
from .exits import ExitCauses, Kill
from .footprint import CollectorPages
from .ledger import ChildState, Ledger, Record, TaskTable
from .limit import LiveLimit
from .logline import emit, logger
from .procfs import StatmRss, path
from .sizes import mib

#: How long a working-set reading serves the gate before it is read again (seconds).
FRESH = 0.02
#: Seconds a replacement may take to be ready before its slot is no longer waited for.
REPLACED_WITHIN = 30.0
#: Children whose share of the collector's pages is read: the first ones, then one in this
#: many (one read takes about a millisecond).
UNFROZEN_FIRST = 8
UNFROZEN_EVERY = 8


def available_cpus() -> float:
    """CPUs this worker may use: Celery's count (affinity and the cgroup's CPU quota,
    Celery 5.7), else the affinity mask."""
    try:
        from celery.utils.sysinfo import available_cpu_count  # type: ignore[attr-defined]

        return float(available_cpu_count())
    except (ImportError, AttributeError, OSError, ValueError):
        return float(len(os.sched_getaffinity(0)))


class Governor(Listener):
    """Keeps the pool's projected peak under the high mark, task by task."""

    def __init__(
        self,
        control: PoolControl,
        settings: Settings,
        cgroup: cgroups.Cgroup,
        live: LiveLimit,
        requested: int,
        estimate: int,
        others: int,
        hostname: str,
        exits: ExitCauses,
        count: Callable[[str], None] = lambda action: None,
        limits: dict[str, int] | None = None,
        count_task: Callable[[str, str | None], None] = lambda kind, name: None,
        cpus: float | None = None,
        collector: CollectorPages | None = None,
        unfrozen_collect: float = 0.0,
        may_untrack: bool = True,
    ) -> None:
        self.control = control
        self.settings = settings
        self.cgroup = cgroup
        self.live = live
        self.requested = requested
        self.others = others  # bytes in the cgroup at startup that are not this worker
        self.hostname = hostname
        self.exits = exits
        self.count = count
        self.count_task = count_task  # by task name: holds, recycles, memory kills
        #: declared hard limits bound the peak of tasks not measured yet
        self.ledger = Ledger(estimate, TaskTable(limits))
        self.safety = policy.Safety()
        self.cpus = cpus if cpus is not None else available_cpus()
        #: the pages a full collection writes: at most what a vanilla worker's child copies more
        self.collector = collector
        self.unfrozen_extra = collector.bytes if collector is not None else 0
        self.unfrozen_due: list[int] = []  # measured children whose share is read next tick
        #: seconds of a full collection of the unfrozen heap (with its copies): a vanilla
        #: worker runs one before every fork (Celery issue #2927)
        self.unfrozen_collect = unfrozen_collect
        self.baselines_taken = 0
        self.plan: policy.Plan | None = None  # the size for throughput, made at each tick
        #: the plan as a vanilla worker's settings, for the summary's thread (replaced whole)
        self.planned: dict[str, Any] = {}
        self.rss_at_baseline: int | None = None  # a measured child's RSS, less its leaks
        self.baseline_seen = estimate  # what a new child copies, as the last tick saw it
        self.main_cpu_at: tuple[float, int] | None = None  # (process CPU, tasks finished)
        self.forks_at = (0, 0.0)  # (children forked, seconds), as the last tick read them
        #: when children were told to leave for a replacement: the next one forked replaces
        #: the oldest, and the time to its readiness is a slot left empty
        self.replacing: deque[float] = deque(maxlen=64)
        self.replacements: dict[int, float] = {}  # pid forked -> when its slot emptied
        #: runs between recycles a plan may not go below: the setting, when it was set
        given = settings.source("min_tasks_per_child") != "default"
        self.fewest_tasks = settings.min_tasks_per_child if given else 1
        self.records: deque[Record] = deque()  # from the sampler's thread
        self.main_rss = StatmRss()
        self.reading: tuple[float, int] | None = None  # (when, unreclaimable bytes)
        self.cached_view: tuple[tuple[float, int], policy.View] | None = None  # its reading
        self.holding = False
        #: seconds a task may be held before it goes back to the broker (``brokers``)
        self.hold_bound: brokers.HoldBound = brokers.HoldBound(None, "")
        #: (task id, name, peak, when) the gate admitted last, for ``task_handed``
        self.admitted: tuple[str, str, int, float] | None = None
        self.stopped = False
        #: room to spare (``policy.roomy``): tasks are handed over untracked (``_room``)
        self.roomy = False
        self.tracks_tasks = True
        self.may_untrack = may_untrack  # False: every task tracked, room or not
        self.hub: Any = None
        self.pending: set[Callable[[], None]] = set()  # for the loop's next turn, once each
        #: while the held tasks are weighed again (``_recheck``): the figures read for it
        self.rechecked: policy.View | None = None
        #: observe: decide and log as usual, act on nothing (CELERY_GUARD_GOVERNOR=observe)
        self.observing = settings.governor == "observe"
        self.observed: dict[tuple[str, int], float] = {}  # (action, pid) -> last logged
        #: seconds from passing the high mark to the safety net's action
        self.reactions: deque[float] = deque(maxlen=256)
        self.crossed: float | None = None  # when it passed the high mark
        #: seconds the gate took to decide each of the last holds (the first of a run often
        #: comes just after a fork, when each page the loop touches is copied)
        self.hold_decisions: deque[float] = deque(maxlen=256)
        self.holds = 0  # tasks held, one count per decision
        self.working_set_max = 0  # the largest unreclaimable figure a check read
        self.figures_lock = threading.Lock()  # the summary reads them from its thread

    # -- wiring ----------------------------------------------------------------------
    def start(self, hub: Any) -> None:
        self.hub = hub
        for pid in self.control.children:  # forked before the hooks were in place
            self.child_up(pid)
            if self.control.ready(pid):  # its WORKER_UP came before the hooks
                self.ledger.child_ready(pid)
        self.control.listeners.append(self)
        self.control.gate = self.gate
        hub.call_later(self.settings.brake_interval, self.tick)

    def stop(self) -> None:
        self.stopped = True
        self.control.gate = None

    def _room(self, roomy: bool) -> None:
        self.roomy, self.tracks_tasks = roomy, not roomy

    def _track(self) -> None:
        """Follow tasks one by one again, from those the pool has in flight now."""
        self._room(False)
        now = time.monotonic()
        for task_id, name, pid in self.control.in_flight():
            if pid is None:
                peak = policy.expected_peak(self.ledger, name)
                self.ledger.task_handed(task_id, name, peak, now)
            else:
                self.ledger.task_accepted(pid, task_id, name)

    def _choose_tracking(self, view: policy.View) -> None:
        """Untracked while there is room to spare, and nothing waits or leaves a plan."""
        roomy = (
            self.may_untrack
            and not self.control.held
            and not self.safety.over
            and not self.holding
            and self._outgrown_plan() is None
            and policy.roomy(view, self.ledger)
        )
        if roomy and not self.roomy:
            self._room(True)
            self.admitted = None
            self.ledger.untrack()
        elif self.roomy and not roomy:
            self._track()

    def post(self, record: Record) -> None:
        """A child's record, from whichever thread read it; absorbed on the loop."""
        self.records.append(record)

    def _absorb(self) -> None:
        while self.records:
            record = self.records.popleft()
            child = self.ledger.children.get(record.pid)
            young = child is not None and child.young
            self.ledger.after_task(record)
            if young and child is not None and not child.young:
                self._baseline_taken(child.pid)

    def _baseline_taken(self, pid: int) -> None:
        taken, self.baselines_taken = self.baselines_taken, self.baselines_taken + 1
        if self.collector is not None and (taken < UNFROZEN_FIRST or taken % UNFROZEN_EVERY == 0):
            self.unfrozen_due.append(pid)

    def _measure_unfrozen(self) -> None:
        """What children measured since the last tick still share of the pages a full
        collection writes: what each would copy more in a vanilla worker."""
        due, self.unfrozen_due = self.unfrozen_due, []
        for pid in due:
            shared = self.collector.shared(path(pid, "pagemap")) if self.collector else None
            if shared is not None:  # else gone, or not ours to read: the bound stays
                self.ledger.pace.unfrozen.add(shared)

    # -- the view ---------------------------------------------------------------------
    def _unreclaimable(self, now: float, fresh: float = FRESH) -> int:
        """The cgroup's memory the kernel cannot reclaim (its working set where memory.stat
        has no active_file), read again after ``fresh`` seconds."""
        if self.reading is None or fresh <= 0 or now - self.reading[0] > fresh:
            usage = cgroups.read_usage(self.cgroup)
            found = usage.working_set if usage.unreclaimable is None else usage.unreclaimable
            if found is None:  # unreadable now: the last figure, else nothing fits
                return self.reading[1] if self.reading else self.live.limit
            self.reading = (now, found)
            self.ledger.unread = 0  # the tasks finished so far are in this reading
        return self.reading[1]

    def view(self, now: float, fresh: float = FRESH) -> policy.View:
        """What decisions are taken on. With ``fresh`` > 0 (the per-task path) nothing is
        read: the last view serves, on the pool's size and plan of now, and is built again
        at the loop's next turn (``_refresh``) once the pool changed, or once its reading
        is older than ``fresh`` near the low mark (``gate``: building one reads the cgroup
        and /proc, ten times the rest of a decision). With ``fresh`` 0 all is read now."""
        size, target, requested = self.control.size, self.target, self.requested
        cached = self.cached_view
        if fresh > 0 and cached is not None and self.reading is not None:
            reading, view = cached
            changed = view.size != size or view.target != target or view.requested != requested
            if changed or reading is not self.reading:
                view = replace(
                    view, unreclaimable=self.reading[1], size=size, target=target,
                    requested=requested,
                )  # fmt: skip
                self.cached_view = (self.reading, view)
                self._refresh_soon()
            return view
        view = policy.View(
            unreclaimable=self._unreclaimable(now, fresh),
            marks=self.live.marks,
            size=size,
            requested=requested,
            base=self.main_rss() + self.others,
            tasks_per_child=self.settings.min_tasks_per_child,
            rss_now=self.control.rss,
            target=target,
        )
        self.cached_view = (self.reading, view) if self.reading else None
        return view

    def _stale(self, now: float) -> bool:
        return self.reading is not None and now - self.reading[0] > FRESH

    def _soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` at the event loop's next turn, once however often asked."""
        if callback in self.pending or self.hub is None:
            return
        self.pending.add(callback)
        self.hub.call_soon(callback)

    def _refresh_soon(self) -> None:
        self._soon(self._refresh)

    def _refresh(self) -> None:
        self.pending.discard(self._refresh)
        if not self.stopped:
            self.fresh_view()

    def fresh_view(self) -> policy.View:
        return self.view(time.monotonic(), 0.0)

    @property
    def target(self) -> int | None:
        return self.plan.size if self.plan is not None else None

    # -- listener: the pool's events --------------------------------------------------
    def child_up(self, pid: int) -> None:
        self.ledger.child_up(pid, self.control.rss(pid) or 0)
        now = time.monotonic()
        while self.replacing and now - self.replacing[0] > REPLACED_WITHIN:
            self.replacing.popleft()  # its replacement never came (the pool shrank)
        if self.replacing:
            self.replacements[pid] = self.replacing.popleft()

    def child_alive(self, pid: int) -> None:
        """A child is ready for work (the pool may grow on it: ``Safety``); for a
        replacement, how long its slot was empty."""
        self.ledger.child_ready(pid)
        emptied = self.replacements.pop(pid, None)
        if emptied is not None:
            self.ledger.pace.replace_wall.add(time.monotonic() - emptied)
            self.ledger.pace.replacements += 1

    def child_down(self, pid: int, exitcode: int | None, task: tuple[str, str] | None) -> None:
        self.replacements.pop(pid, None)
        self.ledger.child_down(pid)
        self.control.release()

    def task_accepted(self, pid: int, task_id: str, name: str) -> None:
        if not self.roomy:  # told anyway when another listener tracks tasks
            self.ledger.task_accepted(pid, task_id, name)

    def task_ready(self, pid: int, task_id: str) -> bool:
        """A task ended in ``pid``: take its record, then recycle the child if it has
        outgrown its share (PoolControl releases the held tasks after)."""
        if self.records:
            self._absorb()  # its record came first (PoolControl reads them before this)
        child = self.ledger.children.get(pid)
        if self.roomy:
            if child is None or not policy.worth_a_fork(self.ledger, child):
                self.ledger.task_finished(pid)  # the common end of an untracked task
                return False
            # it kept more than the room was judged on: track (billiard's cache still holds
            # this task), then weigh its recycle
            self._track()
        last = child.task if child is not None else None
        self.ledger.task_finished(pid)
        if child is None or not self.settings.recycle or self.stopped:
            return False
        if self._outgrown_plan() is None and not policy.worth_a_fork(self.ledger, child):
            return False  # the common end of a task: no view needed
        now = time.monotonic()
        view = self.view(now)
        if self._retire_above_plan(child, view):
            return False
        if not policy.recycle(view, self.ledger, child):
            return False
        self.count_task("recycle", last)
        self._log_recycle(child, view)
        if self.observing:
            return False
        self.ledger.leave(child.pid)
        self.replacing.append(now)
        return True

    def _retire_above_plan(self, child: ChildState, view: policy.View) -> bool:
        """Above the plan, the child that just finished leaves (one per task's end)."""
        plan = self._outgrown_plan()
        if plan is None or self.observing:
            return False
        if child.leaving or len(self.ledger.live()) <= 1:
            return False
        if not self.control.retire(child.pid, task_ended=True):
            return False
        self.ledger.leave(child.pid)
        self._pressure(
            "retire", "plan", view.unreclaimable, pid=child.pid, private_mib=mib(child.private),
            target=plan.size,
        )  # fmt: skip
        return True

    def _outgrown_plan(self) -> policy.Plan | None:
        """The plan, when the pool is larger than it (children are retired down to it)."""
        plan = self.plan
        return plan if plan is not None and self.control.size > plan.size else None

    def _main_cpu(self) -> None:
        """The main process' CPU per task since the last check (all its threads), and
        apart from it, per child forked: a plan weighs forks by how often it replaces."""
        forks, seconds = self.control.forks, self.control.fork_seconds
        last_forks, self.forks_at = self.forks_at, (forks, seconds)
        forked = seconds - last_forks[1]
        if forks > last_forks[0]:
            self.ledger.pace.fork_main.add(forked, forks - last_forks[0])
        cpu, finished = time.process_time(), self.ledger.finished
        last, self.main_cpu_at = self.main_cpu_at, (cpu, finished)
        if last is not None and finished > last[1]:
            spent = max(cpu - last[0] - forked, 0.0)
            self.ledger.pace.main_cpu.add(spent, finished - last[1])

    def _replan(self, view: policy.View) -> None:
        """The pool's size for throughput, again; a line when it changes or is first made
        from measured figures."""
        previous = self.plan
        self.plan = policy.plan(view, self.ledger, self.cpus, previous, self.fewest_tasks)
        self.planned = self._as_settings(view)
        measured_now = self.plan.reason != "measuring" and (
            previous is None or previous.reason == "measuring"
        )
        if not measured_now and (previous is None or previous.size == self.plan.size):
            return
        pace = self.ledger.pace
        fields: dict[str, Any] = {
            "worker": self.hostname,
            "target": self.plan.size,
            "concurrency": view.size,
            "reason": self.plan.reason,
            "tasks_per_child": self.plan.tasks_per_child,
            "rate_per_s": round(self.plan.rate, 1) if self.plan.rate else None,
            "task_cpu_ms": _ms(pace.task_cpu.value),
            "task_idle_ms": _ms(pace.idle_wall()),
            "main_cpu_ms": _ms(pace.main_cpu.value),
            "fork_ms": _ms(pace.fork_main.value),
            "start_cpu_ms": _ms(pace.start_cpu),
            "replace_ms": _ms(pace.replace_wall.value),
            "replace_idle_ms": _ms(pace.replace_idle()),
            "retained_mib": mib(int(pace.retained.value or 0)),
            "baseline_mib": mib(self.ledger.expected_baseline),
            "peak_mib": mib(self.ledger.tasks.worst_peak),
            "cpus": self.cpus,
        }
        emit(logging.INFO, "plan", fields)

    # -- the gate ---------------------------------------------------------------------
    def gate(self, request: Any) -> Verdict:
        """Hand ``request`` to the pool now; or hold it and the ones behind it (no room,
        no free child); or defer it while a run of its kind is measured."""
        if self.stopped:
            return Verdict.HAND_OVER
        if self.roomy:
            if request.name in self.ledger.tasks.by_name:  # measured, not only declared
                return Verdict.HAND_OVER
            self._track()  # a kind never measured: its first run is weighed, and watched
        self._absorb()  # the children's records: bookkeeping, before the decision's clock
        began = time.perf_counter()
        now = time.monotonic()
        self.ledger.forget_stale(now)
        view = self.view(now)
        verdict = policy.admit(view, self.ledger, request.name, self.safety.over, self.rechecked)
        decided = time.perf_counter() - began
        if verdict.reason == "no_room" and self.rechecked is None:
            self._recheck_soon()
        elif verdict.projected >= view.marks.low and self._stale(now):
            # An old reading is only cautious (the tasks finished since count at their
            # peak: ``Ledger.unread``); near the marks that caution would hold tasks.
            self._refresh_soon()
        if self.observing and not verdict.admit:
            if verdict.reason not in ("learning", "no_child"):
                self._held(request, verdict, view, decided)
            verdict = policy.Admission(True, "observed", verdict.peak, verdict.projected)
        if verdict.admit:
            self.admitted = (request.id, request.name, verdict.peak, now)
            if self.holding:
                self.holding = False
                self._pressure(
                    "release", "low", view.unreclaimable, task=request.name,
                    projected_mib=mib(verdict.projected), held=len(self.control.held),
                )  # fmt: skip
            return Verdict.HAND_OVER
        if verdict.reason == "learning":
            return Verdict.DEFER
        if verdict.reason == "no_child":
            return Verdict.HOLD
        self._held(request, verdict, view, decided)
        return Verdict.HOLD

    def resized(self, added: int) -> None:
        """Someone resized the pool (``pool_grow``/``pool_shrink``): the concurrency asked
        for moves with it, and the plan is made again."""
        if self.stopped:
            return
        self.requested = max(1, self.requested + added)
        self.plan = None
        emit(
            logging.INFO, "plan",
            {"worker": self.hostname, "target": None, "concurrency": self.control.size,
             "reason": "resized", "requested": self.requested},
        )  # fmt: skip

    def task_handed(self, request: Any) -> None:
        """The request the gate just admitted reached the pool: it enters the ledger now,
        not at the decision (Celery may still refuse it: revoked, expired)."""
        if self.stopped or self.roomy:
            return
        admitted, self.admitted = self.admitted, None
        if admitted is not None and admitted[0] == request.id:
            self.ledger.task_handed(*admitted)

    def _recheck_soon(self) -> None:
        """A task did not fit on the figures at hand: weigh the held tasks again at the
        loop's next turn, on figures read then (a read of memory.stat alone takes longer
        than the rest of a hand-over)."""
        self._soon(self._recheck)

    def _recheck(self) -> None:
        """Read the cgroup and the running children's RSS once, then hand over the held
        tasks that fit on those figures."""
        self.pending.discard(self._recheck)
        if self.stopped:
            return
        fresh, rss = self.fresh_view(), {}
        for child in self.ledger.children.values():  # once per re-check, not per task
            if child.task is not None and not child.leaving:
                rss[child.pid] = self.control.rss(child.pid)
        self.rechecked = replace(fresh, rss_now=rss.get)
        try:
            self.control.release()
        finally:
            self.rechecked = None

    def _held(
        self, request: Any, verdict: policy.Admission, view: policy.View, decided: float
    ) -> None:
        self.holds += 1
        self.count_task("hold", request.name)
        with self.figures_lock:
            self.hold_decisions.append(decided)
        if not self.holding:  # one line when holding starts, not one per task held
            self.holding = True
            self._pressure(
                "hold", "high", view.unreclaimable, task=request.name, task_id=request.id,
                peak_mib=mib(verdict.peak), projected_mib=mib(verdict.projected),
                held=len(self.control.held),
            )  # fmt: skip

    # -- the clock --------------------------------------------------------------------
    def _ready_missed(self) -> None:
        """Children the pool no longer waits for (billiard's ``_waiting_to_start``) are
        ready, heard or not: one taken for starting forever would keep the pool at its
        first wave (``policy.Safety`` grows by the ready)."""
        for child in self.ledger.live():
            if not child.ready and self.control.ready(child.pid):
                self.ledger.child_ready(child.pid)

    def tick(self) -> None:
        if self.stopped:
            return
        delay = self.settings.brake_interval
        try:
            self._absorb()
            self._ready_missed()
            self._measure_unfrozen()
            now = time.monotonic()
            view = self.view(now, fresh=0.0)
            self._main_cpu()
            self._replan(view)
            self.baseline_seen = self.ledger.expected_baseline  # for the summary's thread
            view = replace(view, target=self.target)
            self.working_set_max = max(self.working_set_max, view.unreclaimable)
            self._choose_tracking(view)
            if view.unreclaimable >= view.marks.high and self.crossed is None:
                self.crossed = now
            elif view.unreclaimable < view.marks.high:
                self.crossed = None
            for action in self.safety.decide(view, self.ledger, now):
                self._carry_out(action, view)
            exited, missed = self.control.exited_unjoined()
            if exited:  # joined and replaced now, not at billiard's next maintenance
                self.control.replace_exited()
                # what a worker without the guard waits for: priced in its plan
                self.ledger.pace.late_joins += missed
            if not self.safety.over:
                self.control.release()
            self._give_back_overdue(now)
            delay = self.safety.next_delay(view.unreclaimable, view.marks, delay)
        except Exception:  # noqa: BLE001 - the governor must not stop the worker
            logger.exception("celery-guard event=error stage=governor")
        self.hub.call_later(delay, self.tick)

    def _give_back_overdue(self, now: float) -> None:
        """Held tasks near the broker's timer go back to it: kept longer, Redis would
        deliver them again (run twice) and RabbitMQ would close the channel."""
        bound = self.hold_bound
        if bound.seconds is None or not self.control.held or self.observing:
            return
        for request in self.control.overdue(now, bound.seconds):
            held = now - self.control.held_since.get(request.id, now)
            if self.control.give_back(request):
                self._pressure(
                    "give_back", "high", self.reading[1] if self.reading else 0,
                    task=request.name, task_id=request.id, held_s=round(held, 1),
                    timer=bound.timer, bound_s=round(bound.seconds, 1),
                )  # fmt: skip

    def _carry_out(self, action: policy.Action, view: policy.View) -> None:
        if self.observing:
            self._observe(action, view)
            return
        child = action.child
        if action.action == "grow":
            self.control.grow(action.count)
            self._pressure(
                "grow", action.level, view.unreclaimable, added=action.count,
                child_cost_mib=mib(policy.child_cost(view, self.ledger)),
                target=policy.target_size(view, self.ledger),
            )  # fmt: skip
            return
        if child is None:
            return
        if action.action == "kill":
            reason = (
                f"the memory the kernel cannot reclaim reached {mib(view.unreclaimable)} MiB of "
                f"{mib(view.marks.limit)} MiB and was rising towards the hard mark"
            )
            self.exits.killing(child.pid, Kill(reason))
            done = self.control.kill(child.pid, shrink=True)
            if done:
                self.count_task("memory_kill", child.task)
        elif action.action == "shed":
            done = self.control.recycle(child.pid)
            if done:
                self.replacing.append(time.monotonic())
        else:  # retire
            done = self.control.retire(child.pid)
        if not done:
            return
        self.ledger.leave(child.pid)
        self._note_reaction()
        self._action_line(action, view)

    def _observe(self, action: policy.Action, view: policy.View) -> None:
        """What the action would be, logged (once per action and child in OBSERVE_EVERY
        seconds: the condition that makes it lasts while nothing is done about it)."""
        now, key = time.monotonic(), (action.action, action.pid)
        if now - self.observed.get(key, -self.OBSERVE_EVERY) < self.OBSERVE_EVERY:
            return
        self.observed[key] = now
        if len(self.observed) > 1024:
            self.observed = {k: t for k, t in self.observed.items() if now - t < 60}
        extra: dict[str, Any] = {}
        if action.action == "grow":  # never about a child
            extra = {"added": action.count, "target": policy.target_size(view, self.ledger)}
        self._action_line(action, view, **extra)

    def _action_line(self, action: policy.Action, view: policy.View, **extra: Any) -> None:
        child = action.child
        if child is not None:
            extra.update(pid=child.pid, private_mib=mib(child.private))
            if action.action == "kill":
                extra.update(task=child.task, task_id=child.task_id)
        name = {"kill": "terminate", "shed": "retire"}.get(action.action, action.action)
        self._pressure(name, action.level, view.unreclaimable, **extra)

    #: seconds between two lines of one observed action about one child
    OBSERVE_EVERY = 5.0

    def _note_reaction(self) -> None:
        if self.crossed is not None:
            with self.figures_lock:
                self.reactions.append(time.monotonic() - self.crossed)
            self.crossed = None

    # -- lines ------------------------------------------------------------------------
    def _pressure(self, action: str, level: str, usage: int, **extra: Any) -> None:
        self.count(action)
        fields = {
            "worker": self.hostname,
            "level": level,
            "unreclaimable_mib": mib(usage),
            "limit_mib": mib(self.live.limit),
            "action": action,
            "concurrency": self.control.size,
            **extra,
        }
        if self.observing:
            fields["observe"] = True  # decided and logged; not done
        emit(logging.WARNING, "pressure", fields)

    def _log_recycle(self, child: ChildState, view: policy.View) -> None:
        self.count("recycle")
        fields = {
            "worker": self.hostname,
            "pid": child.pid,
            "reason": "budget",
            "private_mib": mib(child.private),
            "baseline_mib": mib(child.baseline or 0),
            "next_peak_mib": mib(self.ledger.tasks.worst_peak),
            "share_mib": mib(policy.share(view)),
            "tasks": child.tasks,
            "concurrency": view.size,
        }
        if self.observing:
            fields["observe"] = True
        emit(logging.INFO, "recycle", fields)

    def figures(self) -> dict[str, Any]:
        """What the summary line adds from the governor (the README's log reference)."""
        with self.figures_lock:
            decisions, reactions = list(self.hold_decisions), list(self.reactions)
        return {
            "holds": self.holds,
            "hold_decision_p50_us": round(statistics.median(decisions) * 1e6, 1)
            if decisions
            else None,
            "reaction_p50_ms": round(statistics.median(reactions) * 1000, 1) if reactions else None,
            "reaction_max_ms": round(max(reactions) * 1000, 1) if reactions else None,
            "working_set_max_mib": mib(self.working_set_max),
            "expected_baseline_mib": mib(self.baseline_seen),
            **self.planned,
        }

    def vanilla_extra(self) -> int:
        """Bytes a child copies more in a vanilla worker: what children were measured to
        share of the pages a full collection writes, else all of them."""
        measured = self.ledger.pace.unfrozen.value
        return int(measured) if measured is not None else self.unfrozen_extra

    def _as_settings(self, view: policy.View) -> dict[str, Any]:
        """The plan, and the pair the summary recommends to a vanilla worker: planned again
        on the same pace, each child copying what it copies without gc.freeze; its size,
        and where tasks keep memory, the ``worker_max_memory_per_child`` that recycles a
        child after its planned tasks; not where children stay below the main process's
        RSS (billiard starts a child's peak RSS at it: every task would recycle)."""
        plan = self.plan
        if plan is None or plan.reason == "memory":
            return {}
        found = policy.costs(view, self.ledger, self.cpus, self.fewest_tasks)
        if plan.reason == "measuring" or found is None:
            # no pace: the size that fits at what a child copies without gc.freeze
            if self.ledger.young_only():
                return {}
            baseline = self.ledger.expected_baseline + self.vanilla_extra()
            fits = policy.children_fitting(view, self.ledger, baseline)
            return {"plan_vanilla_concurrency": max(1, fits)}  # what fits, asked for or not
        fields: dict[str, Any] = {
            "plan_concurrency": plan.size, "plan_tasks_per_child": plan.tasks_per_child,
        }  # fmt: skip
        vanilla_idle = self.ledger.pace.vanilla_replace_idle() or found.replace_idle
        found = replace(
            found,
            baseline=found.baseline + self.vanilla_extra(),
            replace_idle=vanilla_idle + self.unfrozen_collect,
            fork_main=found.fork_main + self.unfrozen_collect,
        )
        # the pair recommended may run more children than were asked for, where they fit
        most = max(view.requested, found.room // max(found.holds(1), 1))
        vanilla = policy.best(found, most, fewest_tasks=self.fewest_tasks)
        fields["plan_vanilla_concurrency"] = vanilla.size
        bases = [c.rss_at_baseline for c in self.ledger.live() if not c.young]
        if bases:  # else the last children's (at shutdown none is left)
            self.rss_at_baseline = sum(bases) // len(bases)
        if vanilla.tasks_per_child is None or self.rss_at_baseline is None:
            return fields
        limit = policy.recycle_rss(found, self.rss_at_baseline, vanilla.tasks_per_child)
        if limit > self.main_rss():
            fields["plan_vanilla_tasks_per_child"] = vanilla.tasks_per_child
            fields["plan_vanilla_max_memory_per_child_kib"] = limit // 1024
        return fields

    def info(self) -> dict[str, Any]:
        """The governor's figures, for ``celery inspect stats`` and ``guard_stats``."""
        tasks = self.ledger.tasks
        view = self.view(time.monotonic())
        return {
            **self.figures(),
            "target": policy.target_size(view, self.ledger),
            "child_cost_mib": mib(policy.child_cost(view, self.ledger)),
            "share_mib": mib(policy.share(view)),
            "expected_baseline_mib": mib(self.ledger.expected_baseline),
            "worst_peak_mib": mib(tasks.worst_peak),
            "worst_retained_mib": mib(tasks.worst_retained),
            "held": len(self.control.held),
            "tracking": not self.roomy,
            "replacements": self.ledger.pace.replacements,
            "replacements_joined_late": self.ledger.pace.late_joins,
            "task_peaks_mib": {n: mib(m.peak) for n, m in list(tasks.by_name.items())[:50]},
        }


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000, 1) if seconds is not None else None


__all__ = ["Governor", "available_cpus"]
