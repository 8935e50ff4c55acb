"""The hand-over gate runs on the event loop for every task: it reads nothing per task.

Driven as in test_governor.py (the real governor, ledger and policy over a pool of
fake children). The view a decision is taken on is built once per working-set reading;
a task that does not fit on the figures at hand is held without reading /proc or the
cgroup, and weighed again at the loop's next turn with both read then.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from celery_guard.actuator import Verdict
from celery_guard.governor import FRESH

from .test_governor import LIMIT, governor
from .test_terminate_lines import MIB


@dataclass
class Request:
    id: str
    name: str = "t"


class Counting:
    """A reader that counts its calls."""

    def __init__(self, value: int) -> None:
        self.value, self.calls = value, 0

    def __call__(self, *args: object) -> int:
        self.calls += 1
        return self.value


def test_the_gate_reads_the_main_process_once_per_working_set_reading(tmp_path: Path) -> None:
    budget, _ = governor(tmp_path, 4)
    budget.main_rss = main_rss = Counting(100 * MIB)  # type: ignore[assignment]
    budget.task_accepted(101, "id-101", "t")  # one task in flight: no "idle" shortcut
    budget.reading = (time.monotonic(), 300 * MIB)  # a new reading: the view is built anew
    budget.hub.later.clear()
    for n in range(20):  # each handed to child 102, run, and finished
        assert budget.gate(Request(f"id-{n}")) is Verdict.HAND_OVER
        budget.task_accepted(102, f"id-{n}", "t")
        budget.task_ready(102, f"id-{n}")
    assert main_rss.calls == 0  # not in a decision: at the loop's next turn, once
    refreshes = [c for _, c in budget.hub.later if c == budget._refresh]
    assert len(refreshes) == 1
    refreshes[0]()
    assert main_rss.calls == 1
    assert budget.cached_view is not None
    view = budget.cached_view[1]
    # older than FRESH, far below the marks: it serves on (an old reading is only
    # cautious, the tasks finished since count at their peak) and nothing is asked for
    budget.cached_view = (reading := (time.monotonic() - 2 * FRESH, 300 * MIB), view)
    budget.reading = reading
    budget.hub.later.clear()
    for n in range(2):
        assert budget.gate(Request(f"id-late-{n}")) is Verdict.HAND_OVER
        budget.task_accepted(102, f"id-late-{n}", "t")
        budget.task_ready(102, f"id-late-{n}")
    assert main_rss.calls == 1 and budget.reading is reading
    assert [c for _, c in budget.hub.later if c == budget._refresh] == []


def test_an_old_reading_near_the_low_mark_is_read_again_at_the_loops_next_turn(
    tmp_path: Path,
) -> None:
    budget, _ = governor(tmp_path, 4)
    budget.main_rss = main_rss = Counting(100 * MIB)  # type: ignore[assignment]
    budget.task_accepted(101, "id-101", "t")
    view = budget.fresh_view()
    calls = main_rss.calls
    near = view.marks.low
    # younger than FRESH near the mark: it serves
    budget.reading = reading = (time.monotonic() + 3600, near)
    budget.cached_view = (reading, replace(view, unreclaimable=near))
    budget.hub.later.clear()
    assert budget.gate(Request("id-0")) is Verdict.HAND_OVER
    assert [c for _, c in budget.hub.later if c == budget._refresh] == []
    # older: the decision takes it and asks for a new one at the loop's next turn, once
    budget.reading = reading = (time.monotonic() - 2 * FRESH, near)
    budget.cached_view = (reading, replace(view, unreclaimable=near))
    for n in range(1, 3):
        assert budget.gate(Request(f"id-{n}")) is Verdict.HAND_OVER
    assert main_rss.calls == calls and budget.reading is reading
    refreshes = [c for _, c in budget.hub.later if c == budget._refresh]
    assert len(refreshes) == 1
    refreshes[0]()
    assert main_rss.calls == calls + 1 and budget.reading is not reading


def test_after_the_pool_changed_the_gate_reads_nothing_and_asks_for_a_new_view(
    tmp_path: Path,
) -> None:
    """A child replaced or retired, a plan or a resize changes the pool's shape: the
    next decision takes the figures at hand on the new shape (building a view reads the
    cgroup and /proc, ten times the rest of a decision) and the view is built again at
    the loop's next turn."""
    budget, pool = governor(tmp_path, 4)
    budget.main_rss = main_rss = Counting(100 * MIB)  # type: ignore[assignment]
    budget.task_accepted(101, "id-101", "t")
    budget.reading = (time.monotonic() + 3600, 300 * MIB)  # fresh all along
    budget.fresh_view()
    reading = budget.reading
    assert budget.gate(Request("id-0")) is Verdict.HAND_OVER
    assert main_rss.calls == 1
    budget.hub.later.clear()
    del pool.children[104]  # a child left: three now
    budget.requested = 3
    assert budget.gate(Request("id-1")) is Verdict.HAND_OVER
    assert main_rss.calls == 1 and budget.reading is reading  # nothing read
    assert budget.cached_view is not None
    view = budget.cached_view[1]
    assert (view.size, view.target, view.requested) == (3, budget.target, 3)
    refreshes = [c for _, c in budget.hub.later if c == budget._refresh]
    assert len(refreshes) == 1
    refreshes[0]()
    assert main_rss.calls == 2


