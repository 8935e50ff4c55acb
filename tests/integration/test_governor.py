"""Run-time protection, end to end: real workers, real Redis, real cgroups, and real OOM
kills by the kernel."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

import harness
from harness import MIB, Cgroup, Worker

MakeWorker = Callable[..., Worker]
MakeCgroup = Callable[..., Cgroup]

SMALL_APP = {"HEAVY_APP_OBJECTS": "1000", "HEAVY_APP_BUFFER_MIB": "1"}
FAST = {"CELERY_GUARD_SAMPLE_INTERVAL": "0.3", "CELERY_GUARD_SUMMARY_INTERVAL": "600"}


def _child_pids(worker: Worker, count: int) -> list[int]:
    """The pids of the first ``count`` pool children, as the example app logs them."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = [int(p) for p in re.findall(r"pool child started pid=(\d+)", worker.log)]
        if len(pids) >= count:
            return pids[:count]
        time.sleep(0.1)
    raise AssertionError(f"fewer than {count} children started:\n{worker.log}")


def _oom_score_adj(pid: int) -> int:
    return int(Path(f"/proc/{pid}/oom_score_adj").read_text())


def test_children_are_the_oom_killers_first_pick(
    redis: harness.RedisServer, make_worker: MakeWorker
) -> None:
    """Every pool child raises its oom_score_adj (default 500); the main process keeps its."""
    worker = make_worker(["-c", "2"], harness.worker_env(redis, SMALL_APP))
    children = _child_pids(worker, 2)

    # the app's own worker_process_init line may come before the guard's receiver ran
    def scores() -> list[int]:
        return [_oom_score_adj(pid) for pid in children]

    assert harness.eventually(lambda: scores() == [500, 500], 30), scores()
    assert _oom_score_adj(worker.process.pid) == _oom_score_adj(os.getpid())


def test_oom_score_adj_can_be_turned_off(
    redis: harness.RedisServer, make_worker: MakeWorker
) -> None:
    env = harness.worker_env(redis, {**SMALL_APP, "CELERY_GUARD_CHILD_OOM_SCORE_ADJ": "off"})
    worker = make_worker(["-c", "1"], env)
    (child,) = _child_pids(worker, 1)
    worker.wait_ready(60)
    (done,) = harness.send_tasks(redis, worker.queue, "add", 1, (1, 1))
    assert done.get(timeout=60) == 2  # the only child: every worker_process_init receiver ran
    assert _oom_score_adj(child) == _oom_score_adj(os.getpid())


