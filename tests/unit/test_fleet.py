"""Tests for celery_guard.fleet: the fleet view from the workers' guard_stats replies."""

from __future__ import annotations

import json
from typing import Any

from celery_guard.fleet import QueueRow, queue_rows, render, table, worker_rows

A = {
    "concurrency": 4, "requested": 8, "limit_mib": 1024.0, "private_p95_mib": 90.5,
    "oom_kills": 1, "recycles": 3, "holds": 7, "recommended_concurrency": 6,
    "recommended_max_memory_per_child_kib": 300000, "recommended_memory_limit_mib": 1200.0,
}  # fmt: skip
B = {
    **A, "concurrency": 2, "recommended_concurrency": 3,
    "recommended_max_memory_per_child_kib": 280000, "recommended_memory_limit_mib": 900.0,
}  # fmt: skip


def test_one_row_per_worker_with_its_queues_and_figures() -> None:
    rows = worker_rows({"b@h": B, "a@h": A}, {"a@h": ["reports", "default"], "b@h": ["default"]})
    assert [r.hostname for r in rows] == ["a@h", "b@h"]
    assert rows[0].queues == ("default", "reports")
    assert (rows[0].concurrency, rows[0].requested, rows[0].holds) == (4, 8, 7)
    assert rows[0].recommended_memory_limit_mib == 1200.0


def test_one_row_per_queue_from_the_workers_that_consume_it() -> None:
    rows = worker_rows({"a@h": A, "b@h": B}, {"a@h": ["reports", "default"], "b@h": ["default"]})
    assert queue_rows(rows) == [
        QueueRow("default", ("a@h", "b@h"), 6, 9, 300000, 1200.0),
        QueueRow("reports", ("a@h",), 4, 6, 300000, 1200.0),
    ]


def test_replies_that_are_not_figures_are_blanks_not_errors() -> None:
    """Replies come from other processes: a worker without the guard answers an error,
    another may answer anything."""
    odd: dict[str, Any] = {
        "x@h": {"error": "celery-guard collects nothing in this worker"},
        "y@h": "not a mapping",
        "z@h": {"concurrency": "4", "limit_mib": True, "holds": None},
    }
    rows = worker_rows(odd, {})
    assert rows[0].error.startswith("celery-guard collects nothing")
    assert all(r.concurrency is None and r.limit_mib is None for r in rows)
    assert queue_rows(rows)[0].recommended_concurrency is None  # not all known: no sum
    text = render(rows, queue_rows(rows), "text")
    assert "x@h" in text and "(no queue reported)" in text


def test_text_is_aligned_and_escaped_and_json_is_one_object() -> None:
    rows = worker_rows({"a\nb@h": A}, {"a\nb@h": ["q"]})
    text = table(rows, [("hostname", "worker"), ("concurrency", "concurrency")])
    first, second = text.splitlines()
    assert first.index("concurrency") == second.index("4")
    assert "a\\nb@h" in second
    (_, accented) = table(worker_rows({"café@h": A}, {}), [("hostname", "worker")]).splitlines()
    assert accented == "café@h"  # printable: as it is
    data = json.loads(render(rows, queue_rows(rows), "json"))
    assert data["workers"][0]["hostname"] == "a\nb@h"
    assert data["queues"][0]["queue"] == "q"
