"""Tests for celery_guard.policy: the run-time decisions, one scenario per rule.

Figures in MiB: a 1000 MiB limit, marks at 80/90/97%, a main process of 200 MiB.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from celery_guard.ledger import PRIOR_TASKS, Ledger, Record
from celery_guard.policy import (
    Marks,
    Safety,
    View,
    admit,
    child_cost,
    fits,
    plan,
    recycle,
    roomy,
    share,
    target_size,
    to_come,
    waiting_for_the_plan_is_cheaper,
    worth_a_fork,
)

MIB = 1024 * 1024
MARKS = Marks.of(1000 * MIB, 0.8, 0.9, 0.97)  # high 900, hard 970 MiB


def view(ws: int, size: int = 4, requested: int = 16, base: int = 200, per_child: int = 4,
         rss: dict[int, int] | None = None) -> View:  # fmt: skip
    """A View with figures in MiB; ``rss`` is what a read of each child's RSS says."""
    now = {pid: mib * MIB for pid, mib in (rss or {}).items()}
    return View(ws * MIB, MARKS, size, requested, base * MIB, per_child, now.get)


def ledger(*children: tuple[int, int | None, str | None], estimate: int = 30,
           peaks: dict[str, int] | None = None) -> Ledger:  # fmt: skip
    """Children as (pid, baseline MiB or None for young, running task or None), all at
    RSS 200 MiB; task peaks in MiB. Past its first tasks: a measure below the estimate
    counts (ledger.PRIOR_TASKS)."""
    book = Ledger(estimate * MIB, finished=PRIOR_TASKS)
    for name, peak in (peaks or {}).items():
        book.tasks.observe(name, peak * MIB, 0)
    for pid, baseline, task in children:
        book.child_up(pid, rss=200 * MIB)
        if baseline is not None:
            book.after_task(Record(pid, "boot", 0, False, 0, 200 * MIB, baseline * MIB))
        if task is not None:
            book.task_accepted(pid, f"id-{pid}", task)
    return book


# -- the projection -----------------------------------------------------------------------
def test_what_is_still_to_come_counts_young_children_and_running_tasks() -> None:
    book = ledger((1, None, None), (2, 20, "hog"), (3, 20, None), peaks={"hog": 60})
    book.task_handed("x", "hog", 60 * MIB, now=0.0)
    # a young child copies the expected baseline (the largest measured: 20), the running
    # task and the one handed over each reach 60
    assert to_come(book) == (20 + 60 + 60) * MIB
    # read: the running task (child 2, from 200 MiB) has grown 45 already
    assert to_come(book, {2: 245 * MIB}.get) == (20 + 15 + 60) * MIB
    # a child gone when read will add nothing more
    assert to_come(book, {}.get) == (20 + 0 + 60) * MIB


def test_a_task_finished_since_the_cgroup_was_read_still_counts_until_it_is_read_again() -> None:
    """What a finished task kept is in the cgroup, not in a reading older than its end:
    its reservation stays in the projection until the next reading."""
    book = ledger((1, 20, "leak"), (2, 20, None), peaks={"leak": 24})
    assert to_come(book) == 24 * MIB
    book.task_finished(1)
    assert to_come(book) == 24 * MIB
    book.task_accepted(1, "id-next", "leak")
    assert to_come(book) == 2 * 24 * MIB  # the next run, and what the last one kept
    book.unread = 0  # the governor read the cgroup
    assert to_come(book) == 24 * MIB


def test_a_child_that_copied_less_than_the_others_counts_the_rest_to_come() -> None:
    """Children measured after tasks that read little of the app's data will copy what
    the hungriest recent child copied once they run its kind of task."""
    book = ledger((1, 80, None), (2, 20, None), (3, 80, None))
    assert book.expected_baseline == 80 * MIB
    assert to_come(book) == (80 - 20) * MIB


def test_children_on_their_way_out_count_once_they_are_gone_but_not_past_the_hard_mark() -> None:
    book = ledger((1, 20, None), (2, 20, None), peaks={"t": 50})
    book.after_task(Record(2, "t", 0, False, 100 * MIB, 300 * MIB, None))  # child 2 holds 120
    book.leave(2)
    assert book.leaving_bytes == 120 * MIB
    # 880 + 50 = 930: over the high mark now, 810 once child 2 is gone; under the hard
    assert fits(view(880), book, 50 * MIB) == (True, 810 * MIB)
    # 930 + 50 = 980 would pass the hard mark before child 2 is gone
    assert fits(view(930), book, 50 * MIB)[0] is False


