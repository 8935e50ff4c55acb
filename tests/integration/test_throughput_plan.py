"""The pool sized for throughput (policy.plan), end to end: real workers, real Redis,
real cgroups. Leaky tasks, dear children against cheap ones: the governor measures what
a task and a new child cost and picks the size and the runs between recycles together,
as a hand-tuner would, and recommends that same pair."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest

import harness
from harness import MIB, Cgroup, Worker

MakeWorker = Callable[..., Worker]
MakeCgroup = Callable[..., Cgroup]

SMALL_APP = {"HEAVY_APP_OBJECTS": "1000", "HEAVY_APP_BUFFER_MIB": "1"}


def _run(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker,
    app: dict[str, str], tasks: int, seconds: float,
) -> Worker:  # fmt: skip
    """``tasks`` tasks that each keep 24 MiB in their child and take ``seconds``, sent
    to a guarded worker asked for -c 16 in 768 MiB: every one done, no OOM kill, none
    stopped."""
    group = make_cgroup(768 * MIB)
    worker = make_worker(["-c", "16"], harness.worker_env(redis, {**SMALL_APP, **app}), group)
    worker.wait_ready(90)
    results = harness.send_tasks(redis, worker.queue, "leak", tasks, (24, seconds))
    assert harness.wait_for_results(results, 240, group)
    assert group.oom_kills() == 0
    assert not [p for p in worker.events("pressure") if p["action"] == "terminate"]
    worker.stop()
    return worker


@pytest.mark.cgroup
def test_dear_children_each_run_several_leaky_tasks_and_the_summary_recommends_that_pair(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """A child spends 0.3 s of CPU starting, a task 20 ms and keeps 24 MiB: replacing
    children after every task would spend most of the CPU on starts. The plan keeps a
    few children that each run several tasks, the pool changes direction at most twice
    once planned, and the summary recommends the plan made for a worker without the
    guard, with the worker_max_memory_per_child that recycles after its runs."""
    worker = _run(redis, make_cgroup, make_worker, {"HEAVY_APP_CHILD_START_SECONDS": "0.3"},
                  160, 0.005)  # fmt: skip
    plans = [p for p in worker.events("plan") if p["reason"] != "measuring"]
    assert plans, worker.log[-3000:]
    last = plans[-1]
    assert int(last["target"]) <= 6
    assert int(last["tasks_per_child"]) >= 3
    assert worker.forks() < 160 / 2
    assert worker.turns_after_plan() in (0, 1, 2)
    summary = worker.final_summary()
    assert summary["plan_concurrency"] == last["target"]
    assert summary["plan_tasks_per_child"] == last["tasks_per_child"]
    # the pair for a worker without the guard: planned again from the same pace
    assert summary["recommended_concurrency"] == summary["plan_vanilla_concurrency"] != ""
    assert (summary["recommended_max_memory_per_child_kib"]
            == summary["plan_vanilla_max_memory_per_child_kib"] != "")  # fmt: skip


@pytest.mark.cgroup
def test_cheap_children_of_slow_tasks_stay_many_and_are_replaced_after_a_task_or_two(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """A child is cheap to start and a task sleeps 0.3 s and keeps 24 MiB: more
    children overlap more sleep, so the plan keeps the pool large (16 fit for one run
    each) and replaces children after a run or two."""
    worker = _run(redis, make_cgroup, make_worker, {}, 160, 0.3)
    plans = [p for p in worker.events("plan") if p["reason"] != "measuring"]
    assert plans, worker.log[-3000:]
    last = plans[-1]
    assert int(last["target"]) >= 12
    assert int(last["tasks_per_child"]) <= 2


@pytest.mark.cgroup
def test_a_pool_of_dear_children_is_forked_in_waves_each_once_the_last_is_measured(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """Asked for -c 8, with children that spend 0.3 s of CPU starting: the pool is
    forked with one child per CPU, and no more before a task has finished (an idle
    worker keeps its first wave); then, as tasks that wait on I/O come, it grows to 8,
    each wave at most as large as the pool before it (the children measured, in the
    first round; ready, after it). The startup line and ``celery inspect stats`` give
    the whole pool's size."""
    from celery_guard.governor import available_cpus

    group = make_cgroup(768 * MIB)
    env = harness.worker_env(redis, {**SMALL_APP, "HEAVY_APP_CHILD_START_SECONDS": "0.3"})
    worker = make_worker(["-c", "8"], env, group)
    worker.wait_ready(90)
    assert worker.startup()["concurrency"] == "8"
    first = max(math.ceil(available_cpus()), 1)
    assert harness.eventually(lambda: worker.forks() == first, 30), worker.log[-3000:]
    node = worker.wait_for(r"(\S+@\S+) ready\.").group(1)
    stats = harness.run_celery(["inspect", "stats", "--json", "--timeout", "10", "-d", node], env)
    assert json.loads(stats.stdout)[node]["pool"]["max-concurrency"] == 8, stats
    # the first wave ready, the governor's checks past (the inspect's round trip): idle,
    # the pool has not grown
    assert worker.forks() == first and "action=grow" not in worker.log, worker.log[-3000:]
    results = harness.send_tasks(redis, worker.queue, "hog", 80, (0, 0.2))
    assert harness.eventually(lambda: worker.forks() == 8, 60), worker.log[-3000:]
    assert harness.wait_for_results(results, 120, group)
    grows = [p for p in worker.events("pressure") if p["action"] == "grow"]
    sizes = [first] + [int(g["concurrency"]) for g in grows]
    assert sizes[-1] == 8 and all(
        int(g["added"]) <= before for g, before in zip(grows, sizes, strict=False)
    ), grows
    before_first_grow = worker.log.split("action=grow", 1)[0]
    assert before_first_grow.count("heavy_app pool child started") == first
    assert "event=calibration" in before_first_grow  # a child measured before it grew
    assert group.oom_kills() == 0


@pytest.mark.cgroup
def test_cpu_bound_tasks_settle_at_the_children_that_keep_the_cpus_busy(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """-c 16 in 1 GiB, where 8 children of the example app fit, and tasks that only read
    its data (no I/O, nothing kept): once the CPUs bound the rate, more children only
    share them, so the plan and the recommendation are the smallest pool that keeps the
    CPUs busy, not all that fit (a tie goes to the smaller pool)."""
    from celery_guard.governor import available_cpus

    group = make_cgroup(1024 * MIB)
    worker = make_worker(["-c", "16"], harness.worker_env(redis), group)
    worker.wait_ready(90)
    results = harness.send_tasks(redis, worker.queue, "walk", 200)
    assert harness.wait_for_results(results, 240, group)
    assert group.oom_kills() == 0
    worker.stop()
    plans = [p for p in worker.events("plan") if p["reason"] != "measuring"]
    assert plans, worker.log[-3000:]
    enough = math.ceil(available_cpus()) + 1
    assert int(plans[-1]["target"]) <= enough, plans
    assert int(worker.final_summary()["recommended_concurrency"]) <= enough
