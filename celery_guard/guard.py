"""One worker's guard: its parts, each made once and wired here to the parts it needs.

The worker's steps (``steps.py``) call these methods in Celery's order: ``fit`` before the
pool forks, ``add_<part>`` as each step is made, ``start_sampler`` and ``start_metrics``
as they start, ``register`` with the event loop, ``install`` on its first tick (the pool's
hooks, its listeners, the governor), ``stop`` at shutdown. Each part gets what it reads as
an argument; nothing reaches through this object at run time.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any

from celery import signals

from . import advice, cgroups, governor, history, procfs, startup, task_limits, telemetry, watchdog
from .actuator import PoolControl, pool_size
from .brokers import hold_bound
from .config import Settings
from .limit import LimitWatch, LiveLimit
from .logline import emit, logger
from .plan import FORKING_POOLS
from .protect import ChildOomScore, FreezeBeforeFirstFork, WorkerMemoryLimit
from .resize import Resizer
from .sizes import mib
from .task_limits import TaskLimit


class Guard:
    """The parts of one worker's guard (``w.memory_guard``)."""

    def __init__(self, w: Any, settings: Settings) -> None:
        self.w = w
        self.settings = settings
        self.pool = startup.pool_name(w.pool_cls)
        autoscale = list(w.autoscale) if w.autoscale else None
        self.requested = int(autoscale[0] if autoscale else w.concurrency)
        self.measured: startup.Measured | None = None
        self.live: LiveLimit | None = None  # the limit now: its one owner
        self.control: PoolControl | None = None  # the pool's hooks (forking pools)
        self.collector: telemetry.Collector | None = None
        self.sampler: telemetry.Sampler | None = None
        self.channel: tuple[int, int] | None = None  # the children's records: read, write
        self.watches: list[Any] = []  # what the sampler runs every second
        self.resizer: Resizer | None = None  # the pool size's owner without a governor
        self.task_limits: dict[str, TaskLimit] = {}
        self.enforcer: watchdog.Enforcer | None = None
        self.freeze: Any = None  # protect.FreezeBeforeFirstFork, with gc_freeze on
        self.governs = False  # the Governor step applies: the governor starts at install
        self.governor: governor.Governor | None = None
        self.hub: Any = None
        self.metrics: Any = None  # metrics.MetricsServer, once serving
        #: the pool's size when it was forked with its first wave only: the governor forks
        #: the rest; None: it was forked whole
        self.whole: int | None = None

    # -- before the fork ---------------------------------------------------------------
    def fit(self) -> None:
        """Measure, read the limit, decide the concurrency and set it on the worker."""
        w, settings = self.w, self.settings
        autoscale = bool(w.autoscale)
        try:
            forked = getattr(w, "pool_start_method", "fork") == "fork"
            measured = startup.measure(settings, self.pool, self.requested, forked=forked)
            fields = {"worker": w.hostname, **measured.fields()}
            if autoscale:
                fields["autoscale_min"] = min(w.min_concurrency, measured.decision.concurrency)
        except startup.Unsupported as error:  # a known condition: one line, no traceback
            unmeasured = startup.unmeasured_fields(settings, self.pool, self.requested, str(error))
            emit(logging.WARNING, "startup", {"worker": w.hostname, **unmeasured})
            return
        except Exception as error:  # noqa: BLE001 - never take the worker down by accident
            logger.exception("celery-guard event=error stage=startup")
            why = f"{type(error).__name__}: {error}"
            unmeasured = startup.unmeasured_fields(settings, self.pool, self.requested, why)
            emit(logging.ERROR, "startup", {"worker": w.hostname, **unmeasured})
            return
        decision = measured.decision
        emit(startup.LEVELS[decision.action], "startup", fields)
        if decision.action == "refused":
            raise SystemExit(startup.EX_CONFIG)
        if decision.concurrency != self.requested:
            if autoscale:
                w.max_concurrency = decision.concurrency
                w.min_concurrency = min(w.min_concurrency, decision.concurrency)
                w.autoscale = [w.max_concurrency, w.min_concurrency]
            else:
                w.concurrency = w.min_concurrency = decision.concurrency
        self.measured = measured
        self.live = LiveLimit(measured.budget.limit, settings)
        if settings.mode != "off":
            self._advise(measured)

    def _advise(self, measured: startup.Measured) -> None:
        """Say what Celery itself would not: settings that cannot work as meant."""
        own, w = measured.budget.own, self.w
        facts = advice.Facts.of(
            w.app.conf,
            self.settings,
            pool=self.pool,
            parent_rss=measured.parent.rss,
            max_memory_per_child_kib=int(getattr(w, "max_memory_per_child", None) or 0),
            oom_group=bool(own is not None and cgroups.read_oom_group(own)),
        )
        for item in advice.worker_advice(facts):
            emit(logging.WARNING, "advice", {"worker": w.hostname, **item.fields()})

    def add_telemetry(self) -> bool:
        """The probe in each child; the collector, the pool's hooks, the limit's watch and
        the resizer in the main process."""
        measured, live, settings, w = self.measured, self.live, self.settings, self.w
        if measured is None or live is None or settings.mode == "off":
            return False
        budget = measured.budget
        max_kib = int(getattr(w, "max_memory_per_child", None) or 0)
        self.channel = telemetry.open_channel()
        probe = telemetry.ChildProbe(self.channel[1], w.hostname, settings, max_kib)
        signals.worker_process_init.connect(
            probe.start_in_child, weak=False, dispatch_uid="cg-init"
        )
        signals.task_prerun.connect(probe.before_task, weak=False, dispatch_uid="cg-prerun")
        signals.task_postrun.connect(probe.after_task, weak=False, dispatch_uid="cg-postrun")
        control = self.control = PoolControl(w) if self.pool in FORKING_POOLS else None
        own = os.getpid()
        self.collector = telemetry.Collector(
            hostname=w.hostname,
            settings=settings,
            live=live,
            parent_rss=measured.parent.rss,
            cgroup=budget.own,
            children=control.pids if control is not None else (lambda: []),
            concurrency=lambda: pool_size(w),
            max_memory_kib=max_kib,
            max_tasks_per_child=int(getattr(w, "max_tasks_per_child", None) or 0),
            estimate=measured.child,
            requested=self.requested,
            known=(
                (lambda pid: not control.installed or pid in control.children)
                if control is not None
                else (lambda pid: pid == own)
            ),
        )
        if budget.own is not None and budget.source.startswith("cgroup"):
            # Only a limit read from the cgroup can change under the worker's feet.
            self.watches.append(LimitWatch(budget.own, budget.physical, live, w.hostname).check)
        if settings.mode not in ("warn", "off"):
            self.resizer = Resizer(
                w, live, measured.in_use, self.requested, settings.min_concurrency,
                measured.child, control, governed=lambda: self.governor is not None,
            )  # fmt: skip
            self.watches.append(self.resizer.check)
        return True

    def add_protection(self) -> bool:
        """Children's ``oom_score_adj``, ``gc.freeze`` before the first fork, the worker
        memory limit of pools that do not fork."""
        if self.collector is None:
            return False
        settings = self.settings
        signals.worker_process_init.connect(
            ChildOomScore(settings), weak=False, dispatch_uid="cg-oom-score"
        )
        if settings.gc_freeze:
            self.freeze = FreezeBeforeFirstFork()
            signals.worker_before_create_process.connect(
                self.freeze, weak=False, dispatch_uid="cg-gc-freeze"
            )
        if settings.max_worker_memory is not None and self.pool not in FORKING_POOLS:
            watch = WorkerMemoryLimit(settings.max_worker_memory, self.w.hostname, self.collector)
            self.watches.append(watch.check)
        return True

    def add_task_limits(self) -> bool:
        """Memory limits per task: checked before the fork (a bad one exits 78), watched in
        each child, enforced by the main process."""
        collector, settings, w = self.collector, self.settings, self.w
        if collector is None:
            return False
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
            return False
        if self.control is None:  # a pool that does not fork
            fields = {"worker": w.hostname, "topic": "task_memory_limit_ignored",
                      "reason": f"{len(limits)} tasks declare memory limits; {self.pool} "
                      "runs tasks in the main process, where one task's memory cannot be "
                      "told from another's", "fix": "the prefork pool"}  # fmt: skip
            emit(logging.WARNING, "advice", fields)
            return False
        self.task_limits = limits
        dog = watchdog.Watchdog()  # each child gets its copy with the fork
        for name, limit in limits.items():  # before the fork: every child's tracer sees it
            watchdog.wrap(w.app.tasks[name], name, limit, dog)
        assert self.channel is not None
        channel, hostname = self.channel[1], w.hostname

        def start_in_child(**_: Any) -> None:
            dog.start(lambda record: _send(channel, record), _private_now, hostname)

        signals.worker_process_init.connect(start_in_child, weak=False, dispatch_uid="cg-watchdog")
        self.enforcer = watchdog.Enforcer(hostname, self.control, collector.exits, limits)
        return True

    def add_governor(self) -> bool:
        """The run-time budget, where it can act: a forking pool on the event loop, a limit
        read from a cgroup, the pool size its own (not ``--autoscale``'s)."""
        measured, w = self.measured, self.w
        self.governs = bool(
            self.settings.governor != "off"
            and self.control is not None
            and measured is not None
            and measured.budget.cgroup is not None
            and measured.budget.source != "physical"
            and not w.autoscale
        )
        if self.governs and self.settings.mode == "scale" and self.settings.governor == "on":
            # Forked with as many children as CPUs (Celery forks ``min_concurrency``): the
            # governor adds the rest in waves, each once the last is ready
            # (``policy.Safety``), so a child dear to start is measured on a few first.
            first = max(math.ceil(governor.available_cpus()), 1)
            if w.min_concurrency > first:
                self.whole, w.min_concurrency = w.min_concurrency, first
        return self.governs

    def started(self) -> None:
        """After the Pool step's start: ``celery inspect stats`` shows the whole pool's
        size (``max-concurrency``), not the first wave it was forked with."""
        if self.whole is not None and self.w.pool is not None:
            self.w.pool.limit = self.whole

    # -- running -----------------------------------------------------------------------
    def start_sampler(self) -> None:
        collector = self.collector
        if collector is None or self.channel is None:
            return
        self.sampler = telemetry.Sampler(
            collector, self.channel[0], self.log_summary, self.watches, self.read_lines
        )
        self.sampler.start()

    def read_lines(self, lines: list[str]) -> None:
        """The children's lines: into the collector's figures, then in this order to the state
        file and the resizer (a measured cost), the enforcer (hits), the governor (records)."""
        assert self.collector is not None
        heard = self.collector.read_lines(lines)
        if heard.calibrated is not None:
            history.keep(self.settings.state_file, heard.calibrated, 1)
            if self.resizer is not None:
                self.resizer.calibrated(heard.calibrated)
        if self.enforcer is not None:
            for hit in heard.hits:
                self.enforcer.on_hit(hit)
        if self.governor is not None:
            for record in heard.records:
                self.governor.post(record)

    # -- the figures: the summary line, ``guard_stats``, the metrics ------------------
    def snapshot(self, final: bool = False) -> telemetry.Snapshot:
        """The collector's figures with the governor's: what every report renders."""
        assert self.collector is not None
        found = self.governor
        return self.collector.snapshot(final, found.figures() if found is not None else None)

    def log_summary(self, final: bool = False) -> dict[str, Any]:
        fields = self.snapshot(final).summary
        emit(logging.INFO, "summary", fields)
        return fields

    def stats(self) -> dict[str, Any]:
        found = self.governor
        return self.snapshot().stats({"governor": found.info()} if found is not None else {})

    def register(self, hub: Any) -> None:
        """Install the pool's hooks on the first tick, once AsynPool has installed its own
        (the Pool registers after the Telemetry step). Again after a lost connection."""
        self.hub = hub
        if self.resizer is not None:
            self.resizer.hub = hub
        if self.control is None:
            return
        if self.sampler is not None:
            self.sampler.on_loop(hub)
        hub.call_soon(self.install)

    def install(self) -> None:
        """On the loop's first tick: the hooks, then the pool's listeners in order (why a
        child exited, the task limits, the governor)."""
        control, collector = self.control, self.collector
        if control is None or collector is None or control.installed:
            return  # installed at the first registration: once
        if not control.install():
            self._fork_whole()  # the guard leaves the pool alone: all of it, at once
            return
        if self.sampler is not None:
            control.read_records = self.sampler.drain
        control.listeners.append(telemetry.ExitListener(collector))
        control.on_lost = collector.on_lost
        if self.enforcer is not None:
            control.listeners.append(self.enforcer)
        if self.governs:
            try:
                self._start_governor(control, collector)
            except Exception:  # noqa: BLE001 - never take the worker down by accident
                logger.exception("celery-guard event=error stage=governor")
                self.governor = None
                self._fork_whole()

    def _start_governor(self, control: PoolControl, collector: telemetry.Collector) -> None:
        measured, live = self.measured, self.live
        assert measured is not None and live is not None and measured.budget.cgroup is not None
        unfrozen = self.freeze.collect_seconds if self.freeze is not None else 0.0
        found = governor.Governor(
            control,
            self.settings,
            measured.budget.cgroup,
            live,
            requested=self.requested,
            estimate=measured.child,
            others=max(measured.in_use - measured.parent.rss, 0),
            hostname=self.w.hostname,
            exits=collector.exits,
            count=collector.count_pressure,
            count_task=collector.count_task,
            limits={n: lim.hard for n, lim in self.task_limits.items() if lim.hard},
            collector=measured.collector,
            unfrozen_collect=unfrozen + measured.collector_copy_seconds,
        )
        found.hold_bound = _hold_bound(self.w.app)
        self.governor = found
        found.start(self.hub)

    def _fork_whole(self) -> None:
        """No governor will add the rest of a pool forked with its first wave: add it."""
        whole, self.whole = self.whole, None
        if whole is not None and self.control is not None and whole > pool_size(self.w):
            self.control.grow(whole - pool_size(self.w))

    def add_metrics(self) -> bool:
        """The Metrics step applies: a port is set and there are figures to serve."""
        return self.collector is not None and self.settings.metrics_port is not None

    def start_metrics(self) -> None:
        port = self.settings.metrics_port
        if self.collector is None or port is None:
            return
        from . import metrics

        source = metrics.GuardCollector(
            self.collector,
            self.requested,
            self.snapshot,
            lambda: metrics.registered_tasks(self.w.app),
        )
        self.metrics = metrics.serve(source, self.settings.metrics_address, port)
        if self.metrics is not None:  # children forked from now on close their copy at once
            os.register_at_fork(after_in_child=self.metrics.close_in_child)

    def stop_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None

    def stop_governor(self) -> None:
        """The governor stops acting (its step stops before the Telemetry step)."""
        if self.governor is not None:
            self.governor.stop()

    def stop(self) -> None:
        """At shutdown: the final summary, and the measured cost kept for the next start."""
        if self.sampler is None or self.collector is None:
            return
        self.sampler.stop()
        self.sampler = None
        try:
            self.collector.sample()
            final = self.log_summary(final=True)
            cost = int((final.get("private_p95_mib") or 0) * 1024 * 1024)
            history.keep(self.settings.state_file, cost, final.get("samples") or 0)
        except Exception:  # noqa: BLE001 - shutdown goes on
            logger.exception("celery-guard event=error stage=shutdown")

    # -- what ``celery inspect stats`` shows -------------------------------------------
    def protection_info(self) -> dict[str, Any]:
        s = self.settings
        return {
            "child_oom_score_adj": s.child_oom_score_adj,
            "gc_freeze": s.gc_freeze,
            "max_worker_memory_mib": mib(s.max_worker_memory) if s.max_worker_memory else None,
        }

    def task_limits_info(self) -> dict[str, Any]:
        return {
            name: {"memory_limit_mib": mib(lim.hard) if lim.hard else None,
                   "soft_memory_limit_mib": mib(lim.soft) if lim.soft else None}
            for name, lim in self.task_limits.items()
        }  # fmt: skip


def _send(channel: int, record: str) -> None:
    """The watchdog's record: whatever the pipe's error, it goes on to stop its task."""
    with contextlib.suppress(OSError):
        telemetry.send(channel, record)


def _private_now() -> int | None:
    return procfs.known(procfs.private())


def _hold_bound(app: Any) -> Any:
    """How long the broker lets a received task wait unacknowledged (``brokers``)."""
    try:
        transport = str(app.connection_for_read().transport_cls)
    except Exception:  # noqa: BLE001 - an odd broker URL: Celery reports it itself
        transport = ""
    options = app.conf.broker_transport_options or {}
    return hold_bound(transport, options if isinstance(options, dict) else {})


__all__ = ["Guard"]
