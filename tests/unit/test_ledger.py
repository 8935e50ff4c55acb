"""Tests for celery_guard.ledger: what the governor remembers of children and tasks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_guard.ledger import (
    ACCEPT_WITHIN,
    BILLIARD_MAINTENANCE,
    MAX_TASK_NAMES,
    OTHER,
    PRIOR_TASKS,
    Ledger,
    Pace,
    Record,
    TaskTable,
)

MIB = 1024 * 1024


def record(pid: int = 1, name: str = "t", peak: int = 0, retained: int = 0, rss: int = 0,
           private: int | None = None, exact: bool = True) -> Record:  # fmt: skip
    return Record(pid, name, peak, exact, retained, rss, private)


def test_the_first_record_sets_the_baseline_without_what_the_task_kept() -> None:
    """A child whose first task leaked 24 MiB: its baseline is what it copied, not the
    leak; its private memory is both."""
    ledger = Ledger(estimate=100 * MIB, finished=PRIOR_TASKS)
    ledger.child_up(7, rss=180 * MIB)
    ledger.after_task(record(7, peak=24 * MIB, retained=24 * MIB, rss=204 * MIB, private=35 * MIB))
    child = ledger.children[7]
    assert child.baseline == 11 * MIB
    assert child.private == 35 * MIB
    assert ledger.expected_baseline == 11 * MIB  # no longer the startup estimate


def test_private_memory_follows_the_rss_of_later_records() -> None:
    ledger = Ledger(estimate=0)
    ledger.child_up(7)
    ledger.after_task(record(7, rss=200 * MIB, private=20 * MIB))
    ledger.after_task(record(7, peak=24 * MIB, retained=24 * MIB, rss=224 * MIB))
    assert ledger.children[7].private == 44 * MIB
    ledger.after_task(record(7, retained=-30 * MIB, rss=190 * MIB))  # it gave memory back
    assert ledger.children[7].private == 20 * MIB  # never below its baseline


def test_the_expected_baseline_is_the_startup_estimate_until_a_child_reports() -> None:
    ledger = Ledger(estimate=100 * MIB, finished=PRIOR_TASKS)
    assert ledger.expected_baseline == 100 * MIB
    for pid, private in ((1, 20), (2, 30), (3, 25)):
        ledger.child_up(pid)
        ledger.after_task(record(pid, private=private * MIB))
    assert ledger.expected_baseline == 30 * MIB  # the largest of the last children


def test_the_pool_grows_on_a_lower_measure_only_after_the_first_tasks() -> None:
    """The first tasks may read less of the app's data than later ones: what their
    children copied bounds the growth of the pool only once PRIOR_TASKS tasks have
    finished, when it is below the startup estimate; a higher measure counts at once."""
    ledger = Ledger(estimate=100 * MIB)
    ledger.child_up(1)
    ledger.after_task(record(1, private=20 * MIB))
    assert ledger.expected_baseline == 20 * MIB
    for _ in range(PRIOR_TASKS - 1):
        ledger.task_finished(1)
        assert ledger.growth_baseline == 100 * MIB
    ledger.task_finished(1)
    assert ledger.growth_baseline == 20 * MIB
    ledger.child_up(2)
    ledger.after_task(record(2, private=150 * MIB))
    assert ledger.growth_baseline == ledger.expected_baseline == 150 * MIB


def test_in_the_first_round_the_staying_children_are_expected_to_copy_the_estimate() -> None:
    """A child measured after a task that read little of the app's data, and a young one
    beside it, will copy what the estimate says, as a child added to the pool would: the
    projection counts the rest of it until PRIOR_TASKS tasks have finished."""
    ledger = Ledger(estimate=100 * MIB)
    ledger.child_up(1)
    ledger.child_up(2)
    ledger.after_task(record(1, private=20 * MIB))
    assert ledger.first_round
    assert ledger.baseline_gap == (100 - 20 + 100) * MIB
    for _ in range(PRIOR_TASKS):
        ledger.task_finished(1)
    assert not ledger.first_round
    assert ledger.baseline_gap == 20 * MIB  # the young one: what was measured


def test_a_bound_does_not_lower_a_measured_peak() -> None:
    """A run that did not raise its child's lifetime peak only bounds its own peak: it
    counts for a task never measured, never against a measured one."""
    table = TaskTable()
    ledger = Ledger(estimate=0, tasks=table)
    ledger.after_task(record(name="new", peak=8 * MIB, exact=False))
    assert table.peak("new") == 8 * MIB  # the bound is all there is: taken
    ledger.after_task(record(name="hog", peak=60 * MIB))
    ledger.after_task(record(name="hog", peak=2 * MIB, exact=False))
    assert table.peak("hog") == 60 * MIB
    assert table.by_name["hog"].runs == 1


def test_the_task_table_is_bounded_and_the_rest_goes_to_other() -> None:
    table = TaskTable()
    for i in range(MAX_TASK_NAMES + 50):
        table.observe(f"t{i}", i, 0)
    assert len(table.by_name) == MAX_TASK_NAMES + 1
    assert table.by_name[OTHER].runs == 50
    assert table.peak(f"t{MAX_TASK_NAMES + 10}") is None  # measured under "other"


def test_worst_figures_and_declared_limits() -> None:
    table = TaskTable(limits={"big": 500 * MIB})
    table.observe("leak", 24 * MIB, 24 * MIB)
    table.observe("leak", 24 * MIB, 24 * MIB)
    table.observe("hog", 60 * MIB, 0)
    assert table.worst_peak == 60 * MIB  # a declared limit bounds only its own task
    assert table.worst_retained == 24 * MIB
    assert table.known("big") and table.peak("big") == 500 * MIB
    assert not table.known("other-task")


def test_a_task_is_reserved_from_hand_over_to_its_end() -> None:
    ledger = Ledger(estimate=0)
    ledger.child_up(1, rss=100)
    ledger.child_up(2, rss=100)
    assert ledger.free() == 2
    ledger.task_handed("a", "hog", 60 * MIB, now=0.0)
    assert ledger.free() == 1 and ledger.learning("hog")
    ledger.task_accepted(2, "a", "hog")
    child = ledger.children[2]
    assert (child.task, child.task_id, child.task_peak, child.task_rss) == (
        "hog",
        "a",
        60 * MIB,
        100,
    )
    assert not ledger.starting and ledger.free() == 1 and ledger.learning("hog")
    ledger.task_finished(2)
    assert child.task is None and child.tasks == 1 and ledger.free() == 2
    assert not ledger.learning("hog")


def test_children_on_their_way_out_take_no_task() -> None:
    ledger = Ledger(estimate=0)
    ledger.child_up(1)
    ledger.child_up(2)
    ledger.leave(1)
    assert ledger.free() == 1 and [c.pid for c in ledger.live()] == [2]


@pytest.mark.parametrize(
    ("age", "kept"), [(0.0, 1), (ACCEPT_WITHIN - 0.1, 1), (ACCEPT_WITHIN, 0), (60.0, 0)]
)
def test_a_task_no_child_accepted_is_forgotten(age: float, kept: int) -> None:
    """Handed over only to a free child, a task not accepted within ACCEPT_WITHIN was
    revoked or lost: its reservation must not hold the pool for good."""
    ledger = Ledger(estimate=0)
    ledger.task_handed("a", "t", MIB, now=100.0)
    ledger.forget_stale(100.0 + age)
    assert len(ledger.starting) == kept


def test_records_of_children_it_does_not_know_still_teach_the_task_table() -> None:
    ledger = Ledger(estimate=0)
    ledger.after_task(record(99, name="t", peak=5 * MIB, private=10 * MIB))
    assert ledger.tasks.peak("t") == 5 * MIB and 99 not in ledger.children


@settings(max_examples=200, deadline=None, database=None)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 4),  # pid
            st.sampled_from(["a", "b", "c"]),
            st.integers(0, 512 * MIB),  # peak
            st.integers(-64 * MIB, 64 * MIB),  # retained
            st.integers(0, 1 << 32),  # rss
            st.one_of(st.none(), st.integers(0, 1 << 31)),  # private
            st.booleans(),
        ),
        max_size=40,
    )
)
def test_any_stream_of_records_keeps_the_figures_sane(
    stream: list[tuple[int, str, int, int, int, int | None, bool]],
) -> None:
    ledger = Ledger(estimate=50 * MIB)
    for pid in range(1, 5):
        ledger.child_up(pid)
    for pid, name, peak, retained, rss, private, exact in stream:
        ledger.after_task(Record(pid, name, peak, exact, retained, rss, private))
    for child in ledger.children.values():
        assert child.private >= 0
        assert child.baseline is None or child.private >= child.baseline >= 0
    assert ledger.expected_baseline >= 0
    assert ledger.tasks.worst_peak >= 0 and ledger.tasks.worst_retained >= 0
    exact = [p for _, n, p, _, _, _, e in stream if n == "a" and e]
    every = [p for _, n, p, _, _, _, _ in stream if n == "a"]
    if every:  # a bound counts only until a run is measured: between the two
        assert max(exact, default=0) <= (ledger.tasks.peak("a") or 0) <= max(every)


def test_private_memory_that_grew_more_than_the_rss_raises_the_childs_baseline() -> None:
    """Pages shared with the main process that a later kind of task wrote to (copy on
    write): the child's private memory grows, its RSS does not. The child's baseline,
    and what the next child is expected to copy, grow by that much; growth the RSS also
    shows (a task's own allocation) does not count."""
    ledger = Ledger(estimate=100 * MIB, finished=PRIOR_TASKS)
    ledger.child_up(7)
    ledger.after_task(record(7, name="ping", rss=200 * MIB, private=10 * MIB))
    assert ledger.expected_baseline == 10 * MIB
    ledger.after_task(record(7, name="report", rss=204 * MIB, private=94 * MIB))  # +84, RSS +4
    assert ledger.children[7].baseline == 90 * MIB
    assert ledger.children[7].private == 94 * MIB
    assert ledger.expected_baseline == 90 * MIB
    ledger.after_task(record(7, name="grow", retained=30 * MIB, rss=234 * MIB, private=124 * MIB))
    assert ledger.children[7].baseline == 90 * MIB  # its own allocation: not copied
    assert ledger.children[7].private == 124 * MIB


def test_a_vanilla_replacement_waits_for_billiards_maintenance_as_often_as_it_was_missed() -> None:
    """A child that starts in 0.4 s of CPU, replaced in 1.0 s: 0.6 s off the CPU. One
    replacement in four was missed by billiard here: without the guard it waits half of
    BILLIARD_MAINTENANCE more, a quarter of the time."""
    pace = Pace()
    pace.first_cpu.add(0.5)
    pace.first_tasks.add(1)
    pace.task_cpu.add(0.1)
    pace.replace_wall.add(1.0)
    assert pace.vanilla_replace_idle() == pytest.approx(0.6)  # none counted yet
    pace.replacements, pace.late_joins = 4, 1
    assert pace.replace_idle() == pytest.approx(0.6)
    assert pace.vanilla_replace_idle() == pytest.approx(0.6 + BILLIARD_MAINTENANCE / 2 / 4)


# -- the sums a hand-over weighs, kept as the events come ----------------------------------
PIDS = st.integers(1, 5)
NAMES = st.sampled_from(["a", "b", "c"])
EVENTS = st.one_of(
    st.tuples(st.just("up"), PIDS, st.integers(0, 300)),
    st.tuples(st.just("down"), PIDS),
    st.tuples(st.just("leave"), PIDS),
    st.tuples(st.just("handed"), st.integers(0, 9), NAMES, st.integers(0, 90)),
    st.tuples(st.just("accepted"), PIDS, st.integers(0, 9), NAMES),
    st.tuples(st.just("finished"), PIDS),
    st.tuples(st.just("stale"), st.integers(0, 20)),
    st.tuples(
        st.just("record"),
        PIDS,
        NAMES,
        st.integers(-50, 50),
        st.integers(0, 400),
        st.one_of(st.none(), st.integers(0, 300)),
    ),
)


def apply(ledger: Ledger, event: tuple, clock: list[float]) -> None:
    kind, *args = event
    clock[0] += 1.0
    if kind == "up":
        ledger.child_up(args[0], args[1] * MIB)
    elif kind == "down":
        ledger.child_down(args[0])
    elif kind == "leave":
        ledger.leave(args[0])
    elif kind == "handed":
        ledger.task_handed(f"id-{args[0]}", args[1], args[2] * MIB, clock[0])
    elif kind == "accepted":
        ledger.task_accepted(args[0], f"id-{args[1]}", args[2])
    elif kind == "finished":
        ledger.task_finished(args[0])
    elif kind == "stale":
        ledger.forget_stale(clock[0] + args[0])
    else:
        pid, name, retained, rss, private = args
        ledger.after_task(record(pid, name, 10 * MIB, retained * MIB, rss * MIB,
                           None if private is None else private * MIB))  # fmt: skip


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(EVENTS, max_size=40))
def test_the_sums_a_hand_over_weighs_are_what_walking_the_children_gives_after_any_events(
    events: list[tuple],
) -> None:
    """The ledger keeps them as the events come so that no decision walks the children;
    after any sequence of events each must equal its definition, walked here."""
    ledger, clock = Ledger(estimate=25 * MIB), [0.0]
    for event in events:
        apply(ledger, event, clock)
        children = list(ledger.children.values())
        staying = [c for c in children if not c.leaving]
        expected = max(ledger.baselines, default=ledger.estimate)
        assert ledger.expected_baseline == expected
        assert ledger.busy == sum(c.task is not None for c in children)
        assert ledger.free() == sum(c.task is None for c in staying) - len(ledger.starting)
        assert ledger.running_peaks == sum(c.task_peak for c in staying if c.task is not None)
        assert ledger.starting_peaks == sum(h.peak for h in ledger.starting.values())
        assert ledger.leaving_bytes == sum(c.private for c in children if c.leaving)
        # in the first round every child is expected to copy at least the estimate
        copies = max(expected, ledger.estimate) if ledger.finished < PRIOR_TASKS else expected
        assert ledger.baseline_gap == sum(
            copies if c.baseline is None else max(copies - c.baseline, 0) for c in staying
        )
        for name in ("a", "b", "c"):
            in_flight = [h.name for h in ledger.starting.values()] + [c.task for c in children]
            assert ledger.learning(name) == (name in in_flight)
        assert ledger.tasks.worst_peak == max(
            (m.peak for m in ledger.tasks.by_name.values()), default=0
        )