# -- admit ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "ws", "children", "handed", "over", "expected"),
    [
        # nothing in flight: always, even far past the marks, so the worker moves on
        ("idle", 990, [(1, 20, None)], [], True, (True, "idle")),
        # a task never measured, one run of it in flight: wait for its measurement
        ("learning", 300, [(1, 20, "new"), (2, 20, None)], [], False, (False, "learning")),
        # every idle child already has a task promised
        ("no-child", 300, [(1, 20, "hog"), (2, 20, None)], ["hog"], False, (False, "no_child")),
        # past the high mark (the safety net says so): hold
        ("over", 300, [(1, 20, "hog"), (2, 20, None)], [], True, (False, "over")),
        # 500 + 60 running + 60 new = 620 <= 900
        ("fits", 500, [(1, 20, "hog"), (2, 20, None)], [], False, (True, "fits")),
        # 800 + 60 + 60 = 920 > 900, and the running task has not grown: no room
        ("no-room", 800, [(1, 20, "hog"), (2, 20, None)], [], False, (False, "no_room")),
    ],
)
def test_admit(name: str, ws: int, children: list, handed: list[str], over: bool,
               expected: tuple[bool, str]) -> None:  # fmt: skip
    book = ledger(*children, peaks={"hog": 60})
    for i, task in enumerate(handed):
        book.task_handed(f"h{i}", task, 60 * MIB, now=0.0)
    task = "new" if name == "learning" else "hog"
    verdict = admit(view(ws, rss={1: 200}), book, task, over=over)
    assert (verdict.admit, verdict.reason) == expected


@pytest.mark.parametrize(("finished", "expected"), [(0, "no_room"), (PRIOR_TASKS, "fits")])
def test_in_the_first_round_a_child_that_copied_less_than_the_estimate_counts_the_rest(
    finished: int, expected: str
) -> None:
    """Estimate 100 MiB; child 1 copied 20 in a first task that read little, child 2 is
    young. In the first round both are expected to copy the estimate: 650 + 80 + 100 +
    60 running + 60 new = 950 > 900. Past it, what was measured: 650 + 0 + 20 + 60 + 60
    = 790."""
    book = Ledger(100 * MIB, finished=finished)
    book.tasks.observe("hog", 60 * MIB, 0)
    for pid in (1, 2):
        book.child_up(pid, rss=200 * MIB)
    book.after_task(Record(1, "boot", 0, False, 0, 200 * MIB, 20 * MIB))
    book.task_accepted(1, "id-1", "hog")
    assert admit(view(650), book, "hog").reason == expected


def test_nothing_in_flight_is_not_idle_while_a_child_on_its_way_out_holds_memory() -> None:
    """Child 1 was recycled holding 300 MiB and has not exited: its memory is still in
    the working set. 930 + 60 = 990 would pass the hard mark (970) before it is freed:
    the task waits for the exit instead of starting because nothing is in flight."""
    book = ledger((1, 20, None), (2, 20, None), peaks={"hog": 60})
    book.after_task(Record(1, "hog", 0, False, 280 * MIB, 480 * MIB, None))  # holds 300
    book.leave(1)
    verdict = admit(view(930), book, "hog")
    assert (verdict.admit, verdict.reason) == (False, "no_room")
    book.child_down(1)  # gone: nothing in flight, nothing held by a leaving child
    assert admit(view(630), book, "hog").reason == "idle"


def test_admit_reads_the_running_children_before_it_says_no() -> None:
    """800 + 60 + 60 = 920 assumed; read now, the running task has grown its 60 already
    (it is in the working set): 800 + 0 + 60 = 860 fits. The second look reads the
    working set again too: ``fresh``."""
    book = ledger((1, 20, "hog"), (2, 20, None), peaks={"hog": 60})
    stale = view(800, rss={1: 260})
    assert admit(stale, book, "hog").reason == "no_room"  # no fresh view: no second look
    verdict = admit(stale, book, "hog", fresh=stale)
    assert (verdict.admit, verdict.projected) == (True, 860 * MIB)


def test_a_task_never_measured_counts_at_the_worst_seen() -> None:
    book = ledger((1, 20, None), (2, 20, "small"), peaks={"small": 1, "hog": 60})
    verdict = admit(view(500), book, "unknown")
    assert verdict.admit and verdict.peak == 60 * MIB


# -- recycle -------------------------------------------------------------------------------
def test_share_divides_the_room_left_by_the_main_process_among_the_children() -> None:
    assert share(view(0, size=4, base=200)) == 175 * MIB  # (900 - 200) / 4


@pytest.mark.parametrize(
    ("name", "retained", "task", "young", "recycled"),
    [
        # 20 + 120 retained + 60 next peak = 200 > 175: over its share, worth a fork
        ("over-share", 120, None, False, True),
        # 20 + 90 + 60 = 170 <= 175: keeps going
        ("within-share", 90, None, False, False),
        # 20 + 3 + 160 > 175 with a large peak, but 3 MiB is not worth a fork
        ("nothing-to-gain", 3, None, False, False),
        # 20 + 16 + 160 > 175, and 16 MiB would be worth a fork, but it is less than an
        # eighth of the share (21.9 MiB): not worth a fork
        ("under-an-eighth", 16, None, False, False),
        # busy or young children are never recycled here
        ("busy", 120, "leak", False, False),
        ("young", 120, None, True, False),
    ],
)
def test_recycle(name: str, retained: int, task: str | None, young: bool, recycled: bool) -> None:
    peaks = {"leak": 160} if name in ("nothing-to-gain", "under-an-eighth") else {"leak": 60}
    book = ledger((1, None if young else 20, task), peaks=peaks)
    child = book.children[1]
    child.rss = (200 + retained) * MIB
    assert recycle(view(500), book, child) is recycled
    # what the governor asks first, without a view: never "no" to a child it recycles
    assert worth_a_fork(book, child) is (name in ("over-share", "within-share", "under-an-eighth"))


