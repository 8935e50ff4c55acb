"""The worker bootstep: measure, decide and log before the pool forks.

It requires the Pool step, so its ``__init__`` runs after ``Pool.__init__`` has copied
the concurrency and autoscale settings onto the worker and before any step's ``create``
forks a child: the one moment where the pool size can still be changed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from celery import bootsteps

from . import advice, cgroups, governor, history, startup, telemetry
from .config import ConfigError, error_fields, given_options, load_settings
from .logline import emit, logger
from .plan import FORKING_POOLS, Decision

EX_CONFIG = 78  # sysexits.h: configuration error; supervisors can tell it from a crash
#: The running worker's collector, for ``celery inspect guard_stats`` (one worker a process).
ACTIVE: dict[str, telemetry.Collector] = {}

_LEVELS = {
    "kept": logging.INFO,
    "off": logging.INFO,
    "scaled": logging.WARNING,
    "warned": logging.WARNING,
    "over_budget": logging.ERROR,
    "refused": logging.CRITICAL,
}


def pool_name(pool_cls: Any) -> str:
    """The ``-P`` name of a pool class: prefork, threads, solo, gevent, eventlet..."""
    from celery import concurrency

    if isinstance(pool_cls, str):
        return pool_cls
    path = f"{pool_cls.__module__}:{pool_cls.__name__}"
    for name, alias_path in concurrency.ALIASES.items():
        if alias_path == path:
            return "prefork" if name == "processes" else name
    from celery.concurrency.prefork import TaskPool

    if isinstance(pool_cls, type) and issubclass(pool_cls, TaskPool):
        return "prefork"
    return pool_cls.__name__


def _log_format(env: Mapping[str, str]) -> str:
    value = env.get("CELERY_GUARD_LOG_FORMAT", "text").strip().lower()
    return value if value in ("text", "json") else "text"


class MemoryGuard(bootsteps.StartStopStep):
    """Fit the pool to the memory budget before it forks, then watch the children."""

    label = "MemoryGuard"
    name = "celery_guard.bootstep.MemoryGuard"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, w: Any, **kwargs: Any) -> None:
        super().__init__(w, **kwargs)
        if logger.level == logging.NOTSET:
            # The startup line is the product: show it even under ``-l warning``.
            logger.setLevel(logging.INFO)
        try:  # worker options come with the kwargs when install() added them
            self.settings = load_settings(os.environ, w.app.conf, given_options(kwargs))
        except ConfigError as error:
            emit(logging.CRITICAL, "config_error", error_fields(error), _log_format(os.environ))
            raise SystemExit(EX_CONFIG) from None
        self.collector: telemetry.Collector | None = None
        self.sampler: telemetry.Sampler | None = None
        self.watches: list[Callable[[], None]] = []
        self.brake: governor.Brake | None = None
        self.metrics: Any = None  # metrics.MetricsServer, when served
        self.pool = pool_name(w.pool_cls)
        self.child_estimate = 0  # bytes, as decided at startup
        self.decision = self._startup(w)
        if self.settings.mode != "off" and self.decision is not None:  # off: collect nothing
            self._prepare_telemetry(w, self.decision)
            self._prepare_governor(w)

    def _startup(self, w: Any) -> Decision | None:
        settings = self.settings
        autoscale = list(w.autoscale) if w.autoscale else None
        requested = self.requested = int(autoscale[0] if autoscale else w.concurrency)
        pool = self.pool
        try:
            fields, decision = self._measure_and_decide(w, pool, requested)
        except Exception as error:  # noqa: BLE001 - never take the worker down by accident
            logger.exception("celery-guard event=error stage=startup")
            emit(
                logging.ERROR,
                "startup",
                {
                    "mode": settings.mode,
                    "pool": pool,
                    "requested": requested,
                    "concurrency": requested,
                    "action": "kept",
                    "error": f"{type(error).__name__}: {error}",
                },
                settings.log_format,
            )
            return None
        emit(_LEVELS[decision.action], "startup", fields, settings.log_format)
        if decision.action == "refused":
            raise SystemExit(EX_CONFIG)
        if decision.concurrency != requested:
            if autoscale:
                w.max_concurrency = decision.concurrency
                w.min_concurrency = min(w.min_concurrency, decision.concurrency)
                w.autoscale = [w.max_concurrency, w.min_concurrency]
            else:
                w.concurrency = w.min_concurrency = decision.concurrency
        return decision

    def _measure_and_decide(
        self, w: Any, pool: str, requested: int
    ) -> tuple[dict[str, Any], Decision]:
        start_method = getattr(w, "pool_start_method", "fork")
        measured = startup.measure(self.settings, pool, requested, forked=start_method == "fork")
        self.budget, self.parent = measured.budget, measured.parent
        self.child_estimate = measured.child
        fields = measured.fields()
        if w.autoscale:
            fields["autoscale_min"] = min(w.min_concurrency, measured.decision.concurrency)
        return fields, measured.decision

    def _save_history(self, fields: dict[str, Any]) -> None:
        path, cost = self.settings.state_file, fields.get("private_p95_mib")
        if path is None or not cost or not fields.get("samples"):
            return
        try:
            history.save(path, int(cost * 1024 * 1024), fields["samples"])
        except OSError as error:
            emit(
                logging.WARNING,
                "history",
                {"action": "not_saved", "path": path, "reason": str(error)},
                self.settings.log_format,
            )

    # -- advice ----------------------------------------------------------------------
    def _advise(self, w: Any) -> None:
        """Say what Celery itself would not: settings that cannot work as meant."""
        own = self.budget.own
        facts = advice.Facts.of(
            w.app.conf,
            self.settings,
            pool=self.pool,
            parent_rss=self.parent.rss,
            max_memory_per_child_kib=int(getattr(w, "max_memory_per_child", None) or 0),
            oom_group=bool(own is not None and cgroups.read_oom_group(own)),
        )
        for item in advice.worker_advice(facts):
            fields = {"worker": w.hostname, **item.fields()}
            emit(logging.WARNING, "advice", fields, self.settings.log_format)

    # -- telemetry -------------------------------------------------------------------
    def _prepare_telemetry(self, w: Any, decision: Decision) -> None:
        from celery import signals

        settings = self.settings
        max_kib = int(getattr(w, "max_memory_per_child", None) or 0)
        self.channel_read, channel_write = telemetry.open_channel()
        probe = telemetry.ChildProbe(channel_write, w.hostname, settings, max_kib)
        signals.worker_process_init.connect(
            probe.on_child_start, weak=False, dispatch_uid="cg-init"
        )
        signals.task_postrun.connect(probe.after_task, weak=False, dispatch_uid="cg-postrun")
        forks = self.pool in FORKING_POOLS
        self.collector = telemetry.Collector(
            hostname=w.hostname,
            settings=settings,
            limit=self.budget.limit,
            headroom=decision.headroom,
            parent_rss=self.parent.rss,
            cgroup=self.budget.own,
            children=(lambda: _child_pids(w)) if forks else (lambda: []),
            concurrency=lambda: _pool_size(w),
            max_memory_kib=max_kib,
        )
        ACTIVE["collector"] = self.collector

    def _prepare_governor(self, w: Any) -> None:
        from celery import signals

        settings = self.settings
        signals.worker_process_init.connect(
            governor.ChildOomScore(settings), weak=False, dispatch_uid="cg-oom-score"
        )
        if settings.gc_freeze:
            signals.worker_before_create_process.connect(
                governor.freeze_before_fork, weak=False, dispatch_uid="cg-gc-freeze"
            )
        if settings.max_worker_memory is not None and self.pool not in FORKING_POOLS:
            watch = governor.WorkerMemoryLimit(
                settings.max_worker_memory, w.hostname, settings, self.collector
            )
            self.watches.append(watch.check)
        if self.collector is not None:
            self.collector.oom_kills_seen = self.collector.read_oom_kills()
            self._watch_limit(w, self.collector)
        self._advise(w)

    def _watch_limit(self, w: Any, collector: telemetry.Collector) -> None:
        """Only a limit read from the cgroup can change under the worker's feet."""
        if collector.cgroup is None or not self.budget.source.startswith("cgroup"):
            return
        watch = governor.LimitWatch(
            collector.cgroup,
            self.budget.physical,
            self.budget.limit,
            w.hostname,
            self.settings,
            collector,
            lambda: self.brake,
        )
        self.watches.append(watch.check)

    def create(self, w: Any) -> MemoryGuard:
        return self

    def start(self, w: Any) -> None:
        if self.collector is not None:
            self.sampler = telemetry.Sampler(
                self.collector, self.channel_read, self.collector.log_summary, self.watches
            )
            self.sampler.start()
            self._serve_metrics(w)

    def _serve_metrics(self, w: Any) -> None:
        settings = self.settings
        if settings.metrics_port is None or self.collector is None:
            return
        from celery import signals

        from . import metrics

        source = metrics.GuardCollector(self.collector, self.requested)
        self.metrics = metrics.serve(
            source, settings.metrics_address, settings.metrics_port, settings.log_format
        )
        if self.metrics is not None:  # children forked from now on close their copy
            signals.worker_process_init.connect(
                self.metrics.close_in_child, weak=False, dispatch_uid="cg-metrics"
            )

    def register_with_event_loop(self, w: Any, hub: Any) -> None:
        """Wrap the pool's process-down callback once AsynPool has installed its own.

        Steps register in reverse order, so the Pool registers (and replaces the
        callback) after this step: the wrapping waits for the loop's first tick.
        """
        if self.collector is not None:
            hub.call_soon(self._wrap_process_down, w)
            self._start_brake(w, hub)

    def _start_brake(self, w: Any, hub: Any) -> None:
        """The brake needs a forking pool, a cgroup to read and a limit it enforces."""
        settings = self.settings
        if not settings.brake or self.pool not in FORKING_POOLS:
            return
        if w.autoscale:  # Celery's autoscaler owns the pool size
            return
        if self.budget.cgroup is None or self.budget.source == "physical":
            return
        self.brake = governor.Brake(
            w,
            settings,
            self.budget.cgroup,
            self.budget.limit,
            target=self.requested,
            estimate=self.child_estimate,
            collector=self.collector,
        )
        self.brake.start(hub)

    def _wrap_process_down(self, w: Any) -> None:
        pool = getattr(getattr(w, "pool", None), "_pool", None)
        if self.collector is None or pool is None or not hasattr(pool, "on_process_down"):
            return
        collector, sampler, original = self.collector, self.sampler, pool.on_process_down
        job_down = pool.on_job_process_down
        #: pid -> (task name, id) of the job it held, noted before billiard marks it lost
        held: dict[int, tuple[str, str]] = {}

        def on_job_process_down(job: Any, pid_gone: int) -> Any:
            try:
                held[pid_gone] = _task_of(job)
            except Exception:  # noqa: BLE001 - the pool's own callback must still run
                logger.exception("celery-guard event=error stage=job_process_down")
            return job_down(job, pid_gone)

        def on_process_down(proc: Any) -> Any:
            try:
                if sampler is not None:
                    sampler.drain()  # the child's last record, written before it exited
                task = held.pop(proc.pid, None) or governor.running_task(proc.pid)
                collector.on_exit(proc.pid, proc.exitcode, task)
            except Exception:  # noqa: BLE001 - the pool's own callback must still run
                logger.exception("celery-guard event=error stage=process_down")
            return original(proc) if original else None

        pool.on_job_process_down = on_job_process_down
        pool.on_process_down = on_process_down

    def stop(self, w: Any) -> None:
        if self.brake is not None:
            self.brake.stop()
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        if self.sampler is not None and self.collector is not None:
            self.sampler.stop()
            self.sampler = None
            try:
                self.collector.sample()
                self._save_history(self.collector.log_summary(final=True))
            except Exception:  # noqa: BLE001 - shutdown goes on
                logger.exception("celery-guard event=error stage=shutdown")

    terminate = stop
    shutdown = stop


def _task_of(job: Any) -> tuple[str, str]:
    """(name, id) of a billiard job: its correlation id is the task id."""
    from celery.worker import state

    request = state.requests.get(job.correlation_id)
    return (request.name if request is not None else "?"), job.correlation_id


def _child_pids(w: Any) -> list[int]:
    try:
        return [p.pid for p in list(w.pool._pool._pool) if p.pid]
    except AttributeError:
        return []


def _pool_size(w: Any) -> int:
    try:
        return int(w.pool.num_processes)
    except (AttributeError, TypeError):
        return int(w.concurrency)


__all__ = ["ACTIVE", "EX_CONFIG", "MemoryGuard", "pool_name"]
