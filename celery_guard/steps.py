"""The worker steps: thin Celery glue, one concern each, in the style of
``celery/worker/components.py``.

``MemoryGuard`` is the one line users add; it requires the others, so Celery's blueprint
pulls them in (``requires`` also means "after"):

- ``Fit`` (requires the Pool step): measure, read the limit, decide the concurrency. Its
  ``__init__`` runs after ``Pool.__init__`` has copied the concurrency onto the worker and
  before any step's ``create`` forks a child: the one moment the pool size can change.
- ``Telemetry``: the per-task probe in each child, the collector and its sampler thread,
  and (prefork on the event loop) the ``PoolControl`` that hears the pool.
- ``Protection``: children's ``oom_score_adj``, ``gc.freeze`` before each fork, the
  worker memory limit of pools that do not fork.
- ``TaskLimits``: memory limits per task (``memory_limit``, ``soft_memory_limit``).
- ``Governor``: the run-time budget (prefork, a cgroup, the event loop, no autoscale).
- ``Metrics``: the Prometheus endpoint, when a port is set.

They share one ``GuardState`` on the worker (``w.memory_guard``). Each has ``info()``, so
``celery inspect stats`` shows its figures under ``guard_<step>``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import bootsteps
from celery.worker.components import Pool

from . import (
    advice,
    cgroups,
    governor,
    history,
    procfs,
    startup,
    task_limits,
    telemetry,
    watchdog,
)  # fmt: skip
from .actuator import PoolControl, pool_size
from .config import ConfigError, Settings, error_fields, given_options, load_settings
from .limit import LimitWatch, LiveLimit
from .logline import emit, format_from_env, logger, use_format
from .plan import FORKING_POOLS
from .resize import Resizer
from .sizes import mib
from .task_limits import TaskLimit


@dataclass
class GuardState:
    """What the steps share: the settings and the startup figures (Fit), the live limit
    (Fit owns it, the limit watch changes it), the collector and the pool control
    (Telemetry), the watches the sampler runs."""

    settings: Settings
    pool: str
    requested: int
    measured: startup.Measured | None = None
    live: LiveLimit | None = None
    collector: telemetry.Collector | None = None
    control: PoolControl | None = None
    watches: list[Callable[[], None]] = field(default_factory=list)
    #: The write end of the children's channel (Telemetry), for the watchdog's records.
    channel: int | None = None
    #: Tasks that declare memory limits (TaskLimits), by name.
    task_limits: dict[str, TaskLimit] = field(default_factory=dict)
    #: The governor runs: it owns the pool size (else ``resizer`` does).
    governed: bool = False
    #: Called once the pool's hooks are in place (on the event loop's first tick).
    on_installed: list[Callable[[], None]] = field(default_factory=list)
    #: Seconds the full collection before the first fork took (Protection, gc.freeze
    #: on): what a worker without the freeze spends before every fork.
    unfrozen_collect: Callable[[], float] = lambda: 0.0
    #: The pool's size when it started with its first wave only (``Governor``): the
    #: governor forks the rest; None: it started whole.
    whole: int | None = None
    #: Called when the pool's hooks cannot be placed: the guard leaves the pool alone.
    on_not_installed: list[Callable[[], None]] = field(default_factory=list)
    #: The pool size's owner where no governor runs (Telemetry).
    resizer: Resizer | None = None


def state_of(w: Any) -> GuardState | None:
    return getattr(w, "memory_guard", None)


def _send(channel: int | None, record: str) -> None:
    """A child's record to the main process; a full pipe drops it."""
    if channel is not None:
        with contextlib.suppress(OSError):
            os.write(channel, record.encode()[:4000])


def _private_now() -> int | None:
    return procfs.known(procfs.private())