# -- the pool's size -----------------------------------------------------------------------
def test_a_child_costs_its_baseline_a_peak_and_room_for_its_next_leaky_runs() -> None:
    book = ledger((1, 20, None), peaks={"hog": 60})
    book.tasks.observe("leak", 24 * MIB, 24 * MIB)
    # 20 + 60 (worst peak) + 3 * 24 (runs 2 to 4 of the leakiest task keep 24 each)
    assert child_cost(view(0, per_child=4), book) == 152 * MIB
    assert child_cost(view(0, per_child=1), book) == 80 * MIB
    assert target_size(view(0, per_child=4), book) == 4  # 700 // 152
    assert target_size(view(0, per_child=1, requested=16), book) == 8  # 700 // 80
    assert target_size(view(0, per_child=1, requested=5), book) == 5  # never above
    assert target_size(view(0, base=1000), book) == 1  # never below one


# -- the safety net ------------------------------------------------------------------------
def test_near_the_hard_mark_it_stops_the_largest_running_tasks_first() -> None:
    """Past the high mark and rising fast: kill busy children, the one that grew most
    first, until the projection is back under the high mark; idle ones are spared while
    that is enough."""
    book = ledger((1, 20, "hog"), (2, 20, "hog"), (3, 20, "hog"), (4, 20, None),
                  peaks={"hog": 60})  # fmt: skip
    safety = Safety()
    safety.decide(view(850), book, now=0.0)  # rising from 850 ...
    actions = safety.decide(view(930, rss={1: 300, 2: 210, 3: 280}), book, now=0.1)
    # ... to 930 in 0.1 s: 1330 in LOOKAHEAD; killing 1 (100) then 3 (80) is not enough
    assert [(a.action, a.pid, a.level) for a in actions][:2] == [
        ("kill", 1, "hard"),
        ("kill", 3, "hard"),
    ]
    assert safety.over


def test_growth_it_admitted_is_not_stopped_however_fast_it_rises() -> None:
    """Past the high mark and rising fast, but every running task is within the peak it
    was admitted with, and with what they may still add the hard mark is not reached:
    nothing is stopped (the tasks were admitted to fit). Children on their way out hold
    memory that will be freed: the working set less theirs is what holds new tasks."""
    book = ledger((1, 20, "hog"), (2, 20, "hog"), (3, 20, None), peaks={"hog": 60})
    book.leave(3)
    book.after_task(Record(3, "t", 0, False, 100 * MIB, 300 * MIB, None))  # holds 120 MiB
    safety = Safety()
    safety.decide(view(700), book, now=0.0)
    actions = safety.decide(view(910, rss={1: 250, 2: 240}), book, now=0.05)  # 4 GiB/s
    assert actions == []
    assert not safety.over  # 910 - 120 leaving < 900: tasks still go


def test_a_burst_of_tasks_a_little_past_their_mean_peak_is_not_stopped() -> None:
    """Tasks admitted at their expected peak (a mean, 60 MiB) reach 61 MiB; the cgroup
    rises from 700 to 975 MiB in 0.1 s, past the hard mark (970) only with the 120 MiB a
    retiring child still holds. Nothing is stopped: the rise was admitted, what passes
    the expected peaks does not grow, and the retiring child's memory is on its way out
    (a CI run stopped seven such tasks: the cgroup's rate read as unforeseen growth)."""
    book = ledger((1, 20, "hog"), (2, 20, "hog"), (3, 20, "hog"), (4, 20, None),
                  peaks={"hog": 60})  # fmt: skip
    book.leave(4)
    book.after_task(Record(4, "t", 0, False, 100 * MIB, 300 * MIB, None))  # holds 120 MiB
    at_peak = {1: 260, 2: 260, 3: 260}
    past_it = {1: 261, 2: 261, 3: 261}  # each task 1 MiB past its expected peak
    safety = Safety()
    assert safety.decide(view(700), book, now=0.0) == []
    assert safety.decide(view(930, rss=at_peak), book, now=0.05) == []
    # read a microsecond later: 1 MiB is not a rate of 1 MiB per microsecond
    assert safety.decide(view(975, rss=past_it), book, now=0.050001) == []
    assert safety.decide(view(975, rss=past_it), book, now=0.1) == []


def test_stopping_a_runaway_task_takes_its_whole_projection_with_it() -> None:
    """Task 1 is first seen 140 MiB past its 60 MiB peak a microsecond after a check
    (read over the FAST interval: 140 MiB in 0.05 s projects 1400 more in LOOKAHEAD);
    task 2 is within its peak. Stopping task 1 removes what it holds, adds and would
    grow: task 2 runs on."""
    book = ledger((1, 20, "hog"), (2, 20, "hog"), (3, 20, None), peaks={"hog": 60})
    safety = Safety()
    assert safety.decide(view(850, rss={1: 200, 2: 230}), book, now=0.0) == []
    actions = safety.decide(view(930, rss={1: 400, 2: 230}), book, now=0.000001)
    assert [(a.action, a.pid) for a in actions] == [("kill", 1)]


def test_it_always_leaves_one_child() -> None:
    book = ledger((1, 20, "hog"), peaks={"hog": 60})
    safety = Safety()
    safety.decide(view(500), book, now=0.0)
    assert safety.decide(view(990, rss={1: 900}), book, now=0.1) == []


