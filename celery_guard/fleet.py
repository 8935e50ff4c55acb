"""The fleet view: every worker's figures, as ``celery inspect guard_stats`` returns them,
in one table per worker and one per queue, with the recommendations (pure).

``celery -A proj guard report`` asks every worker through Celery's remote control (the
broker the fleet already has) and prints these tables.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from .stats import number


@dataclass(frozen=True)
class WorkerRow:
    hostname: str
    queues: tuple[str, ...]
    concurrency: int | None  # the pool's size now
    requested: int | None
    limit_mib: float | None
    private_p95_mib: float | None  # a child's private memory, p95 of its samples
    oom_kills: int | None
    recycles: int | None
    holds: int | None
    recommended_concurrency: int | None
    recommended_max_memory_per_child_kib: int | None
    recommended_memory_limit_mib: float | None  # the limit that runs `requested`
    error: str = ""  # a worker without the guard's figures says why


def _figure(key: str, value: Any) -> float | int | None:
    """A figure from a reply, or None: replies come from other processes. MiB as they are,
    counts whole."""
    found = number(value)
    if found is None:
        return None
    return float(found) if key.endswith("_mib") else int(float(found))


def worker_rows(stats: Mapping[str, Any], queues: Mapping[str, list[str]]) -> list[WorkerRow]:
    """One row per worker that answered, sorted by name; ``holds`` from the governor's
    section where the summary has none."""
    rows = []
    for hostname in sorted(stats):
        reply: Mapping[str, Any] = stats[hostname] if isinstance(stats[hostname], Mapping) else {}
        governor = reply.get("governor")
        reply = {"holds": governor.get("holds") if isinstance(governor, Mapping) else None, **reply}
        figures: dict[str, Any] = {
            f.name: _figure(f.name, reply.get(f.name))
            for f in fields(WorkerRow)
            if f.name not in ("hostname", "queues", "error")
        }
        queued = tuple(sorted(queues.get(hostname, [])))
        error = str(reply.get("error", ""))[:200]
        rows.append(WorkerRow(hostname, queued, **figures, error=error))
    return rows


@dataclass(frozen=True)
class QueueRow:
    queue: str
    workers: tuple[str, ...]
    concurrency: int  # children serving the queue now, summed over its workers
    recommended_concurrency: int | None  # summed: what its workers' memory allows
    #: the largest of its workers': one value to set on every worker of the queue
    recommended_max_memory_per_child_kib: int | None
    recommended_memory_limit_mib: float | None


def queue_rows(rows: list[WorkerRow]) -> list[QueueRow]:
    """One row per queue, from the workers that consume it."""
    by_queue: dict[str, list[WorkerRow]] = {}
    for row in rows:
        for queue in row.queues or ("(no queue reported)",):
            by_queue.setdefault(queue, []).append(row)
    result = []
    for queue, members in sorted(by_queue.items()):
        recommended = [r.recommended_concurrency for r in members]
        result.append(
            QueueRow(
                queue,
                tuple(r.hostname for r in members),
                sum(r.concurrency or 0 for r in members),
                None if None in recommended else sum(filter(None, recommended)),
                _largest(r.recommended_max_memory_per_child_kib for r in members),
                _largest(r.recommended_memory_limit_mib for r in members),
            )
        )
    return result


def _largest(values: Iterable[Any]) -> Any:
    return max((value for value in values if value is not None), default=None)


def cell(value: Any) -> str:
    """A figure as the reports print it: MiB to a tenth, flags as log lines spell them."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(value) or "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _escaped(text: str) -> str:
    return text if text.isprintable() else text.encode("unicode_escape").decode()


def table(rows: list[Any], columns: list[tuple[str, str]]) -> str:
    """Aligned text columns: ``columns`` is [(attribute, heading)]; names are printed as
    they are, so a name with a control character is shown escaped."""
    cells = [[heading for _, heading in columns]]
    for row in rows:
        cells.append([_escaped(cell(getattr(row, name))) for name, _ in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    )


WORKER_COLUMNS = [
    ("hostname", "worker"), ("queues", "queues"), ("concurrency", "concurrency"),
    ("requested", "requested"), ("limit_mib", "limit MiB"),
    ("private_p95_mib", "child p95 MiB"), ("oom_kills", "OOM kills"),
    ("recycles", "recycles"), ("holds", "holds"),
    ("recommended_concurrency", "rec. concurrency"),
    ("recommended_max_memory_per_child_kib", "rec. max_memory_per_child KiB"),
    ("recommended_memory_limit_mib", "rec. memory limit MiB"), ("error", "error"),
]  # fmt: skip
QUEUE_COLUMNS = [
    ("queue", "queue"), ("workers", "workers"), ("concurrency", "concurrency"),
    ("recommended_concurrency", "rec. concurrency"),
    ("recommended_max_memory_per_child_kib", "rec. max_memory_per_child KiB"),
    ("recommended_memory_limit_mib", "rec. memory limit MiB"),
]  # fmt: skip


def render(workers: list[WorkerRow], queues: list[QueueRow], output: str) -> str:
    if output == "json":
        return json.dumps(
            {"workers": [asdict(w) for w in workers], "queues": [asdict(q) for q in queues]},
            separators=(",", ":"),
        )
    return (
        "workers\n" + table(workers, WORKER_COLUMNS) + "\n\nqueues\n" + table(queues, QUEUE_COLUMNS)
    )


__all__ = ["QueueRow", "WorkerRow", "cell", "queue_rows", "render", "table", "worker_rows"]