def test_tasks_untracked_and_taken_in_again_leave_the_sums_as_they_were() -> None:
    """``untrack`` forgets the tasks in flight (the sums as if every staying child were
    idle); entering the same tasks again through the events gives back the same sums."""
    ledger = Ledger(estimate=30 * MIB)
    for pid in (1, 2, 3):
        ledger.child_up(pid, rss=100 * MIB)
    ledger.tasks.observe("hog", 60 * MIB, 0)

    def enter() -> None:
        ledger.task_handed("a", "hog", 60 * MIB, now=0.0)
        ledger.task_accepted(1, "a", "hog")
        ledger.task_accepted(2, "b", "add")
        ledger.task_handed("c", "hog", 60 * MIB, now=0.0)

    def sums() -> tuple[object, ...]:
        flying = {name: n for name, n in ledger.in_flight.items() if n}
        return (ledger.busy, ledger.idle, ledger.running_peaks, ledger.starting_peaks,
                flying, ledger.free(), [c.task for c in ledger.children.values()])  # fmt: skip

    enter()
    tracked = sums()
    ledger.untrack()
    assert sums() == (0, 3, 0, 0, {}, 3, [None, None, None])
    enter()
    assert sums() == tracked


def test_a_childs_start_and_a_tasks_wall_time_come_from_the_timed_tasks_once_there_are() -> None:
    """First record: 0.5 s of CPU over 2 tasks that ran 0.3 s; tasks timed since: 0.1 s of
    CPU and 0.25 s of wall time each. The start is 0.5 - 2 * 0.1 = 0.3 s of CPU."""
    pace = Pace()
    pace.first_cpu.add(0.5)
    pace.first_busy.add(0.3)
    pace.first_tasks.add(2)
    assert pace.start_and_task() == pytest.approx((0.2, 0.15))  # 0.5 - 0.3, and 0.3 / 2
    pace.task_cpu.add(0.1)  # the start is known, a task's wall time not yet
    assert pace.start_and_task() == pytest.approx((0.2, 0.15))
    pace.task_wall.add(0.25)
    assert pace.start_and_task() == pytest.approx((0.3, 0.25))