def test_past_the_high_mark_it_sheds_idle_children_that_hold_retained_memory() -> None:
    book = ledger((1, 20, None), (2, 20, None), (3, 20, None), peaks={"leak": 24})
    for pid, kept in ((1, 100), (2, 10), (3, 60)):
        book.children[pid].rss = (200 + kept) * MIB
    safety = Safety()
    actions = safety.decide(view(950 - 20), book, now=0.0)  # 30 over the high mark
    assert [(a.action, a.pid) for a in actions] == [("shed", 1)]  # the largest frees 100
    assert safety.decide(view(930), book, now=0.1) == []  # cooling down: let it exit


def test_below_the_marks_it_grows_as_many_as_fit_towards_the_target() -> None:
    book = ledger(*[(pid, 20, None) for pid in range(1, 8)], peaks={"t": 30})
    safety = Safety()
    # target: 700 // (20 + 30) = 14; seven ready children may bring seven more, but each
    # adds 50 and from 700 only (900 - 700) // 50 = 4 fit under the high mark
    actions = safety.decide(view(700, size=7), book, now=0.0)
    assert [(a.action, a.count) for a in actions] == [("grow", 4)]
    # from 300, twelve would fit: the seven to the target
    assert [(a.action, a.count) for a in safety.decide(view(300, size=7), book, now=1.0)] == [
        ("grow", 7)
    ]
    assert safety.decide(view(300, size=14), book, now=2.0) == []  # at the target


def test_it_grows_in_waves_no_more_than_the_children_ready_less_those_starting() -> None:
    """A pool started with its first wave (two children) doubles once they are ready:
    a child dear to start is paid by a few before the plan has weighed it."""
    book = ledger((1, 20, None), (2, 20, None), peaks={"t": 30})
    safety = Safety()
    assert [(a.action, a.count) for a in safety.decide(view(300, size=2), book, 0.0)] == [
        ("grow", 2)
    ]
    book.child_up(3)
    book.child_up(4)
    assert safety.decide(view(300, size=4), book, now=0.1) == []  # both still starting
    book.child_ready(3)
    assert [(a.action, a.count) for a in safety.decide(view(300, size=4), book, 0.2)] == [
        ("grow", 2)  # three ready, one still starting
    ]
    book.child_up(5)
    book.child_up(6)
    book.after_task(Record(4, "t", 0, False, 0, 200 * MIB, 20 * MIB))  # a record: it is ready
    for pid in (5, 6):
        book.child_ready(pid)
    assert [(a.action, a.count) for a in safety.decide(view(300, size=6), book, 0.3)] == [
        ("grow", 6)  # six ready: the pool may double
    ]


def test_in_the_first_round_it_grows_only_on_children_that_finished_a_task() -> None:
    """Before PRIOR_TASKS tasks a wave is the measured children: the startup estimate
    (150 MiB) foresees no task's peak, and the young child beside the measured one has
    not shown what its tasks copy, so the pool does not double on them yet."""
    book = Ledger(150 * MIB)
    book.tasks.observe("t", 25 * MIB, 0)
    for pid in (1, 2):
        book.child_up(pid, rss=200 * MIB)
        book.child_ready(pid)
    book.after_task(Record(1, "t", 0, False, 0, 200 * MIB, 10 * MIB))
    safety = Safety()
    assert book.first_round
    # room for two more: 200 held + 2 x 140 the two will still copy + 2 x 175 = 830 < 900
    assert safety.decide(view(200, size=2), book, now=0.0) == []  # one measured, one not
    book.after_task(Record(2, "t", 0, False, 0, 200 * MIB, 10 * MIB))
    assert [(a.action, a.count) for a in safety.decide(view(200, size=2), book, 0.1)] == [
        ("grow", 2)
    ]


def timed(start_cpu: float, tasks: int, task_s: float) -> Ledger:
    """A ledger whose first child spent ``start_cpu`` CPU seconds before its first task,
    with ``tasks`` tasks timed at ``task_s`` seconds each, on a CPU all along."""
    book = Ledger(30 * MIB)
    book.pace.first_cpu.add(start_cpu + task_s)
    book.pace.first_busy.add(task_s)
    book.pace.first_tasks.add(1)
    for _ in range(tasks):
        book.pace.task_cpu.add(task_s)
        book.pace.task_wall.add(task_s)
    return book


@pytest.mark.parametrize(
    ("start_cpu", "tasks", "task_s", "children", "waits"),
    [
        # a model loaded at start (0.9 s) against 6 tasks of 45 ms on 2 children: 0.135 s
        (0.9, 2, 0.045, 2, True),
        (0.9, 2, 0.045, 40, True),  # many children only shorten the wait
        (0.02, 2, 0.5, 2, False),  # slow tasks: 1.5 s to wait, a cheap child forks now
        (0.1, 2, 0.05, 2, False),  # 0.1 s of start against 0.15 s of wait: it forks
        (0.2, 2, 0.05, 2, True),  # 0.2 s against the same wait: it waits
        (0.1, 6, 0.05, 2, True),  # two tasks to go, 0.05 s: it waits
        (0.1, 8, 0.05, 2, False),  # the plan is due: it decides, not this
        # the first records alone: their CPU less their task's wall time, that wall time
        (0.9, 0, 0.045, 2, True),
        (0.02, 0, 0.045, 2, False),
    ],
)
def test_before_the_plan_the_pool_waits_when_a_childs_start_costs_more_than_the_wait(
    start_cpu: float, tasks: int, task_s: float, children: int, waits: bool
) -> None:
    """Waiting costs the wall time of the tasks the plan still needs (MEASURED_TASKS, 8)
    on the children there are; a child the plan may retire costs its start."""
    book = timed(start_cpu, tasks, task_s)
    wait = (8 - tasks) * task_s / children
    assert waiting_for_the_plan_is_cheaper(book, children) is waits
    if tasks < 8:
        assert waits == (start_cpu > wait)


