"""The brake's decisions, apart from the pool they act on.

Given the cgroup's working set, the time and the pool's children, what to do: pause or
resume consuming, retire an idle child, terminate busy ones, grow the pool. Pure (the
children are read through a callable, only when a rule needs them), so every rule has a
table-driven test; ``governor.Brake`` carries the actions out on the worker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Child:
    pid: int
    private: int  # bytes: the memory only this child holds (USS)
    busy: bool


@dataclass(frozen=True)
class Action:
    action: str  # pause | resume | retire | terminate | grow
    level: str  # the mark that made it: hard | high | low
    child: Child | None = None  # retire, terminate
    cost: int = 0  # grow: what one child costs now (the largest child)
    projected: int = 0  # grow: the working set once every child costs that


#: Reads the pool's live children; ``busy`` True or False reads only those.
ReadChildren = Callable[[Optional[bool]], list[Child]]  # a runtime alias: Optional for 3.9


@dataclass(frozen=True)
class Marks:
    """The working-set marks, in bytes: low < high < hard < limit."""

    low: int
    high: int
    hard: int

    @classmethod
    def of(cls, limit: int, low: float, high: float, hard: float) -> Marks:
        return cls(int(limit * low), int(limit * high), int(limit * hard))


def fit(working_set: int, children: list[Child], size: int, floor: int) -> tuple[int, int]:
    """(cost, projected): what one child costs, the private memory of the largest (at
    least ``floor``), and the working set once every child of a pool of ``size`` has
    grown to it.

    Young children have not copied yet; counting them at the largest child's cost keeps
    the pool from growing into a burst it cannot hold.
    """
    cost = max([c.private for c in children] + [floor])
    projected = working_set + sum(cost - c.private for c in children)
    projected += max(size - len(children), 0) * cost  # started, not yet readable
    return cost, projected


def _largest_first(children: list[Child]) -> list[Child]:
    return sorted(children, key=lambda c: -c.private)


class Policy:
    """Between the marks it does nothing, so a pool that fits stays as it is.

    - Past the high mark, and the working set projected LOOKAHEAD seconds ahead at the
      rate it rises reaches the hard mark: pause, and stop children (busy ones, the
      largest first, then idle ones that hold memory), as many as it takes to bring the
      projection back under the high mark. Not
      earlier: children that copy at once rise as fast whether the pool fits or not (the
      CPUs set the pace), only the level tells them apart.
    - Past the high mark otherwise: pause and retire idle children, the largest first,
      until the working set is under the high mark.
    - Paused: go on retiring idle children while above the low mark, or while the pool
      would not fit under the high mark at the largest child's cost; then resume.
    - Below the low mark, not paused: grow by one child when one more still fits.
    """

    FAST = 0.05  # seconds between checks above the low-water mark
    COOLDOWN = 0.3  # seconds after retiring a child: time for it to exit and free memory
    HARD_COOLDOWN = 0.1  # after terminating: SIGKILL frees at once
    LOOKAHEAD = 0.5  # seconds: act on where the working set will be, not where it is
    CALM_AFTER_PRESSURE = 10  # intervals without growing after any pressure
    CALM_AFTER_GROW = 5  # intervals between two grows
    CALM_AFTER_NO_ROOM = 20  # intervals before reading the children again for a grow
    REMEMBER = 60.0  # seconds a removed child's cost still counts: the evidence is gone

    def __init__(self, marks: Marks, interval: float, target: int, estimate: int) -> None:
        self.marks = marks
        self.interval = interval
        self.target = target
        self.estimate = estimate
        self.paused = False
        self.quiet_until = 0.0
        self.hard_quiet_until = 0.0
        self.grow_after = 0.0
        self.last: tuple[float, int] | None = None  # (time, working set) at the last check
        self.rate = 0.0  # bytes per second the working set rose by at the last check
        self.removed: list[tuple[float, int]] = []  # (time, private) of children removed

    def next_delay(self, working_set: int) -> float:
        """Check again before the working set can reach the low mark at the rate it is
        rising; above that mark, check often."""
        if working_set >= self.marks.low:
            return self.FAST
        if self.rate > 0:
            until_low = (self.marks.low - working_set) / self.rate / 2
            return min(self.interval, max(until_low, self.FAST))
        return self.interval

    def project(self, working_set: int, now: float) -> int:
        """The working set LOOKAHEAD seconds from now, at the rate it rose since the last
        check: children that copy hundreds of MiB a second outrun a check that waits."""
        last, self.last = self.last, (now, working_set)
        if last is None or now <= last[0]:
            return working_set
        self.rate = max((working_set - last[1]) / (now - last[0]), 0.0)
        return working_set + int(self.rate * self.LOOKAHEAD)

    def decide(
        self, working_set: int, now: float, size: int, children: ReadChildren
    ) -> list[Action]:
        marks = self.marks
        ahead = self.project(working_set, now)
        if working_set >= marks.high and ahead >= marks.hard:
            return self._pressure("hard", now) + self._stop(working_set, now, size, children)
        if working_set >= marks.high:
            actions = self._retire("high", marks.high, working_set, now, size, children)
            return self._pressure("high", now) + actions
        if self.paused:
            return self._while_paused(working_set, now, size, children)
        if working_set < marks.low:
            return self._grow(working_set, now, size, children)
        return []

    # -- the rules ---------------------------------------------------------------------
    def _pressure(self, level: str, now: float) -> list[Action]:
        self.grow_after = now + self.CALM_AFTER_PRESSURE * self.interval
        if self.paused:
            return []
        self.paused = True
        return [Action("pause", level)]

    def _stop(
        self, working_set: int, now: float, size: int, children: ReadChildren
    ) -> list[Action]:
        """As many children as it takes to bring the projection under the high mark. Busy
        ones first, the largest first: they are the rise, and each frees what it holds
        and stops its share. Then, if that is not enough, idle ones, the largest first
        (children that ran leaky tasks hold memory without a task; nothing is lost). The
        idle ones are read only then: each read costs a CPU that copying children want.
        One child is always left."""
        if now < self.hard_quiet_until:
            return []
        busy = _largest_first(children(True))
        share = self.rate * self.LOOKAHEAD / len(busy) if busy else 0.0
        left = len(busy)
        actions: list[Action] = []

        def enough() -> bool:
            return bool(actions) and working_set + share * left <= self.marks.high

        for child in busy:
            if enough():
                break
            working_set -= self._take(actions, "terminate", "hard", child, now)
            left -= 1
        if not enough():
            for child in _largest_first(children(False)):
                if enough() or size - len(actions) <= 1:
                    break
                working_set -= self._take(actions, "retire", "hard", child, now)
        if actions:
            self.hard_quiet_until = now + self.HARD_COOLDOWN
        return actions

    def _retire(
        self,
        level: str,
        mark: int,
        working_set: int,
        now: float,
        size: int,
        children: ReadChildren,
        at_least: int = 1,
    ) -> list[Action]:
        """Idle children, the largest first, as many as it takes to bring the working set
        under ``mark`` (and ``at_least`` of them); then a pause for them to exit."""
        if now < self.quiet_until or size <= 1:
            return []
        actions: list[Action] = []
        for child in _largest_first(children(False)):
            enough = len(actions) >= at_least and working_set <= mark
            if enough or size - len(actions) <= 1:
                break
            working_set -= self._take(actions, "retire", level, child, now)
        if actions:
            self.quiet_until = now + self.COOLDOWN
        return actions

    def _take(
        self, actions: list[Action], action: str, level: str, child: Child, now: float
    ) -> int:
        """Add a terminate or retire; the child's cost is remembered (see ``_fit``).
        Returns what it frees."""
        actions.append(Action(action, level, child))
        self.removed.append((now, child.private))
        return child.private

    def _while_paused(
        self, working_set: int, now: float, size: int, children: ReadChildren
    ) -> list[Action]:
        """Idle children keep what they copied, so waiting frees nothing: retire them
        until below the low mark and until the pool fits at what its largest child costs.
        Resuming earlier would start the same burst again."""
        everyone = children(None)
        cost, projected = self._fit(working_set, now, everyone, size)
        over = -(-(projected - self.marks.high) // cost) if projected > self.marks.high else 0
        if working_set >= self.marks.low or (over and size > 1):
            # each child retired takes one child's cost off the projection
            idle = [c for c in everyone if not c.busy]
            return self._retire(
                "low", self.marks.low, working_set, now, size, lambda _: idle, max(over, 1)
            )
        self.paused = False
        self.grow_after = now + self.CALM_AFTER_PRESSURE * self.interval  # let them settle
        return [Action("resume", "low")]

    def _fit(
        self, working_set: int, now: float, children: list[Child], size: int
    ) -> tuple[int, int]:
        """``fit`` at a cost no lower than what the children removed lately had: after
        retiring the largest, the young ones left would make the pool look cheap."""
        self.removed = [(t, p) for t, p in self.removed if now - t < self.REMEMBER]
        floor = max((p for _, p in self.removed), default=0)
        if not children:  # nothing measured yet: the startup estimate
            floor = max(floor, self.estimate)
        return fit(working_set, children, size, floor)

    def _grow(
        self, working_set: int, now: float, size: int, children: ReadChildren
    ) -> list[Action]:
        if size >= self.target or now < self.grow_after:
            return []
        cost, projected = self._fit(working_set, now, children(None), size)
        if projected + cost > self.marks.high:
            self.grow_after = now + self.CALM_AFTER_NO_ROOM * self.interval
            return []
        self.grow_after = now + self.CALM_AFTER_GROW * self.interval
        return [Action("grow", "low", cost=cost, projected=projected)]


__all__ = ["Action", "Child", "Marks", "Policy", "ReadChildren", "fit"]