class Fit(bootsteps.StartStopStep):
    """Fit the pool to the memory budget before it forks."""

    label = "Fit"
    name = "celery_guard.steps.Fit"
    #: Classes, not names: Celery resolves the names of the steps added to a blueprint,
    #: not of the steps those pull in.
    requires = (Pool,)

    def __init__(self, w: Any, **kwargs: Any) -> None:
        super().__init__(w, **kwargs)
        if logger.level == logging.NOTSET:
            # The startup line is the product: show it even under ``-l warning``.
            logger.setLevel(logging.INFO)
        try:  # worker options come with the kwargs when install() added them
            settings = load_settings(os.environ, w.app.conf, given_options(kwargs))
        except ConfigError as error:
            use_format(format_from_env(os.environ))
            emit(logging.CRITICAL, "config_error", error_fields(error))
            raise SystemExit(startup.EX_CONFIG) from None
        use_format(settings.log_format)
        autoscale = list(w.autoscale) if w.autoscale else None
        requested = int(autoscale[0] if autoscale else w.concurrency)
        guard = w.memory_guard = GuardState(settings, startup.pool_name(w.pool_cls), requested)
        guard.measured = self._decide(w, guard, autoscale)
        if guard.measured is not None:
            guard.live = LiveLimit(guard.measured.budget.limit, settings)
            if settings.mode != "off":
                self._advise(w, guard, guard.measured)

    def _decide(self, w: Any, guard: GuardState, autoscale: list[int] | None) -> Any:
        settings, requested = guard.settings, guard.requested
        try:
            start_method = getattr(w, "pool_start_method", "fork")
            measured = startup.measure(
                settings, guard.pool, requested, forked=start_method == "fork"
            )
            fields = measured.fields()
            if autoscale:
                fields["autoscale_min"] = min(w.min_concurrency, measured.decision.concurrency)
        except Exception as error:  # noqa: BLE001 - never take the worker down by accident
            logger.exception("celery-guard event=error stage=startup")
            fields = {
                "mode": settings.mode, "pool": guard.pool, "requested": requested,
                "concurrency": requested, "action": "kept",
                "error": f"{type(error).__name__}: {error}",
            }  # fmt: skip
            emit(logging.ERROR, "startup", fields)
            return None
        decision = measured.decision
        emit(startup.LEVELS[decision.action], "startup", fields)
        if decision.action == "refused":
            raise SystemExit(startup.EX_CONFIG)
        if decision.concurrency != requested:
            if autoscale:
                w.max_concurrency = decision.concurrency
                w.min_concurrency = min(w.min_concurrency, decision.concurrency)
                w.autoscale = [w.max_concurrency, w.min_concurrency]
            else:
                w.concurrency = w.min_concurrency = decision.concurrency
        return measured

    def _advise(self, w: Any, guard: GuardState, measured: startup.Measured) -> None:
        """Say what Celery itself would not: settings that cannot work as meant."""
        own = measured.budget.own
        facts = advice.Facts.of(
            w.app.conf,
            guard.settings,
            pool=guard.pool,
            parent_rss=measured.parent.rss,
            max_memory_per_child_kib=int(getattr(w, "max_memory_per_child", None) or 0),
            oom_group=bool(own is not None and cgroups.read_oom_group(own)),
        )
        for item in advice.worker_advice(facts):
            fields = {"worker": w.hostname, **item.fields()}
            emit(logging.WARNING, "advice", fields)

    def info(self, w: Any) -> dict[str, Any]:  # type: ignore[override]  # celery-types: None; Blueprint.info merges the dict
        guard = state_of(w)
        if guard is None or guard.measured is None:
            return {}
        return {"guard_fit": guard.measured.fields()}


