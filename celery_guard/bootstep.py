"""The worker bootstep: measure, decide and log before the pool forks.

It requires the Pool step, so its ``__init__`` runs after ``Pool.__init__`` has copied
the concurrency and autoscale settings onto the worker and before any step's ``create``
forks a child: the one moment where the pool size can still be changed.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from celery import bootsteps

from . import cgroups, footprint, governor, history, telemetry
from .config import OPTIONS, ConfigError, Settings, load_settings
from .logline import emit, logger
from .plan import FORKING_POOLS, Decision, decide
from .sizes import mib

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


@dataclass(frozen=True)
class Budget:
    limit: int
    source: str  # cgroup-v2 | cgroup-v1 | env | config | physical
    detail: str
    in_use: int  # what the cgroup already holds (working set), when it is the cgroup's
    cgroup: cgroups.Cgroup | None = None  # where usage is compared with the limit


def read_budget(settings: Settings, root: str = "/") -> Budget:
    """The limit to fit in: the setting, else the cgroup's, else physical memory.

    With a cgroup limit, ``in_use`` is the working set where that limit is set: the
    processes already charged there (siblings too) count against the pool.
    """
    found = cgroups.find_memory_cgroup(root)
    if settings.memory_limit is not None:
        source = settings.source("memory_limit")
        return Budget(settings.memory_limit, source, f"{source} setting", 0, found.cgroup)
    physical, _ = cgroups.physical_memory(root)
    if physical is None:
        import psutil

        physical = psutil.virtual_memory().total
    if found.cgroup is None:
        return Budget(physical, "physical", found.reason, 0)
    limit = cgroups.read_limit(found.cgroup, physical)
    if limit.bytes is None:
        return Budget(physical, "physical", limit.reason, 0)
    level = replace(found.cgroup, path=limit.path or found.cgroup.path)
    in_use = cgroups.read_usage(level).working_set or 0
    return Budget(limit.bytes, limit.source, limit.reason, in_use, level)


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
        try:
            self.settings = load_settings(os.environ, w.app.conf)
        except ConfigError as error:
            emit(
                logging.CRITICAL,
                "config_error",
                {
                    "variable": error.variable,
                    "setting": error.setting,
                    "source": error.source,
                    "value": error.value,
                    "accepted": error.accepted,
                },
                _log_format(os.environ),
            )
            raise SystemExit(EX_CONFIG) from None
        self.collector: telemetry.Collector | None = None
        self.sampler: telemetry.Sampler | None = None
        self.watches: list[Callable[[], None]] = []
        self.brake: governor.Brake | None = None
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
        self._advise(w, pool)
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
        settings = self.settings
        gc.collect()  # what the pool does before each fork; measure the same heap
        budget = read_budget(settings)
        parent = footprint.measure(allocators=footprint.read_allocators())
        forked = getattr(w, "pool_start_method", "fork") == "fork"
        estimate = footprint.estimate_child(parent, forked=forked)
        remembered = self._history()
        if settings.child_memory is not None:
            child, child_source = settings.child_memory, settings.source("child_memory")
        elif remembered is not None:
            child, child_source = remembered, "history"
        else:
            child, child_source = estimate.bytes, "measured"
        in_use = max(parent.rss, budget.in_use)
        decision = decide(
            mode=settings.mode,
            limit=budget.limit,
            headroom_fraction=settings.headroom,
            in_use=in_use,
            child=child,
            requested=requested,
            minimum=settings.min_concurrency,
            pool=pool,
        )
        self.budget, self.parent, self.child_estimate = budget, parent, child
        fields: dict[str, Any] = {
            "mode": settings.mode,
            "pool": pool,
            "limit_mib": mib(budget.limit),
            "limit_source": budget.source,
            "headroom_mib": mib(decision.headroom),
            "parent_rss_mib": mib(parent.rss),
            "child_estimate_mib": mib(child),
            "child_estimate_source": child_source,
            "requested": requested,
            "concurrency": decision.concurrency,
            "action": decision.action,
            "fits": decision.fits,
            "in_use_mib": mib(in_use),
            "child_estimate_method": estimate.method,
            "gc_freeze": settings.gc_freeze,
            "limit_detail": budget.detail,
        }
        if w.autoscale:
            fields["autoscale_min"] = min(w.min_concurrency, decision.concurrency)
        return fields, decision

    # -- history ---------------------------------------------------------------------
    def _history(self) -> int | None:
        path = self.settings.state_file
        if path is None or self.settings.child_memory is not None:
            return None
        cost, why = history.load(path)
        if cost is None and why != "no state file yet":
            emit(
                logging.WARNING,
                "history",
                {"action": "ignored", "path": path, "reason": why},
                self.settings.log_format,
            )
        return cost

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
    def _advise(self, w: Any, pool: str) -> None:
        """Say what Celery itself would not: settings that cannot work as meant."""
        max_kib = getattr(w, "max_memory_per_child", None) or 0
        if not max_kib:
            return
        if pool not in FORKING_POOLS:
            advice = {
                "topic": "max_memory_per_child_ignored",
                "max_memory_per_child_kib": max_kib,
                "reason": f"the {pool} pool does not recycle children; the setting does nothing",
                "fix": "use the prefork pool, or drop worker_max_memory_per_child",
            }
        elif max_kib * 1024 < self.parent.rss:
            parent_kib = self.parent.rss // 1024
            advice = {
                "topic": "max_memory_per_child_below_parent",
                "max_memory_per_child_kib": max_kib,
                "parent_rss_kib": parent_kib,
                "reason": "a child's peak RSS starts at the parent's RSS, so every child "
                "will be replaced after every task",
                "fix": f"set worker_max_memory_per_child above {parent_kib} (KiB), "
                "from the summary's recommended_max_memory_per_child_kib",
            }
        else:
            return
        emit(logging.WARNING, "advice", {"worker": w.hostname, **advice}, self.settings.log_format)

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
        found = cgroups.find_memory_cgroup("/")
        forks = self.pool in FORKING_POOLS
        self.collector = telemetry.Collector(
            hostname=w.hostname,
            settings=settings,
            limit=self.budget.limit,
            headroom=decision.headroom,
            parent_rss=self.parent.rss,
            cgroup=found.cgroup,
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
        if settings.max_worker_memory is not None:
            self._watch_worker_memory(w, settings.max_worker_memory)
        self._advise_acks(w)
        collector = self.collector
        if collector is None or collector.cgroup is None:
            return
        collector.oom_kills_seen = collector.read_oom_kills()
        if cgroups.read_oom_group(collector.cgroup):
            advice = {
                "worker": w.hostname,
                "topic": "oom_group",
                "reason": "memory.oom.group is 1 in this cgroup: one OOM kill ends every "
                "process in it, the main process included",
                "fix": "keep the pool inside its budget (mode scale) so the kernel never "
                "has to act; Kubernetes 1.28+ sets it on every container",
            }
            emit(logging.WARNING, "advice", advice, settings.log_format)

    def _advise_acks(self, w: Any) -> None:
        """A child the brake (or the kernel) stops loses its task unless acks are late."""
        conf = w.app.conf
        if not self.settings.brake or self.pool not in FORKING_POOLS:
            return
        if conf.get("task_acks_late") and conf.get("task_reject_on_worker_lost"):
            return
        advice = {
            "worker": w.hostname,
            "topic": "acks_early",
            "reason": "a task whose child is stopped for memory fails with WorkerLostError "
            "and is not run again: its message was acknowledged when it started",
            "fix": "task_acks_late = True and task_reject_on_worker_lost = True (tasks must "
            "be safe to run twice), or accept the loss",
        }
        emit(logging.WARNING, "advice", advice, self.settings.log_format)

    def _watch_worker_memory(self, w: Any, limit: int) -> None:
        if self.pool not in FORKING_POOLS:
            watch = governor.WorkerMemoryLimit(limit, w.hostname, self.settings)
            self.watches.append(watch.check)
            return
        advice = {
            "worker": w.hostname,
            "topic": "max_worker_memory_ignored",
            "reason": "CELERY_GUARD_MAX_WORKER_MEMORY is for pools that do not fork; "
            "the prefork pool recycles children instead",
            "fix": "set worker_max_memory_per_child (see the summary's recommendation)",
        }
        emit(logging.WARNING, "advice", advice, self.settings.log_format)

    def create(self, w: Any) -> MemoryGuard:
        return self

    def start(self, w: Any) -> None:
        if self.collector is not None:
            self.sampler = telemetry.Sampler(
                self.collector, self.channel_read, self.collector.log_summary, self.watches
            )
            self.sampler.start()

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


__all__ = ["ACTIVE", "EX_CONFIG", "OPTIONS", "MemoryGuard", "pool_name", "read_budget"]
