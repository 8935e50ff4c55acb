"""Memory limits per task, end to end: real workers, real Redis (broker and result backend),
real cgroups.

The example app's ``limited`` task declares ``memory_limit="160M"`` and
``soft_memory_limit="96M"``; ``stubborn`` declares ``memory_limit="96M"`` and swallows
every exception; with ``HEAVY_APP_ANNOTATE=1`` ``task_annotations`` gives ``hog`` a limit
of 100M.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

import harness
from harness import MIB, Cgroup, Worker

MakeWorker = Callable[..., Worker]
MakeCgroup = Callable[..., Cgroup]

SMALL_APP = {"HEAVY_APP_OBJECTS": "1000", "HEAVY_APP_BUFFER_MIB": "1"}
ACKS = {"early": {}, "late": {"HEAVY_APP_ACKS_LATE": "1"}}


def limit_lines(worker: Worker, kind: str) -> list[dict[str, str]]:
    return [line for line in worker.events("task_memory_limit") if line["kind"] == kind]


def failed_with(task: object, worker: Worker) -> str:
    """The exception class a task failed with, read back from the result backend; also
    checks that ``task_failure`` saw the same class in the worker."""
    with pytest.raises(Exception) as failed:
        task.get(timeout=120)  # type: ignore[attr-defined]
    name = type(failed.value).__name__
    worker.wait_for(rf"heavy_app task failed id={task.id} exception={name}", 30)  # type: ignore[attr-defined]
    return name


@pytest.mark.cgroup
@pytest.mark.parametrize("acks", ["early", "late"])
def test_a_task_past_its_hard_limit_fails_alone_and_is_not_re_delivered(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker, acks: str
) -> None:
    """``limited`` grows to 300 MiB (going on past its soft limit), past its 160 MiB limit,
    while two sibling tasks run in
    the other children. It fails with MemoryLimitExceeded (naming the limit and what it
    held); the siblings finish; the main process lives; nothing is OOM-killed; its child
    is replaced; and with late acks it is not run again."""
    group = make_cgroup(1024 * MIB)
    env = harness.worker_env(redis, {**SMALL_APP, **ACKS[acks]})
    worker = make_worker(["-c", "3"], env, group)
    worker.wait_ready(60)
    siblings = harness.send_tasks(redis, worker.queue, "hog", 2, (40, 2.0))
    (limited,) = harness.send_tasks(redis, worker.queue, "limited", 1, (300, 8, "continue"))
    assert failed_with(limited, worker) == "MemoryLimitExceeded"
    assert all(s.get(timeout=60) == 40 * MIB for s in siblings)
    with pytest.raises(Exception) as failed:
        limited.get(timeout=5)
    assert "memory_limit of 160.0 MiB" in str(failed.value)
    (hard,) = limit_lines(worker, "hard")
    assert hard["task"] == "heavy_app.limited" and hard["task_id"] == limited.id
    assert hard["action"] == "raised" and float(hard["held_mib"]) >= 160
    worker.wait_for(rf"event=recycle .*reason=task_memory_limit .*task_id={limited.id}", 30)
    (after,) = harness.send_tasks(redis, worker.queue, "add", 1, (2, 3))
    assert after.get(timeout=60) == 5
    assert worker.process is not None and worker.process.poll() is None
    assert group.oom_kills() == 0
    assert worker.log.count(f"Task heavy_app.limited[{limited.id}] received") == 1


def test_a_task_past_its_soft_limit_catches_it_and_returns(
    redis: harness.RedisServer, make_worker: MakeWorker
) -> None:
    """Told it passed its 96 MiB soft limit, ``limited`` stops growing and returns what
    it got through: the task succeeds, with partial work."""
    worker = make_worker(["-c", "1"], harness.worker_env(redis, SMALL_APP))
    worker.wait_ready(60)
    (task,) = harness.send_tasks(redis, worker.queue, "limited", 1, (150, 8, "return"))
    got = task.get(timeout=60)
    assert 96 <= got < 150
    (soft,) = limit_lines(worker, "soft")
    assert soft["action"] == "raised" and float(soft["task_limit_mib"]) == 96.0
    assert limit_lines(worker, "hard") == []
    (raised,) = harness.send_tasks(redis, worker.queue, "limited", 1, (150,))  # not caught
    assert failed_with(raised, worker) == "SoftMemoryLimitExceeded"


@pytest.mark.cgroup
@pytest.mark.parametrize("acks", ["early", "late"])
def test_a_task_that_swallows_its_limit_is_stopped_with_its_child(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker, acks: str
) -> None:
    """``stubborn`` catches MemoryLimitExceeded and goes on growing: after a grace period
    the main process stops its child. It fails with MemoryLimitExceeded, with late acks
    and task_reject_on_worker_lost too (it would only pass its limit again)."""
    group = make_cgroup(1024 * MIB)
    env = harness.worker_env(redis, {**SMALL_APP, **ACKS[acks]})
    worker = make_worker(["-c", "2"], env, group)
    worker.wait_ready(60)
    (task,) = harness.send_tasks(redis, worker.queue, "stubborn", 1, (600,))
    assert failed_with(task, worker) == "MemoryLimitExceeded"
    with pytest.raises(Exception) as failed:
        task.get(timeout=5)
    assert "did not stop" in str(failed.value)
    killed = [line for line in worker.events("task_memory_limit") if line["action"] == "killed"]
    assert [line["task_id"] for line in killed] == [task.id]
    assert worker.log.count(f"Task heavy_app.stubborn[{task.id}] received") == 1
    assert worker.events("oom") == [] and group.oom_kills() == 0
    (after,) = harness.send_tasks(redis, worker.queue, "add", 1, (2, 3))
    assert after.get(timeout=60) == 5


def test_limits_from_annotations_and_the_worker_wide_default_apply(
    redis: harness.RedisServer, make_worker: MakeWorker
) -> None:
    """``task_annotations`` gives ``hog`` 100M; CELERY_GUARD_TASK_MEMORY_LIMIT gives every
    task without a limit of its own 64M (``collect`` here). Tasks within them run."""
    env = harness.worker_env(
        redis, {**SMALL_APP, "HEAVY_APP_ANNOTATE": "1", "CELERY_GUARD_TASK_MEMORY_LIMIT": "64M"}
    )
    worker = make_worker(["-c", "2"], env)
    worker.wait_ready(60)
    (annotated,) = harness.send_tasks(redis, worker.queue, "hog", 1, (200, 1.0))
    assert failed_with(annotated, worker) == "MemoryLimitExceeded"
    (default,) = harness.send_tasks(redis, worker.queue, "leak", 1, (128, 1.0))
    assert failed_with(default, worker) == "MemoryLimitExceeded"
    hard = {line["task"]: float(line["task_limit_mib"]) for line in limit_lines(worker, "hard")}
    assert hard == {"heavy_app.hog": 100.0, "heavy_app.leak": 64.0}
    ok = harness.send_tasks(redis, worker.queue, "hog", 2, (16, 0.1))
    assert [r.get(timeout=60) for r in ok] == [16 * MIB, 16 * MIB]


def test_a_limit_that_is_not_a_size_stops_the_worker_with_78(
    redis: harness.RedisServer, make_worker: MakeWorker
) -> None:
    env = harness.worker_env(redis, {**SMALL_APP, "HEAVY_APP_BAD_LIMIT": "1"})
    worker = make_worker(["-c", "1"], env)
    assert worker.wait_exit(60) == 78
    (error,) = worker.events("config_error")
    assert error["variable"] == "heavy_app.typo.memory_limit" and error["value"] == "lots"
    assert "Traceback" not in worker.log