class Telemetry(bootsteps.StartStopStep):
    """What children really use: the probe in each child, the collector in the main."""

    label = "Telemetry"
    name = "celery_guard.steps.Telemetry"
    requires = (Fit,)
    conditional = True

    def __init__(self, w: Any, **kwargs: Any) -> None:
        super().__init__(w, **kwargs)
        guard = state_of(w)
        self.enabled = bool(
            guard and guard.measured and guard.live and guard.settings.mode != "off"
        )
        self.sampler: telemetry.Sampler | None = None
        if not self.enabled or guard is None or guard.measured is None or guard.live is None:
            return
        from celery import signals

        settings, budget = guard.settings, guard.measured.budget
        max_kib = int(getattr(w, "max_memory_per_child", None) or 0)
        self.channel_read, channel_write = telemetry.open_channel()
        guard.channel = channel_write
        probe = telemetry.ChildProbe(channel_write, w.hostname, settings, max_kib)
        signals.worker_process_init.connect(
            probe.start_in_child, weak=False, dispatch_uid="cg-init"
        )
        signals.task_prerun.connect(probe.before_task, weak=False, dispatch_uid="cg-prerun")
        signals.task_postrun.connect(probe.after_task, weak=False, dispatch_uid="cg-postrun")
        forks = guard.pool in FORKING_POOLS
        if forks:
            guard.control = PoolControl(w)
        control = guard.control
        own = os.getpid()
        guard.collector = collector = telemetry.Collector(
            hostname=w.hostname,
            settings=settings,
            live=guard.live,
            parent_rss=guard.measured.parent.rss,
            cgroup=budget.own,
            children=control.pids if control is not None else (lambda: []),
            concurrency=lambda: pool_size(w),
            max_memory_kib=max_kib,
            max_tasks_per_child=int(getattr(w, "max_tasks_per_child", None) or 0),
            known=(
                (lambda pid: not control.installed or pid in control.children)
                if control is not None
                else (lambda pid: pid == own)
            ),
        )
        collector.estimate = guard.measured.child
        collector.requested = guard.requested
        # the first child's real cost, kept at once for the next start
        collector.on_calibrated.append(lambda cost: history.keep(settings.state_file, cost, 1))
        if budget.own is not None and budget.source.startswith("cgroup"):
            # Only a limit read from the cgroup can change under the worker's feet.
            watch = LimitWatch(budget.own, budget.physical, guard.live, w.hostname)
            guard.watches.append(watch.check)
        if settings.mode not in ("warn", "off"):
            guard.resizer = resizer = Resizer(
                w, guard.live, guard.measured.in_use, guard.requested,
                settings.min_concurrency, guard.measured.child, control,
                governed=lambda: guard.governed,
            )  # fmt: skip
            collector.on_calibrated.append(resizer.calibrated)
            guard.watches.append(resizer.check)

    def start(self, w: Any) -> None:
        guard = state_of(w)
        if guard is None or guard.collector is None:
            return
        collector = guard.collector
        self.sampler = telemetry.Sampler(
            collector, self.channel_read, collector.log_summary, guard.watches
        )
        self.sampler.start()

    def register_with_event_loop(self, w: Any, hub: Any) -> None:
        """Install the pool's hooks once AsynPool has installed its own: steps register in
        reverse order, so the Pool registers after this step; wait for the first tick."""
        guard = state_of(w)
        if guard is not None and guard.resizer is not None:
            guard.resizer.hub = hub
        if self.sampler is not None and guard is not None and guard.control is not None:
            self.sampler.on_loop(hub)
        if guard is not None and guard.control is not None:
            hub.call_soon(self._install, guard)

    def _install(self, guard: GuardState) -> None:
        control, collector = guard.control, guard.collector
        if control is None or collector is None or control.installed:
            return  # installed at the first registration: once
        if not control.install():
            for callback in guard.on_not_installed:
                callback()
            return
        if self.sampler is not None:
            control.read_records = self.sampler.drain
        control.listeners.append(telemetry.ExitListener(collector))
        control.on_lost = collector.on_lost
        for callback in guard.on_installed:
            callback()

    def stop(self, parent: Any) -> None:  # named as in StartStopStep: terminate is an alias
        guard = state_of(parent)
        if self.sampler is None or guard is None or guard.collector is None:
            return
        self.sampler.stop()
        self.sampler = None
        try:
            guard.collector.sample()
            final = guard.collector.log_summary(final=True)
            cost = int((final.get("private_p95_mib") or 0) * 1024 * 1024)
            history.keep(guard.settings.state_file, cost, final.get("samples") or 0)
        except Exception:  # noqa: BLE001 - shutdown goes on
            logger.exception("celery-guard event=error stage=shutdown")

    terminate = shutdown = stop

    def info(self, w: Any) -> dict[str, Any]:  # type: ignore[override]  # celery-types: None; Blueprint.info merges the dict
        guard = state_of(w)
        if guard is None or guard.collector is None:
            return {}
        return {"guard_telemetry": guard.collector.summary_fields()}