def test_with_no_child_measured_the_pool_does_not_wait_for_the_plan() -> None:
    assert waiting_for_the_plan_is_cheaper(Ledger(30 * MIB), 2) is False


def test_a_pool_of_dear_children_forks_no_wave_the_plan_would_retire() -> None:
    """Two measured children whose start cost 0.9 s of CPU, two tasks of 45 ms timed:
    no wave until the plan is made, though two more children fit."""
    book = ledger((1, 20, None), (2, 20, None), peaks={"t": 30})
    book.pace.first_cpu.add(0.945)
    book.pace.first_busy.add(0.045)
    book.pace.first_tasks.add(1)
    for _ in range(2):
        book.pace.task_cpu.add(0.045)
        book.pace.task_wall.add(0.045)
    assert Safety().decide(view(300, size=2), book, 0.0) == []
    for _ in range(6):  # the tasks the plan needs: the waves go on as before
        book.pace.task_cpu.add(0.045)
    assert [(a.action, a.count) for a in Safety().decide(view(300, size=2), book, 0.1)] == [
        ("grow", 2)
    ]


def test_past_the_high_mark_with_nothing_to_stop_it_retires_idle_children_above_the_target() -> (
    None
):
    """What is ahead is idle young children's copies (a wave forked just before the limit
    fell): no task to stop, so it retires idle children above the target as it does below
    the hard mark, rather than nothing at each check while the pool stays too large."""
    book = ledger((1, 20, None), (2, None, None), (3, None, None), peaks={"t": 30})
    # 940 held, past the high mark (900); the two young ones will copy 20 each: 980 ahead,
    # past the hard mark (970), and nothing runs. The young go: each would copy as much as
    # the measured one holds on its first task, and has nothing warm to lose
    actions = Safety().decide(replace(view(940, size=3), target=1), book, now=0.0)
    assert [(a.action, a.pid) for a in actions] == [("retire", 2), ("retire", 3)]


def test_above_the_target_it_retires_the_young_children_first_then_the_largest() -> None:
    """A limit lowered under a pool forked in waves: a young child holds nothing yet, but
    its first task will copy a whole baseline, which the cgroup's figure the limit was
    set from does not show (retiring a measured child instead frees memory that the
    young one takes back on its first task). Then the largest."""
    book = ledger((1, 20, None), (2, None, None), (3, 20, None), (4, None, None))
    book.after_task(Record(3, "t", 0, False, 10 * MIB, 210 * MIB, None))  # holds 30
    safety = Safety()
    order = []
    for now in (0.0, 1.0, 2.0):
        (action,) = safety.decide(replace(view(300, size=4 - len(order)), target=0), book, now)
        order.append(action.pid)
        book.leave(action.pid)
        book.child_down(action.pid)
    assert order[:2] in ([2, 4], [4, 2]) and order[2] == 3


def test_an_idle_young_childs_copy_to_come_stops_no_running_task_it_is_retired() -> None:
    """Past the high mark every task is held, so a young idle child will copy nothing
    until the pool is under it again: its baseline still to come is no reason to stop
    the task running beside it (it once was: a limit lowered under a pool forked in
    waves stopped measured children's tasks). The young child is retired instead."""
    book = ledger((1, 20, "t"), (2, None, None), peaks={"t": 5})
    # 950 held (high 900): the running task's 5 and the young child's 20 make 975 ahead,
    # past the hard mark (970); without the young one's, 955
    actions = Safety().decide(replace(view(950, size=2), target=1), book, now=0.0)
    assert [(a.action, a.pid) for a in actions] == [("retire", 2)]


def test_it_grows_only_once_children_on_their_way_out_are_gone() -> None:
    """Their memory is freed only when they have exited: new children forked before
    would copy and take tasks on memory that is not free yet."""
    book = ledger((1, 20, None), (2, 20, None), peaks={"t": 30})
    book.after_task(Record(2, "t", 0, False, 100 * MIB, 300 * MIB, None))
    book.leave(2)
    assert Safety().decide(view(300, size=2), book, now=0.0) == []
    book.child_down(2)
    actions = Safety().decide(view(200, size=1), book, now=0.0)
    assert [a.action for a in actions] == ["grow"]


def test_above_the_target_it_retires_an_idle_child() -> None:
    book = ledger((1, 20, None), (2, 20, "t"), peaks={"t": 500})
    safety = Safety()  # target: 700 // 520 = 1
    actions = safety.decide(view(300, size=2), book, now=0.0)
    assert [(a.action, a.pid) for a in actions] == [("retire", 1)]


