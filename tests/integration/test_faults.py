"""Faults a worker meets in production: the guard keeps it running and its lines true.

Unreadable cgroup files, a limit changed under the running worker, the broker restarted,
children killed from outside, children exiting while they are being measured.
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import harness
from harness import MIB

MakeCgroup = Callable[..., harness.Cgroup]
MakeWorker = Callable[..., harness.Worker]
SMALL_APP = {"HEAVY_APP_OBJECTS": "1000", "HEAVY_APP_BUFFER_MIB": "1"}
FAST = {"CELERY_GUARD_SAMPLE_INTERVAL": "0.3", "CELERY_GUARD_SUMMARY_INTERVAL": "600"}
GIB = 1024 * MIB


def no_guard_errors(worker: harness.Worker) -> None:
    log = worker.log
    assert "celery-guard event=error" not in log
    assert not re.search(r"Traceback[^\n]*\n(?:\s.*\n)*?.*celery_guard", log), log


def child_pids(worker: harness.Worker) -> list[int]:
    return [int(p) for p in re.findall(r"pool child started pid=(\d+)", worker.log)]


@pytest.mark.cgroup
def test_unreadable_cgroup_files_fall_back_and_the_worker_runs(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, tmp_path: Path
) -> None:
    """A worker without root's power to read any file, in a cgroup whose memory files
    have mode 000 (EACCES): the startup line falls back with the reason, the summary
    leaves the unreadable figures empty, and every task runs."""
    group = make_cgroup(GIB)
    for name in ("memory.limit_in_bytes", "memory.stat", "memory.usage_in_bytes",
                 "memory.oom_control", "memory.max_usage_in_bytes"):  # fmt: skip
        os.chmod(group.path / name, 0)
    env = harness.worker_env(redis, {**SMALL_APP, **FAST})
    worker = harness.Worker(
        ["-c", "2"], env, tmp_path / "worker.log", cgroup=group, no_read_override=True
    ).start()
    try:
        startup = worker.startup()
        assert startup["limit_source"] == "physical"  # the fallback, with its reason:
        assert "unreadable memory.limit_in_bytes" in startup["limit_detail"]
        assert "Permission denied" in startup["limit_detail"]
        worker.wait_ready(60)
        results = harness.send_tasks(redis, worker.queue, "add", 20, (1, 2))
        assert harness.wait_for_results(results, 60)
    finally:
        worker.stop()
    (final,) = [s for s in worker.events("summary") if s["final"] == "true"]
    assert final["usage_mib"] == "" and final["working_set_mib"] == ""
    no_guard_errors(worker)


def _walks_and_waits(redis: harness.RedisServer, worker: harness.Worker, count: int) -> list[Any]:
    """``count`` tasks that read the app's data and as many that wait 0.2 s (I/O)."""
    walks = harness.send_tasks(redis, worker.queue, "walk", count)
    return walks + harness.send_tasks(redis, worker.queue, "hog", count, (0, 0.2))