class Protection(bootsteps.StartStopStep):
    """Lose a child, not the worker; copy less at each fork; stop a pool that does not
    fork before it passes ``CELERY_GUARD_MAX_WORKER_MEMORY``."""

    label = "Protection"
    name = "celery_guard.steps.Protection"
    requires = (Telemetry,)
    conditional = True

    def __init__(self, w: Any, **kwargs: Any) -> None:
        super().__init__(w, **kwargs)
        guard = state_of(w)
        self.enabled = bool(guard and guard.collector is not None)
        if not self.enabled or guard is None:
            return
        from celery import signals

        from .protect import ChildOomScore, FreezeBeforeFirstFork, WorkerMemoryLimit

        settings = guard.settings
        signals.worker_process_init.connect(
            ChildOomScore(settings), weak=False, dispatch_uid="cg-oom-score"
        )
        if settings.gc_freeze:
            freeze = FreezeBeforeFirstFork()
            signals.worker_before_create_process.connect(
                freeze, weak=False, dispatch_uid="cg-gc-freeze"
            )
            guard.unfrozen_collect = lambda: freeze.collect_seconds
        if settings.max_worker_memory is not None and guard.pool not in FORKING_POOLS:
            watch = WorkerMemoryLimit(
                settings.max_worker_memory, w.hostname, settings, guard.collector
            )
            guard.watches.append(watch.check)

    def info(self, w: Any) -> dict[str, Any]:  # type: ignore[override]  # celery-types: None; Blueprint.info merges the dict
        guard = state_of(w)
        if guard is None:
            return {}
        s = guard.settings
        return {
            "guard_protection": {
                "child_oom_score_adj": s.child_oom_score_adj,
                "gc_freeze": s.gc_freeze,
                "max_worker_memory_mib": mib(s.max_worker_memory) if s.max_worker_memory else None,
            }
        }


class TaskLimits(bootsteps.StartStopStep):
    """Memory limits per task (``memory_limit``, ``soft_memory_limit``): read and checked
    before the pool forks, watched in each child while a limited task runs, enforced by
    the main process when a task does not stop."""

    label = "TaskLimits"
    name = "celery_guard.steps.TaskLimits"
    requires = (Telemetry,)
    conditional = True

    def __init__(self, w: Any, **kwargs: Any) -> None:
        super().__init__(w, **kwargs)
        guard = state_of(w)
        self.enabled = False
        if guard is None or guard.collector is None:
            return
        settings = guard.settings
        try:
            limits = task_limits.declared(
                w.app.tasks, settings.task_memory_limit, settings.task_soft_memory_limit
            )
        except task_limits.LimitError as error:
            fields = {
                "variable": f"{error.task}.{error.option}", "setting": error.option,
                "source": "task", "value": str(error.value)[:200], "accepted": error.accepted,
            }  # fmt: skip
            emit(logging.CRITICAL, "config_error", fields)
            raise SystemExit(startup.EX_CONFIG) from None
        if not limits:
            return
        if guard.pool not in FORKING_POOLS:
            fields = {"worker": w.hostname, "topic": "task_memory_limit_ignored",
                      "reason": f"{len(limits)} tasks declare memory limits; {guard.pool} "
                      "runs tasks in the main process, where one task's memory cannot be "
                      "told from another's", "fix": "the prefork pool"}  # fmt: skip
            emit(logging.WARNING, "advice", fields)
            return
        self.enabled = True
        guard.task_limits = limits
        dog = watchdog.Watchdog()  # each child gets its copy with the fork
        for name, limit in limits.items():  # before the fork: every child's tracer sees it
            watchdog.wrap(w.app.tasks[name], name, limit, dog)
        channel, hostname = guard.channel, w.hostname

        def start_in_child(**_: Any) -> None:
            dog.start(lambda record: _send(channel, record), _private_now, hostname)

        from celery import signals

        signals.worker_process_init.connect(start_in_child, weak=False, dispatch_uid="cg-watchdog")
        control = guard.control
        assert control is not None  # a forking pool
        enforcer = watchdog.Enforcer(hostname, control, guard.collector.exits)
        guard.collector.limit_listeners.append(enforcer.on_hit)
        guard.on_installed.append(functools.partial(control.listeners.append, enforcer))

    def info(self, w: Any) -> dict[str, Any]:  # type: ignore[override]  # celery-types: None; Blueprint.info merges the dict
        guard = state_of(w)
        if guard is None or not guard.task_limits:
            return {}
        return {
            "guard_task_limits": {
                name: {"memory_limit_mib": mib(lim.hard) if lim.hard else None,
                       "soft_memory_limit_mib": mib(lim.soft) if lim.soft else None}
                for name, lim in guard.task_limits.items()
            }
        }  # fmt: skip


