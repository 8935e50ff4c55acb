"""Read celery-guard's records back from worker log files (pure).

Worker logs mix Celery's own lines with ours, from one or several workers, in text
(logfmt) or JSON form, and a log cut by an OOM kill or rotation ends mid-line. Every line
that is not a whole record of ours is skipped, never an error. ``build_report`` keeps
aggregates only, so a log of any length is read in bounded memory.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .logline import PREFIX, parse_line
from .stats import ExpHistogram

#: Celery's default line prefix, ``[2026-11-21 06:04:14,279: WARNING/MainProcess] ``.
_CELERY_PREFIX = re.compile(r"\[\d{4}-\d\d-\d\d [^\]]*\] ")
#: Colours Celery adds when it logs to a terminal (and that survive a copy of it).
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: Our event names are identifiers; other JSON logs (structlog) put sentences there.
_EVENT = re.compile(r"[a-z][a-z0-9_]*\Z")
_INT = re.compile(r"-?\d+\Z")
_FLOAT = re.compile(r"-?\d+\.\d+\Z")
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


def _record(fields: Any) -> dict[str, Any] | None:
    if not isinstance(fields, dict):
        return None
    event = fields.get("event")
    if not isinstance(event, str) or not _EVENT.match(event):
        return None
    return {key: None if value == "" else value for key, value in fields.items()}


def parse_record(line: str) -> dict[str, Any] | None:
    """One celery-guard record from a log line, numbers as numbers; None for any other
    line (Celery's, another program's, cut short, garbled)."""
    if not isinstance(line, str):
        return None
    text = _ANSI.sub("", line).strip()
    prefix = _CELERY_PREFIX.match(text)
    if prefix:
        text = text[prefix.end() :]
    elif not text.startswith(("{", PREFIX)):  # another prefix format: find our message
        start = text.find(" " + PREFIX)
        brace = text.find(' {"event":')
        start = min((i for i in (start, brace) if i >= 0), default=-1)
        if start < 0:
            return None
        text = text[start + 1 :]
    if text.startswith("{"):
        try:
            return _record(json.loads(text))
        except (ValueError, RecursionError):  # cut short, garbled, nested too deep
            return None
    if not text.startswith(PREFIX):
        return None
    fields = parse_line(text)
    try:
        return _record({key: _convert(key, value) for key, value in fields.items()})
    except ValueError:  # as for JSON: a figure no log line of ours has
        return None


def read_records(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The celery-guard records among ``lines``, in order."""
    for line in lines:
        record = parse_record(line)
        if record is not None:
            yield record


def number(value: Any) -> float | None:
    """A finite int or float from a record, else None (bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return value if math.isfinite(value) else None
    except OverflowError:  # an int too large for a float: not a memory figure
        return None


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


@dataclass
class Report:
    """What a set of log lines says, as bounded aggregates.

    ``peaks`` counts the peak RSS (MiB) of every child line; ``summaries`` keeps the last
    summary of each worker; ``events`` counts records by event name.
    """

    records: int = 0
    events: dict[str, int] = field(default_factory=dict)
    tasks: dict[str, TaskGrowth] = field(default_factory=dict)
    peaks: ExpHistogram = field(default_factory=peak_histogram)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    recycles: dict[str, int] = field(default_factory=dict)

    def add(self, record: dict[str, Any]) -> None:
        """Fold one record into the aggregates."""
        self.records += 1
        event = record.get("event")
        name = event if event in KNOWN_EVENTS else "other"
        self.events[name] = self.events.get(name, 0) + 1
        worker = record.get("worker")
        if event == "child":
            self._add_child(record)
        elif event == "summary" and isinstance(worker, str) and worker:
            self.summaries[worker] = dict(record)
        elif event == "recycle" and isinstance(worker, str) and worker:
            self.recycles[worker] = self.recycles.get(worker, 0) + 1

    def _add_child(self, record: dict[str, Any]) -> None:
        peak = number(record.get("peak_rss_mib"))
        if peak is not None:
            self.peaks.add(peak)
        task, delta = record.get("task"), number(record.get("delta_mib"))
        if isinstance(task, str) and task and delta is not None and delta > 0:
            growth = self.tasks.get(task)
            if growth is None:
                growth = self.tasks[task] = TaskGrowth(task)
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
