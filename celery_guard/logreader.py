"""Read celery-guard's records back from worker log files (pure).

Worker logs mix Celery's own lines with ours, from one or several workers, in text
(logfmt) or JSON form, and a log cut by an OOM kill or rotation ends mid-line. Every line
that is not a whole record of ours is skipped, never an error. ``build_report`` keeps
aggregates only, so a log of any length is read in bounded memory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .logline import PREFIX, parse_line
from .stats import ExpHistogram, number

#: Celery's line header (worker_log_format and worker_task_log_format), with the level and
#: the process: ``[2026-11-21 06:04:14,279: WARNING/MainProcess] ``.
_CELERY_HEADER = re.compile(
    r"\[[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2},[0-9]{3}: [A-Z]+/([^\]\s]+)\] "
)
#: Colours Celery adds around a whole line when it logs to a terminal.
_LEADING_ANSI = re.compile(r"\A(?:\x1b\[[0-9;]*m)+")
_TRAILING_ANSI = re.compile(r"(?:\x1b\[[0-9;]*m)+\Z")
#: Our event names and keys are identifiers; other JSON logs (structlog) put sentences there.
_EVENT = re.compile(r"[a-z][a-z0-9_]*\Z")
_KEY = re.compile(r"[a-z_][a-z0-9_]*\Z")
_INT = re.compile(r"-?[0-9]+\Z")
_FLOAT = re.compile(r"-?[0-9]+\.[0-9]+\Z")
#: Keys whose values are names or text even when they look like numbers (a task id "42").
TEXT_KEYS = frozenset(
    {
        "event", "worker", "task", "task_id", "last_task", "top_tasks", "recommendation_note",
        "mode", "pool", "limit_source", "limit_detail", "action", "error", "reason", "fix",
        "variable", "setting", "source", "value", "accepted", "topic",
    }
)  # fmt: skip
#: The events ``Report`` counts by name; any other event is counted as "other".
KNOWN_EVENTS = frozenset(
    (
        "startup", "child", "summary", "recycle", "advice", "history",
        "config_error", "pressure", "error",
    )
)  # fmt: skip


#: Events only the worker's main process logs (the rest, ``child`` above all, come from
#: pool children too). A task in a child that logs text of its own cannot pass for one.
MAIN_PROCESS_EVENTS = frozenset(
    (
        "startup", "summary", "recycle", "oom", "pressure", "limit", "advice", "history",
        "config_error", "metrics",
    )
)  # fmt: skip
MAIN_PROCESS = "MainProcess"
#: Keys whose values are names printed as rows and headings: one printable line.
NAME_KEYS = frozenset({"worker", "task", "last_task"})
MAX_NAME = 256
#: The MiB figures the report reads and prints: numbers (or empty) from 0 to 8 EiB, more
#: than a machine has; a delta may be below 0. Other keys, and keys added later, are
#: kept as they are and never used as figures.
MIB_KEYS = frozenset(
    {
        "limit_mib", "headroom_mib", "parent_rss_mib", "usage_mib", "working_set_mib",
        "unreclaimable_mib", "task_limit_mib",
        "private_p50_mib", "private_p95_mib", "private_max_mib", "peak_rss_p50_mib",
        "peak_rss_p95_mib", "peak_rss_max_mib", "peak_rss_mib", "delta_mib",
    }
)  # fmt: skip
MAX_MIB = float(1 << 43)
SIGNED_MIB_KEYS = frozenset({"delta_mib"})
#: Counts and settings the report reads and prints: whole numbers from 0.
COUNT_KEYS = frozenset(
    {
        "concurrency", "children", "samples", "recycles", "recommended_concurrency",
        "recommended_max_memory_per_child_kib", "alternative_concurrency",
        "alternative_max_memory_per_child_kib",
    }
)  # fmt: skip
MAX_COUNT = 1 << 53


def peak_histogram() -> ExpHistogram:
    """Child peaks in MiB: 1% buckets from 1 MiB up to about 150 GiB."""
    return ExpHistogram(first=1.0, ratio=1.01, max_buckets=1200)


def _convert(key: str, value: str) -> Any:
    """A logfmt value as the JSON form would have it."""
    if value == "":
        return None
    if key in TEXT_KEYS:
        return value
    if value in ("true", "false"):
        return value == "true"
    if _INT.match(value):
        return int(value)  # ValueError past 4300 digits: the line is garbled, skipped
    if _FLOAT.match(value):
        return float(value)
    return value


def _valid_value(key: str, value: Any) -> bool:
    """Whether a value is one a record of ours can hold (see the constants above)."""
    if value is None:
        return True
    if key in NAME_KEYS:
        return isinstance(value, str) and 0 < len(value) <= MAX_NAME and value.isprintable()
    if key in COUNT_KEYS:
        return type(value) is int and 0 <= value <= MAX_COUNT
    if key in MIB_KEYS:
        figure = number(value)  # None for text, flags, NaN, infinity, ints beyond floats
        low = -MAX_MIB if key in SIGNED_MIB_KEYS else 0.0
        return figure is not None and low <= figure <= MAX_MIB
    return True  # text and other keys: shown escaped, never used as figures


def _record(fields: Any) -> dict[str, Any] | None:
    """The record if every key is an identifier and every value one of ours could hold."""
    if not isinstance(fields, dict):
        return None
    event = fields.get("event")
    if not isinstance(event, str) or not _EVENT.match(event):
        return None
    record = {key: None if value == "" else value for key, value in fields.items()}
    valid = all(_KEY.match(key) and _valid_value(key, value) for key, value in record.items())
    return record if valid else None


def parse_record(line: str) -> dict[str, Any] | None:
    """One celery-guard record from a log line, numbers as numbers; None for any other
    line (Celery's, another program's, cut short, garbled, forged).

    Our record is the whole log message: the line starts with it, or with Celery's
    ``[date: LEVEL/Process]`` header and then it (text with the ``celery-guard `` prefix,
    or one JSON object). Text that merely contains the prefix (a task that logs what a
    user typed, another program's format) is not ours, and neither is a main-process
    event (a summary) logged by a pool child.
    """
    if not isinstance(line, str):
        return None
    text = _LEADING_ANSI.sub("", _TRAILING_ANSI.sub("", line.rstrip("\r\n")))
    header = _CELERY_HEADER.match(text)
    process = None
    if header:
        process = header.group(1)
        text = text[header.end() :]
    text = text.rstrip(" \r\n")
    if text.startswith("{"):
        try:
            record = _record(json.loads(text))
        except (ValueError, RecursionError):  # cut short, garbled, nested too deep
            return None
    elif text.startswith(PREFIX):
        try:
            fields = parse_line(text)
            record = _record({key: _convert(key, value) for key, value in fields.items()})
        except ValueError:  # as for JSON: a figure no log line of ours has
            return None
    else:
        return None
    if record is None:
        return None
    if process not in (None, MAIN_PROCESS) and record["event"] in MAIN_PROCESS_EVENTS:
        return None
    return record


def read_records(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The celery-guard records among ``lines``, in order."""
    return (record for record in map(parse_record, lines) if record is not None)


@dataclass
class TaskGrowth:
    """How much one task raised its children's peak RSS (across all workers)."""

    task: str
    events: int = 0
    total_mib: float = 0.0
    max_mib: float = 0.0

    @property
    def mean_mib(self) -> float:
        return self.total_mib / self.events if self.events else 0.0


#: Distinct task names and workers a report keeps. Child lines come from pool children,
#: where any task's code runs, so names can be invented without end: past MAX_TASKS they
#: fold into one OTHER_TASKS row, and past MAX_WORKERS new workers are only counted.
MAX_TASKS = 10_000
MAX_WORKERS = 1_000
OTHER_TASKS = "(other tasks)"


@dataclass
class Report:
    """What a set of log lines says, as bounded aggregates.

    ``peaks`` counts the peak RSS (MiB) of every child line; ``summaries`` keeps the last
    summary of each worker; ``events`` counts records by event name; ``unlisted`` counts
    the summary and recycle records of workers beyond MAX_WORKERS.
    """

    records: int = 0
    events: dict[str, int] = field(default_factory=dict)
    tasks: dict[str, TaskGrowth] = field(default_factory=dict)
    peaks: ExpHistogram = field(default_factory=peak_histogram)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    recycles: dict[str, int] = field(default_factory=dict)
    unlisted: int = 0

    def add(self, record: dict[str, Any]) -> None:
        """Fold one record into the aggregates."""
        self.records += 1
        event = record.get("event")
        name = event if event in KNOWN_EVENTS else "other"
        self.events[name] = self.events.get(name, 0) + 1
        worker = record.get("worker")
        if event == "child":
            self._add_child(record)
            return
        if event not in ("summary", "recycle") or not isinstance(worker, str) or not worker:
            return
        known = worker in self.summaries or worker in self.recycles
        if not known and len(self.summaries.keys() | self.recycles.keys()) >= MAX_WORKERS:
            self.unlisted += 1
        elif event == "summary":
            self.summaries[worker] = dict(record)
        else:
            self.recycles[worker] = self.recycles.get(worker, 0) + 1

    def _add_child(self, record: dict[str, Any]) -> None:
        peak = number(record.get("peak_rss_mib"))
        if peak is not None:
            self.peaks.add(peak)
        task, delta = record.get("task"), number(record.get("delta_mib"))
        if isinstance(task, str) and task and delta is not None and delta > 0:
            if task not in self.tasks and len(self.tasks) >= MAX_TASKS:
                task = OTHER_TASKS
            growth = self.tasks.setdefault(task, TaskGrowth(task))
            growth.events += 1
            growth.total_mib += delta
            growth.max_mib = max(growth.max_mib, delta)

    def task_rows(self) -> list[TaskGrowth]:
        """The tasks, largest total growth first (then by name)."""
        return sorted(self.tasks.values(), key=lambda row: (-row.total_mib, row.task))


def build_report(records: Iterable[dict[str, Any]]) -> Report:
    """Aggregate ``records`` (from ``read_records``) while streaming them."""
    report = Report()
    for record in records:
        report.add(record)
    return report
