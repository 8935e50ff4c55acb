"""The worker bootstep: measure, decide and log before the pool forks.

It requires the Pool step, so its ``__init__`` runs after ``Pool.__init__`` has copied
the concurrency and autoscale settings onto the worker and before any step's ``create``
forks a child: the one moment where the pool size can still be changed.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from celery import bootsteps

from . import cgroups, footprint
from .config import OPTIONS, ConfigError, Settings, load_settings
from .logline import emit, logger
from .plan import Decision, decide
from .sizes import mib

EX_CONFIG = 78  # sysexits.h: configuration error; supervisors can tell it from a crash

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


def read_budget(settings: Settings, root: str = "/") -> Budget:
    """The limit to fit in: the setting, else the cgroup's, else physical memory.

    With a cgroup limit, ``in_use`` is the working set where that limit is set: the
    processes already charged there (siblings too) count against the pool.
    """
    if settings.memory_limit is not None:
        source = settings.source("memory_limit")
        return Budget(settings.memory_limit, source, f"{source} setting", 0)
    physical, _ = cgroups.physical_memory(root)
    if physical is None:
        import psutil

        physical = psutil.virtual_memory().total
    found = cgroups.find_memory_cgroup(root)
    if found.cgroup is None:
        return Budget(physical, "physical", found.reason, 0)
    limit = cgroups.read_limit(found.cgroup, physical)
    if limit.bytes is None:
        return Budget(physical, "physical", limit.reason, 0)
    level = replace(found.cgroup, path=limit.path or found.cgroup.path)
    in_use = cgroups.read_usage(level).working_set or 0
    return Budget(limit.bytes, limit.source, limit.reason, in_use)


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


class MemoryGuard(bootsteps.Step):
    """Fit the pool to the memory budget before it forks; see the README."""

    label = "MemoryGuard"
    name = "celery_guard.bootstep.MemoryGuard"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, w: Any, **kwargs: Any) -> None:
        super().__init__(w, **kwargs)
        if logger.level == logging.NOTSET:
            # The startup line is the product: show it even under ``-l warning``.
            logger.setLevel(logging.INFO)
        self.env: Mapping[str, str] = os.environ
        try:
            self.settings = load_settings(self.env, w.app.conf)
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
                _log_format(self.env),
            )
            raise SystemExit(EX_CONFIG) from None
        self.decision = self._startup(w)

    def _startup(self, w: Any) -> Decision | None:
        settings = self.settings
        autoscale = list(w.autoscale) if w.autoscale else None
        requested = int(autoscale[0] if autoscale else w.concurrency)
        pool = pool_name(w.pool_cls)
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
        settings = self.settings
        gc.collect()  # what the pool does before each fork; measure the same heap
        budget = read_budget(settings)
        parent = footprint.measure(allocators=footprint.read_allocators())
        forked = getattr(w, "pool_start_method", "fork") == "fork"
        estimate = footprint.estimate_child(parent, forked=forked)
        if settings.child_memory is not None:
            child, child_source = settings.child_memory, settings.source("child_memory")
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
            "limit_detail": budget.detail,
        }
        if w.autoscale:
            fields["autoscale_min"] = min(w.min_concurrency, decision.concurrency)
        return fields, decision


__all__ = ["EX_CONFIG", "OPTIONS", "MemoryGuard", "pool_name", "read_budget"]