def test_it_checks_often_above_the_low_mark_and_sooner_when_rising() -> None:
    safety = Safety()
    assert safety.next_delay(850 * MIB, MARKS, 0.25) == Safety.FAST
    assert safety.next_delay(100 * MIB, MARKS, 0.25) == 0.25
    safety.project(100 * MIB, 0.0)
    safety.project(200 * MIB, 0.1)  # 1000 MiB/s: the low mark (800) in 0.6 s
    assert Safety.FAST <= safety.next_delay(200 * MIB, MARKS, 1.0) < 0.6


# -- properties -----------------------------------------------------------------------------
CHILD = st.tuples(
    st.one_of(st.none(), st.integers(0, 200)),  # baseline
    st.integers(0, 300),  # retained
    st.one_of(st.none(), st.sampled_from(["a", "b"])),  # running task
    st.booleans(),  # leaving
)


@settings(max_examples=300, deadline=None, database=None)
@given(
    children=st.lists(CHILD, min_size=1, max_size=8),
    ws=st.integers(0, 1100),
    base=st.integers(0, 1000),
    peaks=st.tuples(st.integers(0, 400), st.integers(0, 400)),
    requested=st.integers(1, 16),
    per_child=st.integers(1, 8),
    times=st.lists(st.floats(0.01, 2.0), min_size=1, max_size=5),
)
def test_the_rules_stay_within_the_pool_and_the_marks(
    children: list[tuple[int | None, int, str | None, bool]],
    ws: int,
    base: int,
    peaks: tuple[int, int],
    requested: int,
    per_child: int,
    times: list[float],
) -> None:
    book = Ledger(30 * MIB)
    book.tasks.observe("a", peaks[0] * MIB, 0)
    book.tasks.observe("b", peaks[1] * MIB, 5 * MIB)
    for pid, (baseline, retained, task, gone) in enumerate(children, 1):
        book.child_up(pid, rss=100 * MIB)
        if baseline is not None:
            book.after_task(Record(pid, "a", 0, False, 0, 100 * MIB, baseline * MIB))
            book.children[pid].rss = (100 + retained) * MIB
        if task is not None:
            book.task_accepted(pid, f"id{pid}", task)
        if gone:
            book.leave(pid)
    size = len(children)
    v = view(ws, size=size, requested=requested, base=base, per_child=per_child)
    assert 1 <= target_size(v, book) <= requested
    verdict = admit(v, book, "a")
    event(verdict.reason)
    if verdict.admit and verdict.reason == "fits":  # what it admits fits: settled, hard
        assert verdict.projected <= MARKS.high
    for child in book.children.values():
        if recycle(v, book, child):
            assert child.task is None and not child.young and not child.leaving
            assert child.private + book.tasks.worst_peak > share(v)
    safety, now, live = Safety(), 0.0, {c.pid for c in book.live()}
    for dt in times:
        now += dt
        actions = safety.decide(v, book, now)
        for action in actions:
            event(action.action)
        stopped = [a.pid for a in actions if a.action in ("kill", "shed", "retire")]
        assert len(stopped) == len(set(stopped)) and set(stopped) <= live
        assert len(live) - len(stopped) >= 1 or not stopped  # one child stays
        for action in actions:
            if action.action == "kill":
                assert book.children[action.pid].task is not None
            if action.action in ("shed", "retire"):
                assert book.children[action.pid].task is None
            if action.action == "grow":
                assert size + action.count <= target_size(v, book)
                assert ws < MARKS.high
        assert safety.next_delay(v.unreclaimable, MARKS, 0.25) > 0


def _first_tasks(estimate: int, baseline: int) -> Ledger:
    """A ledger before PRIOR_TASKS tasks: one child measured at ``baseline`` MiB, a task
    peak of 25 MiB."""
    book = Ledger(estimate * MIB)
    book.tasks.observe("t", 25 * MIB, 0)
    book.child_up(1, rss=200 * MIB)
    book.after_task(Record(1, "boot", 0, False, 0, 200 * MIB, baseline * MIB))
    return book


def test_before_its_first_tasks_the_estimate_keeps_the_pool_from_growing_not_shrinks_it() -> None:
    """Room 700 MiB. The estimate (150 MiB) is above the first child's measure (10): the
    pool of 6 does not grow on that one measure (6 < 700 // 35), nor shrink to what fits
    at the estimate (700 // 175 = 4)."""
    assert plan(view(300, size=6, per_child=1), _first_tasks(150, 10), cpus=2).size == 6
    assert plan(view(300, size=2, per_child=1), _first_tasks(150, 10), cpus=2).size == 4


def test_a_measured_cost_above_the_estimate_shrinks_the_pool_at_once() -> None:
    """The first child copied 200 MiB where 150 were expected: 700 // 225 = 3."""
    assert plan(view(300, size=6, per_child=1), _first_tasks(150, 200), cpus=2).size == 3


