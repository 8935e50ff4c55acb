"""Memory limits per task, like Celery's time limits: read, checked, decided (pure).

A task declares ``memory_limit`` (hard) and ``soft_memory_limit`` as Celery task options:
on the decorator, as class attributes, or through ``task_annotations`` (Celery sets both
as attributes of the task class). The worker-wide defaults apply to tasks that declare
neither. What counts is what the task adds to its child's private memory (USS) since it
started: pages it allocated and shared pages it copied; pages still shared with the main
process do not count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .sizes import MAX_SIZE, PAGE, SIZE_FORMS, parse_size

OPTIONS = ("memory_limit", "soft_memory_limit")
ACCEPTED = f"a size of at least {PAGE >> 10}K ({SIZE_FORMS}), a whole number of bytes, or None"


@dataclass(frozen=True)
class TaskLimit:
    hard: int | None = None  # bytes
    soft: int | None = None


class LimitError(Exception):
    """A task option that cannot be a memory limit; names what the CRITICAL line says."""

    def __init__(self, task: str, option: str, value: Any, accepted: str) -> None:
        super().__init__(f"{task}.{option}={value!r}: expected {accepted}")
        self.task, self.option, self.value, self.accepted = task, option, value, accepted


def parse_limit(value: Any) -> int | None:
    """A size as in the configuration (at least one page, at most what a machine can
    have), a whole number of bytes, or None (no limit)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        size = parse_size(value)
    else:
        raise ValueError(value)
    if not PAGE <= size <= MAX_SIZE:
        raise ValueError(value)
    return size


def declared(
    tasks: Mapping[str, Any], default_hard: int | None = None, default_soft: int | None = None
) -> dict[str, TaskLimit]:
    """The limits of every task that has one, by name. The defaults apply to tasks that
    declare neither option (Celery's own ``celery.*`` tasks excepted). Raises LimitError
    for a value that is not a size, or a soft limit not below the hard one."""
    found: dict[str, TaskLimit] = {}
    for name, task in tasks.items():
        values = {}
        for option in OPTIONS:
            raw = getattr(task, option, None)
            try:
                values[option] = parse_limit(raw)
            except ValueError:
                raise LimitError(name, option, raw, ACCEPTED) from None
        hard, soft = values["memory_limit"], values["soft_memory_limit"]
        if hard is None and soft is None and not name.startswith("celery."):
            hard, soft = default_hard, default_soft
        if hard is not None and soft is not None and soft >= hard:
            raise LimitError(
                name, "soft_memory_limit", getattr(task, "soft_memory_limit", soft),
                "a soft_memory_limit below memory_limit",
            )  # fmt: skip
        if hard is not None or soft is not None:
            found[name] = TaskLimit(hard, soft)
    return found


#: What the watchdog does at a check: nothing, raise the soft or the hard exception in
#: the task, or ask the main process to stop the child.
NONE, SOFT, HARD, KILL = "none", "soft", "hard", "kill"
#: Seconds a task may run on past its hard limit after the exception was raised in it
#: (it may be unwinding, or it caught the exception) before its child is stopped.
GRACE = 1.0


@dataclass
class Run:
    """One run of a limited task, as the watchdog follows it."""

    limit: TaskLimit
    soft_raised: bool = False
    hard_raised_at: float | None = None  # monotonic seconds


def decide(run: Run, held: int, now: float, grace: float = GRACE) -> str:
    """What to do about a run that holds ``held`` bytes more than when it started."""
    hard, soft = run.limit.hard, run.limit.soft
    if hard is not None and held >= hard:
        if run.hard_raised_at is None:
            return HARD
        return KILL if now - run.hard_raised_at >= grace else NONE
    if soft is not None and held >= soft and not run.soft_raised:
        return SOFT
    return NONE


def growth_rate(held: int, last_held: int, since_last: float, since_start: float) -> float:
    """Bytes per second a run grows at: the larger of its last interval's and its mean
    since it was first read. A task that grows in steps (allocate, work, allocate) shows
    no growth in an interval between two steps; its mean still says how fast it comes."""
    recent = max(held - last_held, 0) / max(since_last, 1e-6)
    return max(recent, max(held, 0) / max(since_start, 1e-6))


def next_check(
    run: Run, held: int, rate: float, floor: float = 0.02, ceiling: float = 0.5
) -> float:
    """Seconds until the next check: soon enough that at the rate it grows (bytes per
    second) the task cannot pass its next limit by more than half the way there."""
    limits = [x for x in (run.limit.soft, run.limit.hard) if x is not None and x > held]
    if run.hard_raised_at is not None:
        return floor
    if not limits or rate <= 0:
        return ceiling
    return min(ceiling, max(floor, (min(limits) - held) / rate / 2))


__all__ = [
    "GRACE",
    "HARD",
    "KILL",
    "NONE",
    "OPTIONS",
    "SOFT",
    "LimitError",
    "Run",
    "TaskLimit",
    "decide",
    "declared",
    "growth_rate",
    "next_check",
    "parse_limit",
]
