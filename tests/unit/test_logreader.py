"""Tests for celery_guard.logreader: celery-guard's records read back from worker logs.

The fixture logs in testdata/logs are what a worker log really looks like: Celery's banner
and task lines, colours, a traceback, garbled bytes, and a last line cut short.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_guard.logreader import (
    Report,
    TaskGrowth,
    build_report,
    number,
    parse_record,
    read_records,
)

LOGS = Path(__file__).resolve().parent.parent / "testdata" / "logs"
CELERY = "[2026-11-21 06:04:14,279: WARNING/MainProcess] "
CHILD = "[2026-11-21 06:04:18,120: INFO/ForkPoolWorker-1] "

# id, line, expected record (None: not a celery-guard record)
RECORDS: list[tuple[str, str, dict[str, Any] | None]] = [
    (
        "readme-startup",
        CELERY + "celery-guard event=startup mode=scale pool=prefork limit_mib=1024.0"
        " requested=16 concurrency=7 action=scaled"
        ' limit_detail="memory.limit_in_bytes in /kubepods/pod1/ctr"\n',
        {
            "event": "startup",
            "mode": "scale",
            "pool": "prefork",
            "limit_mib": 1024.0,
            "requested": 16,
            "concurrency": 7,
            "action": "scaled",
            "limit_detail": "memory.limit_in_bytes in /kubepods/pod1/ctr",
        },
    ),
    (
        "text-types",
        CELERY + "celery-guard event=summary worker=w1@h final=true private_p50_mib="
        " recycles=0 delta_mib=-0.5 top_tasks=app.leak:120.5,app.walk:3.0",
        {
            "event": "summary",
            "worker": "w1@h",
            "final": True,
            "private_p50_mib": None,
            "recycles": 0,
            "delta_mib": -0.5,
            "top_tasks": "app.leak:120.5,app.walk:3.0",
        },
    ),
    (
        "text-keys-stay-text",
        CHILD + "celery-guard event=child worker=7 task=true task_id=42 pid=42",
        {"event": "child", "worker": "7", "task": "true", "task_id": "42", "pid": 42},
    ),
    (
        "not-numbers",
        "celery-guard event=x a=1e5 b=1.2.3 c=nan d=1_000 e=007 f=.5 g=0x10",
        {
            "event": "x",
            "a": "1e5",
            "b": "1.2.3",
            "c": "nan",
            "d": "1_000",
            "e": 7,
            "f": ".5",
            "g": "0x10",
        },
    ),
    (
        "quoted-note",
        CELERY + 'celery-guard event=summary recommendation_note="lower the concurrency to 6"',
        {"event": "summary", "recommendation_note": "lower the concurrency to 6"},
    ),
    (
        "json-after-celery-prefix",
        CHILD + '{"event":"child","worker":"w1@h","pid":12,"peak_rss_mib":270.0,"final":false}',
        {"event": "child", "worker": "w1@h", "pid": 12, "peak_rss_mib": 270.0, "final": False},
    ),
    (
        "json-alone",
        '{"event":"recycle","worker":"w1@h","pid":12,"last_task":"app.leak"}\n',
        {"event": "recycle", "worker": "w1@h", "pid": 12, "last_task": "app.leak"},
    ),
    (
        "json-empty-and-null",
        '{"event":"summary","private_p50_mib":null,"top_tasks":""}',
        {"event": "summary", "private_p50_mib": None, "top_tasks": None},
    ),
    (
        "text-alone",
        "celery-guard event=pressure level=high",
        {"event": "pressure", "level": "high"},
    ),
    # the record must be the whole message: text that merely contains one is not ours
    (
        "other-prefix-text",
        "2026-11-21 06:04:14 WARNING celery_guard celery-guard event=x a=1",
        None,
    ),
    ("other-prefix-json", 'Nov 21 06:04:14 host worker[12]: {"event":"child","pid":3}', None),
    (
        "terminal-colours",
        "\x1b[1;33m" + CELERY + "celery-guard event=recycle pid=5\x1b[0m",
        {"event": "recycle", "pid": 5},
    ),
    ("crlf", CELERY + "celery-guard event=x a=1\r\n", {"event": "x", "a": 1}),
    ("cut-in-a-key", CELERY + "celery-guard event=child pid=1 tas", {"event": "child", "pid": 1}),
    ("cut-in-quotes", 'celery-guard event=x note="lower the', {"event": "x", "note": "lower the"}),
    ("cut-in-event", CELERY + "celery-guard eve", None),
    ("cut-json", CHILD + '{"event":"child","worker":"w1@h","pid":1', None),
    ("empty-event", CELERY + "celery-guard event= a=1", None),
    ("event-not-a-name", CELERY + "celery-guard event=\ufffd a=1", None),
    ("garbled", "\x13\ufffd\ufffd garbled \ufffd[2026-11-21 06:04:22,4", None),
    ("empty-line", "", None),
    ("celery-line", CELERY + "Task app.tasks.walk[5b1f] received", None),
    ("celery-banner", " -------------- celery@host-a v5.7.0 (recovery)", None),
    (
        "task-logger-quoting-us",
        CHILD + "app.tasks.walk[5b1f]: celery-guard event=child pid=1 peak_rss_mib=9999.0",
        None,
    ),
    ("json-not-ours", CELERY + '{"not": "ours"}', None),
    ("structlog-sentence", '{"event": "user logged in", "level": "info"}', None),
    ("json-event-number", '{"event": 5}', None),
    ("json-array", "[1, 2, 3]", None),
    ("json-two-objects", '{"event":"x"}{"event":"y"}', None),
    ("json-deeply-nested", '{"a":' * 100_000, None),
    ("not-a-string", None, None),  # type: ignore[list-item]
]


@pytest.mark.parametrize("line,expected", [r[1:] for r in RECORDS], ids=[r[0] for r in RECORDS])
def test_parse_record(line: str, expected: dict[str, Any] | None) -> None:
    """Our lines in either form, numbers as numbers; anything else is None, never an error."""
    assert parse_record(line) == expected


def test_read_records_keeps_ours_in_order() -> None:
    lines = [
        CELERY + "celery-guard event=startup concurrency=7",
        CELERY + "Task x received",
        CHILD + '{"event":"child","pid":1}',
        "garbage",
        "celery-guard event=summary worker=w",
    ]
    assert list(read_records(lines)) == [
        {"event": "startup", "concurrency": 7},
        {"event": "child", "pid": 1},
        {"event": "summary", "worker": "w"},
    ]


# id, value, expected
NUMBERS = [
    ("int", 3, 3),
    ("float", 2.5, 2.5),
    ("bool", True, None),
    ("text", "3", None),
    ("none", None, None),
    ("nan", float("nan"), None),
    ("inf", float("inf"), None),
]


@pytest.mark.parametrize("value,expected", [n[1:] for n in NUMBERS], ids=[n[0] for n in NUMBERS])
def test_number(value: Any, expected: float | None) -> None:
    assert number(value) == expected


def _read(*names: str) -> Iterator[str]:
    for name in names:
        with open(LOGS / name, encoding="utf-8", errors="replace") as file:
            yield from file


# id, fixture files, expected figures of the report
REPORTS: list[tuple[str, tuple[str, ...], dict[str, Any]]] = [
    (
        "two-workers-text",
        ("two_workers.log",),
        {
            # child 11: 10 whole lines and the cut last one (no peak, no delta)
            "events": {"startup": 2, "child": 11, "summary": 4, "recycle": 1},
            "tasks": [
                ("app.tasks.leak", 4, 240.5, 110.5),  # 60 + 40 + 30 + 110.5
                ("app.tasks.walk", 4, 174.5, 80.0),  # 45.5 + 48 + 80 + 1
                ("app.tasks.resize", 1, 5.5, 5.5),  # app.tasks.ping grew nothing
            ],
            "peaks": (10.0, 245.5, 330.0),
            "summaries": {"celery@host-a": (True, 96), "celery@host-b": (False, 64)},
            "recycles": {"celery@host-a": 1},
        },
    ),
    (
        "one-worker-json",
        ("json_worker.log",),
        {
            "events": {"startup": 1, "child": 4, "summary": 1, "recycle": 1},
            "tasks": [
                ("app.tasks.leak", 2, 150.0, 90.0),
                ("app.tasks.walk", 1, 85.0, 85.0),
                ("app.tasks.resize", 1, 10.5, 10.5),
            ],
            "peaks": (4.0, 190.0, 330.0),
            "summaries": {"celery@host-c": (True, 48)},
            "recycles": {"celery@host-c": 1},
        },
    ),
    (
        "all-three-workers",
        ("two_workers.log", "json_worker.log"),
        {
            "events": {"startup": 3, "child": 15, "summary": 5, "recycle": 2},
            "tasks": [
                ("app.tasks.leak", 6, 390.5, 110.5),
                ("app.tasks.walk", 5, 259.5, 85.0),
                ("app.tasks.resize", 2, 16.0, 10.5),
            ],
            "peaks": (14.0, 190.0, 330.0),
            "summaries": {
                "celery@host-a": (True, 96),
                "celery@host-b": (False, 64),
                "celery@host-c": (True, 48),
            },
            "recycles": {"celery@host-a": 1, "celery@host-c": 1},
        },
    ),
    (
        "no-guard-lines",
        ("no_guard.log",),
        {"events": {}, "tasks": [], "peaks": (0.0, None, None), "summaries": {}, "recycles": {}},
    ),
]


@pytest.mark.parametrize("names,expected", [r[1:] for r in REPORTS], ids=[r[0] for r in REPORTS])
def test_build_report_on_fixture_logs(names: tuple[str, ...], expected: dict[str, Any]) -> None:
    report = build_report(read_records(_read(*names)))
    assert report.records == sum(expected["events"].values())
    assert report.events == expected["events"]
    rows = [(r.task, r.events, round(r.total_mib, 1), r.max_mib) for r in report.task_rows()]
    assert rows == expected["tasks"]
    assert (report.peaks.count, report.peaks.min, report.peaks.max) == expected["peaks"]
    summaries = {w: (s["final"], s["samples"]) for w, s in report.summaries.items()}
    assert summaries == expected["summaries"]
    assert report.recycles == expected["recycles"]


# id, worker, key, expected value in its last summary (text and JSON read alike)
SUMMARY_FIELDS = [
    ("text-kib", "celery@host-a", "recommended_max_memory_per_child_kib", 328908),
    ("text-concurrency", "celery@host-b", "recommended_concurrency", 6),
    ("text-float", "celery@host-b", "private_p95_mib", 110.0),
    ("text-note", "celery@host-b", "recommendation_note",
     "at 6 children each can afford 300.3 MiB of peak RSS, less than the healthy peaks with"
     " margin (345.0 MiB): children that peak above it are recycled; 4 children would recycle"
     " none of the healthy ones"),
    ("text-alternative", "celery@host-a", "alternative_concurrency", 9),
    ("text-absent", "celery@host-a", "child_cost_measured_mib", None),
    ("json-kib", "celery@host-c", "recommended_max_memory_per_child_kib", 292805),
    ("json-float", "celery@host-c", "headroom_mib", 102.4),
    ("json-top-tasks", "celery@host-c", "top_tasks",
     "app.tasks.leak:150.0,app.tasks.walk:85.0,app.tasks.resize:10.5"),
]  # fmt: skip


@pytest.mark.parametrize(
    "worker,key,expected", [r[1:] for r in SUMMARY_FIELDS], ids=[r[0] for r in SUMMARY_FIELDS]
)
def test_last_summary_fields(worker: str, key: str, expected: Any) -> None:
    report = build_report(read_records(_read("two_workers.log", "json_worker.log")))
    assert report.summaries[worker].get(key) == expected


# id, records, expected (task rows, peak count, summary workers, recycles)
ODD_RECORDS: list[tuple[str, list[dict[str, Any]], tuple[Any, ...]]] = [
    ("child-without-task", [{"event": "child", "peak_rss_mib": 5.0, "delta_mib": 1.0}],
     ([], 1.0, [], {})),
    ("child-delta-text", [{"event": "child", "task": "t", "delta_mib": "1.0"}], ([], 0.0, [], {})),
    ("child-delta-bool", [{"event": "child", "task": "t", "delta_mib": True}], ([], 0.0, [], {})),
    ("child-delta-negative", [{"event": "child", "task": "t", "delta_mib": -2.0}],
     ([], 0.0, [], {})),
    ("child-peak-inf", [{"event": "child", "peak_rss_mib": float("inf")}], ([], 0.0, [], {})),
    ("summary-without-worker", [{"event": "summary", "limit_mib": 1.0}], ([], 0.0, [], {})),
    ("recycle-without-worker", [{"event": "recycle", "pid": 1}], ([], 0.0, [], {})),
    ("recycle-worker-number", [{"event": "recycle", "worker": 7}], ([], 0.0, [], {})),
    ("ties-by-name", [{"event": "child", "task": n, "delta_mib": 1.0} for n in "ba"],
     ([("a", 1, 1.0, 1.0), ("b", 1, 1.0, 1.0)], 0.0, [], {})),
    ("two-recycles", [{"event": "recycle", "worker": "w"}] * 2, ([], 0.0, [], {"w": 2})),
]  # fmt: skip


@pytest.mark.parametrize(
    "records,expected", [r[1:] for r in ODD_RECORDS], ids=[r[0] for r in ODD_RECORDS]
)
def test_build_report_odd_records(records: list[dict[str, Any]], expected: tuple[Any, ...]) -> None:
    """Records that lack or garble a field count as records, and add only what is sound."""
    report = build_report(records)
    rows = [(r.task, r.events, r.total_mib, r.max_mib) for r in report.task_rows()]
    assert (rows, report.peaks.count, sorted(report.summaries), report.recycles) == expected
    assert report.records == len(records)


def test_unknown_events_are_counted_as_other() -> None:
    report = build_report([{"event": "chi"}, {"event": "startup"}, {"event": "chil"}])
    assert report.events == {"other": 2, "startup": 1}


def test_build_report_streams_in_bounded_memory() -> None:
    """200k child records, read from a generator, leave 3 task rows and a few buckets."""

    def records() -> Iterator[dict[str, Any]]:
        for i in range(200_000):
            yield {
                "event": "child",
                "task": ("a", "b", "c")[i % 3],
                "peak_rss_mib": 100.0 + i % 1000,
                "delta_mib": 0.5,
            }

    report = build_report(records())
    assert report.records == 200_000
    assert len(report.tasks) == 3
    # 100..1099 MiB in 1% buckets: ln(10.99) / ln(1.01) = 241 steps, 242 buckets,
    # however many records arrive.
    assert len(report.peaks.buckets()) == 242
    assert report.peaks.count == 200_000


# id, growth, expected mean
MEANS = [
    ("none", TaskGrowth("t"), 0.0),
    ("two", TaskGrowth("t", events=2, total_mib=5.0, max_mib=4.0), 2.5),
]


@pytest.mark.parametrize("growth,expected", [m[1:] for m in MEANS], ids=[m[0] for m in MEANS])
def test_mean(growth: TaskGrowth, expected: float) -> None:
    assert growth.mean_mib == expected


def test_report_starts_empty() -> None:
    report = Report()
    assert (report.records, report.events, report.tasks, report.peaks.count) == (0, {}, {}, 0.0)