def test_a_replacement_leaves_out_the_wait_for_a_cpu_beyond_its_first_tasks() -> None:
    """Replaced in 1.0 s; the new child's start takes 0.4 s of CPU (0.5 less one task of
    0.1), and by its first record it waited 0.3 s for a CPU, 0.1 of it in that task: the
    start waited 0.2 s, so 0.4 s of the replacement was neither on a CPU nor waiting."""
    pace = Pace()
    pace.first_cpu.add(0.5)
    pace.first_tasks.add(1)
    pace.task_cpu.add(0.1)
    pace.replace_wall.add(1.0)
    pace.first_wait.add(0.3)
    assert pace.replace_idle() == pytest.approx(0.3)  # no task's wait known: all 0.3 s
    pace.task_wait.add(0.1)
    assert pace.replace_idle() == pytest.approx(0.4)
    pace.first_wait.add(5.0)  # a start that waited longer than the replacement took
    assert pace.replace_idle() == pytest.approx(0.0)


def test_one_replacement_that_billiard_missed_waits_half_its_maintenance_interval() -> None:
    pace = Pace()
    pace.first_cpu.add(0.5)
    pace.first_tasks.add(1)
    pace.task_cpu.add(0.1)
    pace.replace_wall.add(1.0)
    pace.replacements, pace.late_joins = 1, 1
    assert pace.vanilla_replace_idle() == pytest.approx(0.6 + BILLIARD_MAINTENANCE / 2)


