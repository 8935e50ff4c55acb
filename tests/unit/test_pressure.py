"""Tests for celery_guard.pressure: the brake's rules, one scenario per rule.

Figures in MiB on a 1000 MiB limit with the default marks: low 800, high 900, hard 970.
A scenario is a list of checks (time, working set, pool size, children); the children
are read through a recorder, so a test also sees which children a rule read, and when.
"""

from __future__ import annotations

import pytest

from celery_guard.pressure import Action, Child, Marks, Policy, fit

MIB = 1 << 20
MARKS = Marks.of(1000 * MIB, 0.80, 0.90, 0.97)
INTERVAL = 0.25


def policy(target: int = 16, estimate: int = 50) -> Policy:
    return Policy(MARKS, INTERVAL, target, estimate * MIB)


def child(pid: int, private: float, busy: bool = False) -> Child:
    return Child(pid, int(private * MIB), busy)


class Children:
    """The pool's children as the brake would read them, and a record of each read."""

    def __init__(self, *children: Child) -> None:
        self.children = list(children)
        self.reads: list[bool | None] = []

    def __call__(self, busy: bool | None) -> list[Child]:
        self.reads.append(busy)
        return [c for c in self.children if busy is None or c.busy == busy]


def kinds(actions: list[Action]) -> list[tuple[str, str, int | None]]:
    return [(a.action, a.level, a.child.pid if a.child else None) for a in actions]


def check(p: Policy, now: float, working_set: float, size: int, kids: Children) -> list:
    return kinds(p.decide(int(working_set * MIB), now, size, kids))


# -- fit -------------------------------------------------------------------------------
FIT = [
    # id, working set, children (private), size, floor, cost, projected
    ("all-grown", 700, [100, 100, 100], 3, 0, 100, 700),
    ("young-counted-at-largest", 500, [100, 20, 20], 3, 0, 100, 660),
    ("started-not-readable", 500, [100], 3, 0, 100, 700),
    ("floor-above-largest", 500, [60, 60], 2, 100, 100, 580),
    ("no-children-floor", 300, [], 2, 80, 80, 460),
]


@pytest.mark.parametrize(
    "working_set,privates,size,floor,cost,projected",
    [row[1:] for row in FIT],
    ids=[r[0] for r in FIT],
)
def test_fit(
    working_set: int, privates: list[int], size: int, floor: int, cost: int, projected: int
) -> None:
    children = [child(i, p) for i, p in enumerate(privates)]
    assert fit(working_set * MIB, children, size, floor * MIB) == (cost * MIB, projected * MIB)


# -- between the marks -----------------------------------------------------------------
@pytest.mark.parametrize("working_set", [100, 799, 850, 899])
def test_a_pool_that_fits_is_left_alone(working_set: float) -> None:
    """Steady, not paused, at the target: no action and no child read (it costs ms)."""
    p, kids = policy(target=4), Children(child(1, 100), child(2, 100))
    for now in (0.0, 0.25, 0.5, 0.75):
        assert check(p, now, working_set, 4, kids) == []
    assert kids.reads == []


# -- the high mark ---------------------------------------------------------------------
def test_above_high_pause_once_and_retire_the_largest_idle_child() -> None:
    p = policy()
    kids = Children(child(1, 90, busy=True), child(2, 60), child(3, 80))
    assert check(p, 0.0, 910, 3, kids) == [("pause", "high", None), ("retire", "high", 3)]
    assert kids.reads == [False], "only the idle children are read to retire"
    assert check(p, 0.1, 910, 2, kids) == [], "within the cooldown: the child is exiting"
    assert check(p, 0.1 + Policy.COOLDOWN, 910, 2, kids) == [("retire", "high", 3)]


def test_above_high_as_many_idle_children_as_it_takes() -> None:
    """960 MiB, high 900: 40 + 30 is enough, the third idle child stays."""
    p = policy()
    kids = Children(child(1, 30), child(2, 40), child(3, 10), child(4, 200, busy=True))
    actions = check(p, 0.0, 960, 4, kids)
    assert actions == [("pause", "high", None), ("retire", "high", 2), ("retire", "high", 1)]


def test_the_last_child_is_never_retired() -> None:
    p = policy()
    assert check(p, 0.0, 910, 1, Children(child(1, 500))) == [("pause", "high", None)]


# -- the hard mark ---------------------------------------------------------------------
def test_a_fast_rise_past_high_stops_the_largest_busy_children() -> None:
    """900 -> 940 MiB in 0.05 s: 800 MiB/s, 400 MiB more within the look-ahead. Busy
    children are the rise: the largest go, and the idle ones are not even read."""
    p = policy()
    kids = Children(
        child(1, 100, busy=True), child(2, 120, busy=True), child(3, 300), child(4, 110, True)
    )
    assert check(p, 0.0, 890, 4, kids) == []
    actions = check(p, 0.05, 930, 4, kids)
    # largest first: 2 leaves 810 + 2/3 of the rise (1077) > 900, 4 leaves 700 + 133
    assert actions == [("pause", "hard", None), ("terminate", "hard", 2), ("terminate", "hard", 4)]
    assert kids.reads == [True]


