"""Advice: settings that cannot work as meant, each with a reason and a fix.

Pure rules over the facts a worker (or ``celery guard check``) gathered, so the worker's
startup lines and the check say the same thing for the same settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import Settings
from .plan import FORKING_POOLS


@dataclass(frozen=True)
class Advice:
    topic: str
    reason: str
    fix: str
    figures: Mapping[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        return {"topic": self.topic, **self.figures, "reason": self.reason, "fix": self.fix}


@dataclass(frozen=True)
class Facts:
    """What the rules look at. The deployment facts (CPU, prefetch, gossip...) are known
    to ``celery guard check``; the worker leaves them at their neutral values."""

    pool: str
    parent_rss: int  # bytes
    max_memory_per_child_kib: int = 0
    max_worker_memory: int | None = None
    governed: bool = True  # the run-time budget acts (it may stop a child)
    acks_late: bool = False
    reject_on_worker_lost: bool = False
    oom_group: bool = False
    # deployment
    concurrency_from_host_cpus: bool = False  # -c and worker_concurrency left unset
    host_cpus: int | None = None
    cpu_budget: int | None = None  # what the cgroup CPU quota allows (Celery's -c auto)
    prefetch_multiplier: int = 1
    left_on: tuple[str, ...] = ()  # of gossip, mingle, heartbeat

    @classmethod
    def of(
        cls,
        conf: Mapping[str, Any] | Any,
        settings: Settings,
        *,
        pool: str,
        parent_rss: int,
        max_memory_per_child_kib: int,
        oom_group: bool,
        **deployment: Any,
    ) -> Facts:
        """The facts both the worker and the check take from app.conf and the settings."""
        return cls(
            pool=pool,
            parent_rss=parent_rss,
            max_memory_per_child_kib=max_memory_per_child_kib,
            max_worker_memory=settings.max_worker_memory,
            governed=settings.governor != "off",
            acks_late=bool(conf.get("task_acks_late")),
            reject_on_worker_lost=bool(conf.get("task_reject_on_worker_lost")),
            oom_group=oom_group,
            **deployment,
        )


def _max_memory_per_child(f: Facts) -> Advice | None:
    kib = f.max_memory_per_child_kib
    if not kib:
        return None
    if f.pool not in FORKING_POOLS:
        return Advice(
            "max_memory_per_child_ignored",
            f"the {f.pool} pool does not recycle children; the setting does nothing",
            "use the prefork pool, or drop worker_max_memory_per_child",
            {"max_memory_per_child_kib": kib},
        )
    if kib * 1024 >= f.parent_rss:
        return None
    parent_kib = f.parent_rss // 1024
    return Advice(
        "max_memory_per_child_below_parent",
        "a child's peak RSS starts at the parent's RSS, so every child will be "
        "replaced after every task",
        f"set worker_max_memory_per_child above {parent_kib} (KiB), from the "
        "summary's recommended_max_memory_per_child_kib",
        {"max_memory_per_child_kib": kib, "parent_rss_kib": parent_kib},
    )


def _max_worker_memory(f: Facts) -> Advice | None:
    if f.max_worker_memory is None or f.pool not in FORKING_POOLS:
        return None
    return Advice(
        "max_worker_memory_ignored",
        "CELERY_GUARD_MAX_WORKER_MEMORY is for pools that do not fork; the prefork "
        "pool recycles children instead",
        "set worker_max_memory_per_child (see the summary's recommendation)",
    )


def _acks(f: Facts) -> Advice | None:
    if not f.governed or f.pool not in FORKING_POOLS or (f.acks_late and f.reject_on_worker_lost):
        return None
    return Advice(
        "acks_early",
        "a task whose child has to be stopped for memory (the last resort, when the "
        "kernel would act next) fails with MemoryLimitExceeded and is not run again: "
        "its message was acknowledged when it started",
        "task_acks_late = True and task_reject_on_worker_lost = True (tasks must be "
        "safe to run twice; one task is re-delivered at most CELERY_GUARD_MAX_MEMORY_KILLS "
        "times), or accept the loss",
    )


def _oom_group(f: Facts) -> Advice | None:
    if not f.oom_group:
        return None
    return Advice(
        "oom_group",
        "memory.oom.group is 1 in this cgroup or one above it: one OOM kill ends every "
        "process in that group, the main process included",
        "keep the pool inside its budget (mode scale) so the kernel never has to act; "
        "Kubernetes 1.28+ sets it on every container",
    )


def _host_cpus(f: Facts) -> Advice | None:
    if not (f.concurrency_from_host_cpus and f.pool in FORKING_POOLS):
        return None
    if f.host_cpus is None or f.cpu_budget is None or f.cpu_budget >= f.host_cpus:
        return None
    return Advice(
        "concurrency_from_host_cpus",
        f"the concurrency defaults to the host's {f.host_cpus} CPUs, but the cgroup "
        f"CPU quota allows {f.cpu_budget}: more children than CPUs, each a full copy "
        "of the main process",
        f"-c auto (Celery 5.7+ reads the quota) or -c {f.cpu_budget}",
        {"host_cpus": f.host_cpus, "cpu_budget": f.cpu_budget},
    )


def _prefetch(f: Facts) -> Advice | None:
    if f.prefetch_multiplier <= 1 or f.pool not in FORKING_POOLS:
        return None
    return Advice(
        "prefetch_multiplier",
        f"worker_prefetch_multiplier={f.prefetch_multiplier}: each child reserves "
        "that many messages; with long tasks they wait behind it, and a worker paused "
        "for memory still holds them",
        "worker_prefetch_multiplier = 1 for long tasks (with task_acks_late)",
        {"prefetch_multiplier": f.prefetch_multiplier},
    )


def _left_on(f: Facts) -> Advice | None:
    if not f.left_on:
        return None
    flags = " ".join(f"--without-{name}" for name in f.left_on)
    return Advice(
        "gossip_mingle_heartbeat",
        f"{', '.join(f.left_on)} on: the main process keeps extra consumers, events "
        "and broker traffic that a worker which only runs tasks does not use",
        f"{flags} unless you use them (Flower and `celery events` need heartbeats)",
        {"on": ",".join(f.left_on)},
    )


#: The rules: what the worker logs at startup, then what ``celery guard check`` adds (the
#: deployment, before it runs).
WORKER_RULES = (_max_memory_per_child, _max_worker_memory, _acks, _oom_group)
CHECK_RULES = (*WORKER_RULES, _host_cpus, _prefetch, _left_on)


def worker_advice(facts: Facts) -> list[Advice]:
    return [found for rule in WORKER_RULES if (found := rule(facts)) is not None]


def check_advice(facts: Facts) -> list[Advice]:
    return [found for rule in CHECK_RULES if (found := rule(facts)) is not None]


__all__ = ["Advice", "Facts", "check_advice", "worker_advice"]
