"""Adversarial tests for the log reader boundary (celery_guard.logreader, ``celery-guard
recommend`` in celery_guard.cli).

Worker logs carry whatever tasks log: user input, text that looks like our records,
control characters, numbers of any size. A record is read only where it is the whole log
message as the worker writes it (at the start of the line, or right after Celery's
``[date: LEVEL/Process]`` header; main-process events only from the main process), with
every value one of ours could hold; and what ``recommend`` prints is one printable line
per line, with no setting below one.
"""

from __future__ import annotations

import io
import json
import math
import re
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_guard import cli
from celery_guard.logline import PREFIX, format_event
from celery_guard.logreader import (
    COUNT_KEYS,
    MAIN_PROCESS_EVENTS,
    MAX_COUNT,
    MAX_MIB,
    MAX_NAME,
    MAX_TASKS,
    MAX_WORKERS,
    MIB_KEYS,
    NAME_KEYS,
    OTHER_TASKS,
    SIGNED_MIB_KEYS,
    Report,
    build_report,
    parse_record,
    read_records,
)

QUICK = settings(max_examples=300, deadline=None, database=None)
MAIN = "[2026-11-21 06:04:14,279: INFO/MainProcess] "
CHILD = "[2026-11-21 06:04:18,120: WARNING/ForkPoolWorker-1] "
SUMMARY: dict[str, Any] = {
    "worker": "celery@host-a",
    "final": True,
    "limit_mib": 1024.0,
    "headroom_mib": 102.4,
    "parent_rss_mib": 180.0,
    "concurrency": 7,
    "samples": 10,
    "private_p50_mib": 90.0,
    "private_p95_mib": 98.0,
    "peak_rss_p50_mib": 270.0,
    "peak_rss_p95_mib": 280.0,
}
STARTUP = MAIN + format_event("startup", {"mode": "scale", "concurrency": 7})


def _recommend(*lines: str) -> tuple[int, list[str]]:
    out = io.StringIO()
    status = cli.main(
        ["recommend"], stdin=io.StringIO("".join(f"{x}\n" for x in lines)), stdout=out
    )
    return status, out.getvalue().splitlines()


def _summary(log_format: str = "text", **changes: Any) -> str:
    return format_event("summary", {**SUMMARY, **changes}, log_format)


def test_the_good_summary_is_read() -> None:
    """The baseline every forgery below is compared with."""
    status, out = _recommend(STARTUP, MAIN + _summary())
    assert status == 0 and "--concurrency 7" in out


# --- regressions: issue 13, finding 10 ------------------------------------------------------

FORGED = [
    # the prefix anywhere in another program's line, or in what a task logged
    "GET /search?q= " + _summary() + " HTTP/1.1",
    "2026-11-21 06:04:14 INFO app.views user said " + _summary(),
    'Nov 21 06:04:14 host app[12]: {"note": 1} ' + _summary("json"),
    "user said: " + _summary("json"),
    # a task's print() or logger in a pool child, in the worker's own format
    CHILD + _summary(),
    CHILD + _summary("json"),
    CHILD.replace("WARNING", "INFO") + format_event("recycle", {"worker": "w", "pid": 5}),
    # the task logger's format: the message starts with the task's name
    MAIN + "app.tasks.echo[5b1f]: " + _summary(),
    # a leading blank or another header shape
    " " + _summary(),
    "[2026-11-21 06:04:14: INFO/MainProcess] " + _summary(),
]


@pytest.mark.parametrize("line", FORGED)
def test_a_record_that_is_not_the_whole_message_is_not_read(line: str) -> None:
    """Any line that merely contained ``celery-guard `` was taken as a record, so a task
    that logs user input could forge the settings ``recommend`` prints."""
    assert parse_record(line) is None
    status, out = _recommend(STARTUP, line)
    assert status == 0 and "no summary line: nothing to recommend from" in out


