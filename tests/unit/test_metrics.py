"""Tests for celery_guard.metrics.serve: whatever binding raises, the worker goes on.

Metrics are an extra: an address the resolver or idna refuses, a port taken, must cost
one ERROR ``event=metrics`` line and no more (before, UnicodeError from idna escaped and
the worker exited 1 with "Unrecoverable error").
"""

from __future__ import annotations

import logging
import socket
import urllib.request
from collections.abc import Iterator
from typing import Any

import needs
import pytest

from celery_guard import metrics
from celery_guard.logline import parse_line

needs.module("prometheus_client", module_level=True)
MIB = 1024 * 1024


class Empty:
    """A collector with no metric: serve only needs something to register."""

    def collect(self) -> Iterator[Any]:
        return iter(())


def _metrics_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    marks = ("event=metrics", '"event":"metrics"')
    return [r for r in caplog.records if any(m in r.getMessage() for m in marks)]


@pytest.mark.parametrize(
    "address",
    [
        "a" * 64,  # idna: label too long (UnicodeError)
        "x..y",  # idna: empty label (UnicodeError)
        "no-such-host.invalid",  # the resolver: socket.gaierror
        "192.0.2.1",  # TEST-NET-1, not this machine's: EADDRNOTAVAIL
    ],
)
def test_an_address_that_cannot_be_bound_is_one_error_line(
    address: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="celery_guard")
    assert metrics.serve(Empty(), address, 0) is None  # type: ignore[arg-type]
    (record,) = _metrics_lines(caplog)
    assert record.levelno == logging.ERROR
    fields = parse_line(record.getMessage())
    assert (fields["action"], fields["address"]) == ("off", address)
    assert fields["reason"]


def test_a_port_in_use_is_one_error_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="celery_guard")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        served = metrics.serve(Empty(), "127.0.0.1", port)  # type: ignore[arg-type]
    assert served is None
    (record,) = _metrics_lines(caplog)
    assert record.levelno == logging.ERROR and "action=off" in record.getMessage()


def test_a_good_address_serves(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="celery_guard")
    server = metrics.serve(Empty(), "127.0.0.1", 0)  # type: ignore[arg-type]
    assert server is not None
    try:
        fields = parse_line(_metrics_lines(caplog)[0].getMessage())
        assert fields["action"] == "serving"
        url = f"http://127.0.0.1:{fields['port']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
    finally:
        server.stop()


def _sample(families: list[Any], metric: str, **labels: str) -> float:
    for family in families:
        for sample in family.samples:
            if sample.name == metrics.PREFIX + metric and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                return float(sample.value)
    raise AssertionError(f"no sample {metric} {labels}")


def test_the_metrics_and_guard_stats_render_one_snapshot() -> None:
    """A scrape reads the figures once (``Collector.snapshot``), as ``guard_stats`` and
    the summary line do: a figure counted after the snapshot was taken is in neither
    that scrape nor that reply, and every counter the scrape shows is the snapshot's."""
    from .test_adversarial_pipe import collector, record

    c = collector({101})
    c.read_lines([record(name="app.kept", delta=3 * MIB)])
    c.count_task("recycle", "app.kept")
    c.count_pressure("hold")
    taken = []

    def snapshot() -> Any:
        taken.append(c.snapshot())
        c.count_task("recycle", "app.kept")  # counted after: in no report of this one
        c.count_pressure("hold")
        return taken[-1]

    families = list(metrics.GuardCollector(c, 16, snapshot).collect())
    (now,) = taken
    stats = now.stats()
    assert _sample(families, "task_recycles_total", name="app.kept") == 1
    assert now.task_counts()["app.kept"] == {"recycle": 1}
    assert _sample(families, "pressure_actions_total", action="hold") == 1 == now.pressure["hold"]
    assert stats["tasks"]["app.kept"] == {"events": 1, "total_mib": 3.0, "max_mib": 3.0}
    assert _sample(families, "concurrency") == stats["concurrency"] == 2
    assert _sample(families, "limit_bytes") == now.limit == stats["limit_mib"] * MIB
    assert c.snapshot().task_counts()["app.kept"] == {"recycle": 2}  # the live table went on


