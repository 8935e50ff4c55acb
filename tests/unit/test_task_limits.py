"""Tests for celery_guard.task_limits (what a task declares, and what the watchdog does
about a run) and the records the watchdog sends."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_guard.exits import GUARD, ExitCauses, Kill, LostJob, MemoryFailures
from celery_guard.task_limits import (
    GRACE,
    HARD,
    KILL,
    NONE,
    SOFT,
    LimitError,
    Run,
    TaskLimit,
    decide,
    declared,
    growth_rate,
    next_check,
    parse_limit,
)
from celery_guard.telemetry import LimitHit, parse_limit_hit

MIB = 1024 * 1024


def task(**options: Any) -> SimpleNamespace:
    return SimpleNamespace(**options)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None), ("512M", 512 * MIB), ("1.5G", 1536 * MIB), (4096, 4096),
        (" 64 MiB", 64 * MIB), ("4K", 4096), (2**63 - 1, 2**63 - 1),
    ],
)  # fmt: skip
def test_parse_limit(value: Any, expected: int | None) -> None:
    assert parse_limit(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "", "lots", "-5M", 0, -1, True, 1.5, "0", [512], "1e9",
        # as CELERY_GUARD_TASK_MEMORY_LIMIT: at least a page, at most 8 EiB (a larger int
        # reached the governor's float arithmetic and took the worker's loop down)
        4095, "4095", 10**400, 2**63,
    ],
)  # fmt: skip
def test_parse_limit_refuses(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_limit(value)


def test_declared_reads_the_options_of_each_task_and_the_defaults() -> None:
    tasks = {
        "app.both": task(memory_limit="512M", soft_memory_limit="400M"),
        "app.hard": task(memory_limit=256 * MIB),
        "app.soft": task(soft_memory_limit="64M"),
        "app.none": task(),
        "celery.chord_unlock": task(),  # Celery's own: no default for them
    }
    assert declared(tasks) == {
        "app.both": TaskLimit(512 * MIB, 400 * MIB),
        "app.hard": TaskLimit(256 * MIB, None),
        "app.soft": TaskLimit(None, 64 * MIB),
    }
    with_defaults = declared(tasks, default_hard=1024 * MIB, default_soft=768 * MIB)
    assert with_defaults["app.none"] == TaskLimit(1024 * MIB, 768 * MIB)
    assert with_defaults["app.hard"] == TaskLimit(256 * MIB, None)  # its own wins, whole
    assert "celery.chord_unlock" not in with_defaults


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"memory_limit": "huge"}, "memory_limit"),
        ({"soft_memory_limit": -1}, "soft_memory_limit"),
        ({"memory_limit": "100M", "soft_memory_limit": "100M"}, "soft_memory_limit"),
        ({"memory_limit": "100M", "soft_memory_limit": "200M"}, "soft_memory_limit"),
    ],
)
def test_a_bad_limit_names_the_task_and_the_option(options: dict[str, Any], option: str) -> None:
    with pytest.raises(LimitError) as error:
        declared({"app.t": task(**options)})
    assert (error.value.task, error.value.option) == ("app.t", option)
    assert str(error.value).startswith(f"app.t.{option}=")


LIMIT = TaskLimit(hard=100 * MIB, soft=60 * MIB)


@pytest.mark.parametrize(
    ("held", "soft_raised", "hard_at", "now", "expected"),
    [
        (10, False, None, 0.0, NONE),
        (60, False, None, 0.0, SOFT),  # at the soft limit: raised once
        (80, True, None, 0.0, NONE),  # ... and not again
        (100, True, None, 0.0, HARD),  # at the hard limit: MemoryLimitExceeded in the task
        (100, False, None, 0.0, HARD),  # straight past the soft one: the hard one only
        (150, True, 5.0, 5.5, NONE),  # raised 0.5 s ago: it may be unwinding
        (150, True, 5.0, 5.0 + GRACE, KILL),  # still over after the grace: stop the child
        (50, True, 5.0, 9.0, NONE),  # it let go of the memory: nothing more to do
    ],
)
def test_decide(held: int, soft_raised: bool, hard_at: float | None, now: float,
                expected: str) -> None:  # fmt: skip
    run = Run(LIMIT, soft_raised, hard_at)
    assert decide(run, held * MIB, now) == expected


def test_checks_come_sooner_as_a_task_nears_its_limit() -> None:
    run = Run(LIMIT)
    assert next_check(run, 0, 0.0) == 0.5  # not growing: the slowest
    slow = next_check(run, 10 * MIB, 10 * MIB)  # 50 MiB to go at 10 MiB/s
    fast = next_check(run, 10 * MIB, 1000 * MIB)
    assert 0.02 <= fast < slow <= 0.5
    assert next_check(Run(LIMIT, True, 1.0), 150 * MIB, 0.0) == 0.02  # past it: closely


@pytest.mark.parametrize("rate_mib_s", [100, 400, 1000, 2000])
def test_by_the_next_check_a_task_has_come_at_most_half_way_to_its_limit(rate_mib_s: int) -> None:
    """10 MiB held, the soft limit at 60: growing at the rate it does, by the next check
    it has covered at most half of the 50 MiB left (25 MiB), however fast it grows, until
    the checks are as close as they go (0.02 s: 2000 MiB/s covers 40 MiB then)."""
    rate = rate_mib_s * MIB
    delay = next_check(Run(LIMIT), 10 * MIB, rate)
    assert rate * delay <= 25 * MIB or delay == 0.02
    assert delay >= 0.02


@pytest.mark.parametrize(
    ("held", "last_held", "since_last", "since_start", "expected_mib_s"),
    [
        (64, 64, 0.02, 0.4, 160),  # between two steps: its mean, not nothing
        (64, 32, 0.02, 0.4, 1600),  # a step in the last interval: that step's pace
        (0, 0, 0.02, 0.02, 0),  # not grown yet
        (-8, 0, 0.02, 0.4, 0),  # freed memory: not growing
    ],
)
def test_a_task_growing_in_steps_grows_at_its_mean_between_steps(
    held: int, last_held: int, since_last: float, since_start: float, expected_mib_s: float
) -> None:
    rate = growth_rate(held * MIB, last_held * MIB, since_last, since_start)
    assert rate == pytest.approx(expected_mib_s * MIB)


def test_a_task_between_two_steps_near_its_limit_is_checked_before_the_slowest() -> None:
    """64 MiB in 0.4 s, 96 MiB to its hard limit: at its mean it is there in 0.6 s."""
    run = Run(TaskLimit(160 * MIB))
    between_steps = growth_rate(64 * MIB, 64 * MIB, 0.02, 0.4)
    assert next_check(run, 64 * MIB, between_steps) == pytest.approx(0.3)


@settings(max_examples=300, deadline=None, database=None)
@given(
    hard=st.one_of(st.none(), st.integers(1, 1000)),
    soft=st.one_of(st.none(), st.integers(1, 1000)),
    steps=st.lists(st.tuples(st.integers(-100, 2000), st.floats(0.0, 3.0)), max_size=30),
)
def test_a_run_is_raised_in_at_most_once_per_limit_and_stopped_only_past_its_hard_limit(
    hard: int | None, soft: int | None, steps: list[tuple[int, float]]
) -> None:
    run, now, seen = Run(TaskLimit(hard, soft)), 0.0, []
    for held, dt in steps:
        now += dt
        action = decide(run, held, now)
        if action == SOFT:
            run.soft_raised = True
        elif action == HARD:
            run.hard_raised_at = now
        elif action == KILL:
            assert hard is not None and held >= hard
            run.hard_raised_at = now
        seen.append(action)
        assert next_check(run, held, abs(held) * 1.0) > 0
    assert seen.count(SOFT) <= (1 if soft is not None else 0)
    assert seen.count(HARD) <= (1 if hard is not None else 0)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("L 12 hard 104857600 110100480 a-b-c app.big task",
         LimitHit(12, "hard", 100 * MIB, 105 * MIB, "a-b-c", "app.big task")),
        ("L 12 soft 1 0 id app.t", LimitHit(12, "soft", 1, 0, "id", "app.t")),
        ("L 12 kill 1 2 id app.t", LimitHit(12, "kill", 1, 2, "id", "app.t")),
        ("L 12 other 1 2 id app.t", None),  # an unknown kind
        ("L 12 hard 0 2 id app.t", None),  # no limit of 0
        ("L 12 hard 1 -2 id app.t", None),
        ("L 0 hard 1 2 id app.t", None),
        ("L 12 hard 99999999999999999 2 id app.t", None),  # beyond any machine
        ("L 12 hard 1 2 id", None),  # no name
        ("L 12 hard \u0661 2 id app.t", None),  # digits must be ASCII
        ("L 12 hard 1 2 id app\x1b[31m", None),  # no escapes in a name that is logged
        ("T 12 hard 1 2 id app.t", None),
    ],
)  # fmt: skip
def test_parse_limit_hit(line: str, expected: LimitHit | None) -> None:
    assert parse_limit_hit(line) == expected


def test_a_task_stopped_for_its_own_limit_is_never_re_delivered() -> None:
    """Late acks and task_reject_on_worker_lost would re-deliver a task killed for the
    worker's memory (up to max_kills); one killed for its own limit would only pass it
    again: it fails at once."""
    causes = ExitCauses(oom_kills_seen=0)
    failures = MemoryFailures(lambda pid, code: causes.cause(pid, code, 0), max_kills=3)
    causes.killing(7, Kill("passed its memory_limit of 96 MiB", limit=96 * MIB))
    error = failures.on_lost(LostJob(7, -9, "t1", "app.stubborn", True, True), causes)
    assert type(error).__name__ == "MemoryLimitExceeded"
    assert "memory_limit of 96 MiB" in str(error)
    outcome = failures.outcome(7)
    assert outcome is not None and (outcome.cause, outcome.then) == (GUARD, "fail")


def test_a_soft_limit_just_reached_leaves_the_hard_limit_as_the_next_one() -> None:
    """At its soft limit of 60 MiB (raised at this check), 40 MiB from its hard limit of
    100 at 100 MiB/s: the hard limit is 0.4 s away, so the next check is in 0.2 s."""
    run = Run(TaskLimit(100 * MIB, 60 * MIB), soft_raised=True)
    assert next_check(run, 60 * MIB, 100 * MIB) == pytest.approx(0.2)


def test_a_task_growing_slower_than_a_byte_a_second_is_timed_by_its_rate() -> None:
    """Only a task that does not grow waits the longest: one byte from its limit at half a
    byte a second, it is there in 2 s, checked in 1 s (under a ceiling of 10 s)."""
    run = Run(TaskLimit(4096))
    assert next_check(run, 4095, 0.5, ceiling=10.0) == pytest.approx(1.0)


def test_a_bad_limit_shows_the_value_as_declared_and_what_is_accepted() -> None:
    accepted = (
        "a size of at least 4K (bytes (536870912), or a number with K, M, G, T, KB, MiB,"
        " GiB... (512M, 1.5GiB)), a whole number of bytes, or None"
    )
    with pytest.raises(LimitError) as error:
        declared({"app.t": task(memory_limit="huge")})
    assert (error.value.value, error.value.accepted) == ("huge", accepted)
    assert str(error.value) == f"app.t.memory_limit='huge': expected {accepted}"


def test_a_soft_limit_not_below_the_hard_one_shows_the_soft_limit_as_declared() -> None:
    with pytest.raises(LimitError) as error:
        declared({"app.t": task(memory_limit="100M", soft_memory_limit="200M")})
    assert (error.value.value, error.value.accepted) == (
        "200M", "a soft_memory_limit below memory_limit",
    )  # fmt: skip


def test_worker_defaults_with_a_soft_limit_above_the_hard_show_it_in_bytes() -> None:
    with pytest.raises(LimitError) as error:
        declared({"app.t": task()}, default_hard=100 * MIB, default_soft=200 * MIB)
    assert (error.value.option, error.value.value) == ("soft_memory_limit", 200 * MIB)
