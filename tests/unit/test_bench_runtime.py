"""``bench/runtime.py``'s exit status: CI's short run fails when a guarded run failed what
the guard is for (a task lost, stopped or unfinished, an OOM kill), whatever the times."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import runtime

import harness


def outcome(label: str, **changed: object) -> runtime.Outcome:
    figures: dict[str, object] = {
        "seconds": 10.0, "succeeded": 240, "sent": 240, "failed": {}, "oom_kills": 0,
        "smallest_pool": 4,
    }  # fmt: skip
    figures.update(changed)
    return runtime.Outcome(label, **figures)  # type: ignore[arg-type]


def comparison(*guarded: runtime.Outcome) -> runtime.Comparison:
    vanilla = outcome("vanilla -c 4", smallest_pool=None)
    return runtime.Comparison(
        "leaky", 768, [vanilla], vanilla, 4, [vanilla], {"early": list(guarded), "late": []}
    )


@pytest.mark.parametrize(
    ("changed", "unclean"),
    [
        ({}, False),
        ({"seconds": 99.0}, False),  # slow: reported, not judged
        ({"oom_kills": 1}, True),
        ({"stopped": 1}, True),
        ({"succeeded": 239}, True),  # lost
        ({"seconds": None, "succeeded": 200, "failed": {"unfinished": 40}}, True),
    ],
    ids=["clean", "slow", "oom-kill", "stopped", "lost", "unfinished"],
)
def test_a_guarded_run_that_failed_its_tasks_fails_the_run(
    changed: dict[str, object], unclean: bool
) -> None:
    found = runtime.not_clean([comparison(outcome("guard"), outcome("guard", **changed))])
    assert bool(found) is unclean
    assert all(line.startswith("leaky 768 MiB acks=early: guard") for line in found)


def test_the_ramp_and_the_pace_come_from_the_results_end_times() -> None:
    """A pool that ends nothing for 2 s, then a task every 10 ms: the first tenth of 100
    tasks ends 2.1 s after the worker started, then 80 tasks take 10 ms each."""
    import datetime
    from types import SimpleNamespace

    sent = datetime.datetime(2026, 12, 7, tzinfo=datetime.timezone.utc)
    ends = [sent + datetime.timedelta(seconds=2 + i / 100) for i in range(100)]
    results = [SimpleNamespace(date_done=end.isoformat()) for end in reversed(ends)]
    ramp, pace = runtime._ramp_and_pace(results, sent.timestamp())
    assert ramp == pytest.approx(2.1) and pace == pytest.approx(10.0)


def test_where_the_time_went_is_listed_only_for_rows_that_kept_it() -> None:
    kept = {"ramp": 1.0, "pace": 2.0, "cpu": 9.0}
    vanilla = outcome("vanilla -c 4", smallest_pool=None, **kept)
    guard = outcome("guard", **{**kept, "ramp": 1.5})
    full = runtime.Comparison("jinja", 768, [vanilla], vanilla, 4, [vanilla], {"early": [guard]})
    old = comparison(outcome("guard"))  # measured before the figures were kept
    assert runtime.pace_lines([full, old]) == [
        "jinja at 768 MiB: vanilla 1.00 s, 2.00 ms/task, CPU 9.0 s; "
        "guard, early acks 1.50 s, 2.00 ms/task, CPU 9.0 s"
    ]


class StoredResults:
    """A result backend whose Redis says how many of the asked keys it holds."""

    def __init__(self, stored_at_each_look: list[int]) -> None:
        self.counts = iter(stored_at_each_look)
        self.looks: list[int] = []  # how many keys each look asked about
        self.client = self

    def get_key_for_task(self, task_id: str) -> bytes:
        return f"celery-task-meta-{task_id}".encode()

    def exists(self, *keys: bytes) -> int:
        self.looks.append(len(keys))
        return next(self.counts)


class Running:
    def __init__(self, alive: bool = True) -> None:
        self.process = self
        self.alive = alive

    def poll(self) -> int | None:
        return None if self.alive else -9


def results_of(backend: StoredResults, count: int) -> list[object]:
    return [type("Result", (), {"id": str(n), "backend": backend})() for n in range(count)]


def test_waiting_asks_redis_once_per_look_however_many_results_are_out() -> None:
    backend = StoredResults([0, 100, 2999, 3000])
    results = results_of(backend, 3000)
    ended = runtime._wait(Running(), results, runtime.time.monotonic() + 30)  # type: ignore[arg-type]
    assert ended is not None
    assert backend.looks == [3000] * 4  # one question per look, none per result


def test_waiting_ends_without_a_time_when_the_main_process_died() -> None:
    backend = StoredResults([5, 5])
    results = results_of(backend, 10)
    assert runtime._wait(Running(alive=False), results, runtime.time.monotonic() + 30) is None  # type: ignore[arg-type]
    assert backend.looks == [10]


LINE = "[2026-12-07 15:35:20,000: INFO/MainProcess] celery-guard event={} concurrency={}"


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        ([("startup", 16), ("plan", 2)], 2),  # planned at its first wave and kept
        ([("startup", 16), ("plan", 2), ("pressure", 3), ("pressure", 4)], 4),  # waves
        ([("plan", 2), ("pressure", 4), ("recycle", 3), ("pressure", 4)], 3),  # shrunk
        ([("startup", 16)], None),  # no line after the fork
    ],
)
def test_the_smallest_pool_counts_a_plan_that_kept_the_first_wave(
    tmp_path: Path, events: list[tuple[str, int]], expected: int | None
) -> None:
    log = tmp_path / "worker.log"
    log.write_text("\n".join(LINE.format(event, size) for event, size in events) + "\n")
    worker = harness.Worker(["-c", "16"], {}, log)
    assert worker.smallest_pool() == expected
