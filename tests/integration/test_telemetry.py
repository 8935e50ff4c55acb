"""Child memory telemetry, end to end: real workers, real Redis, real cgroups.

``heavy_app.leak(n)`` keeps n MiB for the life of the child that ran it, so the growth
each line and summary should report is known in advance.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import harness
from harness import MIB, Cgroup, Worker

MakeWorker = Callable[..., Worker]
MakeCgroup = Callable[..., Cgroup]

SMALL_APP = {"HEAVY_APP_OBJECTS": "1000", "HEAVY_APP_BUFFER_MIB": "1"}
FAST = {"CELERY_GUARD_SAMPLE_INTERVAL": "0.3", "CELERY_GUARD_SUMMARY_INTERVAL": "600"}


def _run(redis: harness.RedisServer, worker: Worker, name: str, count: int, *args: int) -> None:
    results = harness.send_tasks(redis, worker.queue, name, count, args)
    assert harness.wait_for_results(results, 120), f"{name} tasks did not all succeed"


def _final_summary(worker: Worker) -> dict[str, str]:
    worker.stop()
    finals = [s for s in worker.events("summary") if s["final"] == "true"]
    assert len(finals) == 1, worker.log
    return finals[0]


def test_growth_is_attributed_to_the_leaking_task(
    redis: harness.RedisServer, make_worker: MakeWorker
) -> None:
    """10 calls of leak(8) grow the children by 80 MiB: the lines and the summary say so
    within 10%, and the tasks that leak nothing get no growth."""
    env = harness.worker_env(redis, {**SMALL_APP, **FAST, "CELERY_GUARD_CHILD_LOG": "all"})
    worker = make_worker(["-c", "2"], env)
    worker.wait_ready(60)
    _run(redis, worker, "noop", 10)
    _run(redis, worker, "leak", 10, 8)
    _run(redis, worker, "add", 10, 1, 2)
    summary = _final_summary(worker)

    lines = worker.events("child")
    assert len(lines) == 30  # CHILD_LOG=all: one line per task
    by_task: dict[str, float] = {}
    for line in lines:
        by_task[line["task"]] = by_task.get(line["task"], 0) + float(line["delta_mib"])
        assert {"pid", "task_id", "rss_mib", "peak_rss_mib", "tasks"} <= set(line)
    assert 72 <= by_task["heavy_app.leak"] <= 88
    assert by_task["heavy_app.noop"] + by_task["heavy_app.add"] < 8
    top_name, top_mib = summary["top_tasks"].split(",")[0].split(":")
    assert top_name == "heavy_app.leak" and 72 <= float(top_mib) <= 88


def test_growth_mode_logs_only_past_the_step(
    redis: harness.RedisServer, make_worker: MakeWorker
) -> None:
    """Default mode: a line when a child's peak has grown by the step since its last line."""
    env = harness.worker_env(redis, {**SMALL_APP, **FAST, "CELERY_GUARD_CHILD_LOG_STEP": "20M"})
    worker = make_worker(["-c", "1"], env)
    worker.wait_ready(60)
    _run(redis, worker, "noop", 5)
    _run(redis, worker, "leak", 6, 8)  # 48 MiB and more in all: past the 20 MiB step twice
    worker.stop()
    lines = worker.events("child")
    assert [line["task"] for line in lines] == ["heavy_app.leak"] * 2


def test_recycle_after_max_memory_per_child_is_reported(
    redis: harness.RedisServer, make_worker: MakeWorker
) -> None:
    """billiard's exit 155 is silent unless MP_LOG is set; the guard names pid and task."""
    env = harness.worker_env(redis, {**SMALL_APP, **FAST})
    probe = make_worker(["-c", "1"], env)
    parent_kib = int(float(probe.startup()["parent_rss_mib"]) * 1024)
    probe.stop()
    limit_kib = parent_kib + 40 * 1024  # the child recycles once it keeps 40 MiB more
    worker = make_worker(["-c", "1", f"--max-memory-per-child={limit_kib}"], env)
    worker.wait_ready(60)
    _run(redis, worker, "leak", 4, 16)
    worker.wait_for(r"event=recycle ", 30)
    (recycle,) = worker.events("recycle")[:1]
    assert recycle["last_task"] == "heavy_app.leak"
    assert recycle["exitcode"] == "155"
    assert float(recycle["peak_rss_mib"]) * 1024 > limit_kib
    assert worker.forks() >= 2  # the replacement
    assert _final_summary(worker)["recycles"] == str(len(worker.events("recycle")))


