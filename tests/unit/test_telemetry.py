"""The child's per-task hooks around Celery's tracer (``ChildProbe.wrap_tracer``)."""

from __future__ import annotations

import os
import resource
import time
from types import SimpleNamespace
from typing import Any

import celery.app.trace
import pytest

from celery_guard.config import load_settings
from celery_guard.telemetry import TRACERS, ChildProbe, parse_record

MIB = 1024 * 1024


class Tracers:
    """A module with Celery's two tracer functions; the second raises."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def fast_trace_task(self, task: str, uuid: str, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((task, uuid))
        time.sleep(0.01)
        return (1, None, 0.01)

    def trace_task_ret(self, name: str, uuid: str, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((name, uuid))
        raise RuntimeError("the tracer failed")


def test_celerys_tracers_are_the_functions_the_probe_wraps() -> None:
    assert all(callable(getattr(celery.app.trace, name, None)) for name in TRACERS)


def test_the_hooks_run_around_celerys_tracer_in_place_of_its_signals() -> None:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    probe = ChildProbe(write_end, "w@h", load_settings({}, {}), 0)
    probe.on_child_start()
    module = Tracers()
    assert probe.wrap_tracer(module)
    assert module.fast_trace_task("app.report", "id-1", {}, b"", "", "") == (1, None, 0.01)
    with pytest.raises(RuntimeError):
        module.trace_task_ret("app.ping", "id-2", {}, b"", "", "")
    assert module.calls == [("app.report", "id-1"), ("app.ping", "id-2")]
    assert probe.tasks == 2 and probe.busy >= 0.01  # the task's own time, from the wrapper
    assert probe.wrap_tracer(module)  # again: around the tracer, not around the wrapper
    module.fast_trace_task("app.report", "id-3", {}, b"", "", "")
    assert probe.tasks == 3
    names = [line.split()[-1] for line in os.read(read_end, 65536).decode().splitlines()]
    os.close(read_end)
    os.close(write_end)
    assert names[:2] == ["app.report", "app.ping"]  # each task's record, named by the tracer


def test_a_module_without_both_tracers_is_left_alone() -> None:
    probe = ChildProbe(None, "w@h", load_settings({}, {}), 0)
    traced = Tracers().fast_trace_task
    module = SimpleNamespace(fast_trace_task=traced)  # no trace_task_ret
    assert not probe.wrap_tracer(module)
    assert module.fast_trace_task == traced


def test_a_record_the_probe_writes_reads_back_as_the_task_it_measured() -> None:
    """One task that raises the child's peak by 64 MiB past its lifetime's and frees it:
    the main process reads an exact peak of at least 64 MiB and nothing retained, not
    the other way round (every field of the record by its place)."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    probe = ChildProbe(write_end, "w@h", load_settings({}, {}), 0)
    probe.on_child_start()
    above = max(probe.last_peak - probe.last_rss, 0) + 64 * MIB
    probe.before_task()
    block = bytearray(above)  # zero pages: counted once written
    block[:: resource.getpagesize()] = b"\1" * len(block[:: resource.getpagesize()])
    del block
    probe.after_task(task_id="id-1", name="app.big report")
    (line,) = os.read(read_end, 65536).decode().splitlines()
    os.close(read_end)
    os.close(write_end)
    parsed = parse_record(line)
    assert parsed is not None
    kind, delta, record = parsed
    assert (kind, record.pid, record.name, record.exact, record.tasks) == (
        "T", os.getpid(), "app.big report", True, 1,
    )  # fmt: skip
    assert record.peak >= 56 * MIB and delta >= 56 * MIB  # 64 MiB, as the kernel counts pages
    assert abs(record.retained) < 16 * MIB  # freed: what it kept is within noise
    assert record.rss == probe.last_rss and record.private is not None and record.private > 0
    assert record.cpu is not None and record.busy is not None and record.busy > 0
