"""The safety net's ``event=pressure action=terminate`` line names the task it stops.

The Governor is driven as on the worker's event loop: its real ledger, policy and line
writer; a PoolControl whose children are fake (pids, RSS readings, a kill that records),
and a cgroup directory whose files say what the working set is. One of two running tasks
has grown far past its peak with the working set past the high mark: the net stops that
child, and its line carries that task's name and id, the child's pid and private memory.
Observing, the same line with ``observe=true`` and nothing killed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from celery_guard import cgroups
from celery_guard.actuator import Child, PoolControl
from celery_guard.config import Settings
from celery_guard.exits import ExitCauses
from celery_guard.governor import Governor
from celery_guard.ledger import Record
from celery_guard.limit import LiveLimit
from celery_guard.logline import RECORD_ATTRIBUTE, parse_line

MIB = 1024 * 1024
LIMIT = 1000 * MIB  # default marks: high 950 MiB, hard 980 MiB


class FakePool(PoolControl):
    """PoolControl over children that are only pids: RSS from a table, kills recorded."""

    def __init__(self, rss_mib: dict[int, int]) -> None:
        super().__init__(w=None)
        self.rss_mib = rss_mib
        self.killed: list[tuple[int, bool]] = []
        for pid in rss_mib:
            self.children[pid] = Child(pid, None, process=None)

    @property
    def size(self) -> int:
        return len(self.children)

    def rss(self, pid: int) -> int | None:
        return self.rss_mib[pid] * MIB if pid in self.rss_mib else None

    def kill(self, pid: int, shrink: bool) -> bool:
        self.killed.append((pid, shrink))
        return True

    def exited_unjoined(self) -> tuple[int, int]:
        return 0, 0


class Hub:
    """The event loop's timer: remembers what was scheduled, runs nothing."""

    def __init__(self) -> None:
        self.later: list[tuple[float, Callable[[], Any]]] = []

    def call_later(self, delay: float, callback: Callable[[], Any]) -> None:
        self.later.append((delay, callback))

    def call_soon(self, callback: Callable[[], Any]) -> None:
        self.later.append((0.0, callback))


def cgroup_at(directory: Path, working_set_mib: int, active_file_mib: int = 0) -> cgroups.Cgroup:
    """A cgroup-v1 directory whose usage is ``working_set_mib`` with no inactive file and
    ``active_file_mib`` of it page cache in active use."""
    (directory / "memory.usage_in_bytes").write_text(f"{working_set_mib * MIB}\n")
    cache = active_file_mib * MIB
    (directory / "memory.stat").write_text(
        f"cache {cache}\ntotal_inactive_file 0\ntotal_active_file {cache}\n"
    )
    return cgroups.Cgroup(1, str(directory), str(directory))


def governor(
    tmp_path: Path, mode: str, active_file_mib: int = 0
) -> tuple[Governor, FakePool, ExitCauses]:
    """Three children of 30 MiB private memory each (RSS 200 MiB after a first run of
    hog, which peaked at 100 MiB); child 101 runs hog (id-hog) and has grown by 300 MiB,
    child 102 runs add (id-add) and has grown 10 MiB, child 103 is idle. The working set
    is 960 MiB: past the high mark, and what the running tasks still add reaches the
    hard mark, so the net stops the largest growth: child 101."""
    pool = FakePool({101: 200, 102: 200, 103: 200})
    settings = Settings(governor=mode)
    exits = ExitCauses(None)
    budget = Governor(
        pool,
        settings,
        cgroup_at(tmp_path, 960, active_file_mib),
        LiveLimit(LIMIT, settings),
        requested=3,
        estimate=30 * MIB,
        others=0,
        hostname="w1@test",
        exits=exits,
    )
    budget.start(Hub())
    for pid in (101, 102, 103):
        budget.post(Record(pid, "heavy_app.hog", 100 * MIB, True, 0, 200 * MIB, 30 * MIB))
    budget.tick()  # absorbs the records: every child measured, nothing to do yet
    budget.task_accepted(101, "id-hog", "heavy_app.hog")
    budget.task_accepted(102, "id-add", "heavy_app.add")
    pool.rss_mib.update({101: 500, 102: 210})
    return budget, pool, exits


def terminate_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The fields of every terminate line, checked to be the same in the text message."""
    found = []
    for record in caplog.records:
        fields = getattr(record, RECORD_ATTRIBUTE, None)
        if fields is None or fields.get("action") != "terminate":
            continue
        assert record.levelno == logging.WARNING
        text = parse_line(record.getMessage())
        assert text == {k: _text(v) for k, v in fields.items()}
        found.append(fields)
    return found


def _text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


@pytest.mark.parametrize("mode", ["on", "observe"])
def test_a_terminate_line_names_the_task_its_child_was_running(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    budget, pool, exits = governor(tmp_path, mode)
    with caplog.at_level(logging.INFO, logger="celery_guard"):
        budget.tick()
    (line,) = terminate_lines(caplog)
    assert line["event"] == "pressure"
    assert line["level"] == "hard"
    assert line["pid"] == 101
    assert line["private_mib"] == 30.0
    assert line["task"] == "heavy_app.hog"
    assert line["task_id"] == "id-hog"
    if mode == "observe":
        assert line["observe"] is True
        assert pool.killed == []  # decided and logged, not done
        assert exits.kill_of(101) is None
    else:
        assert "observe" not in line
        assert pool.killed == [(101, True)]
        assert exits.kill_of(101) is not None  # its exit will be told as the guard's


def test_page_cache_never_makes_the_net_stop_a_task(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same pool with 400 MiB of the cgroup's 960 MiB in active page cache (a task
    read a large file): the kernel reclaims it before it kills anything, so the net
    stops nothing and holds nothing."""
    budget, pool, _ = governor(tmp_path, "on", active_file_mib=400)
    with caplog.at_level(logging.INFO, logger="celery_guard"):
        budget.tick()
    assert terminate_lines(caplog) == []
    assert pool.killed == []
    assert not budget.safety.over