@pytest.mark.parametrize(
    "worker",
    [
        "w1\nworker_max_memory_per_child = 1  # KiB",
        "w1\r--concurrency 999",
        "w1\x1b[2J\x1b[Hcleared",
        "w1\u2028next",
        "w1\x00",
        "",
        "w" * (MAX_NAME + 1),
    ],
    ids=["newline", "carriage-return", "ansi", "line-separator", "nul", "empty", "too-long"],
)
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_name_that_is_not_one_printable_line_is_not_read(worker: str, log_format: str) -> None:
    """A worker name with a newline split the output: it printed a forged setting."""
    line = MAIN + _summary(log_format, worker=worker)
    record = parse_record(line)
    assert record is None or (worker == "" and record["worker"] is None)  # "" is no name
    status, out = _recommend(STARTUP, line)
    assert status == 0
    assert all(x.isprintable() for x in out)
    assert not any(x.startswith(("worker_max_memory_per_child", "--concurrency")) for x in out)


@pytest.mark.parametrize(
    "changes",
    [
        {"limit_mib": -1024.0},
        {"peak_rss_p95_mib": -280.0},
        {"private_p95_mib": -98.0},
        {"concurrency": -7},
        {"concurrency": 0},
        {"concurrency": 7.5},
        {"limit_mib": 1e300},
        {"limit_mib": float(2**44)},
        {"samples": 10**30},
        {"limit_mib": "lots"},
    ],
    ids=repr,
)
def test_figures_out_of_range_never_print_as_settings(changes: dict[str, Any]) -> None:
    """Negative figures printed as settings (``worker_max_memory_per_child = -...``)."""
    status, out = _recommend(STARTUP, MAIN + _summary("json", **changes))
    assert status == 0
    for line in out:
        setting = re.fullmatch(r"(?:worker_max_memory_per_child = |--concurrency )(\S+).*", line)
        assert setting is None, line


def test_non_ascii_digits_are_not_numbers() -> None:
    """``\\d`` matched ARABIC-INDIC digits, so ``pid=\\u0663`` read as 3."""
    assert parse_record(PREFIX + "event=x n=\u0663\u0664") == {"event": "x", "n": "\u0663\u0664"}
    assert parse_record(PREFIX + "event=summary samples=\u0663") is None  # a count as text


def test_the_summary_of_a_main_process_passes_with_colours() -> None:
    """Celery's terminal colours around the whole line are not part of the record."""
    line = "\x1b[1;33m" + MAIN + _summary() + "\x1b[0m"
    assert parse_record(line) is not None


def test_colours_inside_a_value_are_not_stripped_into_a_record() -> None:
    line = MAIN + PREFIX + "event=summary worker=w\x1b[0m limit_mib=1.0"
    assert parse_record(line) is None


# --- odd lines ---------------------------------------------------------------------------

ODD = [
    "",
    "\x00" * 1000,
    PREFIX,
    PREFIX + "event=",
    PREFIX + "event=Summary",
    PREFIX + "event=summary worker=w limit_mib=nan",
    PREFIX + "event=summary worker=w limit_mib=" + "9" * 5000,
    '{"event":"summary","worker":"w","limit_mib":NaN}',
    '{"event":"summary","worker":"w","limit_mib":Infinity}',
    '{"event":"summary","worker":"w","limit_mib":1e999}',
    '{"event":"summary","worker":["w"]}',
    '{"event":"summary","worker":5}',
    '{"event":"summary","Worker-Name":"w"}',
    '{"event":"summary","":"w"}',
    '{"event":"child","peak_rss_mib":-5}',
    '{"event":"child","peak_rss_mib":true}',
    '{"event":"summary","worker":"w","samples":-1}',
    '{"event":"summary","worker":"w","samples":1.5}',
    '{"event":"child","task":"a\\nb"}',
    '{"event":' + "[" * 50_000,
    "{" * 100_000,
    MAIN + "{",
    MAIN,
]


@pytest.mark.parametrize("line", ODD, ids=lambda line: repr(line[:40]))
def test_odd_lines_are_not_records(line: str) -> None:
    assert parse_record(line) is None


def test_a_huge_line_is_read_or_skipped_without_error() -> None:
    line = MAIN + PREFIX + "event=child note=" + "x" * 5_000_000
    record = parse_record(line)
    assert record is not None and len(record["note"]) == 5_000_000


