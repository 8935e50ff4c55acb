"""Prometheus metrics (the ``celery-guard[prometheus]`` extra), served by the main process.

Figures are read when scraped, from the collector and the cgroup: nothing is updated on
the task path. Only the main process serves; a forked child closes its copy of the
listening socket, so one port answers for the whole worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from . import cgroups, procfs
from .logline import emit
from .protect import threads_without_signals
from .telemetry import PEAK_BUCKETS, Collector, Snapshot

PREFIX = "celery_guard_"
#: The port the documentation and the examples use: outside Prometheus' allocated range
#: (9100-9999, which is full), clear of celery-exporter (9808) and Flower (5555).
CONVENTIONAL_PORT = 10315
#: Upper bounds (bytes) of the buckets of the children's private memory.
CHILD_BUCKETS = tuple(mib << 20 for mib in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096))


def cumulative(counts: list[int], bounds: tuple[int, ...]) -> list[tuple[str, int]]:
    """Prometheus buckets (``le`` upper bounds, cumulative, ``+Inf`` last) from the counts
    of each bucket and the one above the last bound."""
    buckets, total = [], 0
    for bound, count in zip(bounds, counts, strict=False):
        total += count
        buckets.append((str(float(bound)), total))
    buckets.append(("+Inf", total + sum(counts[len(bounds) :])))
    return buckets


class GuardCollector:
    """A ``prometheus_client`` custom collector over the guard's live figures.

    Labels follow celery-exporter's: ``hostname`` is the worker's node name. No label is
    unbounded: the children's private memory is one histogram (not a series per pid) and
    task names are the collector's bounded table (200 names, then ``other``)."""

    def __init__(
        self,
        collector: Collector,
        requested: int,
        snapshot: Callable[[], Snapshot] | None = None,
    ) -> None:
        self.collector = collector
        self.requested = requested
        #: the figures with the governor's (``Guard.snapshot``): the recommendation
        #: weighs its plan
        self.snapshot = snapshot or collector.snapshot

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        c, now = self.collector, self.snapshot()
        host, summary = [now.hostname], now.summary

        def gauge(name: str, doc: str, value: float | None) -> Iterator[Any]:
            if value is not None:
                family = GaugeMetricFamily(PREFIX + name, doc, labels=["hostname"])
                family.add_metric(host, value)
                yield family

        yield from gauge("limit_bytes", "The memory limit the pool is fitted to.", now.limit)
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
        yield from gauge("concurrency", "The pool's size now.", summary["concurrency"])
        yield from gauge(
            "requested_concurrency", "The concurrency the worker was started with.",
            self.requested,
        )  # fmt: skip
        yield from gauge(
            "recommended_concurrency", "The children the measured per-child cost allows.",
            summary.get("recommended_concurrency"),
        )  # fmt: skip
        limit_mib = summary.get("recommended_memory_limit_mib")
        yield from gauge(
            "recommended_memory_limit_bytes",
            "The memory limit that would run the requested concurrency, as measured.",
            limit_mib * 1024 * 1024 if limit_mib is not None else None,
        )
        yield self._children_private(HistogramMetricFamily, pids)

        actions = CounterMetricFamily(
            PREFIX + "pressure_actions",
            "Actions the guard took on memory (event=pressure lines), by action.",
            labels=["hostname", "action"],
        )
        for action, count in sorted(now.pressure.items()):
            actions.add_metric([now.hostname, action], count)
        yield actions
        for name, doc in (
            ("oom_kills", "Pool children the kernel's OOM killer stopped."),
            ("recycles", "Children replaced for worker_max_memory_per_child."),
        ):
            family = CounterMetricFamily(PREFIX + name, doc, labels=["hostname"])
            family.add_metric(host, summary[name])
            yield family
        growth = HistogramMetricFamily(
            PREFIX + "task_peak_growth_bytes",
            "How far one run of a task raised its child's memory at its peak, by task name.",
            labels=["hostname", "task"],
        )
        for name, figures in sorted(now.tasks.items()):
            if sum(figures.peaks):
                growth.add_metric(
                    [now.hostname, name], cumulative(figures.peaks, PEAK_BUCKETS),
                    figures.peaks_sum,
                )  # fmt: skip
        yield growth
        events = now.task_counts()
        for kind, doc in (
            ("recycle", "Children recycled for their memory after a run of the task."),
            ("hold", "Times a task was held because its peak would not fit."),
            ("memory_kill", "Runs of the task stopped by the guard as the last resort."),
            ("oom_kill", "Runs of the task stopped by the kernel's OOM killer."),
        ):
            family = CounterMetricFamily(
                PREFIX + "task_" + kind + "s", doc, labels=["hostname", "task"]
            )
            for name, by_kind in sorted(events.items()):
                if by_kind.get(kind):
                    family.add_metric([now.hostname, name], by_kind[kind])
            yield family
        limits = CounterMetricFamily(
            PREFIX + "task_memory_limit",
            "Tasks that passed their own memory limit, by task name and kind: soft, hard "
            "(raised in the task), kill (its child stopped).",
            labels=["hostname", "task", "kind"],
        )
        for name, hit in sorted(now.limit_hits().items()):
            for kind, count in sorted(hit.items()):
                limits.add_metric([now.hostname, name, kind], count)
        yield limits

    def _children_private(self, family_class: Any, pids: list[int]) -> Any:
        """The children's private memory now (USS, read when scraped), as one histogram."""
        counts, total = [0] * (len(CHILD_BUCKETS) + 1), 0
        for pid in pids:
            value = procfs.private(pid)
            if isinstance(value, procfs.Unread):  # it exited between the listing and the read
                continue
            index = next((i for i, b in enumerate(CHILD_BUCKETS) if value <= b), -1)
            counts[index] += 1
            total += value
        family = family_class(
            PREFIX + "child_private_bytes",
            "The pool children's private memory (USS), read when scraped.",
            labels=["hostname"],
        )
        family.add_metric([self.collector.hostname], cumulative(counts, CHILD_BUCKETS), total)
        return family


class MetricsServer:
    """The HTTP endpoint; ``close_in_child`` runs in every child as it is forked
    (``os.register_at_fork``), before anything of Celery's runs there."""

    def __init__(self, server: Any, thread: Any) -> None:
        self.server = server
        self.thread = thread
        self.port: int = server.server_address[1]  # the one bound (port 0: any free one)

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
        with threads_without_signals():  # its thread must not take the worker's signals
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
    serving = MetricsServer(server, thread)
    emit(logging.INFO, "metrics", {"address": address, "port": serving.port, "action": "serving"})
    return serving


__all__ = ["CONVENTIONAL_PORT", "GuardCollector", "MetricsServer", "cumulative", "serve"]
