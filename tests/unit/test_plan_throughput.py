"""Tests for the throughput plan (celery_guard.policy.plan, Costs) and the pace it is
made from (celery_guard.ledger.Pace): the pool size and the runs between recycles that a
hand-tuner would pick, worked out by hand.

Figures in MiB and seconds.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from celery_guard.ledger import BILLIARD_MAINTENANCE, Ledger, Mean, Record
from celery_guard.policy import (
    HYSTERESIS,
    MEASURED_REPLACEMENTS,
    MEASURED_TASKS,
    MOST_TASKS_PER_CHILD,
    TIE,
    Costs,
    Marks,
    Plan,
    View,
    best,
    plan,
    recycle_rss,
)

MIB = 1024 * 1024
ROOM = 600 * MIB  # what view() leaves the children


def costs(**changes: float) -> Costs:
    """600 MiB of room; a child copies 10, a task peaks 25 above it and keeps 24 (the
    first too); 5 ms of CPU and 5 ms off the CPU per task; 2 CPUs; a dear start (0.5 s)."""
    figures = dict(room=600, baseline=10, peak=25, first_kept=24, retained=24,
                   task_cpu=0.005, task_idle=0.005, start_cpu=0.5, cpus=2.0)  # fmt: skip
    figures.update(changes)
    for size in ("room", "baseline", "peak", "first_kept", "retained"):
        figures[size] = int(figures[size] * MIB)
    return Costs(**figures)  # type: ignore[arg-type]


# -- what a child can hold, and how fast a pool goes -----------------------------------------
@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (2, 12),  # share 300: 10 + 25 + 24 + 10 * 24 = 299 fits, one more run is 323
        (6, 3),  # share 100: 10 + 25 + 24 + 1 * 24 = 83 fits, 107 does not
        (17, 1),  # share 35.29: 35 fits one run; 59 for a second does not
        (18, 0),  # share 33.33: not even one run (35)
    ],
)
def test_a_childs_share_sets_how_many_runs_it_holds(size: int, expected: int) -> None:
    assert costs().most_tasks(size) == expected


def test_a_child_of_tasks_that_keep_nothing_is_never_recycled_for_memory() -> None:
    assert costs(retained=0).most_tasks(4) == MOST_TASKS_PER_CHILD


@pytest.mark.parametrize(
    ("size", "tasks", "changes", "expected"),
    [
        # 10 runs of 5 ms CPU + 0.5 s start = 0.55 CPU s; + 50 ms off the CPU = 0.6 s:
        # children 2 * 10 / 0.6 = 33.3/s, CPUs 2 * 10 / 0.55 = 36.4/s
        (2, 10, {}, 2 * 10 / 0.6),
        # 16 children, one run each: children 16 / 0.51, CPUs 2 / 0.505 = 3.96/s
        (16, 1, {}, 2 / 0.505),
        # a cheap start (1 ms): the CPUs allow 2 / 0.006 = 333/s, 16 children 16/0.011
        (16, 1, {"start_cpu": 0.001}, 2 / 0.006),
        # tasks that sleep 1 s: 4 children, 3 runs each: 4 * 3 / (0.015 + 0.5 + 3)
        (4, 3, {"task_idle": 1.0}, 4 * 3 / 3.515),
    ],
)
def test_the_rate_is_bound_by_the_children_and_by_the_cpus(
    size: int, tasks: int, changes: dict[str, float], expected: float
) -> None:
    assert costs(**changes).rate(size, tasks) == pytest.approx(expected)


# -- the plan --------------------------------------------------------------------------------
MARKS = Marks.of(1000 * MIB, 0.8, 0.9, 0.97)  # high 900 MiB


def view(size: int = 16, requested: int = 16, base: int = 300) -> View:
    """900 - 300 = 600 MiB of room, as in ``costs()``."""
    return View(0, MARKS, size, requested, base * MIB, 4)


def measured(start_cpu: float, task_cpu: float = 0.005, wall: float = 0.010,
             kept: int = 24, children: int = 4, tasks: int = 6) -> Ledger:  # fmt: skip
    """A ledger fed as the governor feeds it: ``children`` children that each report
    after every one of ``tasks`` tasks, each task ``wall`` seconds long in its child,
    using ``task_cpu`` CPU seconds and keeping ``kept`` MiB; each child spent
    ``start_cpu`` CPU seconds before its first task. A child copies 10 MiB; a task
    peaks 25 MiB above where it started."""
    book = Ledger(10 * MIB)
    for pid in range(1, children + 1):
        book.child_up(pid, rss=100 * MIB)
        cpu, busy = start_cpu, 0.0
        for run in range(1, tasks + 1):
            book.task_accepted(pid, f"{pid}-{run}", "leak")
            cpu += task_cpu
            busy += wall
            rss = (100 + kept * run) * MIB
            private = (10 + kept) * MIB if run == 1 else None
            book.after_task(Record(pid, "leak", 25 * MIB, True, kept * MIB, rss, private,
                             cpu=round(cpu * 1e6), wait=0, busy=round(busy * 1e6),
                             tasks=run))  # fmt: skip
            book.task_finished(pid)
    for _ in range(MEASURED_REPLACEMENTS):  # replacements timed: as long as a start
        book.pace.replace_wall.add(start_cpu)
    return book


def test_the_pace_is_read_from_the_records_and_the_pools_events() -> None:
    pace = measured(start_cpu=0.5).pace
    assert pace.task_cpu.value == pytest.approx(0.005)
    assert pace.start_cpu == pytest.approx(0.5)
    assert pace.idle_wall() == pytest.approx(0.005)  # 10 ms in the task less 5 ms of CPU
    assert pace.retained.value == pytest.approx(24 * MIB)
    assert pace.first_kept.value == pytest.approx(24 * MIB)


def test_time_waiting_for_a_cpu_is_not_time_more_children_can_overlap() -> None:
    book = Ledger(10 * MIB)
    book.child_up(1)
    for run, (cpu, wait) in enumerate([(10_000, 0), (15_000, 20_000), (20_000, 40_000)], 1):
        book.after_task(Record(1, "t", 0, False, 0, 0, None, cpu=cpu, wait=wait, busy=30_000 * run,
                         tasks=run))  # fmt: skip
    # 30 ms wall per task: 5 ms on a CPU and 20 ms waiting for one leave 5 ms
    assert book.pace.idle_wall() == pytest.approx(0.005)


def test_dear_children_give_fewer_children_that_keep_a_few_leaks() -> None:
    chosen = plan(view(), measured(start_cpu=0.5), cpus=2)
    # By hand (costs()), each size at the most runs its share holds:
    #   1 x 24 runs: min(24 / (0.62 + 0.12), 2 * 24 / 0.62) = 32.4/s
    #   2 x 12 runs: min(24 / (0.56 + 0.06), 2 * 12 / 0.56) = 38.7/s
    #   3 x 7 runs:  min(21 / (0.535 + 0.035), 2 * 7 / 0.535) = 26.2/s, and less beyond
    assert chosen == Plan(2, 12, pytest.approx(2 * 12 / 0.62), "throughput", ROOM)


def test_cheap_children_give_the_largest_pool_recycled_after_every_task() -> None:
    # a 1 ms start, tasks that spend 100 ms off the CPU: the children bound the rate,
    # 16 x 1 run = 16 / (0.006 + 0.1) = 151/s against 5 x 4 = 20 / (0.021 + 0.4) = 48/s
    chosen = plan(view(), measured(start_cpu=0.001, wall=0.105), cpus=2)
    assert (chosen.size, chosen.tasks_per_child) == (16, 1)


def test_cpu_bound_tasks_are_not_recycled_after_every_task_even_when_starts_are_cheap() -> None:
    # a 1 ms start is a fifth of a 5 ms task's CPU: 16 x 1 = 2 / 0.006 = 333/s, while 4
    # children of 5 runs reach 2 * 5 / 0.026 = 384.6/s (5 of 4: 381/s, within 1%: a tie
    # goes to the smaller pool)
    chosen = plan(view(), measured(start_cpu=0.001), cpus=2)
    assert (chosen.size, chosen.tasks_per_child) == (4, 5)


def test_short_tasks_are_bounded_by_the_main_process() -> None:
    # 1 ms of the main process' CPU per task: at most 1000/s whatever the pool, and a
    # child waits that long for its next task. 5 ms tasks (10 ms in the child) that keep
    # nothing: the CPUs bound each size at 2 / 0.006 = 333/s, the children at
    # size / 0.011: 4 children reach 333/s (3: 272/s), more tie
    found = replace(costs(start_cpu=0.001), retained=0, first_kept=0, main_cpu=0.001)
    assert found.rate(16, 1000) == pytest.approx(2 / 0.006)
    assert found.rate(3, 1000) == pytest.approx(3 / 0.011)
    assert found.rate(4, 1000) == pytest.approx(found.rate(16, 1000))
    # 0.1 ms tasks: the main process' thread bounds every size from 2 children on
    quick = replace(found, task_cpu=0.0001, task_idle=0.0)
    assert quick.rate(16, 1000) == pytest.approx(1000.0)
    assert quick.rate(2, 1000) == pytest.approx(1000.0)
    assert quick.rate(1, 1000) < 1000.0 * 0.99  # one child waits for each hand-over


def test_children_that_are_never_replaced_pay_no_start() -> None:
    # CPU-bound 45 ms tasks that keep nothing, a 2 s start, no replacement timed yet (one
    # counts at billiard's 5 s maintenance interval): two children already keep both CPUs
    # busy, a third only shares them. Charged a start and a replacement every
    # MOST_TASKS_PER_CHILD tasks, two looked 13% slower than three and the pool grew.
    found = costs(task_cpu=0.045, task_idle=0.0, start_cpu=2.0, replace_idle=5.0,
                  retained=0, first_kept=0)  # fmt: skip
    assert found.most_tasks(3) == MOST_TASKS_PER_CHILD
    assert found.rate(2, MOST_TASKS_PER_CHILD) == pytest.approx(2 / 0.045)
    assert found.rate(3, MOST_TASKS_PER_CHILD) == pytest.approx(2 / 0.045)
    assert best(found, 16).size == 2


def test_the_plan_is_the_best_pair_of_every_size_and_run_count() -> None:
    book = measured(start_cpu=0.2)
    chosen = plan(view(), book, cpus=2)
    found = costs(start_cpu=0.2)
    best = max(
        found.rate(size, runs)
        for size in range(1, 17)
        for runs in range(1, 50)
        if found.holds(runs) <= found.room // size
    )
    assert chosen.rate == pytest.approx(best, rel=0.01)


def test_a_plan_waits_for_enough_measured_tasks() -> None:
    book = measured(start_cpu=0.5, children=1, tasks=MEASURED_TASKS)  # first one has no CPU step
    chosen = plan(view(), book, cpus=2)
    assert chosen.reason == "measuring"
    assert chosen.rate is None
    # while measuring, the size is the one the memory allows at the configured runs
    # (4): 600 // (10 + 25 + 3 * 24) = 5
    assert chosen.size == 5


def test_a_plan_that_hangs_on_the_replacements_time_waits_until_they_are_timed() -> None:
    # a 1 ms start: 16 children replaced after each task are fastest if a replacement
    # costs its start, a few children of many tasks if it costs billiard's 5 s
    book = measured(start_cpu=0.001, wall=0.105)
    book.pace.replace_wall = type(book.pace.replace_wall)()  # never timed
    for _ in range(MEASURED_REPLACEMENTS):
        assert plan(view(), book, cpus=2).reason == "measuring"
        book.pace.replace_wall.add(0.001)
    assert (plan(view(), book, cpus=2).size, plan(view(), book, cpus=2).reason) == (
        16,
        "throughput",
    )


def test_tasks_that_fill_a_child_slowly_are_planned_before_any_replacement() -> None:
    # 90 ms tasks that keep 1 MiB each: a child of 3 runs 166 of them (15 s) before it is
    # replaced; whether a replacement costs billiard's 5 s or only its start, 3 x 166 is
    # within HYSTERESIS of the fastest: planned now, not after three replacements that
    # may come after the queue is empty
    book = measured(start_cpu=0.2, task_cpu=0.09, wall=0.09, kept=1)
    book.pace.replace_wall = type(book.pace.replace_wall)()  # never timed
    chosen = plan(view(), book, cpus=2)
    assert (chosen.size, chosen.tasks_per_child, chosen.reason) == (3, 166, "throughput")


def test_a_slow_replacement_counts_against_many_children() -> None:
    # 2 s from a child leaving to its replacement ready, though its start takes 1 ms of
    # CPU: 16 x 1 run = 16 / (0.105 + 2) = 7.6/s; 5 x 4 = 20 / (0.42 + 2) = 8.3/s;
    # 1 x 24 = 24 / (2.52 + 2) = 5.3/s ... the plan takes the slot's time into account
    book = measured(start_cpu=0.001, wall=0.105)
    book.pace.replace_wall = type(book.pace.replace_wall)()
    for _ in range(MEASURED_REPLACEMENTS):
        book.pace.replace_wall.add(2.0)
    chosen = plan(view(), book, cpus=2)
    assert chosen.size < 16
    assert chosen.tasks_per_child is not None and chosen.tasks_per_child > 1


def test_the_current_size_stays_unless_another_is_clearly_faster() -> None:
    book = measured(start_cpu=0.001, wall=0.105)  # 16 x 1 is best (151/s)
    # 15 children run 15/16 of that: within HYSTERESIS, kept
    kept = plan(view(), book, cpus=2, previous=Plan(15, 1, None, "throughput", ROOM))
    assert (kept.size, kept.reason) == (15, "kept")
    assert HYSTERESIS >= 1 / 15
    # 2 children of 12 runs run 24 / (0.072 + 1.2) = 18.9/s: replaced
    assert plan(view(), book, cpus=2, previous=Plan(2, 12, None, "throughput", ROOM)).size == 16


def test_a_size_the_limit_forced_is_not_kept_once_the_limit_rises() -> None:
    """Tasks of 50 ms of CPU and 29 ms off it, on 2 CPUs: 4 children reach the CPUs'
    40/s, 3 run 3 / 0.079 = 38/s, within HYSTERESIS of it. A pool planned at 3 for a
    lower limit goes back to 4 when the limit rises: the margin against noisy figures
    does not keep a size the memory forced."""
    book = measured(start_cpu=0.001, task_cpu=0.05, wall=0.079, kept=0)
    small = view(size=3, requested=4, base=900 - 120)  # 120 MiB of room: 3 children fit (35 each)
    before = plan(small, book, cpus=2)
    assert (before.size, before.reason) == (3, "throughput")
    within = plan(view(size=3, requested=4, base=900 - 125), book, cpus=2, previous=before)
    assert (within.size, within.reason) == (3, "kept")  # 4 x 35 MiB do not fit in 125
    raised = plan(view(size=3, requested=4), book, cpus=2, previous=before)
    assert (raised.size, raised.reason) == (4, "throughput")
    assert plan(view(size=1, requested=4), book, cpus=2).size == 4  # not a tie: 4 is faster


@pytest.mark.parametrize(
    ("forked", "planned", "reason"),
    [
        (3, 3, "kept"),  # 4 would run 40/s, 3 run 38/s: not worth a child's start
        (1, 4, "throughput"),  # 1 child runs 13/s: the pool grows to the fastest
        (4, 4, "throughput"),
    ],
)
def test_the_first_plan_adds_children_only_for_a_size_clearly_faster(
    forked: int, planned: int, reason: str
) -> None:
    """Tasks of 50 ms of CPU and 29 ms off it, on 2 CPUs (as above). The first plan
    made from measured figures weighs the pool forked while it was measuring as any plan
    weighs the current size: a child added costs its start, so it grows only for a size
    HYSTERESIS faster."""
    book = measured(start_cpu=0.001, task_cpu=0.05, wall=0.079, kept=0)
    first = plan(view(size=forked, requested=4), book, cpus=2)
    assert (first.size, first.reason) == (planned, reason)


def test_the_first_plan_shrinks_a_pool_forked_larger_than_the_fastest() -> None:
    """CPU-bound tasks (50 ms of CPU, none off it) on 2 CPUs and 16 children forked while
    the plan was measuring: it goes down to 2, the smallest that keeps the CPUs busy (the
    margin is for adding children, not for keeping ones forked before the plan)."""
    book = measured(start_cpu=0.001, task_cpu=0.05, wall=0.05, kept=0)
    assert plan(view(size=16), book, cpus=2).size == 2


def test_a_tie_goes_to_the_smaller_pool() -> None:
    """CPU-bound tasks (50 ms of CPU, none off it) on 2 CPUs: from 2 children on, the
    CPUs bound the rate; more children only share them."""
    book = measured(start_cpu=0.001, task_cpu=0.05, wall=0.05, kept=0)
    chosen = plan(view(requested=16), book, cpus=2)
    assert (chosen.size, chosen.reason) == (2, "throughput")
    found = costs(start_cpu=0.001, task_cpu=0.05, task_idle=0, first_kept=0, retained=0)
    runs = MOST_TASKS_PER_CHILD
    assert found.rate(16, runs) == pytest.approx(found.rate(2, runs))
    assert found.rate(1, runs) < found.rate(2, runs) * (1 - TIE)


def test_a_size_taken_while_measuring_is_not_kept_by_the_hysteresis() -> None:
    book = measured(start_cpu=0.001, wall=0.105)  # 16 x 1 is best (151/s)
    chosen = plan(view(), book, cpus=2, previous=Plan(15, None, None, "measuring"))
    assert (chosen.size, chosen.reason) == (16, "throughput")


def test_a_size_that_no_longer_fits_is_never_kept() -> None:
    book = measured(start_cpu=0.001)
    # at 18 children not even one run fits (share 33.3 < 35)
    chosen = plan(view(requested=20), book, cpus=2, previous=Plan(18, 1, None, "throughput", ROOM))
    assert chosen.size <= 17


def test_a_set_minimum_of_runs_per_child_bounds_the_pool() -> None:
    book = measured(start_cpu=0.001)
    chosen = plan(view(), book, cpus=2, fewest_tasks=4)
    # 4 runs need 10 + 25 + 24 + 2 * 24 = 107 MiB: 600 // 107 = 5 children at most
    assert chosen.size <= 5
    assert chosen.tasks_per_child is not None and chosen.tasks_per_child >= 4


# -- the plan as a vanilla worker's settings -------------------------------------------------
@pytest.mark.parametrize(
    ("tasks", "expected_mib"),
    [
        # a child at RSS 50 after its first task's baseline; billiard compares its peak
        # RSS after each task: 50 + 25 (peak) after the first, 50 + 24 + 25 after the
        # second, 50 + 48 + 25 after the third; half-way between the last planned and the
        # next
        (1, 50 + (0 + 25) / 2),
        (2, 50 + (25 + 49) / 2),
        (3, 50 + (49 + 73) / 2),
    ],
)
def test_the_recycle_value_lets_a_child_run_its_planned_tasks_and_no_more(
    tasks: int, expected_mib: float
) -> None:
    assert recycle_rss(costs(), 50 * MIB, tasks) == int(expected_mib * MIB)


def test_tasks_that_keep_a_few_kib_are_planned_without_waiting_for_replacements() -> None:
    """No child has been replaced yet. Tasks that keep 24 MiB will have children
    replaced: the plan waits for replacements to be timed. Tasks that keep 1 KiB (a cache
    filled once, the allocator's slack) would run over MOST_TASKS_PER_CHILD tasks in a
    child even at 16 children (2.5 MiB of a 37.5 MiB share free after its 2nd): the plan
    is made at once."""
    for kept, reason in ((24, "measuring"), (1 / 1024, "throughput")):
        book = measured(start_cpu=0.01, kept=kept)  # type: ignore[arg-type]
        book.pace.replace_wall = Mean()
        assert plan(view(), book, cpus=2).reason == reason, kept


def test_until_replacements_are_timed_a_replacement_counts_at_its_longest() -> None:
    """A child's first task keeps 10 MiB, later ones nothing; 100 ms idle tasks. At 16
    children (a 37.5 MiB share) a child holds 35 MiB at its first task's peak and 45 at
    its second's: replaced after every task, 16 / 0.106 = 151/s if a replacement costs
    nothing more than its start. Not timed yet, it counts as billiard's maintenance
    interval: 16 / 5.106 = 3/s, and the most children that stay win, 13 (46.1 MiB each),
    at 13 / 0.105 = 124/s."""
    found = Costs(room=600 * MIB, baseline=10 * MIB, peak=25 * MIB, first_kept=10 * MIB,
                  retained=0, task_cpu=0.005, task_idle=0.1, start_cpu=0.001, cpus=2)  # fmt: skip
    assert (found.most_tasks(16), found.most_tasks(13)) == (1, MOST_TASKS_PER_CHILD)
    assert best(found, 16).size == 16
    assert best(replace(found, replace_idle=BILLIARD_MAINTENANCE), 16).size == 13


def test_a_plan_made_stays_when_the_figures_fall_short_again() -> None:
    """A mean near a bound may make the figures not enough again (here: the records
    forgotten): the plan made stays, kept, rather than going back to what fits."""
    book = measured(start_cpu=0.5)
    first = plan(view(), book, cpus=2)
    assert first.reason == "throughput"
    book.pace.task_cpu = Mean()
    again = plan(view(), book, cpus=2, previous=first)
    assert (again.size, again.tasks_per_child, again.reason) == (
        first.size, first.tasks_per_child, "kept",
    )  # fmt: skip
    assert plan(view(), book, cpus=2).reason == "measuring"  # no plan made: measuring


def _best_by_every_size(found: Costs, requested: int, previous: Plan | None, fewest: int) -> Plan:
    """``best`` as its docstring states it, weighing every size: the fastest size, ties to
    the smaller, the previous one kept unless another is HYSTERESIS faster."""
    fewest = max(min(fewest, found.most_tasks(1)), 1)
    pairs = {
        size: (found.rate(size, found.most_tasks(size)), found.most_tasks(size))
        for size in range(1, requested + 1)
        if found.most_tasks(size) >= fewest
    }
    if not pairs:
        return Plan(1, 1, None, "memory", found.room)
    top = max(rate for rate, _ in pairs.values())
    size = min(s for s, (rate, _) in pairs.items() if rate >= top * (1 - TIE))
    reason = "throughput"
    if previous is not None and previous.size in pairs:
        if pairs[previous.size][0] * (1 + HYSTERESIS) >= top:
            size, reason = previous.size, "kept"
    rate, tasks = pairs[size]
    return Plan(size, tasks if tasks < MOST_TASKS_PER_CHILD else None, rate, reason, found.room)


def test_the_plan_weighing_each_steps_last_size_is_the_plan_weighing_every_size() -> None:
    """``best`` weighs only the last size of each step of ``most_tasks``; on costs drawn
    at random (leaky or not, cheap or dear children, CPU- or I/O-bound tasks, up to 300
    sizes, with and without a previous plan and a fewest number of tasks) it picks what
    weighing every size picks."""
    draw = random.Random(20)
    for _ in range(3000):
        found = costs(
            room=draw.choice([60, 600, 4096]), baseline=draw.uniform(1, 80),
            peak=draw.uniform(0, 60), first_kept=draw.choice([0, draw.uniform(0, 40)]),
            retained=draw.choice([0, 0.01, draw.uniform(0, 30)]),
            task_cpu=draw.uniform(0.0001, 0.5), task_idle=draw.choice([0, draw.uniform(0, 2)]),
            start_cpu=draw.uniform(0.001, 1), cpus=draw.choice([1.0, 2.0, 8.0]),
            replace_idle=draw.uniform(0, 1), main_cpu=draw.uniform(0, 0.001),
            fork_main=draw.uniform(0, 0.05),
        )  # fmt: skip
        requested = draw.randint(1, 300)
        fewest = draw.choice([1, 1, 3, 20])
        previous = draw.choice(
            [None, Plan(draw.randint(1, 300), None, 1.0, "throughput", found.room)]
        )
        assert best(found, requested, previous, fewest) == _best_by_every_size(
            found, requested, previous, fewest
        )