# --- properties ---------------------------------------------------------------------------

RECORD_LINE = st.builds(
    lambda event, fields, log_format: format_event(event, fields, log_format),
    st.sampled_from(["summary", "child", "recycle", "startup", "x"]),
    st.dictionaries(
        st.sampled_from([*SUMMARY, "task", "delta_mib", "pid", "peak_rss_mib", "top_tasks"]),
        st.one_of(
            st.integers(-(10**20), 10**20),
            st.floats(allow_nan=False),
            st.text(max_size=12),
            st.none(),
            st.booleans(),
        ),
        max_size=8,
    ),
    st.sampled_from(["text", "json"]),
)
HEADER = st.sampled_from(["", MAIN, CHILD, "\x1b[1;31m" + MAIN])
LINE = st.one_of(
    st.builds(str.__add__, HEADER, RECORD_LINE),
    st.text(max_size=120),
    st.binary(max_size=120).map(lambda b: b.decode("utf-8", "replace")),
)


def _valid(key: str, value: Any) -> bool:
    if value is None:
        return True
    if key in NAME_KEYS:
        return isinstance(value, str) and value.isprintable() and 0 < len(value) <= MAX_NAME
    if key in COUNT_KEYS:
        return type(value) is int and 0 <= value <= MAX_COUNT
    if key in MIB_KEYS:
        low = -MAX_MIB if key in SIGNED_MIB_KEYS else 0.0
        ok = type(value) in (int, float) and math.isfinite(value)
        return ok and low <= value <= MAX_MIB
    return True


@QUICK
@given(line=LINE)
def test_what_is_read_holds_only_values_ours_can_hold(line: str) -> None:
    """Bounds: every record read has identifier keys, printable single-line names, and
    figures in range; a record from a child's line is never a main-process event."""
    record = parse_record(line)
    if record is None:
        return
    assert all(re.fullmatch(r"[a-z_][a-z0-9_]*", key) for key in record)
    assert all(_valid(key, value) for key, value in record.items()), record
    if line.startswith(CHILD):
        assert record["event"] not in MAIN_PROCESS_EVENTS


@QUICK
@given(
    before=st.text(min_size=1, max_size=40).filter(
        lambda text: not text.startswith(("c", "{", "[", "\x1b"))
    ),
    line=RECORD_LINE,
)
def test_nothing_before_a_record_but_celerys_header(before: str, line: str) -> None:
    """Forging: a record after any other text is not read."""
    assert parse_record(before + line) is None


@QUICK
@given(lines=st.lists(LINE, max_size=10))
def test_recommend_prints_printable_lines_and_only_positive_settings(lines: list[str]) -> None:
    """Whatever the log, the output is printable lines, and every setting is >= 1."""
    out = io.StringIO()
    stdin = io.StringIO("".join(line.replace("\n", " ") + "\n" for line in lines))
    status = cli.main(["recommend"], stdin=stdin, stdout=out)
    assert status in (cli.OK, cli.NO_RECORDS)
    for text in out.getvalue().splitlines():
        assert text.isprintable(), repr(text)
        setting = re.fullmatch(r"(?:worker_max_memory_per_child = |--concurrency )(\S+).*", text)
        if setting:
            assert int(setting.group(1)) >= 1


@QUICK
@given(
    figures=st.fixed_dictionaries(
        {key: st.floats(0, 1e6) for key in SUMMARY if key.endswith("_mib")}
    ),
    concurrency=st.integers(1, 1000),
    log_format=st.sampled_from(["text", "json"]),
)
def test_a_summary_in_range_round_trips(
    figures: dict[str, float], concurrency: int, log_format: str
) -> None:
    """Round trip: any summary of ours within the ranges reads back as written."""
    fields = {**SUMMARY, **{k: round(v, 1) for k, v in figures.items()}, "concurrency": concurrency}
    record = parse_record(MAIN + format_event("summary", fields, log_format))
    assert record == {"event": "summary", **fields}
    assert build_report(read_records([json.dumps(record)])).summaries["celery@host-a"] == record


