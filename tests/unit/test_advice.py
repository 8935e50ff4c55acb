"""Tests for celery_guard.advice: each rule as rows of facts and the topics they raise.

The worker logs ``worker_advice`` at startup; ``celery guard check`` prints
``check_advice``, which adds the deployment rules. Same facts, same topics.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from celery_guard.advice import Facts, check_advice, worker_advice

MIB = 1 << 20
#: A prefork worker with safe settings: no advice at all.
QUIET = Facts(
    pool="prefork",
    parent_rss=200 * MIB,
    acks_late=True,
    reject_on_worker_lost=True,
    left_on=(),
)

WORKER = [
    # id, changes to QUIET, topics
    ("quiet", {}, []),
    ("max-memory-below-parent", {"max_memory_per_child_kib": 100_000},
     ["max_memory_per_child_below_parent"]),
    ("max-memory-above-parent", {"max_memory_per_child_kib": 300_000}, []),
    ("max-memory-on-threads", {"pool": "threads", "max_memory_per_child_kib": 300_000},
     ["max_memory_per_child_ignored"]),
    ("max-worker-memory-on-prefork", {"max_worker_memory": 1 << 30}, ["max_worker_memory_ignored"]),
    ("max-worker-memory-on-gevent", {"pool": "gevent", "max_worker_memory": 1 << 30}, []),
    ("acks-early", {"acks_late": False}, ["acks_early"]),
    ("acks-late-without-reject", {"reject_on_worker_lost": False}, ["acks_early"]),
    ("acks-early-governor-off", {"acks_late": False, "governed": False}, []),
    ("acks-early-threads", {"acks_late": False, "pool": "threads"}, []),
    ("oom-group", {"oom_group": True}, ["oom_group"]),
    ("in-order", {"max_memory_per_child_kib": 1, "acks_late": False, "oom_group": True},
     ["max_memory_per_child_below_parent", "acks_early", "oom_group"]),
]  # fmt: skip


@pytest.mark.parametrize("changes,topics", [w[1:] for w in WORKER], ids=[w[0] for w in WORKER])
def test_worker_advice(changes: dict[str, object], topics: list[str]) -> None:
    facts = replace(QUIET, **changes)  # type: ignore[arg-type]
    found = worker_advice(facts)
    assert [a.topic for a in found] == topics
    assert all(a.reason and a.fix for a in found)


HOST_16 = {"concurrency_from_host_cpus": True, "host_cpus": 16}
CHECK = [
    ("quiet", {}, []),
    ("host-cpus-above-quota", {**HOST_16, "cpu_budget": 2}, ["concurrency_from_host_cpus"]),
    ("host-cpus-no-quota", {**HOST_16, "cpu_budget": 16}, []),
    ("concurrency-given", {"host_cpus": 16, "cpu_budget": 2}, []),
    ("old-celery-no-budget", HOST_16, []),
    ("prefetch", {"prefetch_multiplier": 4}, ["prefetch_multiplier"]),
    ("prefetch-one", {"prefetch_multiplier": 1}, []),
    ("prefetch-threads", {"prefetch_multiplier": 4, "pool": "threads"}, []),
    ("chatter", {"left_on": ("gossip", "heartbeat")}, ["gossip_mingle_heartbeat"]),
    ("worker-advice-first", {"acks_late": False, "prefetch_multiplier": 4},
     ["acks_early", "prefetch_multiplier"]),
]  # fmt: skip


@pytest.mark.parametrize("changes,topics", [c[1:] for c in CHECK], ids=[c[0] for c in CHECK])
def test_check_advice(changes: dict[str, object], topics: list[str]) -> None:
    facts = replace(QUIET, **changes)  # type: ignore[arg-type]
    assert [a.topic for a in check_advice(facts)] == topics


def test_the_fix_carries_the_figures() -> None:
    """A fix the user can apply as it is: the numbers are in it."""
    (below,) = worker_advice(replace(QUIET, max_memory_per_child_kib=1000))
    assert below.fields()["parent_rss_kib"] == 204800
    assert "above 204800 (KiB)" in below.fix
    cpus = replace(QUIET, concurrency_from_host_cpus=True, host_cpus=16, cpu_budget=2)
    (advice,) = check_advice(cpus)
    assert advice.fix == "-c auto (Celery 5.7+ reads the quota) or -c 2"
    (chatter,) = check_advice(replace(QUIET, left_on=("gossip", "mingle", "heartbeat")))
    assert chatter.fix.startswith("--without-gossip --without-mingle --without-heartbeat")
    assert list(chatter.fields()) == ["topic", "on", "reason", "fix"]