@pytest.mark.cgroup
def test_an_oom_kill_of_a_child_is_explained_and_the_worker_lives_on(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """A task that needs more than the cgroup has, with the brake off (on, it stops the
    child before the kernel has to): the kernel kills the child running it, not the main
    process, and the guard says which task, with the figures."""
    group = make_cgroup(400 * MIB)
    env = harness.worker_env(redis, {**SMALL_APP, **FAST, "CELERY_GUARD_BRAKE": "0"})
    worker = make_worker(["-c", "2"], env, group)
    worker.wait_ready(60)
    (hog,) = harness.send_tasks(redis, worker.queue, "hog", 1, (600,))
    worker.wait_for(r"event=oom ", 60)
    (oom,) = worker.events("oom")
    assert oom["task"] == "heavy_app.hog" and oom["task_id"] == hog.id
    assert float(oom["limit_mib"]) == 400.0
    assert int(oom["cgroup_oom_kills"]) == group.oom_kills() >= 1
    assert "ERROR/MainProcess" in next(
        line for line in worker.log.splitlines() if "event=oom" in line
    )
    assert worker.process.poll() is None  # the main process is alive
    (after,) = harness.send_tasks(redis, worker.queue, "add", 1, (2, 3))
    assert after.get(timeout=60) == 5


@pytest.mark.cgroup
def test_a_plain_kill_9_is_not_called_an_oom_kill(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """SIGKILL from someone else while a task runs: Celery reports the lost worker, the
    cgroup's OOM counter does not move, and the guard does not call it an OOM kill."""
    group = make_cgroup(None)
    worker = make_worker(["-c", "1"], harness.worker_env(redis, {**SMALL_APP, **FAST}), group)
    (child,) = _child_pids(worker, 1)
    worker.wait_ready(60)
    (hog,) = harness.send_tasks(redis, worker.queue, "hog", 1, (8, 30))
    assert harness.running_on(redis, worker, hog.id) == child
    os.kill(child, signal.SIGKILL)
    worker.wait_for(rf"pid:{child} exited with 'signal 9 \(SIGKILL\)'", 30)
    with pytest.raises(Exception) as lost:
        hog.get(timeout=60)
    assert type(lost.value).__name__ == "WorkerLostError"
    (after,) = harness.send_tasks(redis, worker.queue, "add", 1, (2, 3))
    assert after.get(timeout=60) == 5
    assert worker.events("oom") == []
    assert group.oom_kills() == 0


def _charge_per_child_after_collecting(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker, freeze: bool
) -> float:
    """MiB each of 4 children adds to the cgroup once each has run a full collection."""
    env = harness.worker_env(
        redis,
        {"HEAVY_APP_CONTAINERS": "1", "HEAVY_APP_BUFFER_MIB": "1",
         "CELERY_GUARD_GC_FREEZE": "1" if freeze else "0", **FAST},
    )  # fmt: skip
    group = make_cgroup(None)
    worker = make_worker(["-c", "4"], env, group)
    in_use = float(worker.startup()["in_use_mib"]) * MIB
    worker.wait_ready(60)
    results = harness.send_tasks(redis, worker.queue, "collect", 4)
    for result in results:  # hold each child busy so that all four collect
        result.get(timeout=60)
    more = harness.send_tasks(redis, worker.queue, "collect", 8)
    assert harness.wait_for_results(more, 60), worker.log[-3000:]
    working_set = group.working_set()
    worker.stop()
    return (working_set - in_use) / 4 / MIB


@pytest.mark.cgroup
def test_gc_freeze_cuts_what_each_child_copies(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """With 300k lists (containers the collector tracks) in the main process, a full
    collection in each child copies the pages holding them; frozen before the fork, the
    collector leaves them alone."""
    plain = _charge_per_child_after_collecting(redis, make_cgroup, make_worker, freeze=False)
    frozen = _charge_per_child_after_collecting(redis, make_cgroup, make_worker, freeze=True)
    print(f"per-child charge after a full collection: {plain:.1f} MiB, frozen {frozen:.1f} MiB")
    assert frozen <= 0.7 * plain


@pytest.mark.parametrize("pool", ["threads", "solo", "gevent", "eventlet"])
def test_max_worker_memory_shuts_down_warm_and_loses_no_task(
    redis: harness.RedisServer, make_worker: MakeWorker, pool: str
) -> None:
    """Pools that do not fork ignore worker_max_memory_per_child. With
    CELERY_GUARD_MAX_WORKER_MEMORY the worker stops taking tasks once its own memory passes
    the limit, finishes what it runs, exits 75 for its supervisor to restart it, and the
    tasks it had not started wait in the broker for the next worker."""
    env = harness.worker_env(redis, SMALL_APP)
    probe = make_worker(["-P", pool, "-c", "2"], env)
    rss_mib = float(probe.startup()["parent_rss_mib"])
    probe.stop()
    limit = f"{int(rss_mib) + 48}M"
    worker = make_worker(["-P", pool, "-c", "2"], {**env, "CELERY_GUARD_MAX_WORKER_MEMORY": limit})
    worker.wait_ready(60)
    results = harness.send_tasks(redis, worker.queue, "leak", 12, (16, 0.5))  # 192 MiB
    assert worker.wait_exit(90) == 75
    (pressure,) = worker.events("pressure")
    assert pressure["action"] == "warm_shutdown" and pressure["exit_status"] == "75"
    limit_mib = float(pressure["max_worker_memory_mib"])
    assert float(pressure["rss_mib"]) > limit_mib == int(rss_mib) + 48
    assert [s["final"] for s in worker.events("summary")] == ["true"]  # an orderly stop
    done = sum(r.ready() for r in results)
    assert 0 < done < 12  # it stopped part way

    # The next worker (as the supervisor would start) takes the rest: nothing was lost.
    make_worker(["-P", pool, "-c", "2"], env, queue=worker.queue)
    assert harness.wait_for_results(results, 90)


ACKS_LATE = {"HEAVY_APP_ACKS_LATE": "1"}
GIB = 1024 * MIB


def _final_concurrency(worker: Worker) -> int:
    worker.stop()
    (final,) = [s for s in worker.events("summary") if s["final"] == "true"]
    return int(final["concurrency"])


@pytest.mark.cgroup
def test_children_that_grow_past_the_limit_vanilla_is_killed_guarded_finishes(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """6 children fit at startup (7 would), then 60 tasks that each keep 16 MiB in their
    child (one a second per child) push the pool 960 MiB past that. Vanilla Celery: the
    OOM killer. Guarded, with Celery's default early acks: children are recycled between
    tasks before they outgrow their share, no running task is stopped, every task
    completes, and no OOM kill."""
    vanilla_group = make_cgroup(GIB)
    vanilla = make_worker(
        ["-c", "6"], harness.worker_env(redis, ACKS_LATE, guard=False), vanilla_group
    )
    vanilla.wait_ready(60)
    results = harness.send_tasks(redis, vanilla.queue, "walk", 12)
    results += harness.send_tasks(redis, vanilla.queue, "leak", 60, (16, 1.0))
    assert not harness.wait_for_results(results, 120, vanilla_group)
    assert vanilla_group.oom_kills() >= 1
    vanilla.stop()

    group = make_cgroup(GIB)
    worker = make_worker(["-c", "6"], harness.worker_env(redis, FAST), group)
    assert worker.startup()["action"] == "kept"
    worker.wait_ready(60)
    results = harness.send_tasks(redis, worker.queue, "walk", 12)
    results += harness.send_tasks(redis, worker.queue, "leak", 60, (16, 1.0))
    assert harness.wait_for_results(results, 240, group)
    assert group.oom_kills() == 0
    assert [r for r in worker.events("recycle") if r["reason"] == "budget"]
    assert not [p for p in worker.events("pressure") if p["action"] == "terminate"]
    assert worker.events("oom") == []


# forced child estimate, the pool size it starts with
CONVERGENCE = [("900M", 1), ("10M", 16)]


@pytest.mark.cgroup
@pytest.mark.parametrize("estimate,starts", CONVERGENCE, ids=["estimate-high", "estimate-low"])
def test_the_pool_converges_to_what_fits(
    redis: harness.RedisServer,
    make_cgroup: MakeCgroup,
    make_worker: MakeWorker,
    estimate: str,
    starts: int,
) -> None:
    """From a child estimate forced far too high (1 child starts) or far too low (16
    start, and copy about 400 MiB/s at once on the first tasks), the pool settles within
    one child of the 8 that really fit in 1 GiB (REALLY_FIT_IN_1G in test_startup.py,
    re-checked there by bisection): every task done, no OOM kill, and no oscillation
    (at most one more burst after the first). Half the tasks wait on I/O, so every child
    that fits adds to the rate: the throughput plan wants them all (CPU-bound tasks
    alone settle at the few children that keep the CPUs busy)."""
    env = harness.worker_env(redis, {**ACKS_LATE, **FAST, "CELERY_GUARD_CHILD_MEMORY": estimate})
    group = make_cgroup(GIB)
    worker = make_worker(["-c", "16"], env, group)
    assert int(worker.startup()["concurrency"]) == starts
    worker.wait_ready(60)
    results = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # a stream that keeps every child busy in turn
        results += harness.send_tasks(redis, worker.queue, "walk", 8)
        results += harness.send_tasks(redis, worker.queue, "hog", 8, (0, 0.5))
        time.sleep(2)
    assert harness.wait_for_results(results, 240, group)
    assert group.oom_kills() == 0
    final = _final_concurrency(worker)
    assert 7 <= final <= 9
    assert worker.turns_after_plan() in (0, 1, 2)  # no oscillation (None: no plan made)
    pressure = worker.events("pressure")
    holds = [p for p in pressure if p["action"] == "hold"]
    terminated = sum(p["action"] == "terminate" for p in pressure)
    highest = max((float(p["unreclaimable_mib"]) for p in pressure), default=0.0)
    print(  # the figures the README quotes: pytest -s
        f"estimate {estimate}: started {starts}, settled {final}, holds {len(holds)}, "
        f"terminated {terminated}, highest working set logged {highest:.0f} MiB of 1024"
    )
    assert terminated == 0


@pytest.mark.parametrize("acks_late,topics", [(False, ["acks_early"]), (True, [])])
def test_advice_when_acks_are_early(
    redis: harness.RedisServer, make_worker: MakeWorker, acks_late: bool, topics: list[str]
) -> None:
    """With early acks, a task in a child stopped for memory is lost: say so at startup."""
    env = harness.worker_env(redis, {**SMALL_APP, **(ACKS_LATE if acks_late else {})})
    worker = make_worker(["-c", "1"], env)
    worker.wait_ready(60)
    assert [a["topic"] for a in worker.events("advice")] == topics


def _active_file_above(group: Cgroup, size: int) -> bool:
    return group.stat()["total_active_file"] >= size


def _drop_page_cache(path: Path) -> None:
    """Write ``path`` back and drop it from the page cache: the next reader's cgroup is
    charged for the pages it reads."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


@pytest.mark.cgroup
def test_page_cache_never_makes_the_guard_stop_a_task(
    redis: harness.RedisServer,
    make_cgroup: MakeCgroup,
    make_worker: MakeWorker,
    tmp_path: Path,
) -> None:
    """A task reads a 400 MiB file three times in a 600 MiB cgroup (its pages stay in the
    page cache, charged to the cgroup, and active: read more than once) and sleeps, with
    the marks lowered so that the cache alone passes the hard one; meanwhile tasks take
    60 MiB for a moment. The kernel reclaims the cache before it kills: without the guard
    every task succeeds; with it too, and no task is stopped (the guard once counted
    active file pages as memory in use and terminated the reader, which allocates
    nothing)."""
    data = tmp_path / "data.bin"
    with open(data, "wb") as file:
        for _ in range(400):
            file.write(os.urandom(1 << 20))
    marks = {
        "CELERY_GUARD_LOW_WATER": "60%",
        "CELERY_GUARD_HIGH_WATER": "65%",
        "CELERY_GUARD_HARD_WATER": "70%",
    }
    for guard in (False, True):
        _drop_page_cache(data)  # the worker's reads charge its own cgroup
        group = make_cgroup(600 * MIB)
        env = harness.worker_env(redis, {**SMALL_APP, **FAST, **marks}, guard)
        worker = make_worker(["-c", "2"], env, group)
        worker.wait_ready(60)
        (read,) = harness.send_tasks(redis, worker.queue, "read_file", 1, (str(data), 3, 4.0))
        assert harness.running_on(redis, worker, read.id)
        assert harness.eventually(partial(_active_file_above, group, 300 * MIB), 60)
        results = [read, *harness.send_tasks(redis, worker.queue, "hog", 4, (60, 0.5))]
        assert harness.wait_for_results(results, 120, group), (guard, worker.log[-3000:])
        assert read.get() == 3 * 400 * MIB
        assert group.oom_kills() == 0
        assert not [p for p in worker.events("pressure") if p["action"] == "terminate"]
        worker.stop()


@pytest.mark.cgroup
def test_a_task_held_near_the_visibility_timeout_goes_back_and_runs_once(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """Redis re-delivers a message left unacknowledged past ``visibility_timeout`` (10 s
    here), to any worker: a task the guard held that long would run twice. A task held
    behind one that takes 700 MiB for 14 s goes back to the queue at 90% of the timer
    (``action=give_back``), is delivered again, and runs once, when it fits."""
    group = make_cgroup(GIB)
    env = harness.worker_env(redis, {**SMALL_APP, **FAST, "HEAVY_APP_VISIBILITY_TIMEOUT": "10"})
    worker = make_worker(["-c", "2"], env, group)
    worker.wait_ready(60)
    (big,) = harness.send_tasks(redis, worker.queue, "hog", 1, (700, 14.0))
    harness.running_on(redis, worker, big.id)
    (held,) = harness.send_tasks(redis, worker.queue, "hog", 1, (300, 0.1))
    assert harness.wait_for_results([big, held], 90, group)
    gave = [p for p in worker.events("pressure") if p["action"] == "give_back"]
    assert gave, worker.log[-3000:]
    assert gave[0]["task_id"] == held.id and gave[0]["timer"] == "visibility_timeout"
    assert 9.0 <= float(gave[0]["held_s"]) < 10.0
    assert worker.log.count(f"heavy_app.hog[{held.id}] succeeded") == 1
    assert group.oom_kills() == 0


@pytest.mark.cgroup
def test_a_task_held_near_rabbitmqs_consumer_timeout_goes_back_and_the_channel_stays(
    redis: harness.RedisServer,
    make_cgroup: MakeCgroup,
    make_worker: MakeWorker,
    make_rabbitmq: Callable[..., harness.RabbitServer],
) -> None:
    """RabbitMQ closes the channel of a delivery left unacknowledged past its
    ``consumer_timeout`` (10 s on this server), failing every delivery on it. A task held
    behind one that takes 700 MiB for 14 s goes back to the queue at 90% of it, is
    delivered again, runs once, and the channel is never closed."""
    from celery import Celery

    rabbit = make_rabbitmq(consumer_timeout=10)
    group = make_cgroup(GIB)
    extra = {
        **SMALL_APP, **FAST, "HEAVY_APP_BROKER": rabbit.url(),
        "HEAVY_APP_CONSUMER_TIMEOUT": "10",
    }  # fmt: skip
    worker = make_worker(["-c", "2"], harness.worker_env(redis, extra), group)
    worker.wait_ready(60)
    client = Celery("client", broker=rabbit.url(), backend=redis.url(1))
    big = client.send_task("heavy_app.hog", args=(700, 14.0), queue=worker.queue)
    worker.wait_for(rf"heavy_app\.hog\[{big.id}\] received", 30)  # it goes first
    held = client.send_task("heavy_app.hog", args=(300, 0.1), queue=worker.queue)
    assert harness.wait_for_results([big, held], 90, group)
    gave = [p for p in worker.events("pressure") if p["action"] == "give_back"]
    assert gave, worker.log[-3000:]
    assert gave[0]["task_id"] == held.id and gave[0]["timer"] == "consumer_timeout"
    assert worker.log.count(f"heavy_app.hog[{held.id}] succeeded") == 1
    assert "PRECONDITION_FAILED" not in worker.log and "timed out" not in worker.log
    assert group.oom_kills() == 0


@pytest.mark.cgroup
def test_tasks_held_while_the_broker_restarts_run_once(
    redis: harness.RedisServer,
    make_cgroup: MakeCgroup,
    make_worker: MakeWorker,
    make_rabbitmq: Callable[..., harness.RabbitServer],
) -> None:
    """RabbitMQ goes away for 2 s while the guard holds two tasks behind one that takes
    700 MiB, the first of their kind. Celery drops the requests it has not started (their
    delivery tags die with the channel; the broker delivers the messages again), the guard
    drops the ones it holds with them, and each held task runs once, after the broker is
    back: none runs from the dead channel ("Couldn't ack")."""
    from celery import Celery

    rabbit = make_rabbitmq()
    group = make_cgroup(GIB)
    extra = {**SMALL_APP, **FAST, "HEAVY_APP_BROKER": rabbit.url()}
    worker = make_worker(["-c", "2"], harness.worker_env(redis, extra), group)
    node = worker.wait_for(r"(\S+@\S+) ready\.", 60).group(1)
    client = Celery("client", broker=rabbit.url(), backend=redis.url(1))

    def send(mib: int, seconds: float) -> Any:
        return client.send_task("heavy_app.hog", args=(mib, seconds), queue=worker.queue)

    big = send(700, 20.0)  # it ends after the broker is back
    worker.wait_for(rf"heavy_app\.hog\[{big.id}\] received", 30)  # it goes first
    held = [send(300, 0.1) for _ in range(2)]
    for result in held:  # the guard holds them while the first run of their kind ends
        worker.wait_for(rf"heavy_app\.hog\[{result.id}\] received", 30)
    rabbit.restart(down=2.0)
    worker.wait_for(r"(?i)connection to broker lost|Cannot connect", 30)
    assert harness.wait_for_results([big, *held], 120, group), worker.log[-3000:]

    from kombu import Connection

    def idle() -> bool:  # a new connection: the client's pooled ones died with the broker
        with Connection(rabbit.url()) as connection:
            inspect = client.control.inspect([node], timeout=1, connection=connection)
            reserved, active = inspect.reserved(), inspect.active()  # None: no reply
        return (
            reserved is not None
            and active is not None
            and not (reserved.get(node) or active.get(node))
        )

    assert harness.eventually(idle, 60)
    for result in (big, *held):
        assert worker.log.count(f"heavy_app.hog[{result.id}] succeeded") == 1, result.id
    assert "Couldn't ack" not in worker.log
    assert worker.process is not None and worker.process.poll() is None
    assert "celery-guard event=error" not in worker.log
    assert group.oom_kills() == 0