# --- the printer on its own: what it is given, not only what the reader lets through -----


def test_render_escapes_names_it_is_given() -> None:
    """Escaping is the printer's too: a report built by other code cannot split lines."""
    report = Report()
    report.add({"event": "child", "task": "t\nforged", "peak_rss_mib": 1.0, "delta_mib": 1.0})
    report.add(
        {**SUMMARY, "event": "summary", "worker": "w\n--concurrency 999", "top_tasks": "\x1b[2J"}
    )
    lines = cli.render(report)
    assert all(line.isprintable() for line in lines), lines
    assert "--concurrency 999" not in lines
    assert any("w\\n--concurrency 999" in line for line in lines)


@pytest.mark.parametrize(
    "changes",
    [
        {"limit_mib": -1024.0},
        {"peak_rss_p95_mib": -280.0},
        {"concurrency": 0},
        {"headroom_mib": -1},
    ],
    ids=repr,
)
def test_render_prints_no_setting_from_figures_below_zero(changes: dict[str, Any]) -> None:
    report = Report()
    report.add({**SUMMARY, "event": "summary", **changes})
    for line in cli.render(report):
        assert not re.fullmatch(r"(worker_max_memory_per_child = |--concurrency )-?\d+.*", line)


def test_a_line_of_50_mib_is_skipped_in_bounded_memory(tmp_path: Path) -> None:
    """A task that logged a 50 MiB payload: the line was read and held whole (twice, as
    bytes and text); now it is skipped in pieces and the records around it are read."""
    log = tmp_path / "worker.log"
    with open(log, "w") as file:
        file.write(STARTUP + "\n")
        file.write(MAIN + PREFIX + "event=child note=" + "x" * (50 << 20) + "\n")
        file.write(MAIN + _summary() + "\n")
    out = io.StringIO()
    tracemalloc.start()
    try:
        status = cli.main(["recommend", str(log)], stdin=io.StringIO(), stdout=out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 0 and "--concurrency 7" in out.getvalue()
    assert "2 celery-guard lines" in out.getvalue()  # the long line is not one of them
    assert peak < 16 << 20, peak


@pytest.mark.parametrize("size", [cli.MAX_LINE - 1, cli.MAX_LINE, cli.MAX_LINE + 1])
def test_lines_at_the_bound(size: int) -> None:
    """Lines up to MAX_LINE characters (newline included) are read whole; longer skipped."""
    long = "x" * (size - 1) + "\n"
    lines = list(cli._bounded(io.StringIO("a\n" + long + "b\nc")))
    assert lines == (["a\n", long, "b\n", "c"] if size <= cli.MAX_LINE else ["a\n", "b\n", "c"])


def test_invented_task_names_fold_into_one_row() -> None:
    """Child lines come from any task's process: a million invented names kept a million
    rows (the report promised bounded memory)."""
    records = (
        {"event": "child", "task": f"t{i}", "delta_mib": 1.0} for i in range(MAX_TASKS + 500)
    )
    report = build_report(records)
    assert len(report.tasks) == MAX_TASKS + 1
    assert report.tasks[OTHER_TASKS].events == 500


def test_invented_workers_are_counted_not_kept() -> None:
    records = ({**SUMMARY, "event": "summary", "worker": f"w{i}"} for i in range(MAX_WORKERS + 7))
    report = build_report(records)
    assert len(report.summaries) == MAX_WORKERS and report.unlisted == 7
    assert cli.render(report)[-1].startswith("# 7 summary and recycle lines of workers beyond")


@pytest.mark.parametrize(
    "value", [{"app.leak": 120.5}, "a:1,b:2", -3.5, float("nan"), None], ids=repr
)
def test_keys_the_report_does_not_read_are_kept_as_they_are(value: Any) -> None:
    """Keys added later (a figure of another shape, a map of MiB by task) do not make a
    record of ours unreadable: only the figures the report reads are checked."""
    line = MAIN + format_event("pressure", {"action": "pause", "task_peaks_mib": value}, "json")
    record = parse_record(line)
    assert record is not None and record["action"] == "pause"