def test_a_childs_records_give_its_start_then_what_each_task_between_two_records_used() -> None:
    """The first record (2 tasks): 0.5 s of CPU, 0.3 s waiting for one, 0.4 s in tasks.
    The next (5 tasks, 3 more): 0.3 s more CPU, 0.06 s more waiting, 0.6 s more in tasks
    and 12 MiB more RSS; per task 0.1, 0.02, 0.2 s and 4 MiB."""
    from celery_guard.ledger import ChildState

    pace, child = Pace(), ChildState(1)
    mib = 1 << 20

    def record(cpu: int, wait: int, busy: int, rss_mib: int, tasks: int) -> Record:
        return Record(1, "t", 0, False, 0, rss_mib * mib, None, cpu, wait, busy, tasks)

    pace.from_record(child, record(500_000, 300_000, 400_000, 200, 2))
    assert (pace.first_cpu.value, pace.first_tasks.value) == (0.5, 2)
    assert (pace.first_wait.value, pace.first_busy.value) == (0.3, 0.4)
    pace.from_record(child, record(800_000, 360_000, 1_000_000, 212, 5))
    assert pace.task_cpu.value == pytest.approx(0.1)
    assert pace.task_wait.value == pytest.approx(0.02)
    assert pace.task_wall.value == pytest.approx(0.2)
    assert pace.retained.value == pytest.approx(4 * mib)
    assert pace.task_cpu.samples == 1


