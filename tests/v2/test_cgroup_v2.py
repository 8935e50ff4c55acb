"""Real workers in real cgroup-v2 memory cgroups: what the guard reads there (``memory.max``
up the tree, ``memory.oom.group``, ``memory.events``) is what a kernel really wrote.

Run by ``tests/v2/run`` in a qemu guest (TCG: every Python step is 12-16 times slower than
on the host), so the apps are small, the pools one or two children and every wait long: each
waits for a log line, none for time.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

import harness
from harness import MIB

MakeCgroup = Callable[..., harness.CgroupV2]
MakeWorker = Callable[..., harness.Worker]
SMALL_APP = {"HEAVY_APP_OBJECTS": "1000", "HEAVY_APP_BUFFER_MIB": "1"}
FAST = {"CELERY_GUARD_SAMPLE_INTERVAL": "0.3", "CELERY_GUARD_SUMMARY_INTERVAL": "600"}
#: seconds for a worker to print a line (start, ready, a task's end) under TCG
SLOW = 300


def startup(worker: harness.Worker) -> dict[str, str]:
    """The startup line's fields, waited for as long as the guest needs."""
    worker.wait_for(r"celery-guard event=startup ", SLOW)
    return worker.startup()


def test_the_limit_is_read_from_a_parents_memory_max(
    redis: harness.RedisServer, make_v2_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """v2 shows each level's own ``memory.max`` only: a worker in a child cgroup with no
    limit ("max") under a parent limited to 512 MiB starts with the parent's limit, read
    from cgroup v2, and says which level set it."""
    parent = make_v2_cgroup(512 * MIB)
    child = parent.child()
    assert (child.path / "memory.max").read_text().strip() == "max"
    worker = make_worker(["-c", "1"], harness.worker_env(redis, SMALL_APP), child)
    line = startup(worker)
    assert line["limit_source"] == "cgroup-v2", line
    assert line["limit_mib"] == "512.0", line
    assert line["limit_detail"] == f"memory.max in /{parent.path.name}", line
    assert worker.process is not None and worker.process.poll() is None, worker.log


def test_group_oom_is_reported_at_startup(
    redis: harness.RedisServer, make_v2_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """With ``memory.oom.group=1`` (what Kubernetes 1.28+ sets) one OOM kill ends every
    process of the cgroup, the main process included: the worker says so when it starts,
    in an advice line on that topic."""
    group = make_v2_cgroup(512 * MIB, oom_group=True)
    worker = make_worker(["-c", "1"], harness.worker_env(redis, SMALL_APP), group)
    assert startup(worker)["limit_source"] == "cgroup-v2"
    worker.wait_ready(SLOW)  # the advice is given before the pool forks
    advice = [line for line in worker.events("advice") if line.get("topic") == "oom_group"]
    assert len(advice) == 1, worker.events("advice")
    assert "memory.oom.group is 1" in advice[0]["reason"], advice


def test_group_oom_set_above_the_workers_cgroup_is_reported_at_startup(
    redis: harness.RedisServer, make_v2_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """The kernel kills the group of the highest ancestor with ``memory.oom.group=1``: set
    on a parent (a pod, a supervisor's cgroup) above a worker whose own cgroup has 0, one
    OOM kill still ends the main process. The worker says so as it does for its own."""
    parent = make_v2_cgroup(512 * MIB, oom_group=True)
    child = parent.child()
    assert (child.path / "memory.oom.group").read_text().strip() == "0"
    worker = make_worker(["-c", "1"], harness.worker_env(redis, SMALL_APP), child)
    assert startup(worker)["limit_mib"] == "512.0"
    worker.wait_ready(SLOW)
    advice = [line for line in worker.events("advice") if line.get("topic") == "oom_group"]
    assert len(advice) == 1, worker.events("advice")


def test_a_kernel_oom_kill_is_explained_from_memory_events(
    redis: harness.RedisServer, make_v2_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """A task that needs more than the cgroup's ``memory.max``, the guard's own brake off:
    the kernel's OOM killer takes its child, ``memory.events`` counts it, and the guard
    names the task in one event=oom line. The worker lives on and runs the next task."""
    group = make_v2_cgroup(320 * MIB)
    env = harness.worker_env(redis, {**SMALL_APP, **FAST, "CELERY_GUARD_BRAKE": "0"})
    worker = make_worker(["-c", "1"], env, group)
    assert startup(worker)["limit_mib"] == "320.0"
    worker.wait_ready(SLOW)
    (hog,) = harness.send_tasks(redis, worker.queue, "hog", 1, (480, 1.0))
    hog.get(timeout=SLOW, propagate=False)  # its child was lost: WorkerLostError
    assert hog.state == "FAILURE", hog.state
    line = worker.wait_for(rf"celery-guard event=oom .*task_id={hog.id}.*", 60).group(0)
    assert "task=heavy_app.hog" in line, line
    assert group.oom_kills() >= 1, group.events()
    (oom,) = worker.events("oom")
    assert oom["limit_mib"] == "320.0", oom
    assert int(oom["cgroup_oom_kills"]) == group.oom_kills(), (oom, group.events())  # what it read
    (after,) = harness.send_tasks(redis, worker.queue, "add", 1, (2, 3))
    assert after.get(timeout=SLOW) == 5


def test_memory_max_lowered_under_a_running_worker_is_noticed_and_the_pool_shrinks(
    redis: harness.RedisServer, make_v2_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """An in-place resize (Kubernetes 1.35) writes a new ``memory.max`` under the running
    worker, just above its working set (the high-water mark, 95%, now below it): the guard
    reads it again within seconds, says so in one event=limit line with the old and new
    figures read from cgroup v2, and its brake retires a child before the kernel has to
    kill one."""
    group = make_v2_cgroup(1024 * MIB)
    worker = make_worker(["-c", "2"], harness.worker_env(redis, {**SMALL_APP, **FAST}), group)
    worker.wait_ready(SLOW)
    walks = harness.send_tasks(redis, worker.queue, "walk", 4)  # both children at work
    assert harness.wait_for_results(walks, SLOW, group), harness.outcome(walks, group, worker)
    lowered_mib = group.working_set() // 0.97 // MIB
    lowered_at = len(worker.log)  # the guard's lines from here on, not its start's
    group.set_limit(int(lowered_mib * MIB))
    line = worker.wait_for(r"celery-guard event=limit .*", 60).group(0)  # read every second
    (changed,) = worker.events("limit")
    assert (changed["old_mib"], changed["new_mib"]) == ("1024.0", str(lowered_mib)), line
    assert changed["limit_source"] == "cgroup-v2", line
    assert changed["limit_detail"] == f"memory.max in /{group.path.name}", line

    def retired() -> bool:
        return any(p.get("action") == "retire" for p in worker.events("pressure", lowered_at))

    assert harness.eventually(retired, 60), worker.events("pressure", lowered_at)
    assert group.oom_kills() == 0, group.events()


@pytest.mark.parametrize(
    ("task", "args", "count"),
    [
        ("leak", (16,), 48),  # 768 MiB kept in children, in all: children recycled
        ("hog", (96, 0.5), 24),  # 8 at once would need 768 MiB: tasks held
    ],
)
def test_with_group_oom_a_pool_of_8_under_pressure_has_no_oom_kill(
    redis: harness.RedisServer,
    make_v2_cgroup: MakeCgroup,
    make_worker: MakeWorker,
    task: str,
    args: tuple[float, ...],
    count: int,
) -> None:
    """With ``memory.oom.group=1`` one OOM kill would end the whole worker, the main process
    with its children. Leaky tasks (each keeps 16 MiB in its child for good) and transient
    peaks (96 MiB for half a second each) at ``-c 8`` in 512 MiB, late acks: every task
    finishes, the guard recycling children or holding tasks, and the kernel kills nothing."""
    group = make_v2_cgroup(512 * MIB, oom_group=True)
    env = harness.worker_env(redis, {**SMALL_APP, **FAST, "HEAVY_APP_ACKS_LATE": "1"})
    worker = make_worker(["-c", "8"], env, group)
    assert startup(worker)["concurrency"] == "8"
    worker.wait_ready(SLOW)
    results = harness.send_tasks(redis, worker.queue, task, count, args)
    assert harness.wait_for_results(results, 3 * SLOW, group), harness.outcome(
        results, group, worker
    )
    assert group.oom_kills() == 0, group.events()
    acted = worker.events("recycle") + worker.events("pressure")
    assert acted, worker.log[-3000:]  # it had to act (recycle, retire, hold), and did