# -- room to spare ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ws", "children", "peak", "target", "kept", "expected"),
    [
        # 4 children of 20 copied, hog reaches 60: 500 + 4 * 60 = 740 < 800 (low mark)
        (500, 4, 60, None, 0, True),
        (560, 4, 60, None, 0, False),  # 560 + 240 = 800: at the low mark
        (500, 4, 60, 6, 0, False),  # 2 more planned: 500 + 2 * 20 + 6 * 60 = 900
        (380, 4, 60, 6, 0, True),  # 380 + 2 * 20 + 6 * 60 = 780
        (500, 4, 60, None, 4, False),  # a child holds 4 MiB more than a new one copies
        (500, 4, 60, None, 3, True),  # 3: not worth a fork
    ],
)
def test_room_to_spare_is_the_whole_pool_at_its_worst_under_the_low_mark(
    ws: int, children: int, peak: int, target: int | None, kept: int, expected: bool
) -> None:
    """Every child the pool has or plans, all running the worst task seen, new ones
    copying the expected baseline, under the low mark; and no child worth a fork."""
    book = ledger(*[(pid, 20, None) for pid in range(1, children + 1)], peaks={"hog": peak})
    if kept:
        book.after_task(
            Record(1, "hog", 0, False, kept * MIB, (200 + kept) * MIB, (20 + kept) * MIB)
        )
    found = replace(view(ws, size=children), target=target)
    assert roomy(found, book) is expected


def test_a_pool_of_one_child_gives_it_all_the_room_in_whole_bytes() -> None:
    assert share(view(0, size=1, base=200)) == 700 * MIB  # 900 - 200, for one child
    assert share(view(0, size=3, base=200)) == 244_667_733  # 700 MiB / 3, rounded down


def test_a_child_that_retained_exactly_min_retained_is_worth_a_fork() -> None:
    book = ledger((1, 20, None))
    child = book.children[1]
    child.rss = 200 * MIB + 4 * MIB  # 4 MiB beyond what a new child copies: MIN_RETAINED
    assert worth_a_fork(book, child) is True
    child.rss -= 1
    assert worth_a_fork(book, child) is False


@pytest.mark.parametrize(
    ("retained", "recycled"),
    [
        # the share is 700 MiB / 3 = 244667733 bytes; an eighth of it 30583466 bytes
        (30_583_466, True),  # exactly an eighth; 20 MiB + it + 200 MiB > the share
        (30_583_465, False),  # a byte under an eighth: not worth a fork
        (20 * MIB, False),  # 20 MiB, under an eighth (29.2 MiB), though above a ninth
    ],
)
def test_a_child_is_recycled_from_an_eighth_of_its_share_retained(
    retained: int, recycled: bool
) -> None:
    book = ledger((1, 20, None), peaks={"leak": 200})
    child = book.children[1]
    child.rss = 200 * MIB + retained
    assert recycle(view(500, size=3), book, child) is recycled


def test_a_child_that_would_reach_exactly_its_share_at_the_next_peak_is_kept() -> None:
    """20 MiB copied + 95 retained + 60 (the worst peak) = 175 MiB, its share: it fits."""
    book = ledger((1, 20, None), peaks={"leak": 60})
    child = book.children[1]
    child.rss = (200 + 95) * MIB
    assert recycle(view(500), book, child) is False
    child.rss += 1
    assert recycle(view(500), book, child) is True


def test_every_task_finished_since_the_cgroup_was_read_counts_not_only_the_last() -> None:
    book = ledger((1, 20, "leak"), (2, 20, "leak"), peaks={"leak": 24})
    book.task_finished(1)
    book.task_finished(2)
    assert to_come(book) == 2 * 24 * MIB


def test_a_task_accepted_without_passing_the_gate_reserves_its_own_peak() -> None:
    """Not the worst seen (60 MiB) when its kind was measured at 10 MiB."""
    book = ledger((1, 20, None), peaks={"small": 10, "big": 60})
    book.task_accepted(1, "id-1", "small")
    assert to_come(book) == 10 * MIB


def _at_the_hard_mark(ws: int, retained: dict[int, int], peak: int) -> list[tuple[str, int, str]]:
    """Child 1 runs ``hog`` (grown 10 MiB so far), children 2 to 4 are idle and kept
    ``retained`` MiB beyond the 20 a child copies; then the cgroup is at ``ws`` MiB."""
    book = ledger((1, 20, "hog"), (2, 20, None), (3, 20, None), (4, 20, None),
                  peaks={"hog": peak})  # fmt: skip
    for pid, kept in retained.items():
        book.children[pid].rss = (200 + kept) * MIB
    safety = Safety()
    safety.decide(view(500, rss={1: 200}), book, now=0.0)
    actions = safety.decide(view(ws, rss={1: 210}), book, now=0.1)
    assert all(a.child is not None and a.child.pid == a.pid for a in actions)
    return [(a.action, a.pid, a.level) for a in actions]


def test_at_the_hard_mark_when_stopping_the_tasks_is_not_enough_idle_children_are_shed() -> None:
    """990 MiB, and task 1 is to add 50 more (its peak of 60, 10 grown): 1040 ahead.
    Stopping it takes its peak and the 20 MiB its child copied (960 left, past the high
    mark of 900); shedding child 2, which holds 70 MiB, is enough (890). Child 3 stays."""
    assert _at_the_hard_mark(990, {2: 50, 3: 10, 4: 0}, peak=60) == [
        ("kill", 1, "hard"), ("shed", 2, "hard"),
    ]  # fmt: skip


