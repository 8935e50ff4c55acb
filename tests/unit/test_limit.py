"""The live limit when the cgroup's limit changes under a running worker: raised, lowered,
lifted (unlimited) or gone (the files removed). Fixture trees, no real cgroup."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from celery_guard.cgroups import Cgroup
from celery_guard.config import load_settings
from celery_guard.limit import LimitWatch, LiveLimit
from celery_guard.logline import parse_line

MIB = 1024 * 1024
PHYSICAL = 4096 * MIB
V2_UNLIMITED = "max"


def watch(tmp_path: Path, limit: int) -> tuple[LimitWatch, Path]:
    """A cgroup-v2 leaf under its mount, its memory.max at ``limit``, and the watch over it."""
    leaf = tmp_path / "sys" / "fs" / "cgroup" / "pod" / "ctr"
    leaf.mkdir(parents=True)
    (leaf / "memory.max").write_text(f"{limit}\n")
    cgroup = Cgroup(2, str(leaf), str(tmp_path / "sys" / "fs" / "cgroup"))
    live = LiveLimit(limit, load_settings({}, {}))
    return LimitWatch(cgroup, PHYSICAL, live, "w@h"), leaf


def lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    return [parse_line(r.getMessage()) for r in caplog.records if "event=limit" in r.getMessage()]


def test_a_changed_limit_moves_the_marks_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    limit, leaf = watch(tmp_path, 1024 * MIB)
    high = limit.live.marks.high
    (leaf / "memory.max").write_text(f"{512 * MIB}\n")
    with caplog.at_level(logging.INFO):
        limit.check()
        limit.check()  # unchanged since: no second line
    assert limit.live.limit == 512 * MIB
    assert limit.live.marks.high == high // 2
    (line,) = lines(caplog)
    assert (line["old_mib"], line["new_mib"], line["limit_source"]) == (
        "1024.0",
        "512.0",
        "cgroup-v2",
    )


@pytest.mark.parametrize(
    "lift",
    [
        pytest.param(
            lambda leaf: (leaf / "memory.max").write_text(f"{V2_UNLIMITED}\n"), id="unlimited"
        ),
        pytest.param(lambda leaf: (leaf / "memory.max").unlink(), id="file-removed"),
    ],
)
def test_a_limit_that_disappears_falls_back_to_physical_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, lift: object
) -> None:
    """No limit any more (lifted, or the cgroup's files gone): the budget is physical
    memory, said once, and the worker goes on; a limit set again is taken again."""
    limit, leaf = watch(tmp_path, 1024 * MIB)
    with caplog.at_level(logging.INFO):
        lift(leaf)  # type: ignore[operator]
        limit.check()
        limit.check()
        (leaf / "memory.max").write_text(f"{768 * MIB}\n")
        limit.check()
    first, again = lines(caplog)
    assert (first["new_mib"], first["limit_source"]) == ("4096.0", "physical")
    assert (again["old_mib"], again["new_mib"]) == ("4096.0", "768.0")
    assert limit.live.limit == 768 * MIB


def test_the_headroom_follows_the_limit(tmp_path: Path) -> None:
    """The bytes kept free are the headroom's fraction of the limit of now, so a pool sized
    again after a change keeps the same share free as the startup decision did."""
    limit, leaf = watch(tmp_path, 1000 * MIB)
    assert limit.live.headroom == 100 * MIB
    (leaf / "memory.max").write_text(f"{500 * MIB}\n")
    limit.check()
    assert limit.live.headroom == 50 * MIB
