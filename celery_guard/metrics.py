"""Prometheus metrics (the ``celery-guard[prometheus]`` extra), served by the main process.

Figures are read when scraped, from the collector and the cgroup: nothing is updated on
the task path. Only the main process serves; a forked child closes its copy of the
listening socket, so one port answers for the whole worker.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from . import cgroups
from .logline import emit
from .telemetry import Collector, read_private

PREFIX = "celery_guard_"


class GuardCollector:
    """A ``prometheus_client`` custom collector over the guard's live figures."""

    def __init__(self, collector: Collector, requested: int) -> None:
        self.collector = collector
        self.requested = requested

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        c = self.collector
        labels = ["worker"]
        worker = [c.hostname]

        def gauge(name: str, doc: str, value: float | None) -> Iterator[Any]:
            if value is not None:
                family = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
                family.add_metric(worker, value)
                yield family

        yield from gauge("limit_bytes", "The memory limit the pool is fitted to.", c.limit)
        usage = cgroups.read_usage(c.cgroup) if c.cgroup is not None else None
        yield from gauge(
            "usage_bytes", "The cgroup's memory usage.", usage.usage if usage else None
        )
        yield from gauge(
            "working_set_bytes",
            "The cgroup's working set: usage less inactive file pages.",
            usage.working_set if usage else None,
        )
        pids = c.children()
        yield from gauge("children", "Live pool children.", len(pids))
        yield from gauge("concurrency", "The pool's size now.", c.concurrency())
        yield from gauge(
            "requested_concurrency", "The concurrency the worker was started with.",
            self.requested,
        )  # fmt: skip
        private = GaugeMetricFamily(
            PREFIX + "child_private_bytes",
            "Memory only this child holds (USS), read when scraped.",
            labels=["worker", "pid"],
        )
        for pid in pids:
            value = read_private(pid)
            if value is not None:  # None: it exited between the listing and the read
                private.add_metric([c.hostname, str(pid)], value)
        yield private

        with c.lock:
            pressure = dict(c.pressure)
            oom_kills, recycles = c.oom_kills, c.recycles
            hits = {name: dict(counts) for name, counts in c.limit_hits.items()}
        actions = CounterMetricFamily(
            PREFIX + "pressure_actions",
            "Actions the guard took on memory (event=pressure lines), by action.",
            labels=["worker", "action"],
        )
        for action, count in sorted(pressure.items()):
            actions.add_metric([c.hostname, action], count)
        yield actions
        limits = CounterMetricFamily(
            PREFIX + "task_memory_limit",
            "Tasks that passed their own memory limit, by task name (at most 200 names, the "
            "rest as other) and kind: soft, hard (raised in the task), kill (its child "
            "stopped).",
            labels=["worker", "task", "kind"],
        )
        for name, counts in sorted(hits.items()):
            for kind, count in sorted(counts.items()):
                limits.add_metric([c.hostname, name, kind], count)
        yield limits
        for name, doc, value in (
            ("oom_kills", "Pool children the kernel's OOM killer stopped.", oom_kills),
            ("recycles", "Children replaced for worker_max_memory_per_child.", recycles),
        ):
            family = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            family.add_metric(worker, value)
            yield family


class MetricsServer:
    """The HTTP endpoint; ``close_in_child`` is connected to ``worker_process_init``."""

    def __init__(self, server: Any, thread: Any) -> None:
        self.server = server
        self.thread = thread

    def close_in_child(self, **_: Any) -> None:
        try:
            self.server.socket.close()
        except OSError:
            pass

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve(source: GuardCollector, address: str, port: int) -> MetricsServer | None:
    """Start serving; on any failure (no prometheus_client,
    the port taken, an address the resolver or idna refuses) one ERROR line, and the
    worker goes on without metrics: metrics are never worth the worker."""
    fields: dict[str, Any] = {"address": address, "port": port}
    try:
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(source)
        server, thread = start_http_server(port, addr=address, registry=registry)
    except ImportError:
        reason = "prometheus_client is not installed: pip install 'celery-guard[prometheus]'"
        emit(logging.ERROR, "metrics", {**fields, "action": "off", "reason": reason})
        return None
    except Exception as error:  # noqa: BLE001 - OSError, gaierror, UnicodeError, ...
        detail = getattr(error, "strerror", None) or str(error) or "no detail"
        reason = f"{type(error).__name__}: {detail}"
        emit(logging.ERROR, "metrics", {**fields, "action": "off", "reason": reason})
        return None
    bound = server.server_address[1]
    emit(
        logging.INFO,
        "metrics",
        {"address": address, "port": bound, "action": "serving"},
    )
    return MetricsServer(server, thread)


__all__ = ["GuardCollector", "MetricsServer", "serve"]