def test_idle_children_holding_memory_go_when_busy_ones_are_not_enough() -> None:
    """Leaky tasks finish at once: the memory is held by idle children. After the one busy
    child, the largest idle ones go (retire, at the hard level: SIGKILL, no task lost)."""
    p = policy()
    kids = Children(child(1, 50, busy=True), child(2, 200), child(3, 150), child(4, 30))
    check(p, 0.0, 880, 4, kids)
    actions = check(p, 0.05, 960, 4, kids)  # 1600 MiB/s: 800 ahead, all of it child 1's
    # 1 leaves 910 and no rise: still over 900; 2 leaves 710
    assert actions == [("pause", "hard", None), ("terminate", "hard", 1), ("retire", "hard", 2)]
    assert kids.reads == [True, False]


def test_young_idle_children_are_not_stopped_for_a_rise_they_do_not_make() -> None:
    """16 children copying at once; the idle young ones hold 20 MiB each and do not grow:
    stopping busy ones (90 MiB and their share of the rise) brings the projection down."""
    p = policy()
    kids = Children(
        *(child(pid, 60, busy=True) for pid in range(8)), *(child(pid, 20) for pid in range(8, 16))
    )
    check(p, 0.0, 880, 16, kids)
    actions = check(p, 0.05, 920, 16, kids)  # 800 MiB/s: 400 ahead, 50 a busy child
    assert {a for a, _, _ in actions} == {"pause", "terminate"}


TERMINATE = [
    # id, rise in MiB over 0.05 s from 905, busy children (MiB each), terminated
    ("slow-rise-nothing", 5, 3, 0),  # 100 MiB/s: 960 ahead, under hard
    ("one-is-enough", 10, 3, 1),  # 200 MiB/s: 1015 ahead; 100 freed, 2/3 of the rise left
    ("two-needed", 20, 3, 2),  # 400 MiB/s: 1125 ahead
    ("all-of-them", 60, 3, 3),  # a rise the pool cannot outrun
]


@pytest.mark.parametrize(
    "rise,busy,terminated", [r[1:] for r in TERMINATE], ids=[r[0] for r in TERMINATE]
)
def test_as_many_as_the_projection_needs(rise: float, busy: int, terminated: int) -> None:
    p = policy()
    kids = Children(*(child(pid, 100, busy=True) for pid in range(busy)))
    check(p, 0.0, 905, busy, kids)
    actions = check(p, 0.05, 905 + rise, busy, kids)
    assert sum(1 for action, _, _ in actions if action == "terminate") == terminated


def test_after_terminating_it_waits_for_the_memory_to_be_freed() -> None:
    p = policy()
    kids = Children(child(1, 100, busy=True), child(2, 100, busy=True))
    check(p, 0.0, 820, 2, kids)
    assert ("terminate", "hard", 1) in check(p, 0.05, 900, 2, kids)
    assert check(p, 0.1, 960, 1, kids) == []  # within HARD_COOLDOWN
    assert ("terminate", "hard", 1) in check(p, 0.2, 990, 1, kids)


def test_a_fast_rise_under_high_is_not_cut() -> None:
    """Children that copy at once rise as fast (the CPUs set the pace) whether the pool
    fits or not; under the high mark the brake only watches closely."""
    p = policy(target=7)
    kids = Children(*(child(pid, 90, busy=True) for pid in range(7)))
    assert check(p, 0.0, 800, 7, kids) == []
    assert check(p, 0.05, 860, 7, kids) == []  # 1200 MiB/s, 1460 ahead, but under 900
    assert p.next_delay(860 * MIB) == Policy.FAST
    assert kids.reads == []


# -- paused ----------------------------------------------------------------------------
def test_paused_it_retires_until_the_pool_fits_then_resumes() -> None:
    """After a burst, three children grown to 100 MiB and the rest young at 20. With 7
    children (working set 400, shared 400 - 220 = 180) the pool at full cost needs
    180 + 700 = 880, under the high mark: resume. With 10 (600, shared 160) it needs
    1160: retire the largest idle child first, then wait for it to exit."""
    p = policy()
    p.paused = True
    kids = Children(*(child(pid, 100) for pid in range(3)), *(child(p_, 20) for p_ in range(3, 7)))
    assert check(p, 0.0, 400, 7, kids) == [("resume", "low", None)]
    assert not p.paused

    p = policy()
    p.paused = True
    many = [*(child(pid, 100) for pid in range(3)), *(child(p_, 20) for p_ in range(3, 10))]
    kids = Children(*many)
    # 160 + 10 x 100 = 1160: 260 over, 3 children's cost: the three grown ones go
    assert check(p, 0.0, 600, 10, kids) == [("retire", "low", pid) for pid in (0, 1, 2)]
    kids.children = many[3:]  # gone: 300 + 7 young at the removed cost 100 fits
    assert check(p, 0.5, 300, 7, kids) == [("resume", "low", None)]