@pytest.mark.parametrize(
    "args,topics",
    [
        (["-c", "1", "--max-memory-per-child=10000"], ["max_memory_per_child_below_parent"]),
        # threads also cannot honour the example app's per-task memory limits
        (["-P", "threads", "-c", "2", "--max-memory-per-child=900000"],
         ["max_memory_per_child_ignored", "task_memory_limit_ignored"]),
    ],
    ids=["below-parent", "ignored-by-threads"],
)  # fmt: skip
def test_advice_on_max_memory_per_child(
    redis: harness.RedisServer, make_worker: MakeWorker, args: list[str], topics: list[str]
) -> None:
    worker = make_worker(args, harness.worker_env(redis, {**SMALL_APP, "HEAVY_APP_ACKS_LATE": "1"}))
    worker.wait_ready(60)
    advice = worker.events("advice")
    assert sorted(a["topic"] for a in advice) == topics
    assert all(a["fix"] for a in advice)


def test_state_file_round_trip_and_corruption(
    redis: harness.RedisServer, make_worker: MakeWorker, tmp_path: Path
) -> None:
    """The measured cost is kept (JSON, 0600) and used at the next start; a corrupt file
    is ignored with a warning and the worker starts as usual."""
    state = tmp_path / "guard-state.json"
    env = harness.worker_env(redis, {**SMALL_APP, **FAST, "CELERY_GUARD_STATE_FILE": str(state)})
    first = make_worker(["-c", "2"], env)
    assert first.startup()["child_estimate_source"] == "measured"
    first.wait_ready(60)
    _run(redis, first, "leak", 4, 8)
    summary = _final_summary(first)
    data = json.loads(state.read_text())
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert data["child_cost_bytes"] == int(float(summary["private_p95_mib"]) * MIB)

    second = make_worker(["-c", "2"], env)
    startup = second.startup()
    assert startup["child_estimate_source"] == "history"
    assert float(startup["child_estimate_mib"]) == float(summary["private_p95_mib"])
    second.stop()

    state.write_text("{not json")
    third = make_worker(["-c", "2"], env)
    assert third.startup()["child_estimate_source"] == "measured"
    (warning,) = third.events("history")
    assert warning["action"] == "ignored" and "unreadable" in warning["reason"]
    third.wait_ready(60)
    _run(redis, third, "noop", 2)


def test_inspect_guard_stats_from_the_cli(
    redis: harness.RedisServer, make_worker: MakeWorker
) -> None:
    env = harness.worker_env(redis, {**SMALL_APP, **FAST})
    worker = make_worker(["-c", "2"], env)
    worker.wait_ready(60)
    _run(redis, worker, "leak", 2, 8)
    stats = harness.guard_stats(worker, env)
    node = worker.wait_for(r"(\S+@\S+) ready\.").group(1)
    assert stats["worker"] == node
    assert stats["concurrency"] == 2 and stats["children"] == 2
    assert stats["tasks"]["heavy_app.leak"]["total_mib"] >= 15


