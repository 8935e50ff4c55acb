"""Calibration on the first child: its real cost after its first task, against the startup
estimate (``event=calibration``), and the pool sized again at once where no governor does.
Real workers, real Redis, real cgroups."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import harness
from harness import MIB, Cgroup, Worker

MakeWorker = Callable[..., Worker]
MakeCgroup = Callable[..., Cgroup]
SMALL_APP = {"HEAVY_APP_OBJECTS": "1000", "HEAVY_APP_BUFFER_MIB": "1"}


def test_the_first_child_says_how_good_the_estimate_was(
    redis: harness.RedisServer, make_worker: MakeWorker
) -> None:
    """One line after the first task of the first child: the estimate, the measured cost
    and their ratio, the same figures the startup line and the summary give."""
    worker = make_worker(["-c", "2"], harness.worker_env(redis))
    estimate = float(worker.startup()["child_estimate_mib"])
    worker.wait_ready(60)
    assert harness.wait_for_results(harness.send_tasks(redis, worker.queue, "walk", 2), 60)
    worker.wait_for(r"celery-guard event=calibration ")
    (calibration,) = worker.events("calibration")
    estimated, measured = float(calibration["estimated_mib"]), float(calibration["measured_mib"])
    assert estimated == estimate and measured > 0
    assert float(calibration["ratio"]) == pytest.approx(estimated / measured, rel=0.01)
    assert calibration["task"] == "heavy_app.walk"
    worker.stop()
    (final,) = [s for s in worker.events("summary") if s["final"] == "true"]
    assert float(final["child_cost_measured_mib"]) == measured


@pytest.mark.cgroup
def test_an_estimate_far_too_high_is_corrected_for_the_autoscaler(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """With --autoscale the governor is off: the startup estimate is all there is until the
    first child is measured. Forced to 900M, the max is scaled to 1; measured, the max
    goes up to what fits, and the autoscaler may use it."""
    group = make_cgroup(1024 * MIB)
    env = harness.worker_env(redis, {**SMALL_APP, "CELERY_GUARD_CHILD_MEMORY": "900M"})
    worker = make_worker(["--autoscale", "8,1"], env, group)
    assert worker.startup()["concurrency"] == "1"  # over budget: the minimum
    worker.wait_ready(60)
    assert harness.wait_for_results(harness.send_tasks(redis, worker.queue, "add", 2, (1, 1)), 60)
    resized = worker.wait_for(
        r"celery-guard event=pressure .*level=calibration .*what=autoscale_max.*"
    )
    (line,) = [p for p in worker.events("pressure") if p.get("level") == "calibration"]
    assert int(line["before"]) <= 1 and int(line["concurrency"]) == 8 and resized
    assert group.oom_kills() == 0


def resizes(worker: Worker) -> list[dict[str, str]]:
    return [p for p in worker.events("pressure") if p.get("action") == "resize"]


@pytest.mark.cgroup
def test_the_autoscalers_max_is_sized_in_the_limit_of_now(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """The limit lowered under the running worker before its first child is measured:
    the autoscaler's max is sized in the lowered limit (with the estimate at once, with
    the measured cost after the first task), not in the one read at startup (which had
    room for all 8)."""
    group = make_cgroup(1024 * MIB)
    worker = make_worker(["--autoscale", "8,1"], harness.worker_env(redis, SMALL_APP), group)
    startup = worker.startup()
    assert startup["concurrency"] == "8"
    in_use = float(startup["in_use_mib"])
    worker.wait_ready(60)
    lowered = int((in_use + 40) / 0.9)  # after the headroom, 40 MiB for the children
    (group.path / "memory.limit_in_bytes").write_text(str(lowered * MIB))
    worker.wait_for(rf"celery-guard event=limit .*new_mib={lowered}\.0", 10)
    worker.wait_for(r"celery-guard event=pressure .*level=limit .*what=autoscale_max", 10)
    assert harness.wait_for_results(harness.send_tasks(redis, worker.queue, "add", 2, (1, 1)), 60)
    worker.wait_for(r"celery-guard event=calibration ", 30)
    (calibration,) = worker.events("calibration")
    fits = int((lowered * 0.9 - in_use) // float(calibration["measured_mib"]))
    worker.stop()  # a resize with the measured cost, if it changed the max, is logged by now
    last = resizes(worker)[-1]
    assert last["what"] == "autoscale_max" and last["limit_mib"] == f"{lowered}.0"
    # the logged figures are rounded to 0.1 MiB: one child either way
    assert abs(int(last["concurrency"]) - max(fits, 1)) <= 1, (last, calibration)
    assert int(last["concurrency"]) < 8
    assert group.oom_kills() == 0


@pytest.mark.cgroup
def test_a_limit_lowered_after_calibration_lowers_the_autoscalers_max(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """The stale-limit case: the first child measured in 1 GiB (8 fit), then the limit
    lowered under the running worker; with --autoscale no governor runs, and the max is
    sized again in the new limit with the measured cost."""
    group = make_cgroup(1024 * MIB)
    worker = make_worker(["--autoscale", "8,1"], harness.worker_env(redis, SMALL_APP), group)
    in_use = float(worker.startup()["in_use_mib"])
    worker.wait_ready(60)
    assert harness.wait_for_results(harness.send_tasks(redis, worker.queue, "add", 2, (1, 1)), 60)
    worker.wait_for(r"celery-guard event=calibration ", 30)
    (calibration,) = worker.events("calibration")
    measured = float(calibration["measured_mib"])
    lowered = int((in_use + 3 * measured) / 0.9) + 1  # room for 3 children after the headroom
    (group.path / "memory.limit_in_bytes").write_text(str(lowered * MIB))
    worker.wait_for(r"celery-guard event=pressure .*level=limit .*what=autoscale_max", 10)
    (line,) = [p for p in resizes(worker) if p["level"] == "limit"]
    assert line["limit_mib"] == f"{lowered}.0" and float(line["child_cost_mib"]) == measured
    # the logged figures are rounded to 0.1 MiB: one child either way
    assert abs(int(line["concurrency"]) - 3) <= 1 and int(line["before"]) == 8, line
    assert group.oom_kills() == 0


def test_an_estimate_far_too_high_is_corrected_without_a_cgroup(
    redis: harness.RedisServer, make_worker: MakeWorker
) -> None:
    """Out of a cgroup (physical memory) the governor is off too: forced to 8G, -c 4 starts
    with fewer; once the first child is measured, the pool grows to the 4 asked for."""
    env = harness.worker_env(redis, {**SMALL_APP, "CELERY_GUARD_CHILD_MEMORY": "8G"})
    worker = make_worker(["-c", "4"], env)
    started = int(worker.startup()["concurrency"])
    assert started < 4
    worker.wait_ready(60)
    assert harness.wait_for_results(harness.send_tasks(redis, worker.queue, "add", 2, (1, 1)), 60)
    worker.wait_for(r"celery-guard event=pressure .*level=calibration .*what=pool")
    (line,) = [p for p in worker.events("pressure") if p.get("level") == "calibration"]
    assert (int(line["before"]), int(line["concurrency"])) == (started, 4)
    assert harness.eventually(lambda: worker.forks() >= 4, 30)