class Governor(bootsteps.StartStopStep):
    """The run-time budget: admit, hold, recycle, grow and, as the last resort, stop."""

    label = "Governor"
    name = "celery_guard.steps.Governor"
    requires = (Telemetry, TaskLimits)
    conditional = True

    def __init__(self, w: Any, **kwargs: Any) -> None:
        super().__init__(w, **kwargs)
        guard = state_of(w)
        self.governor: governor.Governor | None = None
        self.registered = False
        self.enabled = bool(guard and self._applies(w, guard))
        if self.enabled and guard is not None:
            self._first_wave(w, guard)

    @staticmethod
    def _first_wave(w: Any, guard: GuardState) -> None:
        """Have the pool forked with as many children as there are CPUs (Celery forks
        ``min_concurrency`` children, as it does for ``--autoscale``): the governor adds
        the rest in waves, each once the last is ready for work (``policy.Safety``), so
        a child that is dear to start is measured on a few before it is paid by all.
        Only where the governor acts on the pool."""
        if guard.settings.mode != "scale" or guard.settings.governor != "on":
            return
        first = max(math.ceil(governor.available_cpus()), 1)
        if w.min_concurrency > first:
            guard.whole, w.min_concurrency = w.min_concurrency, first
            guard.on_not_installed.append(lambda: Governor._fork_whole(w, guard))

    def start(self, parent: Any) -> None:
        """After the Pool step's start: the pool's size as ``celery inspect stats`` shows
        it (``max-concurrency``) is the whole, not the first wave it was forked with."""
        guard = state_of(parent)
        if guard is not None and guard.whole is not None and parent.pool is not None:
            parent.pool.limit = guard.whole

    @staticmethod
    def _applies(w: Any, guard: GuardState) -> bool:
        """A forking pool on the event loop, a limit it enforces, and the pool size its
        own: with ``--autoscale`` Celery's autoscaler owns the size."""
        measured = guard.measured
        return bool(
            guard.settings.governor != "off"
            and guard.control is not None
            and measured is not None
            and measured.budget.cgroup is not None
            and measured.budget.source != "physical"
            and not w.autoscale
        )

    def register_with_event_loop(self, w: Any, hub: Any) -> None:
        guard = state_of(w)
        if guard is None or guard.control is None or guard.collector is None:
            return
        if self.registered:  # registered again after a lost broker connection
            return
        self.registered = True
        guard.on_installed.append(lambda: self._start(w, guard, hub))

    def _start(self, w: Any, guard: GuardState, hub: Any) -> None:
        try:
            self._run(w, guard, hub)
        except Exception:  # noqa: BLE001 - never take the worker down by accident
            logger.exception("celery-guard event=error stage=governor")
            self._fork_whole(w, guard)

    def _run(self, w: Any, guard: GuardState, hub: Any) -> None:
        measured, collector, control = guard.measured, guard.collector, guard.control
        assert measured is not None and collector is not None and control is not None
        assert guard.live is not None and measured.budget.cgroup is not None
        self.governor = governor.Governor(
            control,
            guard.settings,
            measured.budget.cgroup,
            guard.live,
            requested=guard.requested,
            estimate=measured.child,
            others=max(measured.in_use - measured.parent.rss, 0),
            hostname=w.hostname,
            exits=collector.exits,
            count=collector.count_pressure,
            count_task=collector.count_task,
            limits={n: lim.hard for n, lim in guard.task_limits.items() if lim.hard},
            collector=measured.collector,
            unfrozen_collect=guard.unfrozen_collect() + measured.collector_copy_seconds,
        )
        self.governor.hold_bound = self._hold_bound(w.app)
        collector.listeners.append(self.governor.post)
        guard.governed = True
        collector.summary_extras.append(self.governor.figures)
        collector.stats_sections["governor"] = self.governor.info
        self.governor.start(hub)

    @staticmethod
    def _fork_whole(w: Any, guard: GuardState) -> None:
        """No governor will add the rest of a pool started with its first wave: add it."""
        whole, guard.whole = guard.whole, None
        if whole is not None and guard.control is not None and whole > pool_size(w):
            guard.control.grow(whole - pool_size(w))

    @staticmethod
    def _hold_bound(app: Any) -> Any:
        """How long the broker lets a received task wait unacknowledged (``brokers``)."""
        from . import brokers

        try:
            transport = str(app.connection_for_read().transport_cls)
        except Exception:  # noqa: BLE001 - an odd broker URL: Celery reports it itself
            transport = ""
        options = app.conf.broker_transport_options or {}
        return brokers.hold_bound(transport, options if isinstance(options, dict) else {})

    def stop(self, parent: Any) -> None:
        if self.governor is not None:
            self.governor.stop()

    terminate = shutdown = stop

    def info(self, w: Any) -> dict[str, Any]:  # type: ignore[override]  # celery-types: None; Blueprint.info merges the dict
        if self.governor is None:
            return {}
        return {"guard_governor": self.governor.info()}


