"""Structured logs the stdlib way: a worker whose root logger formats records as JSON
(python-json-logger, as a log pipeline installs it) emits the guard's fields as JSON fields
of their own, in the main process and in the children, whatever the message's format."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

import harness
from celery_guard.logline import RECORD_ATTRIBUTE
from harness import Worker

MakeWorker = Callable[..., Worker]
SMALL_APP = {"HEAVY_APP_OBJECTS": "1000", "HEAVY_APP_BUFFER_MIB": "1"}


def json_records(worker: Worker) -> list[dict[str, object]]:
    records = []
    for line in worker.log.splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_json_formatter_reads_the_guards_fields_as_fields(
    redis: harness.RedisServer, make_worker: MakeWorker, log_format: str
) -> None:
    env = harness.worker_env(
        redis,
        {**SMALL_APP, "HEAVY_APP_JSON_LOGS": "1", "CELERY_GUARD_LOG_FORMAT": log_format,
         "CELERY_GUARD_CHILD_LOG": "all"},
    )  # fmt: skip
    worker = make_worker(["-c", "1"], env)
    worker.wait_for(r'"name": "celery_guard"')
    (result,) = harness.send_tasks(redis, worker.queue, "add", 1, (2, 3))
    assert result.get(timeout=60) == 5
    assert harness.eventually(
        lambda: any(
            isinstance(r.get(RECORD_ATTRIBUTE), dict) and r[RECORD_ATTRIBUTE]["event"] == "child"
            for r in json_records(worker)
        ),
        30,
    )
    guard = [r for r in json_records(worker) if r.get("name") == "celery_guard"]
    startup = next(r[RECORD_ATTRIBUTE] for r in guard if r[RECORD_ATTRIBUTE]["event"] == "startup")
    assert isinstance(startup["limit_mib"], float) and isinstance(startup["requested"], int)
    assert startup["pool"] == "prefork" and startup["action"] == "kept"  # -c 1 fits
    child = next(r[RECORD_ATTRIBUTE] for r in guard if r[RECORD_ATTRIBUTE]["event"] == "child")
    assert child["task"] == "heavy_app.add" and isinstance(child["pid"], int)
    message = next(r["message"] for r in guard if r[RECORD_ATTRIBUTE]["event"] == "startup")
    if log_format == "json":  # the message keeps its contract's format too
        assert json.loads(message)["event"] == "startup"
    else:
        assert message.startswith("celery-guard event=startup ")