def test_a_task_that_does_not_fit_is_held_without_a_read_then_weighed_with_one(
    tmp_path: Path,
) -> None:
    budget, pool = governor(tmp_path, 4)
    high = int(LIMIT * 0.95)
    budget.task_accepted(101, "id-101", "t")
    # The figures at hand: a working set past the high mark, read just now; the cgroup
    # has since freed memory (its file says 300 MiB).
    reading = (time.monotonic() + 3600, high + 10 * MIB)
    budget.reading = reading
    pool.rss = rss = Counting(200 * MIB)  # type: ignore[method-assign]
    started: list[Request] = []
    pool._start_task = started.append
    request = Request("id-held")
    pool.held.append(request)
    pool.release()
    assert started == [] and list(pool.held) == [request]
    assert budget.reading is reading and rss.calls == 0  # the decision read nothing
    rechecks = [callback for delay, callback in budget.hub.later if callback == budget._recheck]
    assert len(rechecks) == 1
    pool.release()  # held again: one re-check is scheduled, not one per attempt
    assert [c for _, c in budget.hub.later if c == budget._recheck] == rechecks
    # the re-check reads the cgroup and the running child's growth once, before it
    # weighs the held tasks: the decisions themselves read nothing
    order: list[str] = []
    gate = budget.gate

    def deciding(request: Request) -> bool | None:
        order.append("decide")
        return gate(request)

    def reading(pid: int) -> int:
        order.append("read")
        return rss(pid)

    pool.gate, pool.rss = deciding, reading  # type: ignore[method-assign]
    second = Request("id-held-2")
    pool.held.append(second)
    rechecks[0]()
    assert started == [request, second] and not pool.held
    assert budget.reading is not None and budget.reading[1] == 300 * MIB
    assert order == ["read", "decide", "decide"]  # the running child's growth, read first


class Walked(dict):
    """The ledger's children, counting every walk of them."""

    walks = 0

    def _walked(self) -> None:
        type(self).walks += 1

    def values(self):  # type: ignore[no-untyped-def]
        self._walked()
        return super().values()

    def items(self):  # type: ignore[no-untyped-def]
        self._walked()
        return super().items()

    def keys(self):  # type: ignore[no-untyped-def]
        self._walked()
        return super().keys()

    def __iter__(self):  # type: ignore[no-untyped-def]
        self._walked()
        return super().__iter__()


def test_a_hand_over_walks_no_child_whether_the_task_is_admitted_or_held(tmp_path: Path) -> None:
    """What a decision weighs is summed as the events come (``Ledger._count``): the
    gate and a task's end look children up by pid, and never walk all of them (what
    the children will still copy is summed again only when one comes, goes, leaves or
    is measured: here, once, at the first decision)."""
    budget, _ = governor(tmp_path, 4)
    budget.task_accepted(101, "id-101", "t")  # one task in flight: no "idle" shortcut
    budget.reading = (time.monotonic() + 3600, 300 * MIB)  # fresh all along
    budget.fresh_view()
    assert budget.gate(Request("id-first")) is Verdict.HAND_OVER
    budget.ledger.children = Walked(budget.ledger.children)
    Walked.walks = 0
    for n in range(20):
        assert budget.gate(Request(f"id-{n}")) is Verdict.HAND_OVER
        budget.task_handed(Request(f"id-{n}"))
        budget.task_accepted(102, f"id-{n}", "t")
        budget.task_ready(102, f"id-{n}")
    assert Walked.walks == 0
    budget.reading = (time.monotonic() + 3600, int(LIMIT * 0.95) + 10 * MIB)  # past high
    assert budget.gate(Request("id-held")) is Verdict.HOLD
    assert Walked.walks == 0


def test_a_tasks_end_builds_no_view_unless_its_child_may_be_recycled_or_retired(
    tmp_path: Path,
) -> None:
    """Most tasks end in a child that keeps less than a fork is worth: the governor
    tells it from the ledger alone, without the view a recycle is weighed on."""
    budget, _ = governor(tmp_path, 4)
    budget.reading = (time.monotonic() + 3600, 300 * MIB)  # fresh all along
    budget.fresh_view()
    views: list[float] = []
    view = budget.view

    def counted(now: float, fresh: float = FRESH):  # type: ignore[no-untyped-def]
        views.append(now)
        return view(now, fresh)

    budget.view = counted  # type: ignore[method-assign]
    child = budget.ledger.children[102]
    budget.task_accepted(102, "id-0", "t")
    budget.task_ready(102, "id-0")
    assert views == []  # it keeps nothing beyond its baseline
    assert not child.young
    child.rss += 64 * MIB  # its next task kept 64 MiB
    budget.task_accepted(102, "id-1", "t")
    budget.task_ready(102, "id-1")
    assert len(views) == 1