def test_a_record_with_no_task_or_time_gone_backwards_adds_nothing_to_the_pace() -> None:
    from celery_guard.ledger import ChildState

    pace, child = Pace(), ChildState(1)
    pace.from_record(child, Record(1, "t", 0, False, 0, 0, None, 500_000, 0, 0, 0))
    assert pace.first_cpu.samples == 0  # no task finished yet: not a first record
    pace.from_record(child, Record(1, "t", 0, False, 0, 0, None, 500_000, 0, 0, 1))
    pace.from_record(child, Record(1, "t", 0, False, 0, 0, None, 400_000, 0, 0, 2))
    pace.from_record(child, Record(1, "t", 0, False, 0, 0, None, 600_000, 0, 0, 2))
    assert pace.task_cpu.samples == 0  # less CPU than before, then no more tasks
    # time inside tasks and waiting unchanged: tasks that took no time, not unknown
    pace.from_record(child, Record(1, "t", 0, False, 0, 0, None, 700_000, 0, 0, 3))
    assert (pace.task_cpu.value, pace.task_wall.value, pace.task_wait.value) == (
        pytest.approx(0.1), 0.0, 0.0,
    )  # fmt: skip


def test_a_tasks_pace_counts_a_first_record_of_one_task_and_tasks_that_took_nothing() -> None:
    """A first record after one task; then a task that used no CPU, kept nothing (the RSS
    fell) and whose time is unknown (-1 on the pipe: None) adds zeros, not nothing."""
    from celery_guard.ledger import ChildState

    pace, child = Pace(), ChildState(1)
    pace.from_record(child, Record(1, "t", 0, False, 0, 300, None, 500_000, 40, 30, 1))
    assert (pace.first_cpu.value, pace.first_tasks.value) == (0.5, 1)
    pace.from_record(child, Record(1, "t", 0, False, 0, 200, None, 500_000, None, None, 2))
    assert (pace.task_cpu.value, pace.retained.value) == (0.0, 0.0)
    assert (pace.task_wall.samples, pace.task_wait.samples) == (0, 0)  # unknown: not counted
    pace.from_record(child, Record(1, "t", 0, False, 0, 200, None, 800_000, None, None, 5))
    assert pace.task_cpu.total == pytest.approx(0.3, rel=1e-12)  # 0.3 s over the 3 tasks
