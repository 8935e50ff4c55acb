"""Tests for celery_guard.exits: why a child exited, and what its task becomes."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from billiard.exceptions import WorkerLostError

from celery_guard import history
from celery_guard.errors import MemoryKilled, MemoryLimitExceeded
from celery_guard.exits import (
    GUARD,
    KEPT,
    OOM,
    OTHER,
    ExitCauses,
    Kill,
    LostJob,
    MemoryFailures,
    Outcome,
    failure,
)

KILLED = -signal.SIGKILL


def test_two_children_oom_killed_at_once_are_both_oom_kills() -> None:
    """The kernel kills two children; their exits are seen one after the other, and by the
    first the counter has risen by two. Each takes one rise: both are OOM kills."""
    causes = ExitCauses(oom_kills_seen=3)
    assert causes.cause(10, KILLED, oom_kills_now=5) == OOM
    assert causes.cause(11, KILLED, oom_kills_now=5) == OOM
    assert causes.cause(12, KILLED, oom_kills_now=5) == OTHER  # a third is someone's kill -9


def test_a_kill_by_the_guard_is_not_an_oom_kill_even_when_the_counter_rose() -> None:
    causes = ExitCauses(oom_kills_seen=0)
    causes.killing(10, Kill("working set at the hard mark"))
    assert causes.cause(10, KILLED, oom_kills_now=1) == GUARD
    # the rise is kept for the child the kernel did kill
    assert causes.cause(11, KILLED, oom_kills_now=1) == OOM
    assert causes.kill_of(10) == Kill("working set at the hard mark")


@pytest.mark.parametrize(
    ("exitcode", "counter", "expected"),
    [
        (0, 9, OTHER),  # a clean exit, whatever the counter
        (155, 9, OTHER),  # billiard's recycle
        (-signal.SIGTERM, 9, OTHER),
        (KILLED, 0, OTHER),  # SIGKILL and no rise: someone's kill -9
        (KILLED, None, OTHER),  # the counter cannot be read: not called an OOM kill
        (KILLED, 1, OOM),
    ],
)
def test_the_cause_of_one_exit(exitcode: int, counter: int | None, expected: str) -> None:
    assert ExitCauses(oom_kills_seen=0).cause(10, exitcode, counter) == expected


def test_each_exit_is_decided_once() -> None:
    """The pool asks about one exit from two callbacks (the job lost, the process down):
    the second answer is the first, whatever the counter says by then."""
    causes = ExitCauses(oom_kills_seen=0)
    assert causes.cause(10, KILLED, 1) == OOM
    assert causes.cause(10, KILLED, 7) == OOM
    assert causes.cause(11, KILLED, 7) == OOM  # 6 more rises: still counted


def test_what_it_remembers_is_bounded() -> None:
    causes = ExitCauses(oom_kills_seen=0)
    for pid in range(KEPT + 100):
        causes.cause(pid, 0, None)
    assert len(causes.causes) == KEPT
    failures = MemoryFailures(lambda pid, code: GUARD, max_kills=3)
    for i in range(KEPT + 100):
        failures.on_lost(LostJob(i, KILLED, str(i), "app.t", True, True), causes)
    assert len(failures.kills) == KEPT and len(failures.outcomes) == KEPT


@pytest.mark.parametrize(
    ("count", "acks_late", "reject", "then", "kind"),
    [
        (1, False, False, "fail", MemoryLimitExceeded),  # early acks: cannot come back
        (1, True, False, "fail", MemoryLimitExceeded),  # late acks alone: acknowledged
        (1, True, True, "requeue", MemoryKilled),  # Celery re-delivers a lost worker
        (2, True, True, "requeue", MemoryKilled),
        (3, True, True, "fail", MemoryLimitExceeded),  # the third kill: no more
    ],
)
def test_what_a_task_stopped_for_memory_becomes(
    count: int, acks_late: bool, reject: bool, then: str, kind: type
) -> None:
    error, decided = failure("why", count, 3, acks_late, reject)
    assert decided == then and type(error) is kind
    assert isinstance(error, MemoryLimitExceeded)  # one class to catch either way
    # only the re-delivered kind is a WorkerLostError: Celery requeues only those
    assert isinstance(error, WorkerLostError) == (then == "requeue")
    assert type(error).__name__ == "MemoryLimitExceeded" or then == "requeue"


def test_a_task_killed_again_and_again_fails_in_the_end() -> None:
    """Late acks with reject_on_worker_lost: the same task id, killed for memory three
    times, comes back twice and fails the third time, so it cannot loop forever."""
    causes = ExitCauses(oom_kills_seen=0)
    failures = MemoryFailures(lambda pid, code: causes.cause(pid, code, None), max_kills=3)
    outcomes = []
    for pid in (100, 101, 102):
        causes.killing(pid, Kill("the hard mark"))
        lost = LostJob(pid, KILLED, "task-1", "app.hog", True, True)
        error = failures.on_lost(lost, causes)
        assert error is not None and "app.hog[task-1]" in str(error)
        outcomes.append(failures.outcome(pid))
    assert [(o.then, o.kills, o.cause) for o in outcomes if o] == [
        ("requeue", 1, GUARD), ("requeue", 2, GUARD), ("fail", 3, GUARD)
    ]  # fmt: skip


def test_the_next_worker_goes_on_counting_a_tasks_memory_kills(tmp_path: Path) -> None:
    """Killed once in a worker that then stopped, and once in the next (a restart, a
    new container): with a state file the third kill in a third worker fails the task,
    as three kills in one worker would; without one each worker starts from none."""
    path = str(tmp_path / "state.json.kills")
    outcomes = []
    for pid in (100, 101, 102):  # each kill in a new worker's MemoryFailures
        causes = ExitCauses(oom_kills_seen=0)
        known = history.recall_kills(path)  # as telemetry.Collector does at start
        failures = MemoryFailures(lambda p, c: causes.cause(p, c, None), 3, known)  # noqa: B023
        causes.killing(pid, Kill("the hard mark"))
        failures.on_lost(LostJob(pid, KILLED, "task-1", "app.hog", True, True), causes)
        history.keep_kills(path, failures.kills)  # ... and at each memory kill
        outcomes.append(failures.outcome(pid))
    assert [(o.then, o.kills) for o in outcomes if o] == [
        ("requeue", 1), ("requeue", 2), ("fail", 3)
    ]  # fmt: skip
    forgetful = MemoryFailures(lambda p, c: GUARD, 3)
    assert forgetful.on_lost(LostJob(103, KILLED, "task-1", "app.hog", True, True), causes)
    assert forgetful.outcome(103) == Outcome(GUARD, "requeue", 1)  # its first kill


def test_a_task_lost_for_another_reason_stays_a_worker_lost_error() -> None:
    causes = ExitCauses(oom_kills_seen=0)
    failures = MemoryFailures(lambda pid, code: causes.cause(pid, code, 0), max_kills=3)
    assert failures.on_lost(LostJob(5, KILLED, "t", "app.t", False, False), causes) is None
    assert failures.outcome(5) is None


def test_a_reused_pid_is_not_answered_with_the_last_childs_cause() -> None:
    """A child killed by someone's ``kill -9``; a new child takes its pid and the kernel
    OOM-kills it: the pool's process_up (the worker's exit listener) makes the guard
    forget the old answer, so the kill is an OOM kill with its ``event=oom`` line."""
    from celery_guard.telemetry import ExitListener

    from .test_adversarial_pipe import collector

    watched = collector()
    watched.read_oom_kills = lambda: counter  # type: ignore[method-assign]
    counter = 0
    watched.exits.seen = 0
    assert watched.exit_cause(100, KILLED) == OTHER
    ExitListener(watched).child_up(100)  # billiard forks a child with pid 100
    counter = 1  # and the kernel kills it
    assert watched.exit_cause(100, KILLED) == OOM
