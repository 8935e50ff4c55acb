"""The governor carries out the throughput plan (policy.plan) on the pool's events.

Driven as on the worker's event loop, as in test_terminate_lines.py: the real ledger,
policy and line writer over a PoolControl whose children are fake. Above the plan's size
the child that just finished a task leaves the pool (``level=plan action=retire``), and
a recycled child's replacement is timed from the recycle to the new child's readiness.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from celery_guard.actuator import Child, Verdict
from celery_guard.config import Settings
from celery_guard.exits import ExitCauses
from celery_guard.footprint import CollectorPages
from celery_guard.governor import Governor
from celery_guard.ledger import Record
from celery_guard.limit import LiveLimit
from celery_guard.logline import RECORD_ATTRIBUTE
from celery_guard.policy import Plan

from .test_footprint import _Forked
from .test_plan_throughput import measured
from .test_terminate_lines import MIB, FakePool, Hub, cgroup_at

LIMIT = 1000 * MIB


class RecordingPool(FakePool):
    """A FakePool that records what the governor asks of it."""

    def __init__(self, rss_mib: dict[int, int]) -> None:
        super().__init__(rss_mib)
        self.retired: list[tuple[int, bool]] = []
        self.recycled: list[int] = []
        self.flight: list[tuple[str, str, int | None]] = []  # billiard's cache, as read

    def in_flight(self) -> list[tuple[str, str, int | None]]:
        return list(self.flight)

    def retire(self, pid: int, task_ended: bool = False) -> bool:
        self.retired.append((pid, task_ended))
        self.children.pop(pid)
        return True

    def recycle(self, pid: int, task_ended: bool = False) -> bool:
        self.recycled.append(pid)
        return True


def governor(
    tmp_path: Path, children: int, may_untrack: bool = False
) -> tuple[Governor, RecordingPool]:
    """``children`` idle children, each measured after a first run of ``t`` (30 MiB
    copied, RSS 200 MiB); a working set of 300 MiB, far below the marks. Every task is
    tracked unless ``may_untrack`` (then the pool has room to spare: ``policy.roomy``)."""
    pool = RecordingPool({pid: 200 for pid in range(101, 101 + children)})
    settings = Settings()
    budget = Governor(
        pool, settings, cgroup_at(tmp_path, 300), LiveLimit(LIMIT, settings),
        requested=children, estimate=30 * MIB, others=0, hostname="w1@test",
        exits=ExitCauses(None), cpus=2, may_untrack=may_untrack,
    )  # fmt: skip
    budget.start(Hub())
    for pid in pool.children:
        budget.post(Record(pid, "t", 0, False, 0, 200 * MIB, 30 * MIB, cpu=1, tasks=1))
    budget.tick()
    return budget, pool


def guard_lines(caplog: pytest.LogCaptureFixture, key: str, value: str) -> list[dict[str, object]]:
    """The fields of each guard line logged whose ``key`` is ``value``."""
    return [
        fields
        for record in caplog.records
        if (fields := getattr(record, RECORD_ATTRIBUTE, None)) is not None
        and fields.get(key) == value
    ]


def plan_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return guard_lines(caplog, "level", "plan")


def test_above_the_plan_the_child_that_finished_leaves_one_at_a_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    budget, pool = governor(tmp_path, 4)
    budget.plan = Plan(2, 3, 10.0, "throughput")
    for pid in (101, 102):
        budget.task_accepted(pid, f"id-{pid}", "t")
    with caplog.at_level(logging.INFO, logger="celery_guard"):
        assert budget.task_ready(101, "id-101") is False  # left the pool, not recycled
        assert pool.retired == [(101, True)]
        assert budget.task_ready(102, "id-102") is False
    assert pool.retired == [(101, True), (102, True)]
    lines = plan_lines(caplog)
    assert [(line["action"], line["pid"], line["target"]) for line in lines] == [
        ("retire", 101, 2), ("retire", 102, 2),
    ]  # fmt: skip


def test_at_the_plans_size_no_child_leaves(tmp_path: Path) -> None:
    budget, pool = governor(tmp_path, 2)
    budget.plan = Plan(2, 3, 10.0, "throughput")
    budget.task_accepted(101, "id-101", "t")
    budget.task_ready(101, "id-101")
    assert pool.retired == []


def test_a_replacement_is_timed_from_the_recycle_to_the_new_childs_readiness(
    tmp_path: Path,
) -> None:
    budget, _pool = governor(tmp_path, 1)
    # child 101 has kept 1000 MiB: past its share (less than the 950 MiB high mark) with
    # the next task's peak, recycled
    budget.post(Record(101, "t", 10 * MIB, True, 1000 * MIB, 1200 * MIB, None, cpu=2, tasks=2))
    budget.task_accepted(101, "id-2", "t")
    began = time.monotonic()
    assert budget.task_ready(101, "id-2") is True
    budget.child_up(201)  # the replacement, forked
    budget.child_alive(150)  # another child: not a replacement
    assert budget.ledger.pace.replace_wall.samples == 0
    time.sleep(0.05)
    budget.child_alive(201)
    measured = budget.ledger.pace.replace_wall.value
    assert measured is not None and 0.05 <= measured <= time.monotonic() - began
    assert budget.replacing == type(budget.replacing)() and budget.replacements == {}


def test_the_recommended_pair_is_planned_for_children_that_copy_more_without_gc_freeze(
    tmp_path: Path,
) -> None:
    """A vanilla worker does not freeze the collector before it forks: each child copies
    more (``unfrozen_extra``), so the pair recommended for it is planned at that cost.
    Cheap children of tasks that wait 0.1 s: the guard's plan is 16 children of one run;
    at 40 MiB more a child, fewer fit."""
    budget, _pool = governor(tmp_path, 16)
    budget.ledger = measured(start_cpu=0.001, wall=0.105)
    budget.unfrozen_extra = 40 * MIB
    budget.tick()
    assert budget.plan is not None and budget.plan.size == 16
    assert budget.planned["plan_concurrency"] == 16
    assert 1 <= budget.planned["plan_vanilla_concurrency"] < 16
    budget.unfrozen_extra = 0
    budget.tick()
    # as dear as the guard's children: the guard's plan, or more children than were
    # asked for where they fit and run faster (the recommendation is not bound by -c)
    assert budget.planned["plan_vanilla_concurrency"] >= 16


def test_only_exits_billiard_missed_are_counted_late(tmp_path: Path) -> None:
    """At each turn the governor has the pool join its exited children. Those whose exit
    billiard had handled, and missed (a worker without the guard waits for its next
    maintenance), are counted late; those whose exit event is still to come are joined
    too, not counted; with none exited, the pool is not asked."""
    budget, pool = governor(tmp_path, 1)
    joins: list[int] = []
    found = [(0, 0)]
    pool.replace_exited = lambda: joins.append(1)  # type: ignore[method-assign]
    pool.exited_unjoined = lambda: found[0]  # type: ignore[method-assign]
    budget.tick()
    assert (budget.ledger.pace.late_joins, joins) == (0, [])
    found[0] = (2, 1)  # two exited: one missed, one whose event is pending
    budget.tick()
    assert (budget.ledger.pace.late_joins, joins) == (1, [1])
    found[0] = (1, 0)
    budget.tick()
    assert (budget.ledger.pace.late_joins, joins) == (1, [1, 1])


def test_with_no_pace_the_recommended_size_is_what_fits_at_the_peaks_without_gc_freeze(
    tmp_path: Path,
) -> None:
    """Tasks whose records are rare (nothing changed) give no pace, and no throughput
    plan: the size recommended for a worker without the guard is what fits at the
    children's peaks, each copying what it copies without gc.freeze. 16 children of 30
    MiB, a task peak of 10 MiB, 850 MiB of room: 850 // 40 = 21 fit with gc.freeze (the
    recommendation says what fits, not only what was asked for); at 140 MiB more a child,
    850 // 180 = 4."""
    budget, _pool = governor(tmp_path, 16)
    budget.main_rss = lambda: 100 * MIB  # type: ignore[method-assign]
    budget.ledger.tasks.observe("t", 10 * MIB, 0)
    budget.tick()
    assert budget.plan is not None and budget.plan.reason == "measuring"
    assert budget.planned == {"plan_vanilla_concurrency": 850 // 40}  # more than asked for
    budget.unfrozen_extra = 140 * MIB
    budget.tick()
    assert budget.planned == {"plan_vanilla_concurrency": 4}


def test_the_first_plan_from_measured_figures_is_logged_though_its_size_stays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """From ``measuring`` to a measured plan of the same size: one line says the size is
    now chosen from figures (the figures it was chosen from are the news); the next
    turns, the plan unchanged, add none."""
    budget, _pool = governor(tmp_path, 4)
    assert budget.plan is not None and budget.plan.reason == "measuring"
    assert budget.plan.size == 4
    budget.ledger = measured(start_cpu=0.001, kept=0)  # cheap children: 4 is fastest
    with caplog.at_level(logging.INFO, logger="celery_guard"):
        budget.tick()
        budget.tick()
    lines = guard_lines(caplog, "event", "plan")
    assert [(line["target"], line["reason"]) for line in lines] == [(4, "throughput")]


def test_a_vanilla_child_is_charged_what_measured_children_still_share_of_the_collectors_pages(
    tmp_path: Path,
) -> None:
    """Without gc.freeze a child ends up with its own copy of every page a full collection
    writes that it still shares: until a child is read, all of them count (the bound);
    then what the children read still share. Real forked children stand for the pool's:
    one that has written them (its own full collection) and one that has not."""
    made = [{"id": i, "tags": [i]} for i in range(50_000)]
    gc.collect()
    collector = CollectorPages.of()
    copied, fresh = _Forked(), _Forked()
    try:
        copied.collect()
        pool = RecordingPool({copied.pid: 200, fresh.pid: 200})
        settings = Settings()
        budget = Governor(
            pool, settings, cgroup_at(tmp_path, 300), LiveLimit(LIMIT, settings),
            requested=2, estimate=30 * MIB, others=0, hostname="w1@test",
            exits=ExitCauses(None), cpus=2, collector=collector,
        )  # fmt: skip
        budget.start(Hub())
        assert budget.vanilla_extra() == collector.bytes
        budget.post(Record(copied.pid, "t", 0, False, 0, 200 * MIB, 30 * MIB, cpu=1, tasks=1))
        budget.tick()
        alone = budget.vanilla_extra()
        budget.post(Record(fresh.pid, "t", 0, False, 0, 200 * MIB, 30 * MIB, cpu=1, tasks=1))
        budget.tick()
        both = budget.vanilla_extra()
    finally:
        copied.close()
        fresh.close()
    assert len(made) == 50_000 and collector.bytes >= 10 * MIB
    assert budget.ledger.pace.unfrozen.samples == 2
    assert alone <= 0.05 * collector.bytes
    assert 0.35 * collector.bytes <= both <= 0.65 * collector.bytes


def test_the_collectors_pages_are_read_in_the_first_children_then_one_in_eight(
    tmp_path: Path,
) -> None:
    """A read takes about a millisecond: the first UNFROZEN_FIRST children measured, then
    one in UNFROZEN_EVERY; none without the pages (gc.freeze off)."""
    pool = RecordingPool({pid: 200 for pid in range(101, 131)})
    settings = Settings()
    budget = Governor(
        pool, settings, cgroup_at(tmp_path, 300), LiveLimit(LIMIT, settings),
        requested=30, estimate=30 * MIB, others=0, hostname="w1@test",
        exits=ExitCauses(None), cpus=2, collector=CollectorPages.of([]),
    )  # fmt: skip
    budget.start(Hub())
    for pid in range(101, 131):
        budget.post(Record(pid, "t", 0, False, 0, 200 * MIB, 30 * MIB, cpu=1, tasks=1))
        budget.post(Record(pid, "t", 0, False, 0, 200 * MIB, 30 * MIB, cpu=2, tasks=2))
    budget._absorb()
    assert budget.unfrozen_due == [*range(101, 109), 109, 117, 125]
    budget.collector = None
    budget.unfrozen_due = []
    budget._baseline_taken(200)
    assert budget.unfrozen_due == []


def test_a_fresh_reading_of_the_cgroup_takes_in_the_tasks_finished_before_it(
    tmp_path: Path,
) -> None:
    """A finished task's reservation counts until the cgroup is read again: the clock's
    reading holds what it kept."""
    budget, _pool = governor(tmp_path, 2)
    budget.ledger.tasks.observe("leak", 24 * MIB, 24 * MIB)
    budget.ledger.task_accepted(101, "a", "leak")
    budget.task_ready(101, "a")
    assert budget.ledger.unread == 24 * MIB
    budget.tick()
    assert budget.ledger.unread == 0


def started_with_two_children(
    tmp_path: Path, waiting: set[object], processes: tuple[object, object]
) -> Governor:
    """A governor started on two children forked before its hooks (pids 101 and 102, of
    ``processes``); billiard still waits for the WORKER_UP of those in ``waiting``."""
    pool = RecordingPool({})
    pool.children = {101 + i: Child(101 + i, None, p) for i, p in enumerate(processes)}
    pool.rss_mib = {101: 200, 102: 200}
    pool.w = SimpleNamespace(pool=SimpleNamespace(_pool=SimpleNamespace(_waiting_to_start=waiting)))
    settings = Settings()
    budget = Governor(
        pool, settings, cgroup_at(tmp_path, 300), LiveLimit(LIMIT, settings),
        requested=4, estimate=30 * MIB, others=0, hostname="w1@test",
        exits=ExitCauses(None), cpus=2,
    )  # fmt: skip
    budget.start(Hub())
    return budget


def test_a_child_whose_readiness_was_missed_is_taken_as_ready_at_the_next_tick(
    tmp_path: Path,
) -> None:
    """A WORKER_UP the governor never heard: once billiard no longer waits for the
    child, the next tick counts it ready, so the pool's waves are not stuck on it."""
    first, second = object(), object()
    waiting = {first, second}
    budget = started_with_two_children(tmp_path, waiting, (first, second))
    assert budget.ledger.starting_children() == (0, 2)
    budget.tick()
    assert budget.ledger.starting_children() == (0, 2)  # billiard still waits for both
    waiting.discard(first)  # its WORKER_UP came, and went unheard
    budget.tick()
    assert budget.ledger.starting_children() == (1, 1)


def test_children_forked_before_the_hooks_are_ready_unless_billiard_still_waits_for_them(
    tmp_path: Path,
) -> None:
    """Their WORKER_UP may have come before the guard's hooks: the pool's own list of the
    children it still waits for says which are ready, so the first wave's growth need not
    wait for a first task's record."""
    up, starting = object(), object()
    budget = started_with_two_children(tmp_path, {starting}, (up, starting))
    assert budget.ledger.starting_children() == (1, 1)
    budget.child_alive(102)  # its WORKER_UP, through the hook
    assert budget.ledger.starting_children() == (2, 0)


# -- room to spare: tasks handed over untracked ---------------------------------------------
def test_with_room_to_spare_a_known_task_is_handed_over_untracked(tmp_path: Path) -> None:
    """Far below the marks (300 MiB of 1000, children of 30 MiB whose task grows them by
    nothing) the tick finds room to spare: a task of a known kind is handed over without
    entering the ledger, and its acceptance and end leave no trace in it but the count."""
    budget, _pool = governor(tmp_path, 4, may_untrack=True)
    assert budget.roomy and not budget.tracks_tasks and budget.info()["tracking"] is False
    assert budget.gate(SimpleNamespace(id="a", name="t")) is Verdict.HAND_OVER
    budget.task_handed(SimpleNamespace(id="a", name="t"))
    budget.task_accepted(101, "a", "t")
    assert not budget.ledger.starting and budget.ledger.busy == 0
    finished = budget.ledger.finished
    assert budget.task_ready(101, "a") is False
    assert budget.ledger.finished == finished + 1


def test_a_kind_never_measured_is_tracked_from_what_the_pool_has_in_flight(
    tmp_path: Path,
) -> None:
    """A task of a new kind ends the untracked hand-overs: the ledger takes in the tasks
    the pool has in flight (accepted by a child, or not yet), and the new one is weighed
    as any: its first run goes, a second of its kind waits for it to be measured."""
    budget, pool = governor(tmp_path, 4, may_untrack=True)
    pool.flight = [("a", "t", 101), ("b", "t", None)]
    assert budget.gate(SimpleNamespace(id="u1", name="u")) is Verdict.HAND_OVER
    assert not budget.roomy and budget.tracks_tasks
    assert budget.ledger.children[101].task_id == "a" and list(budget.ledger.starting) == ["b"]
    budget.task_handed(SimpleNamespace(id="u1", name="u"))
    assert list(budget.ledger.starting) == ["b", "u1"]
    assert budget.gate(SimpleNamespace(id="u2", name="u")) is Verdict.DEFER


def test_near_the_low_mark_the_tick_tracks_tasks_again(tmp_path: Path) -> None:
    """Room to spare is judged at every tick on a fresh reading: with the working set
    near the low mark the tasks in flight are tracked again, and untracked once it fell."""
    budget, pool = governor(tmp_path, 4, may_untrack=True)
    pool.flight = [("a", "t", 102)]
    low = budget.fresh_view().marks.low
    (tmp_path / "memory.usage_in_bytes").write_text(str(low))
    budget.tick()
    assert not budget.roomy and budget.ledger.children[102].task_id == "a"
    (tmp_path / "memory.usage_in_bytes").write_text(str(300 * MIB))
    budget.tick()
    assert budget.roomy and budget.ledger.busy == 0


def test_a_child_that_kept_a_forks_worth_ends_the_room_at_its_tasks_end(
    tmp_path: Path,
) -> None:
    """Untracked, a task's end decides nothing; but a child whose record says it kept
    more than a new child copies by a fork's worth tracks tasks again at once, and the
    end of that task weighs its recycle as it would have tracked (1000 MiB kept: past
    its share with the next task's peak)."""
    budget, pool = governor(tmp_path, 1, may_untrack=True)
    assert budget.roomy
    # billiard's cache still holds the task whose end this is (its own handler runs next)
    pool.flight = [("id-2", "t", 101)]
    budget.post(Record(101, "t", 10 * MIB, True, 1000 * MIB, 1200 * MIB, None, cpu=2, tasks=2))
    assert budget.task_ready(101, "id-2") is True
    assert not budget.roomy and budget.ledger.busy == 0  # the ended task is not in flight


def test_a_recycled_childs_line_counts_the_tasks_it_ran_untracked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The ``tasks`` of a recycle line are every task the child finished, those that
    ended while the ledger followed none (room to spare) included: 5 untracked, then the
    one whose record ends the room and recycles it."""
    caplog.set_level(logging.INFO, logger="celery_guard")
    budget, pool = governor(tmp_path, 1, may_untrack=True)
    assert budget.roomy
    for n in range(5):
        assert budget.task_ready(101, f"id-{n}") is False
    pool.flight = [("id-5", "t", 101)]
    budget.post(Record(101, "t", 10 * MIB, True, 1000 * MIB, 1200 * MIB, None, cpu=2, tasks=7))
    assert budget.task_ready(101, "id-5") is True
    (line,) = guard_lines(caplog, "event", "recycle")
    assert line["tasks"] == 5 + 1  # ends heard; ``governor``'s first record is not one


def test_a_kind_with_a_declared_limit_but_never_run_is_weighed_on_that_limit(
    tmp_path: Path,
) -> None:
    """A declared memory limit bounds its task's peak before any run (``TaskTable``), but
    the room was judged on the peaks measured: the first run of such a task ends it, and
    is weighed on its limit (800 MiB more than the 300 in use passes the high mark)."""
    budget, pool = governor(tmp_path, 4, may_untrack=True)
    budget.ledger.tasks.limits["heavy"] = 800 * MIB
    pool.flight = [("a", "t", 101)]  # not idle: a pool with nothing in flight takes any
    assert budget.roomy
    assert budget.gate(SimpleNamespace(id="h1", name="heavy")) is Verdict.HOLD
    assert not budget.roomy
