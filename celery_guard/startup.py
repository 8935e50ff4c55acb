"""The startup decision, measured: the budget, the main process, one child's cost.

Shared by the worker step (right before the pool forks) and ``celery guard check`` (a dry
run before a deploy), so that both print the same figures from the same arithmetic.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, replace
from typing import Any

from . import census, cgroups, footprint, history, procfs
from .config import Settings
from .logline import emit
from .plan import FORKING_POOLS, Decision, decide
from .sizes import mib

EX_CONFIG = 78  # sysexits.h: configuration error; supervisors can tell it from a crash

#: The startup line's level, by the decision's action.
LEVELS = {
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
    for name, alias_path in concurrency.ALIASES.items():  # type: ignore[attr-defined]  # not in celery-types
        if alias_path == path:
            return "prefork" if name == "processes" else name
    from celery.concurrency.prefork import TaskPool

    if isinstance(pool_cls, type) and issubclass(pool_cls, TaskPool):
        return "prefork"
    return pool_cls.__name__


@dataclass(frozen=True)
class Budget:
    limit: int
    source: str  # cgroup-v2 | cgroup-v1 | env | config | option | physical
    detail: str
    in_use: int  # what the cgroup already holds (working set), when it is the cgroup's
    cgroup: cgroups.Cgroup | None = None  # where usage is compared with the limit
    own: cgroups.Cgroup | None = None  # the process's own memory cgroup, if any
    physical: int = 0  # bytes of physical memory: the budget when nothing limits


def physical_bytes(root: str = "/") -> int:
    """Physical memory: /proc/meminfo under ``root``, else what psutil says."""
    physical, _ = cgroups.physical_memory(root)
    if physical is None:
        import psutil

        physical = int(psutil.virtual_memory().total)
    return physical


def read_budget(settings: Settings, root: str = "/") -> Budget:
    """The limit to fit in: the setting, else the cgroup's, else physical memory. With a
    cgroup limit, ``in_use`` is the working set where that limit is set (siblings too)."""
    found = cgroups.find_memory_cgroup(root)
    own, physical = found.cgroup, physical_bytes(root)
    if settings.memory_limit is not None:
        source = settings.source("memory_limit")
        detail = f"{source} setting"
        return Budget(settings.memory_limit, source, detail, 0, own, own, physical)
    if own is None:
        return Budget(physical, "physical", found.reason, 0, None, None, physical)
    limit = cgroups.read_limit(own, physical)
    if limit.bytes is None:
        return Budget(physical, "physical", limit.reason, 0, None, own, physical)
    level = replace(own, path=limit.path or own.path)
    in_use = cgroups.read_usage(level).working_set or 0
    return Budget(limit.bytes, limit.source, limit.reason, in_use, level, own, physical)


def remembered_cost(settings: Settings, physical: int | None = None) -> int | None:
    """The per-child cost the state file kept from an earlier run, if it is to be used;
    ``physical`` bounds a plausible cost (the budget's physical memory, read once)."""
    path = settings.state_file
    if path is None or settings.child_memory is not None:
        return None
    cost, why = history.load(path, physical=physical)
    if cost is None and why != history.NO_FILE:
        fields = {"action": "ignored", "path": path, "reason": why}
        emit(logging.WARNING, "history", fields)
    return cost


@dataclass(frozen=True)
class Measured:
    settings: Settings
    pool: str
    requested: int
    budget: Budget
    parent: footprint.Footprint
    estimate: footprint.Estimate
    child: int  # bytes: the cost per child the decision used
    child_source: str  # measured | history | env | config | option
    in_use: int
    decision: Decision
    #: the pages a full collection writes, counted before the first fork (gc.freeze on)
    collector: footprint.CollectorPages | None = None
    #: seconds to write one page shared with a child (``footprint.copy_on_write_seconds``)
    copy_seconds: float | None = None

    @property
    def collector_copy_seconds(self) -> float:
        """Seconds a worker without gc.freeze spends, in the collection before each fork,
        copying the pages it writes: the child forked last shares all of them."""
        if self.collector is None or self.copy_seconds is None:
            return 0.0
        return len(self.collector.numbers) * self.copy_seconds

    def fields(self) -> dict[str, Any]:
        """The keys of the startup line, in its order."""
        return {
            "mode": self.settings.mode,
            "pool": self.pool,
            "limit_mib": mib(self.budget.limit),
            "limit_source": self.budget.source,
            "headroom_mib": mib(self.decision.headroom),
            "parent_rss_mib": mib(self.parent.rss),
            "child_estimate_mib": mib(self.child),
            "child_estimate_source": self.child_source,
            "requested": self.requested,
            "concurrency": self.decision.concurrency,
            "action": self.decision.action,
            # children that fit: none are forked by a pool that runs tasks in the main
            # process, so it has no such figure
            "fits": self.decision.fits if self.pool in FORKING_POOLS else None,
            "in_use_mib": mib(self.in_use),
            "child_estimate_method": self.estimate.method,
            "gc_freeze": self.settings.gc_freeze,
            "limit_detail": self.budget.detail,
            # what the run-time budget compares with the limit: the cgroup's figure (every
            # process in it), or nothing (the limit serves the startup decision only)
            "usage_measured": "none" if self.budget.cgroup is None else "cgroup",
        }


class Unsupported(Exception):
    """Nothing can be measured on this system (``procfs.unsupported`` says why)."""


def unmeasured_fields(settings: Settings, pool: str, requested: int, error: str) -> dict[str, Any]:
    """The startup (or check) line when nothing was measured: the concurrency asked, why."""
    return {
        "mode": settings.mode, "pool": pool, "requested": requested,
        "concurrency": requested, "action": "kept", "error": error,
    }  # fmt: skip


def measure(
    settings: Settings, pool: str, requested: int, forked: bool = True, root: str = "/"
) -> Measured:
    """Measure this process as the main process of a worker and decide the concurrency
    (its cgroup and meminfo read under ``root``); Unsupported where there is no /proc."""
    why = procfs.unsupported()  # this process's own /proc: its RSS is read there
    if why is not None:
        raise Unsupported(why)
    # No gc.collect() here: the census counts live data only, and a full collection of a
    # large app is most of what measuring would cost (the pool collects before forking).
    budget = read_budget(settings, root)
    app_objects = None  # off mode, or a child cost given: the app's data is not walked
    if settings.mode != "off" and settings.child_memory is None:
        app_objects = census.census(sys.modules, census.library_roots()).bytes
    # the pages a vanilla worker's children copy more (the pair the summary recommends)
    collector = copy_seconds = None
    if settings.gc_freeze and forked:
        collector = footprint.CollectorPages.of()
        copy_seconds = footprint.copy_on_write_seconds()
    parent = footprint.measure(allocators=footprint.read_allocators(), app_objects=app_objects)
    estimate = footprint.estimate_child(parent, forked=forked, gc_freeze=settings.gc_freeze)
    remembered = remembered_cost(settings, budget.physical)
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
    return Measured(
        settings, pool, requested, budget, parent, estimate, child, child_source, in_use,
        decision, collector, copy_seconds,
    )  # fmt: skip


__all__ = [
    "EX_CONFIG",
    "LEVELS",
    "Budget",
    "Measured",
    "measure",
    "physical_bytes",
    "pool_name",
    "read_budget",
    "remembered_cost",
]
