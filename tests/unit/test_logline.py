"""Tests for celery_guard.logline: the log line format that pipelines parse.

The contract pins the text form (``celery-guard `` then logfmt, event first, values with
spaces quoted) and the JSON form (one object, numbers as numbers, no prefix).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from celery_guard.logline import (
    PREFIX,
    RECORD_ATTRIBUTE,
    emit,
    format_event,
    format_from_env,
    parse_line,
    use_format,
)

STARTUP: dict[str, Any] = {
    "mode": "scale",
    "pool": "prefork",
    "limit_mib": 600.0,
    "limit_source": "cgroup-v1",
    "headroom_mib": 60.0,
    "parent_rss_mib": 148.2,
    "child_estimate_mib": 43.0,
    "child_estimate_source": "measured",
    "requested": 16,
    "concurrency": 9,
    "action": "scaled",
}

# id, event, fields, expected text line
TEXT = [
    (
        "startup",
        "startup",
        STARTUP,
        "celery-guard event=startup mode=scale pool=prefork limit_mib=600.0"
        " limit_source=cgroup-v1 headroom_mib=60.0 parent_rss_mib=148.2"
        " child_estimate_mib=43.0 child_estimate_source=measured requested=16"
        " concurrency=9 action=scaled",
    ),
    ("no-fields", "startup", {}, "celery-guard event=startup"),
    ("insertion-order", "x", {"b": 1, "a": 2, "c": 3}, "celery-guard event=x b=1 a=2 c=3"),
    ("space", "x", {"reason": "no limit"}, 'celery-guard event=x reason="no limit"'),
    ("quote", "x", {"v": 'say "hi"'}, 'celery-guard event=x v="say \\"hi\\""'),
    ("lone-quote", "x", {"v": '"'}, 'celery-guard event=x v="\\""'),
    ("equals", "x", {"v": "a=b"}, 'celery-guard event=x v="a=b"'),
    ("empty-string", "x", {"v": ""}, 'celery-guard event=x v=""'),
    ("backslash", "x", {"v": "C:\\tmp"}, 'celery-guard event=x v="C:\\\\tmp"'),
    ("newline", "x", {"v": "a\nb"}, 'celery-guard event=x v="a\\nb"'),
    ("tab", "x", {"v": "a\tb"}, 'celery-guard event=x v="a\\tb"'),
    ("true", "x", {"v": True}, "celery-guard event=x v=true"),
    ("false", "x", {"v": False}, "celery-guard event=x v=false"),
    ("none", "x", {"v": None, "w": 1}, "celery-guard event=x v= w=1"),
    ("int-zero", "x", {"v": 0}, "celery-guard event=x v=0"),
    ("float", "x", {"v": 0.5}, "celery-guard event=x v=0.5"),
    ("path", "x", {"v": "/sys/fs/cgroup/a:b"}, "celery-guard event=x v=/sys/fs/cgroup/a:b"),
    ("non-ascii", "x", {"v": "é"}, "celery-guard event=x v=é"),
]


@pytest.mark.parametrize("event,fields,expected", [t[1:] for t in TEXT], ids=[t[0] for t in TEXT])
def test_format_event_text(event: str, fields: dict[str, Any], expected: str) -> None:
    """logfmt with the prefix, event first, fields in insertion order, quoted when needed."""
    assert format_event(event, fields) == expected
    assert format_event(event, fields, "text") == expected


# id, event, fields, expected JSON message
JSON = [
    (
        "startup",
        "startup",
        {"mode": "scale", "limit_mib": 600.0, "requested": 16, "action": "kept"},
        '{"event":"startup","mode":"scale","limit_mib":600.0,"requested":16,"action":"kept"}',
    ),
    ("no-fields", "startup", {}, '{"event":"startup"}'),
    (
        "types",
        "x",
        {"i": 9, "f": 148.2, "t": True, "n": None, "s": "a b"},
        '{"event":"x","i":9,"f":148.2,"t":true,"n":null,"s":"a b"}',
    ),
    ("quotes", "x", {"s": 'say "hi"'}, '{"event":"x","s":"say \\"hi\\""}'),
]


@pytest.mark.parametrize("event,fields,expected", [j[1:] for j in JSON], ids=[j[0] for j in JSON])
def test_format_event_json(event: str, fields: dict[str, Any], expected: str) -> None:
    """One compact JSON object, no prefix, event first, numbers and booleans keep their type."""
    line = format_event(event, fields, "json")
    assert line == expected
    assert not line.startswith(PREFIX)
    assert "\n" not in line
    assert json.loads(line) == {"event": event, **fields}


def test_json_numbers_stay_numbers() -> None:
    """A pipeline reading json gets int and float, not strings."""
    record = json.loads(format_event("startup", STARTUP, "json"))
    assert list(record) == ["event", *STARTUP]
    assert (type(record["requested"]), type(record["limit_mib"])) == (int, float)
    assert (record["concurrency"], record["parent_rss_mib"]) == (9, 148.2)


# id, value written, value read back
ROUND_TRIP: list[tuple[str, Any, str]] = [
    ("plain", "prefork", "prefork"),
    ("space", "no limit found", "no limit found"),
    ("leading-space", " x", " x"),
    ("trailing-space", "x ", "x "),
    ("quote", 'say "hi"', 'say "hi"'),
    ("lone-quote", '"', '"'),
    ("equals", "a=b", "a=b"),
    ("looks-like-fields", "a=b c=d", "a=b c=d"),
    ("looks-like-a-line", "celery-guard event=other", "celery-guard event=other"),
    ("empty", "", ""),
    ("backslash", "C:\\tmp\\", "C:\\tmp\\"),
    ("quote-backslash-space", '\\" x', '\\" x'),
    ("newline", "a\nb", "a\nb"),
    ("tab", "a\tb", "a\tb"),
    ("non-ascii", "é", "é"),
    ("non-ascii-space", "é x", "é x"),
    ("nbsp", "a\u00a0b", "a\u00a0b"),
    ("int", 16, "16"),
    ("float", 148.2, "148.2"),
    ("true", True, "true"),
    ("false", False, "false"),
    ("none", None, ""),
]


@pytest.mark.parametrize("value,read", [r[1:] for r in ROUND_TRIP], ids=[r[0] for r in ROUND_TRIP])
def test_parse_line_round_trip(value: Any, read: str) -> None:
    """parse_line reads back what format_event wrote, for values that need quoting too."""
    line = format_event("e", {"before": "a b", "v": value, "after": 1})
    assert parse_line(line) == {"event": "e", "before": "a b", "v": read, "after": "1"}


def test_parse_line_startup_round_trip() -> None:
    """The whole startup line reads back as text values, keys in order."""
    fields = parse_line(format_event("startup", STARTUP))
    assert list(fields) == ["event", *STARTUP]
    assert fields == {"event": "startup", **{k: str(v) for k, v in STARTUP.items()}}


# id, line, expected fields
LINES = [
    (
        "celery-formatted",
        "[2026-11-21 05:50:53,731: WARNING/MainProcess] celery-guard event=startup"
        " mode=warn pool=prefork limit_mib=600.0 action=warned",
        {
            "event": "startup",
            "mode": "warn",
            "pool": "prefork",
            "limit_mib": "600.0",
            "action": "warned",
        },
    ),
    (
        "celery-formatted-quoted",
        "[2026-11-21 05:50:53,731: ERROR/MainProcess] celery-guard event=startup"
        ' reason="not one child fits" action=over_budget',
        {"event": "startup", "reason": "not one child fits", "action": "over_budget"},
    ),
    ("bare", "celery-guard event=x", {"event": "x"}),
    ("extra-spaces", "celery-guard event=x   a=1  b=2", {"event": "x", "a": "1", "b": "2"}),
    ("no-prefix", "[2026-11-21 05:50:53,731: INFO/MainProcess] Connected", {}),
    ("prefix-without-space", "celery-guardian event=x", {}),
    ("json-line", '{"event":"startup","requested":16}', {}),
    ("empty", "", {}),
]


@pytest.mark.parametrize("line,expected", [x[1:] for x in LINES], ids=[x[0] for x in LINES])
def test_parse_line(line: str, expected: dict[str, str]) -> None:
    """The prefix is found anywhere in the line (Celery adds its own before the message)."""
    assert parse_line(line) == expected


def test_emit_logs_one_line_on_celery_guard_logger(caplog: pytest.LogCaptureFixture) -> None:
    """emit() sends the formatted message at the given level to the celery_guard logger."""
    with caplog.at_level(logging.INFO, logger="celery_guard"):
        emit(logging.WARNING, "startup", {"mode": "warn", "action": "warned"})
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("celery_guard", logging.WARNING, "celery-guard event=startup mode=warn action=warned")
    ]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_every_line_carries_its_fields_as_one_record_attribute(
    caplog: pytest.LogCaptureFixture, log_format: str
) -> None:
    """``record.celery_guard`` holds the fields (event first) as values, in either format,
    for a JSON formatter to emit as fields of their own; the message is the contract's."""
    use_format(log_format)
    try:
        with caplog.at_level(logging.INFO, logger="celery_guard"):
            emit(logging.INFO, "summary", {"usage_mib": 512.5, "final": True, "note": None})
    finally:
        use_format("text")
    (record,) = caplog.records
    assert getattr(record, RECORD_ATTRIBUTE) == {
        "event": "summary", "usage_mib": 512.5, "final": True, "note": None,
    }  # fmt: skip
    message = record.getMessage()
    if log_format == "json":
        assert json.loads(message) == getattr(record, RECORD_ATTRIBUTE)
    else:
        assert message == "celery-guard event=summary usage_mib=512.5 final=true note="


def test_the_format_is_chosen_once_for_the_process(caplog: pytest.LogCaptureFixture) -> None:
    use_format("json")
    try:
        with caplog.at_level(logging.INFO, logger="celery_guard"):
            emit(logging.INFO, "limit", {"new_mib": 1.0})
    finally:
        use_format("text")
    assert caplog.records[0].getMessage() == '{"event":"limit","new_mib":1.0}'
    assert format_from_env({"CELERY_GUARD_LOG_FORMAT": " JSON "}) == "json"
    assert format_from_env({"CELERY_GUARD_LOG_FORMAT": "xml"}) == "text"
    assert format_from_env({}) == "text"


def test_in_json_a_line_logged_without_the_guards_fields_keeps_its_message() -> None:
    """A record on the guard's logger that is not a guard line (no ``celery_guard``
    attribute: a plain ``logger.warning``) passes the JSON filter as it was."""
    from celery_guard.logline import JsonMessages

    record = logging.LogRecord(
        "celery_guard", logging.WARNING, __file__, 1, "plain %s", ("x",), None
    )
    assert JsonMessages().filter(record) is True
    assert record.getMessage() == "plain x"
