"""Prometheus metrics (the ``celery-guard[prometheus]`` extra), served by the main process.

Figures are read when scraped, from the collector and the cgroup: nothing is updated on
the task path. Only the main process serves; a forked child closes its copy of the
listening socket, so one port answers for the whole worker.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any

from . import cgroups, procfs
from .ledger import MAX_TASK_NAMES
from .logline import emit
from .protect import threads_without_signals
from .telemetry import PEAK_BUCKETS, Collector, Snapshot

PREFIX = "celery_guard_"
#: The port the documentation and the examples use: outside Prometheus' allocated range
#: (9100-9999, which is full), clear of celery-exporter (9808) and Flower (5555).
CONVENTIONAL_PORT = 10315
#: The actions counted by ``pressure_actions_total`` (the ``event=pressure`` lines'), each
#: served from 0 so that an alert on its first increase sees it.
PRESSURE_ACTIONS = (
    "hold", "release", "grow", "retire", "recycle", "give_back", "terminate", "warm_shutdown",
)  # fmt: skip
#: The per-task counters, by the kind ``Collector.count_task`` counts.
TASK_COUNTERS = (
    ("recycle", "Children recycled for their memory after a run of the task."),
    ("hold", "Times a task was held because its peak would not fit."),
    ("memory_kill", "Runs of the task stopped by the guard as the last resort."),
    ("oom_kill", "Runs of the task stopped by the kernel's OOM killer."),
)


def _version() -> str:
    """The installed distribution's version (read from its metadata: the package's
    ``__init__`` sits above this module, which it must not import)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("celery-guard")
    except PackageNotFoundError:
        return "unknown"


def registered_tasks(app: Any) -> list[str]:
    """The app's own tasks (not Celery's ``celery.*``), at most as many as the collector's
    table keeps by name: the per-task counters are served from 0 for these."""
    names = sorted(n for n in app.tasks.keys() if not n.startswith("celery."))
    return names[:MAX_TASK_NAMES]


def exporter_hostname(node: str) -> str:
    """celery-exporter's ``hostname`` label: the host part of Celery's node name, split by
    Celery's own ``nodesplit`` as that exporter does (``w1@host`` -> ``host``), so that
    one PromQL expression joins both exporters' series."""
    from celery.utils import nodesplit

    return str(nodesplit(node)[1])


def cumulative(counts: list[int], bounds: tuple[int, ...]) -> list[tuple[str, int]]:
    """Prometheus buckets (``le`` upper bounds, cumulative, ``+Inf`` last) from the counts
    of each bucket and the one above the last bound."""
    totals = zip(bounds, itertools.accumulate(counts), strict=False)
    return [(str(float(bound)), total) for bound, total in totals] + [("+Inf", sum(counts))]


