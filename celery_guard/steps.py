"""The worker steps: thin Celery glue in the style of ``celery/worker/components.py``.

``MemoryGuard`` is the one line users add; it requires the others, so Celery's blueprint
pulls them in (``requires`` also means "after"). ``Fit`` requires the Pool step: its
``__init__`` runs after ``Pool.__init__`` has copied the concurrency onto the worker and
before any step's ``create`` forks a child, the one moment the pool size can change.

``Fit`` makes the worker's one ``guard.Guard`` (``w.memory_guard``); each step asks it
to make and wire its part, at the step's moment. Each has ``info()``, so ``celery
inspect stats`` shows its figures under ``guard_<step>``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import bootsteps
from celery.worker.components import Pool

from . import startup
from .config import ConfigError, error_fields, given_options, load_settings
from .guard import Guard
from .logline import emit, format_from_env, logger, use_format


def state_of(w: Any) -> Guard | None:
    return getattr(w, "memory_guard", None)


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
        w.memory_guard = Guard(w, settings)
        w.memory_guard.fit()

    def info(self, w: Any) -> dict[str, Any]:  # type: ignore[override]  # celery-types: None; Blueprint.info merges the dict
        guard = state_of(w)
        if guard is None or guard.measured is None:
            return {}
        return {"guard_fit": guard.measured.fields()}


class Telemetry(bootsteps.StartStopStep):
    """What children really use: the probe in each child, the collector and its sampler in
    the main, and (prefork on the event loop) the ``PoolControl`` that hears the pool."""

    label = "Telemetry"
    name = "celery_guard.steps.Telemetry"
    requires = (Fit,)
    conditional = True

    def __init__(self, w: Any, **kwargs: Any) -> None:
        super().__init__(w, **kwargs)
        guard = state_of(w)
        self.enabled = guard is not None and guard.add_telemetry()

    def start(self, w: Any) -> None:
        if (guard := state_of(w)) is not None:
            guard.start_sampler()

    def register_with_event_loop(self, w: Any, hub: Any) -> None:
        if (guard := state_of(w)) is not None:
            guard.register(hub)

    def stop(self, parent: Any) -> None:  # named as in StartStopStep: terminate is an alias
        if (guard := state_of(parent)) is not None:
            guard.stop()

    terminate = shutdown = stop

    def info(self, w: Any) -> dict[str, Any]:  # type: ignore[override]  # celery-types: None; Blueprint.info merges the dict
        guard = state_of(w)
        if guard is None or guard.collector is None:
            return {}
        return {"guard_telemetry": guard.snapshot().summary}


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
        self.enabled = guard is not None and guard.add_protection()

    def info(self, w: Any) -> dict[str, Any]:  # type: ignore[override]  # celery-types: None; Blueprint.info merges the dict
        guard = state_of(w)
        return {} if guard is None else {"guard_protection": guard.protection_info()}


class TaskLimits(bootsteps.StartStopStep):
    """Memory limits per task (``memory_limit``, ``soft_memory_limit``): checked before
    the pool forks, watched in each child, enforced by the main process."""

    label = "TaskLimits"
    name = "celery_guard.steps.TaskLimits"
    requires = (Telemetry,)
    conditional = True

    def __init__(self, w: Any, **kwargs: Any) -> None:
        super().__init__(w, **kwargs)
        guard = state_of(w)
        self.enabled = guard is not None and guard.add_task_limits()

    def info(self, w: Any) -> dict[str, Any]:  # type: ignore[override]  # celery-types: None; Blueprint.info merges the dict
        guard = state_of(w)
        if guard is None or not guard.task_limits:
            return {}
        return {"guard_task_limits": guard.task_limits_info()}


class Governor(bootsteps.StartStopStep):
    """The run-time budget (prefork, a cgroup, the event loop, no autoscale): admit, hold,
    recycle, grow and, as the last resort, stop; once the pool's hooks are in."""

    label = "Governor"
    name = "celery_guard.steps.Governor"
    requires = (Telemetry, TaskLimits)
    conditional = True

    def __init__(self, w: Any, **kwargs: Any) -> None:
        super().__init__(w, **kwargs)
        guard = state_of(w)
        self.enabled = guard is not None and guard.add_governor()

    def start(self, parent: Any) -> None:
        if (guard := state_of(parent)) is not None:
            guard.started()

    def stop(self, parent: Any) -> None:
        if (guard := state_of(parent)) is not None:
            guard.stop_governor()

    terminate = shutdown = stop

    def info(self, w: Any) -> dict[str, Any]:  # type: ignore[override]  # celery-types: None; Blueprint.info merges the dict
        guard = state_of(w)
        if guard is None or guard.governor is None:
            return {}
        return {"guard_governor": guard.governor.info()}


class Metrics(bootsteps.StartStopStep):
    """The Prometheus endpoint, served by the main process only."""

    label = "Metrics"
    name = "celery_guard.steps.Metrics"
    requires = (Telemetry,)
    conditional = True

    def __init__(self, w: Any, **kwargs: Any) -> None:
        super().__init__(w, **kwargs)
        guard = state_of(w)
        self.enabled = guard is not None and guard.add_metrics()

    def start(self, w: Any) -> None:
        if (guard := state_of(w)) is not None:
            guard.start_metrics()

    def stop(self, parent: Any) -> None:
        if (guard := state_of(parent)) is not None:
            guard.stop_metrics()

    terminate = shutdown = stop

    def info(self, w: Any) -> dict[str, Any]:  # type: ignore[override]  # celery-types: None; Blueprint.info merges the dict
        guard = state_of(w)
        if guard is None or guard.metrics is None:
            return {}
        return {"guard_metrics": {"port": guard.metrics.port}}


class MemoryGuard(bootsteps.Step):
    """The one line: ``app.steps["worker"].add(MemoryGuard)`` brings in every step, each
    configured by the ``CELERY_GUARD_*`` variables; ``install(app)`` adds it too, with a
    ``celery worker`` option for each."""

    label = "MemoryGuard"
    name = "celery_guard.MemoryGuard"
    requires = (Fit, Telemetry, Protection, TaskLimits, Governor, Metrics)


__all__ = ["Fit", "Governor", "MemoryGuard", "Metrics", "Protection", "TaskLimits", "Telemetry"]
