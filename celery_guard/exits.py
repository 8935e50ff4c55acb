"""Why a pool child exited, and what its task becomes.

A child killed by SIGKILL was killed by the guard (it says so when it sends the signal),
by the kernel's OOM killer (the cgroup's ``oom_kill`` counter rose), or by someone else.
The counter can rise by two for two children killed at once while their exits are seen
one by one, so each rise is a credit that one unexplained SIGKILL takes. Decisions are
kept per pid, so every callback that asks about one exit gets the same answer.

A task stopped for memory fails with ``MemoryLimitExceeded``; when Celery would re-deliver
a lost task (late acks and ``task_reject_on_worker_lost``) it goes back to the queue, but
only ``max_kills`` times for one task id: a task that cannot fit must not loop forever.
"""

from __future__ import annotations

import signal
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import MemoryKilled, MemoryLimitExceeded

#: What an exit was: killed by the guard for memory, by the kernel, or anything else.
GUARD, OOM, OTHER = "guard", "oom", "other"
#: Pids and task ids remembered (the oldest are forgotten first).
KEPT = 10_000


def _remember(table: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > KEPT:
        table.popitem(last=False)


@dataclass(frozen=True)
class Kill:
    """A child the guard killed, and why (for the task's failure)."""

    reason: str  # what the line says: "working set 745 MiB of 768 MiB" ...
    limit: int = 0  # bytes, when a task's own limit was the reason


class ExitCauses:
    """The cause of each child's exit, decided once."""

    def __init__(self, oom_kills_seen: int | None) -> None:
        self.seen = oom_kills_seen  # the cgroup's oom_kill counter when last read
        self.credits = 0  # rises of the counter not yet matched to a child
        self.killed: OrderedDict[int, Kill] = OrderedDict()
        self.causes: OrderedDict[int, str] = OrderedDict()

    def killing(self, pid: int, kill: Kill) -> None:
        """The guard is about to SIGKILL ``pid``."""
        _remember(self.killed, pid, kill)

    def cause(self, pid: int, exitcode: int | None, oom_kills_now: int | None) -> str:
        """GUARD, OOM or OTHER; ``oom_kills_now`` is the counter read now (None: unknown)."""
        if pid in self.causes:
            return self.causes[pid]
        if pid in self.killed:
            cause = GUARD
        elif exitcode != -signal.SIGKILL:
            cause = OTHER
        else:
            if oom_kills_now is not None:
                if self.seen is not None and oom_kills_now > self.seen:
                    self.credits += oom_kills_now - self.seen
                self.seen = oom_kills_now
            cause = OTHER
            if self.credits > 0:
                self.credits -= 1
                cause = OOM
        _remember(self.causes, pid, cause)
        return cause

    def kill_of(self, pid: int) -> Kill | None:
        return self.killed.get(pid)

    def forget(self, pid: int) -> None:
        """A new child has ``pid``: what the last process with it died of is not its."""
        self.killed.pop(pid, None)
        self.causes.pop(pid, None)


def failure(
    message: str, count: int, max_kills: int, acks_late: bool, reject_on_worker_lost: bool
) -> tuple[Exception, str]:
    """The exception a task stopped for memory fails with, and what then happens to it:
    ``requeue`` (a ``WorkerLostError`` too, so Celery re-delivers it) or ``fail``."""
    if acks_late and reject_on_worker_lost and count < max_kills:
        return MemoryKilled(message), "requeue"
    return MemoryLimitExceeded(message), "fail"


@dataclass(frozen=True)
class LostJob:
    """A task whose child exited before it finished, as the pool reports it."""

    pid: int
    exitcode: int | None
    task_id: str
    name: str
    acks_late: bool
    reject_on_worker_lost: bool


@dataclass(frozen=True)
class Outcome:
    cause: str  # GUARD | OOM
    then: str  # requeue | fail
    kills: int  # memory kills of this task id so far


class MemoryFailures:
    """Turns a task lost to a memory kill into ``MemoryLimitExceeded``; other losses stay
    Celery's ``WorkerLostError``. What it decided is kept by pid for the exit's line.

    Memory kills are counted by task id from ``known`` on (what the last worker counted:
    ``history.recall_kills``), so a task that took its child down is not re-delivered
    forever across restarts."""

    def __init__(
        self,
        cause: Callable[[int, int | None], str],
        max_kills: int,
        known: Mapping[str, int] | None = None,
    ) -> None:
        self.cause = cause
        self.max_kills = max_kills
        self.kills: OrderedDict[str, int] = OrderedDict(known or {})  # by task id, bounded
        self.outcomes: OrderedDict[int, Outcome] = OrderedDict()

    def on_lost(self, lost: LostJob, causes: ExitCauses) -> Exception | None:
        cause = self.cause(lost.pid, lost.exitcode)
        if cause not in (GUARD, OOM):
            return None
        count = self.kills.get(lost.task_id, 0) + 1
        _remember(self.kills, lost.task_id, count)
        kill = causes.kill_of(lost.pid) if cause == GUARD else None
        why = kill.reason if kill else "the kernel's OOM killer stopped it"
        message = f"{lost.name}[{lost.task_id}]: {why} (memory kill {count} of this task)"
        own_limit = kill is not None and kill.limit > 0  # it would only pass it again
        error, then = failure(
            message, count, 1 if own_limit else self.max_kills,
            lost.acks_late, lost.reject_on_worker_lost,
        )  # fmt: skip
        _remember(self.outcomes, lost.pid, Outcome(cause, then, count))
        return error

    def outcome(self, pid: int) -> Outcome | None:
        return self.outcomes.pop(pid, None)

    def forget(self, pid: int) -> None:
        self.outcomes.pop(pid, None)


__all__ = [
    "GUARD",
    "OOM",
    "OTHER",
    "ExitCauses",
    "Kill",
    "LostJob",
    "MemoryFailures",
    "Outcome",
    "failure",
]
