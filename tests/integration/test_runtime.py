"""Run time without loss, end to end: the example app (about 180 MiB main process) asked
for ``-c 16`` in a 768 MiB cgroup, real Redis, real OOM killer.

- Leaky tasks (each keeps 24 MiB for the life of its child): children are recycled
  between tasks, before they outgrow their share; nothing is killed, nothing is lost,
  also with Celery's default early acks.
- Transient peaks (each task uses 60 MiB for a moment): tasks that would not fit are held
  until they do, instead of being started and killed.
- A task that alone cannot fit: stopped, it fails with ``MemoryLimitExceeded`` (in the
  result backend and in ``task_failure``), re-delivered at most
  CELERY_GUARD_MAX_MEMORY_KILLS times with late acks; the worker lives on.

Times are not asserted here: ``bench/runtime.py`` compares them with the best hand-tuned
vanilla worker, and CI runs its short form.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import harness
from harness import MIB, Cgroup, Worker

MakeWorker = Callable[..., Worker]
MakeCgroup = Callable[..., Cgroup]

LIMIT = 768 * MIB
FAST = {"CELERY_GUARD_SAMPLE_INTERVAL": "0.5", "CELERY_GUARD_SUMMARY_INTERVAL": "600"}
ACKS = {"early": {}, "late": {"HEAVY_APP_ACKS_LATE": "1"}}


def smallest_pool(worker: Worker) -> int:
    """The smallest pool size the guard's lines report once the pool was forked (its
    start's waves apart: ``Worker.smallest_pool``), or the startup decision's."""
    smallest = worker.smallest_pool()
    decided = int(worker.startup()["concurrency"])
    return decided if smallest is None else min(smallest, decided)


def guard_stopped(worker: Worker) -> list[dict[str, str]]:
    return [p for p in worker.events("pressure") if p["action"] == "terminate"]


@pytest.mark.cgroup
@pytest.mark.parametrize("acks", ["early", "late"])
def test_leaky_tasks_are_recycled_between_tasks_and_nothing_is_lost(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker, acks: str
) -> None:
    """96 tasks that each keep 24 MiB, 2.3 GiB in all through a 768 MiB cgroup: every
    one succeeds, children are recycled after a task when their share would not hold the
    next (event=recycle reason=budget), no running task is stopped, no OOM kill."""
    group = make_cgroup(LIMIT)
    worker = make_worker(["-c", "16"], harness.worker_env(redis, {**ACKS[acks], **FAST}), group)
    worker.wait_ready(60)
    results = harness.send_tasks(redis, worker.queue, "leak", 96, (24,))
    assert harness.wait_for_results(results, 180, group), worker.log[-3000:]
    worker.stop()
    assert group.oom_kills() == 0
    assert guard_stopped(worker) == []
    recycles = [r for r in worker.events("recycle") if r.get("reason") == "budget"]
    retired = [p for p in worker.events("pressure") if p["action"] == "retire"]
    # What the children that stayed hold fits in the limit, so the ones that went (each
    # with all it held, its leaks among it) freed at least the rest of the 96 leaks.
    freed = sum(float(line["private_mib"]) for line in recycles + retired)
    assert recycles and freed >= 96 * 24 - LIMIT // MIB, (freed, len(recycles), len(retired))
    for line in recycles:  # each one said why: over its share with the next task's peak
        # (each figure rounded to 0.1 MiB in the line: at equality, over by less)
        held = float(line["private_mib"]) + float(line["next_peak_mib"])
        assert held >= float(line["share_mib"]) - 0.1
    assert smallest_pool(worker) >= 3
    assert worker.events("oom") == []


@pytest.mark.cgroup
@pytest.mark.parametrize("acks", ["early", "late"])
def test_transient_peaks_are_held_until_they_fit_not_killed(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker, acks: str
) -> None:
    """Tasks that wait first (0.2 s each, keeping nothing), so the pool grows to 12 or
    more children while each costs little (the throughput plan takes as many children as
    fit for tasks that wait); then 48 tasks that each use 60 MiB for 0.3 s, more than
    that pool can run at once in the cgroup. The guard holds the ones that would not fit
    (event=pressure action=hold) until a running one ends. Every task succeeds, none is
    stopped, no OOM kill."""
    group = make_cgroup(LIMIT)
    worker = make_worker(["-c", "16"], harness.worker_env(redis, {**ACKS[acks], **FAST}), group)
    worker.wait_ready(60)
    cheap = harness.send_tasks(redis, worker.queue, "leak", 64, (0, 0.2))
    assert harness.wait_for_results(cheap, 60, group)
    worker.wait_for(r"event=pressure .*action=grow concurrency=1[2-6]\b", 60)
    results = harness.send_tasks(redis, worker.queue, "hog", 48, (60, 0.3))
    assert harness.wait_for_results(results, 180, group), worker.log[-3000:]
    worker.stop()
    assert group.oom_kills() == 0
    assert guard_stopped(worker) == []
    holds = [p for p in worker.events("pressure") if p["action"] == "hold"]
    assert holds and all(p["task"] == "heavy_app.hog" for p in holds)
    assert smallest_pool(worker) >= 3


@pytest.mark.cgroup
@pytest.mark.parametrize(("acks", "kills"), [("early", 1), ("late", 3)])
def test_a_task_that_cannot_fit_fails_with_memory_limit_exceeded(
    redis: harness.RedisServer,
    make_cgroup: MakeCgroup,
    make_worker: MakeWorker,
    acks: str,
    kills: int,
) -> None:
    """A task that needs more than the whole cgroup: it is stopped (by the guard near the
    hard mark, or by the kernel if it grows faster than the guard looks), and fails with
    MemoryLimitExceeded, read back from the result backend and seen by task_failure.
    With late acks and task_reject_on_worker_lost it comes back, but not forever:
    CELERY_GUARD_MAX_MEMORY_KILLS (3) kills, then it fails. The worker lives on."""
    group = make_cgroup(LIMIT)
    worker = make_worker(["-c", "4"], harness.worker_env(redis, {**ACKS[acks], **FAST}), group)
    worker.wait_ready(60)
    (task,) = harness.send_tasks(redis, worker.queue, "hog", 1, (1024, 0.5))
    with pytest.raises(Exception) as failed:
        task.get(timeout=120)
    assert type(failed.value).__name__ == "MemoryLimitExceeded"
    assert "heavy_app.hog" in str(failed.value) and f"memory kill {kills} " in str(failed.value)
    worker.wait_for(rf"heavy_app task failed id={task.id} exception=MemoryLimitExceeded", 30)
    # the event=oom line follows the task's failure: wait for it
    assert harness.eventually(lambda: len(kills_of(task.id, worker)) == kills), kill_lines(worker)
    assert_only_bystanders_besides(task.id, kill_lines(worker))
    assert worker.process is not None and worker.process.poll() is None  # it lives on
    (after,) = harness.send_tasks(redis, worker.queue, "add", 1, (2, 3))
    assert after.get(timeout=60) == 5


@pytest.mark.cgroup
def test_a_restarted_worker_goes_on_counting_a_tasks_memory_kills(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker, tmp_path: Path
) -> None:
    """Late acks with task_reject_on_worker_lost and a state file: a task that cannot fit
    is killed in one worker (by the guard or the kernel), which is then stopped; the
    next worker for the queue counts on from there, so the task fails at its third kill
    in all (CELERY_GUARD_MAX_MEMORY_KILLS), not at a third kill of its own."""
    group = make_cgroup(LIMIT)
    state = {"CELERY_GUARD_STATE_FILE": str(tmp_path / "state.json")}
    env = harness.worker_env(redis, {**ACKS["late"], **FAST, **state})
    first = make_worker(["-c", "4"], env, group)
    first.wait_ready(60)
    (task,) = harness.send_tasks(redis, first.queue, "hog", 1, (1024, 0.5))
    assert harness.eventually(lambda: kills_of(task.id, first), 60)
    first.stop()  # a warm shutdown: a delivery running now is killed first, then requeued
    before = len(kills_of(task.id, first))
    assert 1 <= before < 3, kill_lines(first)  # else the restart proves nothing
    second = make_worker(["-c", "4"], env, group, queue=first.queue)
    with pytest.raises(Exception) as failed:
        task.get(timeout=120)
    assert type(failed.value).__name__ == "MemoryLimitExceeded"
    assert "memory kill 3 " in str(failed.value)
    to_come = 3 - before
    assert harness.eventually(lambda: len(kills_of(task.id, second)) == to_come), kill_lines(second)
    assert_only_bystanders_besides(task.id, kill_lines(first) + kill_lines(second))


def kill_lines(worker: Worker) -> list[dict[str, str]]:
    """The guard's stops and the kernel's OOM kills, as the worker logged them."""
    stopped = [p for p in worker.events("pressure") if p["action"] == "terminate"]
    return stopped + worker.events("oom")


def kills_of(task_id: str, worker: Worker) -> list[dict[str, str]]:
    return [line for line in kill_lines(worker) if line["task_id"] == task_id]


def assert_only_bystanders_besides(task_id: str, lines: list[dict[str, str]]) -> None:
    """Every kill line is the task's, or the kernel's kill of a child that ran no task: while
    the child the guard stopped still exits, its memory is charged but it has no memory map
    left to rank, so the kernel's OOM killer may pick an idle sibling. The guard reports that
    kill as it is: an event=oom line with no task, counted against none."""
    others = [line for line in lines if line["task_id"] != task_id]
    assert all("cgroup_oom_kills" in line and line["task"] == "" for line in others), others


@pytest.mark.cgroup
@pytest.mark.parametrize("governor", ["observe", "on"])
def test_an_observing_governor_logs_what_it_would_do_and_does_nothing(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker, governor: str
) -> None:
    """A budget of 768M (CELERY_GUARD_MEMORY_LIMIT) in a 2 GiB cgroup, 4 children, leaky
    tasks: on, the governor recycles children; observing, it logs the same decisions with
    observe=true and no child is replaced, nothing held (an operator's dry run)."""
    group = make_cgroup(2048 * MIB)
    env = harness.worker_env(
        redis, {**FAST, "CELERY_GUARD_MEMORY_LIMIT": "768M", "CELERY_GUARD_GOVERNOR": governor}
    )
    worker = make_worker(["-c", "4"], env, group)
    worker.wait_ready(60)
    results = harness.send_tasks(redis, worker.queue, "leak", 48, (24,))
    assert harness.wait_for_results(results, 120, group)
    worker.stop()
    recycles = [r for r in worker.events("recycle") if r.get("reason") == "budget"]
    assert recycles  # decided either way
    lines = recycles + worker.events("pressure")
    if governor == "observe":
        assert all(line.get("observe") == "true" for line in lines)
        assert worker.forks() == 4  # no child replaced
    else:
        assert not any(line.get("observe") for line in lines)
        assert worker.forks() > 4
    assert group.oom_kills() == 0
