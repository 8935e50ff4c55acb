"""Soak: many tasks through a guarded prefork worker. The guard keeps only bounded
aggregates, so what it holds is the same after the last task as after the first fifth;
no task is lost; the summary agrees with the per-task lines.

CI runs 5,000 tasks; the full soak is 50,000 (``-s`` shows the figures):
``GUARD_SOAK_TASKS=50000 bash tests/run.sh tests/integration/test_soak.py -s``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable

import psutil
import pytest
from celery.result import ResultSet

import harness
from harness import MIB

MakeCgroup = Callable[..., harness.Cgroup]
MakeWorker = Callable[..., harness.Worker]
TASKS = int(os.environ.get("GUARD_SOAK_TASKS", "5000"))
ENV = {
    "HEAVY_APP_OBJECTS": "1000",
    "HEAVY_APP_BUFFER_MIB": "1",
    "CELERY_GUARD_CHILD_LOG": "all",
    "CELERY_GUARD_SAMPLE_INTERVAL": "0.5",
    "CELERY_GUARD_SUMMARY_INTERVAL": "600",
}


def rss_mib(worker: harness.Worker, group: harness.Cgroup) -> tuple[float, dict[int, float]]:
    """(main process, each child by pid) resident memory now."""
    assert worker.process is not None
    main = worker.process.pid
    children = [p for p in group.pids() if p != main]
    rss = {pid: psutil.Process(pid).memory_info().rss / MIB for pid in children}
    return psutil.Process(main).memory_info().rss / MIB, rss


def wait_done(worker: harness.Worker, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(re.findall(r"Task heavy_app\.add\[[^\]]+\] succeeded", worker.log)) >= count:
            return
        time.sleep(0.5)
    raise AssertionError(f"fewer than {count} tasks succeeded within {timeout} s")


@pytest.mark.cgroup
def test_soak(redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker) -> None:
    env = harness.worker_env(redis, ENV)
    group = make_cgroup(1024 * MIB)
    worker = make_worker(["-c", "2", "--without-gossip", "--without-mingle"], env, group)
    worker.wait_ready(60)
    warm = TASKS // 5
    results = harness.send_tasks(redis, worker.queue, "add", warm, (1, 2))
    wait_done(worker, warm, 120 + warm / 20)
    main_before, children_before = rss_mib(worker, group)
    held_before = harness.guard_stats(worker, env)["held"]

    results += harness.send_tasks(redis, worker.queue, "add", TASKS - warm, (1, 2))
    wait_done(worker, TASKS, 120 + TASKS / 20)
    main_after, children_after = rss_mib(worker, group)
    held_after = harness.guard_stats(worker, env)["held"]
    assert ResultSet(results).completed_count() == TASKS  # no task lost

    # What the guard holds does not grow with the number of tasks: one entry per task
    # name and per child, histograms of at most 600 buckets (one per 5% of size).
    assert held_after["task_names"] == held_before["task_names"] == 1
    assert held_after["children"] <= 2 and held_after["last_tasks"] == 0
    assert held_after["private_buckets"] <= 600 and held_after["peak_rss_buckets"] <= 600
    # Nor does the worker, beyond allocator noise (figures in the README).
    print(f"main {main_before:.1f} -> {main_after:.1f} MiB; "
          f"children {children_before} -> {children_after} MiB")  # fmt: skip
    assert main_after - main_before < 4
    lived = children_before.keys() & children_after.keys()  # the same child, by pid
    assert lived, (children_before, children_after)
    assert all(children_after[pid] - children_before[pid] < 2 for pid in lived)

    worker.stop()
    lines = worker.events("child")
    assert len(lines) == TASKS == len({line["task_id"] for line in lines})
    per_child: dict[str, int] = {}
    for line in lines:
        per_child[line["pid"]] = max(per_child.get(line["pid"], 0), int(line["tasks"]))
    assert sum(per_child.values()) == TASKS
    (final,) = [s for s in worker.events("summary") if s["final"] == "true"]
    grown = [float(line["delta_mib"]) for line in lines if float(line["delta_mib"]) > 0]
    top = dict(item.split(":") for item in final["top_tasks"].split(",") if item)
    total = float(top.get("heavy_app.add", 0))
    assert abs(total - sum(grown)) <= 0.05 * (len(grown) + 1) + 0.05
    assert final["oom_kills"] == "0" and final["recycles"] == "0"