class Metrics(bootsteps.StartStopStep):
    """The Prometheus endpoint, served by the main process only."""

    label = "Metrics"
    name = "celery_guard.steps.Metrics"
    requires = (Telemetry,)
    conditional = True

    def __init__(self, w: Any, **kwargs: Any) -> None:
        super().__init__(w, **kwargs)
        guard = state_of(w)
        self.server: Any = None
        self.enabled = bool(
            guard and guard.collector is not None and guard.settings.metrics_port is not None
        )

    def start(self, w: Any) -> None:
        guard = state_of(w)
        port = guard.settings.metrics_port if guard is not None else None
        if guard is None or guard.collector is None or port is None:
            return
        from celery import signals

        from . import metrics

        settings = guard.settings
        source = metrics.GuardCollector(guard.collector, guard.requested)
        self.server = metrics.serve(source, settings.metrics_address, port)
        if self.server is not None:  # children forked from now on close their copy
            signals.worker_process_init.connect(
                self.server.close_in_child, weak=False, dispatch_uid="cg-metrics"
            )

    def stop(self, parent: Any) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    terminate = shutdown = stop

    def info(self, w: Any) -> dict[str, Any]:  # type: ignore[override]  # celery-types: None; Blueprint.info merges the dict
        if self.server is None:
            return {}
        return {"guard_metrics": {"port": getattr(self.server, "port", None)}}


class MemoryGuard(bootsteps.Step):
    """The one line: ``app.steps["worker"].add(MemoryGuard)`` brings in every step."""

    label = "MemoryGuard"
    name = "celery_guard.MemoryGuard"
    requires = (Fit, Telemetry, Protection, TaskLimits, Governor, Metrics)


__all__ = [
    "Fit",
    "Governor",
    "GuardState",
    "MemoryGuard",
    "Metrics",
    "Protection",
    "TaskLimits",
    "Telemetry",
]
