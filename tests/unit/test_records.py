"""What a child's record on the pipe may hold (``telemetry.parse_record``), field by field
at the edges: the pipe is open to every process a child forks, so a figure out of range
drops the record, and -1 (unknown) reads as None where the format allows it. Found
unpinned by mutation testing (issue 25). The line's fields, in order:
``KIND PID DELTA EXACT PEAK RETAINED RSS PRIVATE CPU WAIT BUSY TASKS NAME``.
"""

from __future__ import annotations

from typing import Any

import pytest

from celery_guard.ledger import Record
from celery_guard.telemetry import parse_record

MAX_FIGURE = 1 << 50  # 1125899906842624: 16 digits
PID_MAX = 1 << 22

GOOD: dict[str, Any] = {
    "kind": "T", "pid": 101, "delta": 0, "exact": 1, "peak": 0, "retained": 0, "rss": 1000,
    "private": 500, "cpu": 0, "wait": 0, "busy": 0, "tasks": 0, "name": "app.t",
}  # fmt: skip


def line(**fields: Any) -> str:
    values = {**GOOD, **fields}
    return " ".join(str(values[key]) for key in GOOD)


def test_zero_is_a_figure_and_minus_one_is_unknown() -> None:
    assert parse_record(line(rss=0, private=0)) == (
        "T", 0, Record(101, "app.t", 0, True, 0, 0, 0, 0, 0, 0, 0),
    )  # fmt: skip
    unknown = line(private=-1, cpu=-1, wait=-1, busy=-1, exact=0, peak=-5, kind="R")
    assert parse_record(unknown) == (
        "R", 0, Record(101, "app.t", 0, False, 0, 1000, None, None, None, None, 0),
    )  # fmt: skip
    times = line(cpu=7, wait=8, busy=9, tasks=3, delta=-4, retained=-6, private=1, peak=2)
    assert parse_record(times) == (
        "T", -4, Record(101, "app.t", 2, True, -6, 1000, 1, 7, 8, 9, 3),
    )  # fmt: skip


@pytest.mark.parametrize(
    "fields",
    [
        {"pid": 1},
        {"pid": PID_MAX - 1},
        {"rss": MAX_FIGURE - 1},
        {"rss": 10**15},  # 16 digits
        {"delta": -(MAX_FIGURE - 1)},
        {"delta": MAX_FIGURE - 1},
        {"cpu": MAX_FIGURE - 1, "wait": MAX_FIGURE - 1, "busy": MAX_FIGURE - 1},
        {"tasks": MAX_FIGURE - 1},
        {"name": "a" * 200},
        {"name": "app.big task  two spaces"},
    ],
    ids=["pid-1", "pid-max-less-1", "rss-max", "rss-16-digits", "delta-lowest", "delta-max",
         "times-max", "tasks-max", "name-200", "name-with-spaces"],
)  # fmt: skip
def test_a_record_at_the_edge_of_its_ranges_is_read(fields: dict[str, Any]) -> None:
    parsed = parse_record(line(**fields))
    assert parsed is not None
    if "name" in fields:
        assert parsed[2].name == fields["name"]


@pytest.mark.parametrize(
    "text",
    [
        line(pid=0),
        line(pid=PID_MAX),
        line(exact=2),
        line(kind="X"),
        line(rss=MAX_FIGURE),
        line(rss="0" * 16 + "1"),  # 17 digits, however small the figure
        line(rss="\u0661"),  # a digit, not an ASCII one
        line(delta=MAX_FIGURE),
        line(delta=-MAX_FIGURE),
        line(peak=MAX_FIGURE),
        line(private=-2),
        line(cpu=-2),
        line(wait=MAX_FIGURE),
        line(busy=MAX_FIGURE),
        line(tasks=MAX_FIGURE),
        line(tasks=-1),
        line(name="a" * 201),
        line().replace(" 101 ", "  101 "),  # a field left empty
        line(name=""),
    ],
    ids=["pid-0", "pid-max", "exact-2", "kind-x", "rss-max-figure",
         "17-digits", "non-ascii-digit", "delta-max-figure", "delta-lowest-figure",
         "peak-max-figure", "private-below-unknown", "cpu-below-unknown", "wait-max-figure",
         "busy-max-figure", "tasks-max-figure", "tasks-negative", "name-201", "empty-field",
         "no-name"],
)  # fmt: skip
def test_a_record_past_the_edge_of_a_range_is_dropped(text: str) -> None:
    assert parse_record(text) is None