def test_recommend_reads_the_same_figures_as_the_live_summary(
    redis: harness.RedisServer, make_worker: MakeWorker, tmp_path: Path
) -> None:
    env = harness.worker_env(redis, {**SMALL_APP, **FAST})
    worker = make_worker(["-c", "2"], env)
    worker.wait_ready(60)
    _run(redis, worker, "leak", 6, 8)
    _run(redis, worker, "noop", 6)
    summary = _final_summary(worker)
    out = subprocess.run(
        [sys.executable, "-m", "celery_guard.cli", "recommend", str(worker.log_path)],
        env={**os.environ, "PYTHONPATH": str(harness.ROOT)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    kib = summary["recommended_max_memory_per_child_kib"]
    assert f"worker_max_memory_per_child = {kib}" in out.stdout
    assert f"--concurrency {summary['recommended_concurrency']}" in out.stdout
    assert "warning:" not in out.stdout
    assert "heavy_app.leak" in out.stdout


@pytest.mark.cgroup
def test_recommended_max_memory_recycles_leakers_not_healthy_children(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """The done-when of the telemetry: run a healthy mix at -c 4, take the summary's
    recommended pair (a concurrency and the recycle value for it), restart with it and
    the run-time governor off, so that Celery's recycling at that value is all that
    acts. Healthy children are never recycled; children that leak are recycled before
    the cgroup runs out, with no OOM kill. The control run, the same workload without
    --max-memory-per-child, is OOM-killed."""
    env = harness.worker_env(redis, FAST)
    group = make_cgroup(1024 * MIB)
    learn = make_worker(["-c", "4"], env, group)
    learn.wait_ready(60)
    _run(redis, learn, "walk", 12)
    _run(redis, learn, "noop", 20)
    summary = _final_summary(learn)
    # the pair: the throughput plan's size (short tasks: the main process bounds the
    # rate, and a tie goes to the smaller pool), and the recycle value for it, above the
    # healthy peaks (with less than the margin when the note says so)
    concurrency = int(summary["recommended_concurrency"])
    recommended = int(summary["recommended_max_memory_per_child_kib"])
    assert float(summary["peak_rss_p95_mib"]) * 1024 < recommended

    alone = harness.worker_env(redis, {**FAST, "CELERY_GUARD_GOVERNOR": "off"})
    group = make_cgroup(1024 * MIB)
    pair = ["-c", str(concurrency), f"--max-memory-per-child={recommended}"]
    worker = make_worker(pair, alone, group)
    worker.wait_ready(60)
    _run(redis, worker, "walk", 12)
    _run(redis, worker, "noop", 20)
    assert worker.events("recycle") == []  # healthy children stay
    _run(redis, worker, "leak", 60, 16)  # 960 MiB kept in all: more than the cgroup
    recycles = worker.events("recycle")
    assert recycles, "no leaking child was recycled"
    assert {r["last_task"] for r in recycles} == {"heavy_app.leak"}
    assert {r["reason"] for r in recycles} == {"max_memory_per_child"}
    assert worker.events("pressure") == []  # the governor did nothing
    assert group.oom_kills() == 0

    control_group = make_cgroup(1024 * MIB)
    control = make_worker(["-c", "4"], alone, control_group)
    control.wait_ready(60)
    _run(redis, control, "walk", 12)
    leaks = harness.send_tasks(redis, control.queue, "leak", 60, (16,))
    assert not harness.wait_for_results(leaks, 120, control_group)
    assert control_group.oom_kills() > 0, control.log[-3000:]


@pytest.mark.cgroup
def test_recommended_memory_limit_runs_the_requested_concurrency(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """-c 16 in 1 GiB: the guard runs fewer, and its summary names the container limit
    that would run 16 from what its children really used. In a cgroup of that size the
    guarded worker keeps all 16 and runs the same workload with no OOM kill and no task
    stopped; in four fifths of it, it starts fewer (the limit is what 16 need, no more)."""
    worker = make_worker(["-c", "16"], harness.worker_env(redis, FAST), make_cgroup(1024 * MIB))
    assert int(worker.startup()["concurrency"]) < 16
    worker.wait_ready(60)
    _run(redis, worker, "walk", 32)
    recommended = float(_final_summary(worker)["recommended_memory_limit_mib"])

    enough = make_cgroup(int(recommended) * MIB)
    sized = make_worker(["-c", "16"], harness.worker_env(redis, FAST), enough)
    assert (sized.startup()["action"], sized.startup()["concurrency"]) == ("kept", "16")
    sized.wait_ready(60)
    results = harness.send_tasks(redis, sized.queue, "walk", 48)
    assert harness.wait_for_results(results, 180, enough)
    sized.stop()
    assert enough.oom_kills() == 0
    assert [p for p in sized.events("pressure") if p["action"] == "terminate"] == []

    short = make_worker(
        ["-c", "16"], harness.worker_env(redis), make_cgroup(int(recommended * 0.8) * MIB)
    )
    assert int(short.startup()["concurrency"]) < 16


def test_periodic_summaries_between_the_final_one(
    redis: harness.RedisServer, make_worker: MakeWorker
) -> None:
    """CELERY_GUARD_SUMMARY_INTERVAL=1: a summary (final=false) every second while the
    worker runs, the figures of the tasks so far in it, and one final=true at shutdown."""
    env = harness.worker_env(
        redis,
        {**SMALL_APP, "CELERY_GUARD_SAMPLE_INTERVAL": "0.3", "CELERY_GUARD_SUMMARY_INTERVAL": "1"},
    )
    worker = make_worker(["-c", "2"], env)
    worker.wait_ready(60)
    _run(redis, worker, "leak", 4, 8)
    worker.wait_for(r"event=summary .*final=false .*samples=[1-9]", 30)
    summaries = worker.events("summary")
    worker.stop()
    assert [s["final"] for s in summaries] == ["false"] * len(summaries)
    assert int(summaries[-1]["samples"]) >= 1
    finals = [s for s in worker.events("summary") if s["final"] == "true"]
    assert len(finals) == 1