class GuardCollector:
    """A ``prometheus_client`` custom collector over the guard's live figures.

    Labels follow celery-exporter's: ``hostname`` is the part of the node name after
    ``@`` and a task's label is ``name``; ``worker`` keeps the whole node name, which tells
    two workers on one host apart. No label is unbounded: the children's private memory is
    two gauges (not a series per pid) and task names are the collector's bounded table
    (200 names, then ``other``). Counters are served from 0: those of each pressure
    action and, per task, of each task the worker registered (``task_names``) or ran."""

    def __init__(
        self,
        collector: Collector,
        requested: int,
        snapshot: Callable[[], Snapshot] | None = None,
        task_names: Callable[[], list[str]] = list,
    ) -> None:
        self.collector = collector
        self.requested = requested
        #: the figures with the governor's (``Guard.snapshot``): the recommendation
        #: weighs its plan
        self.snapshot = snapshot or collector.snapshot
        self.task_names = task_names

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        c, now = self.collector, self.snapshot()
        host, summary = [exporter_hostname(now.hostname), now.hostname], now.summary
        labels = ["hostname", "worker"]
        info = GaugeMetricFamily(
            PREFIX + "info", "The guard's version; always 1.", labels=[*labels, "version"]
        )
        info.add_metric([*host, _version()], 1)
        yield info
        usage = cgroups.read_usage(c.cgroup) if c.cgroup is not None else None
        pids = c.children()
        limit_mib = summary.get("recommended_memory_limit_mib")
        total, largest = self._children_private(pids)
        for name, doc, value in (
            ("limit_bytes", "The memory limit the pool is fitted to.", now.limit),
            ("usage_bytes", "The cgroup's memory usage.", usage.usage if usage else None),
            ("working_set_bytes", "The cgroup's working set: usage less inactive file pages.",
             usage.working_set if usage else None),
            ("children", "Live pool children.", len(pids)),
            ("concurrency", "The pool's size now.", summary["concurrency"]),
            ("requested_concurrency", "The concurrency the worker was started with.",
             self.requested),
            ("recommended_concurrency", "The children the measured per-child cost allows.",
             summary.get("recommended_concurrency")),
            ("recommended_memory_limit_bytes",
             "The memory limit that would run the requested concurrency, as measured.",
             limit_mib * 1024 * 1024 if limit_mib is not None else None),
            ("children_private_bytes",
             "The pool children's private memory (USS) together, read when scraped.", total),
            ("child_max_private_bytes",
             "The largest private memory (USS) of one pool child, read when scraped.", largest),
        ):  # fmt: skip
            if value is not None:
                gauge = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
                gauge.add_metric(host, value)
                yield gauge

        actions = CounterMetricFamily(
            PREFIX + "pressure_actions",
            "Actions the guard took on memory (event=pressure lines), by action.",
            labels=[*labels, "action"],
        )
        for action in sorted(set(PRESSURE_ACTIONS) | set(now.pressure)):
            actions.add_metric([*host, action], now.pressure.get(action, 0))
        yield actions
        for name, doc in (
            ("oom_kills", "Pool children the kernel's OOM killer stopped."),
            ("recycles", "Children replaced for worker_max_memory_per_child."),
        ):
            family = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            family.add_metric(host, summary[name])
            yield family
        growth = HistogramMetricFamily(
            PREFIX + "task_peak_growth_bytes",
            "How far one run of a task raised its child's memory at its peak, by task name.",
            labels=[*labels, "name"],
        )
        for name, figures in sorted(now.tasks.items()):
            if sum(figures.peaks):
                growth.add_metric(
                    [*host, name], cumulative(figures.peaks, PEAK_BUCKETS), figures.peaks_sum
                )
        yield growth
        events = now.task_counts()
        names = sorted(set(self.task_names()) | set(events) | set(now.tasks))
        for kind, doc in TASK_COUNTERS:
            family = CounterMetricFamily(
                PREFIX + "task_" + kind + "s", doc, labels=[*labels, "name"]
            )
            for name in names:
                family.add_metric([*host, name], events.get(name, {}).get(kind, 0))
            yield family
        limits = CounterMetricFamily(
            PREFIX + "task_memory_limit",
            "Tasks that passed their own memory limit, by task name and kind: soft, hard "
            "(raised in the task), kill (its child stopped).",
            labels=[*labels, "name", "kind"],
        )
        for name, hit in sorted(now.limit_hits().items()):
            for kind, count in sorted(hit.items()):
                limits.add_metric([*host, name, kind], count)
        yield limits

    @staticmethod
    def _children_private(pids: list[int]) -> tuple[int | None, int | None]:
        """The children's private memory now (USS, read when scraped): together and the
        largest; None for both when no child could be read."""
        readings = [procfs.private(pid) for pid in pids]  # Unread: it exited since the listing
        found = [value for value in readings if not isinstance(value, procfs.Unread)]
        return (sum(found), max(found)) if found else (None, None)


class MetricsServer:
    """The HTTP endpoint; ``close_in_child`` runs in every child as it is forked
    (``os.register_at_fork``), before anything of Celery's runs there."""

    def __init__(self, server: Any) -> None:
        self.server = server
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
    """Start serving; on any failure (no prometheus_client, the port taken, an address the
    resolver or idna refuses) one ERROR line, and the worker goes on: metrics are never
    worth the worker."""
    fields: dict[str, Any] = {"address": address, "port": port}
    try:
        from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(source)
        ProcessCollector(registry=registry)  # process_*: the main process's own figures
        with threads_without_signals():  # its thread must not take the worker's signals
            server, _ = start_http_server(port, addr=address, registry=registry)
    except Exception as error:  # noqa: BLE001 - ImportError, OSError, gaierror, UnicodeError, ...
        if isinstance(error, ImportError):
            reason = "prometheus_client is not installed: pip install 'celery-guard[prometheus]'"
        else:
            detail = getattr(error, "strerror", None) or str(error) or "no detail"
            reason = f"{type(error).__name__}: {detail}"
        emit(logging.ERROR, "metrics", {**fields, "action": "off", "reason": reason})
        return None
    serving = MetricsServer(server)
    emit(logging.INFO, "metrics", {"address": address, "port": serving.port, "action": "serving"})
    return serving


__all__ = [
    "CONVENTIONAL_PORT",
    "GuardCollector",
    "MetricsServer",
    "cumulative",
    "exporter_hostname",
    "registered_tasks",
    "serve",
]
