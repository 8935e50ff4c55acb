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


def _sample(families: list[Any], name: str, **labels: str) -> float:
    for family in families:
        for sample in family.samples:
            if sample.name == metrics.PREFIX + name and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels}")


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
    assert _sample(families, "task_recycles_total", task="app.kept") == 1
    assert now.task_counts()["app.kept"] == {"recycle": 1}
    assert _sample(families, "pressure_actions_total", action="hold") == 1 == now.pressure["hold"]
    assert stats["tasks"]["app.kept"] == {"events": 1, "total_mib": 3.0, "max_mib": 3.0}
    assert _sample(families, "concurrency") == stats["concurrency"] == 2
    assert _sample(families, "limit_bytes") == now.limit == stats["limit_mib"] * MIB
    assert c.snapshot().task_counts()["app.kept"] == {"recycle": 2}  # the live table went on