@pytest.mark.cgroup
def test_a_limit_changed_at_run_time_is_noticed(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """4 children of the example app fit in 1 GiB (7 would). Lowered under the running
    worker to just above its working set (the high-water mark now below it), the guard
    says so within seconds and the brake shrinks the pool; raised to 2 GiB, it says so and
    the pool grows back to 4: half the tasks wait on I/O, so each child that fits adds to
    the rate, and the plan made for the lower limit is not kept. No OOM kill, no task
    lost."""
    acks = {"HEAVY_APP_ACKS_LATE": "1"}
    group = make_cgroup(GIB)
    worker = make_worker(["-c", "4"], harness.worker_env(redis, {**acks, **FAST}), group)
    worker.wait_ready(60)
    # every child of the 4 measured first (the pool grows in its first tasks on children
    # that finished one): the working set then holds what each copied
    walked: set[str] = set()
    deadline = time.monotonic() + 120
    while len(walked) < 4:
        assert time.monotonic() < deadline, f"children that walked: {walked}"
        results = _walks_and_waits(redis, worker, 4)
        assert harness.wait_for_results(results, 120, group), harness.outcome(
            results, group, worker
        )
        walked = set(re.findall(r"ForkPoolWorker-(\d+)\] Task heavy_app.walk", worker.log))

    working_set = group.working_set()
    lowered_mib = working_set // 0.97 // MIB  # high (95%) below the working set
    lowered_at = len(worker.log)  # the pool's lines from here on (not its start's waves)
    (group.path / "memory.limit_in_bytes").write_text(str(int(lowered_mib * MIB)))
    lowered = worker.wait_for(rf"celery-guard event=limit .*new_mib={lowered_mib}", 10)
    assert "old_mib=1024.0" in lowered.group(0)
    worker.wait_for(r"event=pressure .*action=retire", 20)
    deadline = time.monotonic() + 120
    while not any(p["reason"] != "measuring" for p in worker.events("plan")):
        # until the plan is made from measured figures, as in a worker that has run a
        # while: its size is then the fastest that fits, not only what fits
        assert time.monotonic() < deadline, f"no measured plan: {worker.events('plan')}"
        results = _walks_and_waits(redis, worker, 8)
        assert harness.wait_for_results(results, 180, group), harness.outcome(
            results, group, worker
        )
    shrunk = min(int(p["concurrency"]) for p in worker.events("pressure", since=lowered_at))
    assert shrunk < 4

    raised_at = len(worker.log)
    (group.path / "memory.limit_in_bytes").write_text(str(2 * GIB))
    worker.wait_for(r"celery-guard event=limit .*new_mib=2048\.0", 10)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        results = _walks_and_waits(redis, worker, 4)
        assert harness.wait_for_results(results, 60, group), harness.outcome(results, group, worker)
        if any(p["action"] == "grow" and p["concurrency"] == "4"
               for p in worker.events("pressure", since=raised_at)):  # fmt: skip
            break
    else:
        pytest.fail(f"the pool did not grow back to 4:\n{worker.events('pressure')}")
    assert group.oom_kills() == 0
    no_guard_errors(worker)


def test_the_broker_restarted_mid_run(
    tmp_path_factory: pytest.TempPathFactory, make_worker: MakeWorker
) -> None:
    """Redis goes away for 2 s and comes back on the same port: Celery reconnects, the
    guard goes on, and tasks sent after the restart run."""
    redis = harness.RedisServer(tmp_path_factory.mktemp("redis-restart"))
    try:
        worker = make_worker(["-c", "2"], harness.worker_env(redis, {**SMALL_APP, **FAST}))
        worker.wait_ready(60)
        assert harness.wait_for_results(
            harness.send_tasks(redis, worker.queue, "add", 4, (1, 1)), 30
        )
        redis.restart(down=2.0)
        worker.wait_for(r"(?i)connection to broker lost|Cannot connect|reconnect", 30)
        results = harness.send_tasks(redis, worker.queue, "add", 4, (2, 2))
        assert harness.wait_for_results(results, 90)
        assert worker.process is not None and worker.process.poll() is None
        worker.stop()
        assert [s["final"] for s in worker.events("summary")] == ["true"]
        no_guard_errors(worker)
    finally:
        redis.close()


def test_children_killed_by_sigterm_and_sigkill(
    redis: harness.RedisServer, make_worker: MakeWorker
) -> None:
    """Billiard replaces both; neither is called an OOM kill or a recycle."""
    worker = make_worker(["-c", "3"], harness.worker_env(redis, {**SMALL_APP, **FAST}))
    worker.wait_ready(60)
    first, second = child_pids(worker)[:2]
    os.kill(first, signal.SIGTERM)
    os.kill(second, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while len(child_pids(worker)) < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(child_pids(worker)) == 5
    results = harness.send_tasks(redis, worker.queue, "add", 12, (3, 4))
    assert harness.wait_for_results(results, 60)
    worker.stop()
    assert worker.events("oom") == [] and worker.events("recycle") == []
    (final,) = [s for s in worker.events("summary") if s["final"] == "true"]
    assert (final["oom_kills"], final["recycles"]) == ("0", "0")
    no_guard_errors(worker)


@pytest.mark.cgroup
def test_children_that_exit_while_being_measured(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """--max-tasks-per-child=1: every child exits after one task, 200 of them, while the
    sampler reads /proc of each child every 0.05 s and the brake checks the cgroup.
    Entries vanish mid-read; every task runs and no guard line is an error."""
    env = harness.worker_env(
        redis,
        {**SMALL_APP, "CELERY_GUARD_SAMPLE_INTERVAL": "0.05", "CELERY_GUARD_CHILD_LOG": "all"},
    )
    worker = make_worker(["-c", "4", "--max-tasks-per-child=1"], env, make_cgroup(GIB))
    worker.wait_ready(60)
    results = harness.send_tasks(redis, worker.queue, "add", 200, (5, 6))
    assert harness.wait_for_results(results, 180)
    assert len(child_pids(worker)) >= 200
    worker.stop()
    assert len(worker.events("child")) == 200
    (final,) = [s for s in worker.events("summary") if s["final"] == "true"]
    assert int(final["samples"]) > 0 and final["oom_kills"] == "0"
    no_guard_errors(worker)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_app_holding_2000_descriptors_still_has_its_records_read(
    redis: harness.RedisServer, make_worker: MakeWorker
) -> None:
    """The app opens 2,000 descriptors at import, so the guard's pipe gets one above 2,000
    (select() refuses those): the children's records are read all the same (the first
    child's calibration line needs one), and the idle main process does not spin."""
    env = harness.worker_env(redis, {**SMALL_APP, **FAST, "HEAVY_APP_OPEN_FILES": "2000"})
    worker = make_worker(["-c", "2"], env)
    worker.wait_ready(60)
    assert harness.wait_for_results(harness.send_tasks(redis, worker.queue, "leak", 4, (8,)), 60)
    worker.wait_for(r"celery-guard event=calibration ", 30)
    assert worker.process is not None
    before = _cpu_seconds(worker.process.pid)
    time.sleep(2.0)  # measuring idle CPU over a span: the span is the measurement
    assert _cpu_seconds(worker.process.pid) - before < 0.5
    no_guard_errors(worker)


def test_a_child_that_writes_garbage_to_the_pipe_changes_nothing(
    redis: harness.RedisServer, make_worker: MakeWorker
) -> None:
    """A task writes hostile records to the guard's pipe (a 3,900-digit number, a pid of no
    child, binary, a line cut short): they are refused and counted, the summaries and
    guard_stats go on, and real records still count."""
    worker = make_worker(["-c", "2"], harness.worker_env(redis, {**SMALL_APP, **FAST}))
    worker.wait_ready(60)
    (forged,) = harness.send_tasks(redis, worker.queue, "forge", 1)
    assert forged.get(timeout=60) > 0
    assert harness.wait_for_results(harness.send_tasks(redis, worker.queue, "leak", 2, (8,)), 60)
    stats = harness.guard_stats(worker, harness.worker_env(redis, SMALL_APP))
    assert stats["records_dropped"] >= 4
    assert "heavy_app.forged" not in stats["tasks"] and "heavy_app.leak" in stats["tasks"]
    worker.stop()
    assert [s["final"] for s in worker.events("summary")] == ["true"]
    no_guard_errors(worker)


@pytest.mark.cgroup
def test_two_children_oom_killed_at_once_are_both_named(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """Two tasks that each need more than the cgroup, started together, the governor off:
    the kernel kills both children, close together. Each is one event=oom line naming its
    own task (each rise of the counter explains one SIGKILL), and the worker lives on."""
    group = make_cgroup(400 * MIB)
    env = harness.worker_env(redis, {**SMALL_APP, **FAST, "CELERY_GUARD_BRAKE": "0"})
    worker = make_worker(["-c", "2"], env, group)
    worker.wait_ready(60)
    hogs = harness.send_tasks(redis, worker.queue, "hog", 2, (500, 2.0))
    assert harness.eventually(lambda: len(worker.events("oom")) >= 2, 60), worker.events("oom")
    named = sorted(line["task_id"] for line in worker.events("oom"))
    assert named == sorted(h.id for h in hogs)
    assert group.oom_kills() == 2
    (after,) = harness.send_tasks(redis, worker.queue, "add", 1, (2, 3))
    assert after.get(timeout=60) == 5


def test_a_state_file_replaced_by_a_fifo_is_refused_without_blocking(
    redis: harness.RedisServer, make_worker: MakeWorker, tmp_path: Path
) -> None:
    """Opening a FIFO blocks until a writer comes: the state file is opened without
    blocking, refused as not a regular file (one event=history line), and the worker
    starts with the measured estimate."""
    fifo = tmp_path / "state.json"
    os.mkfifo(fifo)
    env = harness.worker_env(redis, {**SMALL_APP, "CELERY_GUARD_STATE_FILE": str(fifo)})
    worker = make_worker(["-c", "1"], env)
    assert worker.startup()["child_estimate_source"] == "measured"
    (history,) = worker.events("history")
    assert history["action"] == "ignored" and "not a regular file" in history["reason"]
    worker.wait_ready(60)
    (result,) = harness.send_tasks(redis, worker.queue, "add", 1, (1, 1))
    assert result.get(timeout=60) == 2


@pytest.mark.cgroup
def test_a_child_the_guard_stops_is_not_taken_for_an_oom_kill(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """In one cgroup the kernel's OOM killer takes a process that is no pool child (a
    sidecar: a rise of the counter no child's exit will match) and then a pool child
    running ``hog``; then the guard itself stops the child running ``stubborn`` (past its
    own memory limit, it swallows MemoryLimitExceeded). The guard's SIGKILL comes while
    an unmatched rise is still there: only knowing its own kills keeps it from being
    counted as the kernel's. One event=oom line, naming ``hog``; the stubborn child's
    task fails for its own limit, not for an OOM kill."""
    group = make_cgroup(GIB)
    env = harness.worker_env(redis, {**SMALL_APP, **FAST, "CELERY_GUARD_BRAKE": "0"})
    worker = make_worker(["-c", "2"], env, group)
    worker.wait_ready(60)
    assert harness.allocate_in(group, 1200) == -signal.SIGKILL
    assert group.oom_kills() == 1
    (hog,) = harness.send_tasks(redis, worker.queue, "hog", 1, (1200,))
    worker.wait_for(rf"event=oom .*task_id={hog.id}", 60)
    kernel_kills = group.oom_kills()  # 2, or more when the kernel took another process too
    assert kernel_kills >= 2
    (stubborn,) = harness.send_tasks(redis, worker.queue, "stubborn", 1, (600,))
    with pytest.raises(Exception) as failed:
        stubborn.get(timeout=120)
    assert type(failed.value).__name__ == "MemoryLimitExceeded"
    assert "did not stop" in str(failed.value)  # the guard's reason, not the kernel's
    (killed,) = [line for line in worker.events("task_memory_limit") if line["action"] == "killed"]
    assert killed["task_id"] == stubborn.id
    worker.wait_for(rf"pid:{killed['pid']} exited with 'signal 9 \(SIGKILL\)'", 30)
    (after,) = harness.send_tasks(redis, worker.queue, "add", 1, (2, 3))
    assert after.get(timeout=60) == 5  # every exit has been handled by now
    ooms = worker.events("oom")
    assert [line["task_id"] for line in ooms if line.get("task") == "heavy_app.hog"] == [hog.id]
    assert killed["pid"] not in [line["pid"] for line in ooms]
    assert not [line for line in ooms if line.get("task_id") == stubborn.id]
    assert group.oom_kills() == kernel_kills  # the guard's own kill is no kernel kill
    assert "celery-guard event=error" not in worker.log


@pytest.mark.cgroup
@pytest.mark.parametrize("governor", ["on", "off"])
def test_tasks_waiting_in_the_queue_at_startup_all_run(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker, governor: str
) -> None:
    """20 ``add`` and 5 ``hog`` tasks wait in Redis before the worker starts: the consumer
    receives them at once, before the governor has a gate or has measured anything (a
    ``hog`` never measured is deferred while one run of it is measured); with the
    governor off, no gate ever comes. Every task runs and succeeds, none is left held,
    and no guard error is logged."""
    from celery import Celery
    from redis import Redis

    queue = f"q-{uuid.uuid4().hex[:8]}"
    client = Celery("client", broker=redis.url(0), backend=redis.url(1))
    adds, hogs = [], []
    for i in range(20):  # a hog before every fourth add
        if i % 4 == 0:
            hogs.append(client.send_task("heavy_app.hog", args=(40, 0.2), queue=queue))
        adds.append(client.send_task("heavy_app.add", args=(i, 1), queue=queue))
    assert Redis.from_url(redis.url(0)).llen(queue) == 25  # waiting, no worker yet
    group = make_cgroup(768 * MIB)
    env = harness.worker_env(redis, {**SMALL_APP, **FAST, "CELERY_GUARD_GOVERNOR": governor})
    worker = make_worker(["-c", "4"], env, group, queue)
    assert harness.wait_for_results(adds + hogs, 120, group), worker.log[-3000:]
    assert [r.get() for r in adds] == [i + 1 for i in range(20)]
    assert [r.get() for r in hogs] == [40 * MIB] * 5
    stats = harness.broadcast_guard_stats(redis, worker)
    if governor == "on":
        assert stats["governor"]["held"] == 0  # the governor runs, and holds nothing
    else:
        assert "governor" not in stats
    worker.stop()
    assert group.oom_kills() == 0
    no_guard_errors(worker)