def _samples(families: list[Any]) -> list[Any]:
    return [sample for family in families for sample in family.samples]


def test_labels_join_celery_exporters_series() -> None:
    """celery-exporter labels a worker's series ``hostname``, the host part of the node
    name (``w1@vm`` -> ``vm``, split as Celery's ``nodesplit`` does), and a task's
    series ``name``: every series here has those, and ``worker`` with the whole node
    name (two workers on one host stay apart); no ``task`` label is left."""
    from dataclasses import replace

    from .test_adversarial_pipe import collector, record

    c = collector({101})
    c.read_lines([record(name="app.kept", delta=3 * MIB)])
    c.count_task("hold", "app.kept")

    def snapshot() -> Any:
        return replace(c.snapshot(), hostname="w1@vm.example")

    samples = _samples(list(metrics.GuardCollector(c, 2, snapshot).collect()))
    assert samples
    assert {(s.labels["hostname"], s.labels["worker"]) for s in samples} == {
        ("vm.example", "w1@vm.example")
    }
    assert not any("task" in s.labels for s in samples)
    held = [s for s in samples if s.name == metrics.PREFIX + "task_holds_total"]
    assert [(s.labels["name"], s.value) for s in held] == [("app.kept", 1)]
    assert metrics.exporter_hostname("celery@a@b") == "a@b"  # nodesplit: the first "@"
    assert metrics.exporter_hostname("vm") == "vm"


def test_counters_are_served_at_zero_before_their_first_event() -> None:
    """An alert on ``increase(...) > 0`` sees the first event only if the series existed
    before it: each pressure action, and each per-task counter of every task the app
    registered, are served at 0 from the first scrape; a task seen but not registered
    (sent by name) is served too."""
    from .test_adversarial_pipe import collector, record

    c = collector({101})
    c.read_lines([record(name="app.sent_by_name")])
    source = metrics.GuardCollector(c, 2, task_names=lambda: ["app.a", "app.b"])
    families = list(source.collect())
    for action in ("hold", "terminate", "give_back", "warm_shutdown"):
        assert _sample(families, "pressure_actions_total", action=action) == 0
    for kind in ("recycles", "holds", "memory_kills", "oom_kills"):
        names = {
            s.labels["name"]: s.value
            for s in _samples(families)
            if s.name == metrics.PREFIX + f"task_{kind}_total"
        }
        assert names == {"app.a": 0, "app.b": 0, "app.sent_by_name": 0}, kind


def test_no_histogram_is_recomputed_from_live_children() -> None:
    """A histogram's count may never fall: the children's private memory, read anew at
    each scrape, is two gauges (together, the largest), not a histogram. One child (this
    process) gives both the same figure."""
    import os

    from .test_adversarial_pipe import collector

    c = collector({os.getpid()})
    c.children = lambda: [os.getpid()]
    families = list(metrics.GuardCollector(c, 2).collect())
    types = {f.name: f.type for f in families}
    assert [name for name, kind in types.items() if kind == "histogram"] == [
        metrics.PREFIX + "task_peak_growth_bytes"  # runs counted, never forgotten
    ]
    assert types[metrics.PREFIX + "children_private_bytes"] == "gauge"
    together = _sample(families, "children_private_bytes")
    assert together == _sample(families, "child_max_private_bytes") > 0


def test_the_info_metric_names_the_version() -> None:
    from celery_guard import __version__

    from .test_adversarial_pipe import collector

    families = list(metrics.GuardCollector(collector(), 2).collect())
    assert _sample(families, "info", version=__version__) == 1


def test_the_apps_own_tasks_are_the_registered_ones() -> None:
    """Celery's own ``celery.*`` tasks are not the app's; the list is bounded as the
    collector's table of names is."""
    from types import SimpleNamespace

    tasks = {"celery.chord_unlock": 0, "app.b": 0, "app.a": 0}
    assert metrics.registered_tasks(SimpleNamespace(tasks=tasks)) == ["app.a", "app.b"]
    many = {f"app.t{n:04}": 0 for n in range(500)}
    assert len(metrics.registered_tasks(SimpleNamespace(tasks=many))) == 200
