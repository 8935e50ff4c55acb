"""The task-limit watchdog raises in the run it decided about, and only there.

The Watchdog of a pool child, in this process: its signal handler installed for this
(the main) thread, as ``start`` does in a child; the private memory it reads is a table.
A decision about a run that has ended (the watchdog's thread was late) must not raise in
the next task; no exception lands inside ``arm``/``disarm`` (their lock and Event); a run
armed while the last one was still followed is followed too.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from celery_guard.errors import MemoryLimitExceeded
from celery_guard.exits import GUARD, ExitCauses
from celery_guard.logline import parse_line
from celery_guard.task_limits import HARD, KILL, SOFT, TaskLimit
from celery_guard.telemetry import LimitHit
from celery_guard.watchdog import WATCHDOG_SIGNAL, Armed, Enforcer, Watchdog

MIB = 1024 * 1024
SMALL, LARGE = TaskLimit(hard=8 * MIB), TaskLimit(hard=512 * MIB)


@pytest.fixture
def watchdog() -> Iterator[Watchdog]:
    dog = Watchdog()
    dog.main = threading.get_ident()
    previous = signal.signal(WATCHDOG_SIGNAL, dog._on_signal)
    try:
        yield dog
    finally:
        signal.signal(WATCHDOG_SIGNAL, previous)


def _delivered() -> None:
    """Give the interpreter a few bytecode boundaries to run a pending signal handler."""
    for _ in range(1000):
        pass


def _small_then_large(watchdog: Watchdog) -> Armed:
    """A run of a small-limit task, ended; a large-limit one runs now. The small run."""
    watchdog.arm("small", "id-small", SMALL)
    small = watchdog.armed
    assert small is not None
    watchdog.disarm()
    watchdog.arm("large", "id-large", LARGE)
    return small


def test_a_decision_about_a_finished_run_is_not_raised_in_the_next(watchdog: Watchdog) -> None:
    small = _small_then_large(watchdog)
    watchdog._raise(small, MemoryLimitExceeded("small passed its limit"))
    _delivered()
    assert watchdog.pending is None
    large = watchdog.armed
    assert large is not None and large.name == "large" and large.run.limit == LARGE
    with pytest.raises(MemoryLimitExceeded, match="large"):
        watchdog._raise(large, MemoryLimitExceeded("large passed its limit"))
        _delivered()


def test_a_signal_for_an_ended_run_raises_nothing(watchdog: Watchdog) -> None:
    small = _small_then_large(watchdog)
    watchdog.pending = (small, MemoryLimitExceeded("small"))  # sent before the run ended
    watchdog._on_signal(WATCHDOG_SIGNAL, None)
    assert watchdog.pending is None


def test_no_exception_lands_inside_arm_or_disarm_and_it_is_sent_again(
    watchdog: Watchdog,
) -> None:
    watchdog.arm("large", "id-large", LARGE)
    large = watchdog.armed
    assert large is not None
    watchdog.pending = (large, MemoryLimitExceeded("large"))
    watchdog.busy = True  # the task's thread is inside arm/disarm
    watchdog._on_signal(WATCHDOG_SIGNAL, None)
    assert watchdog.pending is not None  # kept for the next check
    watchdog.busy = False
    with pytest.raises(MemoryLimitExceeded):
        watchdog._send_again(large)
        _delivered()


class Reads:
    """Private memory that grows 16 MiB a read."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        return self.calls * 16 * MIB


def test_a_run_armed_while_the_last_one_was_followed_is_followed(watchdog: Watchdog) -> None:
    """The thread follows run A; A ends and B starts before the thread looks again: B,
    which grows 16 MiB a read past its 8 MiB limit, is followed and stopped."""
    reads = Reads()
    watchdog.read_private = reads
    threading.Thread(target=watchdog._loop, daemon=True).start()
    watchdog.arm("a", "id-a", LARGE)
    deadline = time.monotonic() + 30
    while not reads.calls and time.monotonic() < deadline:
        time.sleep(0.001)  # until the thread has read A's start
    with pytest.raises(MemoryLimitExceeded, match="id-b"):
        watchdog.disarm()
        watchdog.arm("b", "id-b", SMALL)
        while time.monotonic() < deadline:  # until the watchdog raises here
            time.sleep(0.01)
    watchdog.disarm()


class KillingControl:
    """The pool: which pids were killed; ``alive`` says whether the kill found its child."""

    def __init__(self, alive: bool = True) -> None:
        self.alive = alive
        self.killed: list[tuple[int, bool]] = []

    def kill(self, pid: int, shrink: bool) -> bool:
        self.killed.append((pid, shrink))
        return self.alive


def enforcer(control: KillingControl) -> tuple[Enforcer, ExitCauses]:
    exits = ExitCauses(0)
    return Enforcer("w@h", control, exits), exits  # type: ignore[arg-type]


def test_a_task_that_did_not_stop_has_its_child_killed_and_explained(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="celery_guard")
    control = KillingControl()
    found, exits = enforcer(control)
    found.on_hit(LimitHit(41, KILL, 8 * MIB, 9 * MIB, "t-1", "app.grow"))
    assert control.killed == [(41, False)]  # the slot stays: a child replaces it
    assert exits.cause(41, -9, None) == GUARD  # its exit is the guard's, not the kernel's
    (line,) = [parse_line(r.getMessage()) for r in caplog.records]
    assert (line["event"], line["action"], line["kind"], line["task_id"]) == (
        "task_memory_limit", "killed", "hard", "t-1",
    )  # fmt: skip
    assert (line["task_limit_mib"], line["held_mib"]) == ("8.0", "9.0")


def test_a_kill_that_finds_the_child_gone_says_so(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="celery_guard")
    found, _ = enforcer(KillingControl(alive=False))
    found.on_hit(LimitHit(41, KILL, 8 * MIB, 9 * MIB, "t-1", "app.grow"))
    (line,) = [parse_line(r.getMessage()) for r in caplog.records]
    assert line["action"] == "gone"


def test_a_child_whose_task_passed_its_hard_limit_is_replaced_after_that_task() -> None:
    control = KillingControl()
    found, _ = enforcer(control)
    found.on_hit(LimitHit(41, HARD, 8 * MIB, 9 * MIB, "t-1", "app.grow"))
    found.on_hit(LimitHit(42, SOFT, 8 * MIB, 9 * MIB, "t-2", "app.grow"))
    assert control.killed == []  # the exception was raised in the task: nothing killed
    assert found.task_ready(42, "t-2") is False  # a soft limit keeps the child
    assert found.task_ready(41, "t-1") is True
    assert found.task_ready(41, "t-3") is False  # once: its replacement is a new child


def test_a_child_gone_before_its_task_ended_is_forgotten() -> None:
    found, _ = enforcer(KillingControl())
    found.on_hit(LimitHit(41, HARD, 8 * MIB, 9 * MIB, "t-1", "app.grow"))
    found.child_down(41, 0, None)
    assert found.task_ready(41, "t-1") is False  # a new child that got the pid keeps it