def test_paused_above_low_it_retires_even_when_the_pool_fits() -> None:
    """Idle children keep what they copied: waiting would free nothing."""
    p = policy()
    p.paused = True
    kids = Children(child(1, 100), child(2, 300, busy=True))
    assert check(p, 0.0, 850, 2, kids) == [("retire", "low", 1)]


def test_removed_children_still_count_for_a_minute() -> None:
    """Retiring the largest leaves the young: without memory of what the removed ones
    cost, the pool would look cheap and resume into the same burst."""
    p = policy()
    p.paused = True
    p.removed = [(0.0, 100 * MIB)]
    young = Children(*(child(pid, 20) for pid in range(8)))
    # shared = 340 - 160 = 180; at the removed cost 100: 180 + 800 = 980 > 900
    assert check(p, 1.0, 340, 8, young) == [("retire", "low", 0)]
    p.removed = [(0.0, 100 * MIB)]
    p.quiet_until = 0.0
    p.last = None
    assert check(p, Policy.REMEMBER + 1, 340, 8, young) == [("resume", "low", None)]


# -- growing back ----------------------------------------------------------------------
def test_grow_one_child_at_a_time_while_one_more_fits() -> None:
    p = policy(target=8)
    kids = Children(*(child(pid, 100) for pid in range(5)))
    # shared 100: 5 x 100 + 100 = 600; one more: 700 <= 900
    actions = p.decide(600 * MIB, 0.0, 5, kids)
    assert [(a.action, a.cost // MIB, a.projected // MIB) for a in actions] == [("grow", 100, 600)]
    assert p.decide(700 * MIB, 0.25, 6, kids) == [], "calm after a grow"
    kids.children.append(child(6, 100))
    grown = p.decide(700 * MIB, 0.25 + Policy.CALM_AFTER_GROW * INTERVAL, 6, kids)
    assert [a.action for a in grown] == ["grow"]


GROW = [
    # id, working set, children (private), target, expected
    ("room", 600, [100] * 5, 8, ["grow"]),
    ("room-for-exactly-one", 790, [100] * 5, 8, ["grow"]),  # 790 + 100 = 890
    ("at-target", 600, [100] * 8, 8, []),
    ("young-count-at-full-cost", 500, [100, 20, 20, 20, 20], 8, []),  # 820 + 100 > 900
]


@pytest.mark.parametrize(
    "working_set,privates,target,expected", [r[1:] for r in GROW], ids=[r[0] for r in GROW]
)
def test_grow_only_towards_the_target_and_only_when_it_fits(
    working_set: int, privates: list[int], target: int, expected: list[str]
) -> None:
    p = policy(target=target)
    kids = Children(*(child(pid, private) for pid, private in enumerate(privates)))
    actions = p.decide(working_set * MIB, 0.0, len(privates), kids)
    assert [a.action for a in actions] == expected


def test_no_growing_soon_after_pressure_or_a_resume() -> None:
    p = policy()
    kids = Children(child(1, 50))
    calm = Policy.CALM_AFTER_PRESSURE * INTERVAL
    check(p, 0.0, 910, 2, kids)  # pause
    assert check(p, calm + 0.5, 300, 2, kids) == [("resume", "low", None)]
    assert check(p, calm + 0.75, 300, 2, kids) == [], "resumed children burst: wait"
    after = calm + 0.5 + calm
    assert [a for a, _, _ in check(p, after, 300, 2, kids)] == ["grow"]


def test_no_room_waits_before_reading_the_children_again() -> None:
    p = policy()
    kids = Children(*(child(pid, 100) for pid in range(6)), child(6, 50))
    assert check(p, 0.0, 790, 7, kids) == []  # 840 + 100 > 900
    assert check(p, 0.25, 790, 7, kids) == []
    assert kids.reads == [None], "the second check did not read them"


# -- pacing ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rate,working_set,delay",
    [
        (0, 500, INTERVAL),  # steady: the configured interval
        (0, 800, Policy.FAST),  # at the low mark: often
        (100, 500, INTERVAL),  # far from it: 3 s away at 100 MiB/s
        (1000, 700, Policy.FAST),  # 0.1 s away: the floor
        (600, 500, INTERVAL),  # 0.5 s away: check at half of that
    ],
)
def test_next_check_comes_before_the_low_mark_can_be_reached(
    rate: float, working_set: float, delay: float
) -> None:
    p = policy()
    p.rate = rate * MIB
    assert p.next_delay(int(working_set * MIB)) == pytest.approx(delay)
