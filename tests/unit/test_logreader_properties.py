"""Property tests (hypothesis) of celery_guard.logreader: parse_record skips what it
cannot read and never raises, a report counts every record, and text and JSON lines
read back alike."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import DECODED, JSON_ANY, QUICK

from celery_guard import cli
from celery_guard.logline import PREFIX, format_event
from celery_guard.logreader import (
    COUNT_KEYS,
    MAIN_PROCESS_EVENTS,
    MAX_NAME,
    NAME_KEYS,
    TEXT_KEYS,
    build_report,
    number,
    parse_record,
    read_records,
)

EVENT = st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True)
NUMBERISH = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["", "true", "false", "1.", ".5", "-", "1e3", "\u0663\u0664", "0.0"]),
    st.text(max_size=10),
)
CHILD_LINE = st.builds(
    "celery-guard event={} task={} peak_rss_mib={} delta_mib={} worker={}".format,
    st.sampled_from(["child", "summary", "recycle", "startup", "x"]),
    st.sampled_from(["t1", '"a b"', "", "42"]),
    NUMBERISH,
    NUMBERISH,
    st.sampled_from(["w1", "w2", "", '"w 3"']),
)
LOG_LINE = st.one_of(
    st.text(max_size=200),
    st.text(max_size=200).map(lambda s: PREFIX + s),
    st.text(max_size=200).map(lambda s: "[2026-11-21 06:04:14,279: INFO/MainProcess] " + s),
    st.text(max_size=200).map(lambda s: "{" + s),
    st.text(max_size=200).map(lambda s: 'worker: {"event":' + s),
    st.builds(
        lambda name, rest: json.dumps({"event": name, **rest}),
        st.one_of(EVENT, JSON_ANY),
        st.dictionaries(st.text(max_size=8), JSON_ANY, max_size=4),
    ),
    JSON_ANY.map(json.dumps),
    CHILD_LINE,
    CHILD_LINE.map(lambda s: "\x1b[33m" + s + "\x1b[0m\n"),
)


@QUICK
@given(line=LOG_LINE)
def test_parse_record_never_raises(line: str) -> None:
    record = parse_record(line)
    if record is not None:
        assert isinstance(record, dict)
        assert re.fullmatch(r"[a-z][a-z0-9_]*", record["event"])
        assert "" not in record.values()


@QUICK
@given(data=st.one_of(st.binary(max_size=60), st.none(), st.integers(), st.lists(st.text())))
def test_parse_record_skips_what_is_not_text(data: Any) -> None:
    assert parse_record(data) is None


@QUICK
@given(lines=st.lists(st.one_of(LOG_LINE, DECODED), max_size=12))
def test_report_never_raises_and_counts_every_record(lines: list[str]) -> None:
    records = list(read_records(lines))
    report = build_report(records)
    assert report.records == len(records) == sum(report.events.values())
    children = [r for r in records if r["event"] == "child"]
    assert report.peaks.count == sum(number(r.get("peak_rss_mib")) is not None for r in children)
    rows = report.task_rows()
    assert all(row.events > 0 and row.total_mib > 0 and row.max_mib > 0 for row in rows)
    assert [(-r.total_mib, r.task) for r in rows] == sorted((-r.total_mib, r.task) for r in rows)
    # ... and the report renders
    assert cli.render(report)


def _not_a_number(text: str) -> bool:
    return not re.fullmatch(r"-?\d+(\.\d+)?", text) and text not in ("true", "false")


#: Keys as the worker writes them (keys are not escaped: see KEY for what parse_line takes),
#: other than the names and figures the reader checks (test_adversarial_log_reader.py).
IDENTIFIER = st.from_regex(r"[a-z_][a-z0-9_]{0,11}", fullmatch=True).filter(
    lambda key: key not in TEXT_KEYS and key not in COUNT_KEYS and not key.endswith("_mib")
)
TEXT_KEY = st.sampled_from(sorted(TEXT_KEYS - {"event"} - NAME_KEYS))
NAME = st.text(min_size=1, max_size=MAX_NAME).filter(str.isprintable)
#: Values a non-text key has in both forms: numbers printed as mib() prints them, flags,
#: nothing, and text that does not look like a number (logfmt cannot tell "42" from 42).
OTHER_VALUE = st.one_of(
    st.integers(-(2**63), 2**63),
    st.floats(-1e12, 1e12).map(lambda x: round(x, 1)),
    st.booleans(),
    st.none(),
    st.text().filter(_not_a_number),
)


@QUICK
@given(
    name=EVENT.filter(lambda name: name not in MAIN_PROCESS_EVENTS),
    text_fields=st.dictionaries(TEXT_KEY, st.one_of(st.text(), st.none()), max_size=4),
    name_fields=st.dictionaries(st.sampled_from(sorted(NAME_KEYS)), NAME, max_size=2),
    other_fields=st.dictionaries(IDENTIFIER, OTHER_VALUE, max_size=5),
    prefix=st.sampled_from(["", "[2026-11-21 06:04:14,279: INFO/ForkPoolWorker-1] "]),
)
def test_text_and_json_lines_read_back_alike(
    name: str,
    text_fields: dict[str, Any],
    name_fields: dict[str, str],
    other_fields: dict[str, Any],
    prefix: str,
) -> None:
    fields = {**text_fields, **name_fields, **other_fields}
    text = parse_record(prefix + format_event(name, fields) + "\n")
    from_json = parse_record(prefix + format_event(name, fields, "json") + "\n")
    assert text == from_json
    assert text == {"event": name, **{k: None if v == "" else v for k, v in fields.items()}}


# ---------------------------------------------------------------------------------------
# regressions: the smallest inputs of the bugs the properties above found, now fixed;
# each docstring says what the code did before


def test_log_line_with_a_long_number() -> None:
    """logreader.py _convert: int() refuses more than 4300 digits (Python >= 3.11), and
    parse_record lets the ValueError out instead of skipping the line."""
    assert parse_record("celery-guard event=x n=" + "1" * 4301) is None


@pytest.mark.parametrize(
    "line",
    [
        "celery-guard event=child peak_rss_mib=" + "1" * 310,
        '{"event":"child","peak_rss_mib":' + "1" * 310 + "}",
    ],
)
def test_log_line_with_an_int_too_large_for_a_float(line: str) -> None:
    """stats.number() (the log reader's): math.isfinite(int) raises OverflowError past 1.8e308, so
    `celery-guard recommend` crashes on the line instead of skipping the figure."""
    build_report(read_records([line]))