def test_at_the_hard_mark_shedding_stops_at_the_high_mark_itself() -> None:
    """As above, child 2 holding 60 MiB: 960 - 60 leaves exactly the high mark, 900."""
    assert _at_the_hard_mark(990, {2: 40, 3: 10, 4: 0}, peak=60) == [
        ("kill", 1, "hard"), ("shed", 2, "hard"),
    ]  # fmt: skip


def test_at_the_hard_mark_idle_children_are_shed_the_largest_first_until_under_the_mark() -> None:
    """995 MiB, task 1 at its peak of 10: stopping it takes 30 (965 left), child 2 60
    (905: still past 900), child 3 50 (855). Child 4 kept nothing; it stays."""
    assert _at_the_hard_mark(995, {2: 40, 3: 30, 4: 0}, peak=10) == [
        ("kill", 1, "hard"), ("shed", 2, "hard"), ("shed", 3, "hard"),
    ]  # fmt: skip


def _shed_at(ws: int, retained: dict[int, int]) -> list[tuple[str, int, str]]:
    """Idle children that copied 20 MiB and kept ``retained`` MiB more; the cgroup at
    ``ws`` MiB, past the high mark (900) but not the hard one (970)."""
    book = ledger(*[(pid, 20, None) for pid in retained], peaks={"leak": 24})
    for pid, kept in retained.items():
        book.children[pid].rss = (200 + kept) * MIB
    actions = Safety().decide(view(ws, size=len(retained)), book, now=0.0)
    assert all(a.child is not None and a.child.pid == a.pid for a in actions)
    return [(a.action, a.pid, a.level) for a in actions]


def test_past_the_high_mark_it_sheds_the_largest_idle_children_until_under_it() -> None:
    """60 MiB over: child 1 frees the 50 it kept (10 over still), child 3 its 40."""
    assert _shed_at(960, {1: 50, 2: 10, 3: 40}) == [("shed", 1, "high"), ("shed", 3, "high")]


def test_past_the_high_mark_shedding_down_to_the_mark_itself_is_not_enough() -> None:
    """60 MiB over, child 1 kept 60: at the mark after it, not under it; child 3 goes too."""
    assert _shed_at(960, {1: 60, 2: 10, 3: 40}) == [("shed", 1, "high"), ("shed", 3, "high")]


def test_past_the_high_mark_shedding_leaves_one_child() -> None:
    assert _shed_at(960, {1: 50, 2: 40}) == [("shed", 1, "high")]


def _retired_at(ws: int, children: int, target: int) -> list[tuple[str, int, str]]:
    """``children`` idle children that copied 20 MiB and kept nothing, the plan's target
    ``target``; the cgroup at ``ws`` MiB, past the high mark (900), not the hard one."""
    book = ledger(*[(pid, 20, None) for pid in range(1, children + 1)], peaks={"t": 30})
    actions = Safety().decide(replace(view(ws, size=children), target=target), book, now=0.0)
    assert all(a.child is not None and a.child.pid == a.pid for a in actions)
    return [(a.action, a.pid, a.level) for a in actions]


def test_past_the_high_mark_a_pool_at_its_target_retires_no_child() -> None:
    """Its idle children hold only what a new one copies (nothing to shed), and the pool
    is no larger than its target (nothing to retire)."""
    assert _retired_at(920, children=4, target=4) == []


def test_past_the_high_mark_above_the_target_it_retires_idle_children_past_the_mark() -> None:
    """60 MiB over, 20 freed per child: three bring it to the mark itself, a fourth under."""
    assert _retired_at(960, children=5, target=1) == [
        ("retire", 1, "high"), ("retire", 2, "high"), ("retire", 3, "high"), ("retire", 4, "high"),
    ]  # fmt: skip


def test_the_projection_adds_what_the_rate_since_the_last_reading_brings_in_half_a_second() -> None:
    """100 MiB at 10 s, 300 at 12 s: 100 MiB/s, so 50 more in LOOKAHEAD (0.5 s)."""
    safety = Safety()
    assert safety.project(100 * MIB, 10.0) == 100 * MIB  # a first reading: no rate yet
    assert safety.project(300 * MIB, 12.0) == 350 * MIB
    assert safety.rate == 100 * MIB
    assert safety.project(300 * MIB, 12.0) == 300 * MIB  # no time since: the figure alone
    assert safety.project(200 * MIB, 13.0) == 200 * MIB  # falling: no rate
    assert safety.rate == 0.0


def test_below_the_low_mark_the_next_check_comes_half_way_there_at_the_rate() -> None:
    """200 MiB, the low mark at 800, rising 200 MiB/s: there in 3 s, checked in 1.5 s."""
    safety = Safety()
    safety.project(0, 0.0)
    safety.project(200 * MIB, 1.0)
    assert safety.next_delay(200 * MIB, MARKS, 10.0) == pytest.approx(1.5)
    assert safety.next_delay(800 * MIB, MARKS, 10.0) == Safety.FAST  # at the low mark
    assert Safety().next_delay(800 * MIB, MARKS, 10.0) == Safety.FAST  # even not rising


def test_a_rise_slower_than_a_byte_a_second_still_times_the_next_check() -> None:
    safety = Safety()
    safety.project(0, 0.0)
    safety.project(1, 2.0)  # half a byte a second
    assert safety.rate == 0.5
    assert safety.next_delay(MARKS.low - 1, MARKS, 10.0) == pytest.approx(1.0)
