"""``celery guard check`` and ``celery guard imports``, and the worker options, run as a
user runs them: the ``celery`` command on the example app, in and out of real cgroups."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import needs
import pytest

import harness
from celery_guard.logline import parse_line
from harness import MIB

MakeCgroup = Callable[..., harness.Cgroup]
MakeWorker = Callable[..., harness.Worker]
GIB = 1024 * MIB
#: the settings that leave nothing to advise on
QUIET = ["--without-gossip", "--without-mingle", "--without-heartbeat", "--prefetch-multiplier=1"]


def lines(output: str, event: str) -> list[dict[str, str]]:
    return [parse_line(line) for line in output.splitlines() if f"event={event} " in line]


@pytest.fixture
def cpu_quota() -> Iterator[Callable[[float], Path]]:
    made: list[Path] = []

    def make(cpus: float) -> Path:
        try:
            made.append(harness.cpu_cgroup(cpus))
        except harness.Unavailable as error:
            needs.unavailable(str(error))
        return made[-1]

    yield make
    for path in made:
        harness._empty_and_remove(path)


@pytest.mark.cgroup
def test_check_gates_a_deploy_and_agrees_with_the_worker(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """In 1 GiB, -c 16 does not fit: exit 78, and the check's figures are the worker's
    within one child (the concurrency and fits of the startup line of a worker started
    after): the check measures its own process, which has not built the worker's
    components, so its parent's RSS is within 15% of the worker's, not equal. -c 4
    fits: exit 0."""
    env = harness.worker_env(redis, {"HEAVY_APP_ACKS_LATE": "1"})
    group = make_cgroup(GIB)
    done = harness.run_celery(["guard", "check", "-c", "16", *QUIET], env, [group.path])
    assert done.returncode == 78, done.stderr
    (check,) = lines(done.stdout, "check")
    assert (check["requested"], check["action"], check["limit_source"]) == (
        "16",
        "scaled",
        "cgroup-v1",
    )
    assert lines(done.stdout, "advice") == []
    assert "Traceback" not in done.stderr

    worker = make_worker(["-c", "16"], env, group)
    startup = worker.startup()
    assert abs(int(startup["fits"]) - int(check["fits"])) <= 1
    assert abs(int(startup["concurrency"]) - int(check["concurrency"])) <= 1
    ratio = float(check["parent_rss_mib"]) / float(startup["parent_rss_mib"])
    assert 0.85 <= ratio <= 1.05, (check, startup)
    worker.stop()

    fits = harness.run_celery(["guard", "check", "-c", "4", *QUIET], env, [group.path])
    assert fits.returncode == 0, fits.stderr
    assert lines(fits.stdout, "check")[0]["action"] == "kept"


@pytest.mark.cgroup
def test_check_recommends_the_container_limit_that_runs_the_requested_concurrency(
    redis: harness.RedisServer, make_cgroup: MakeCgroup
) -> None:
    """In 1 GiB, -c 16 does not fit and the check names the limit that would hold it; in
    a cgroup of that limit the same check keeps 16 (exit 0), and the limit is the least
    that does: in 16 MiB less, 16 does not fit."""
    env = harness.worker_env(redis, {"HEAVY_APP_ACKS_LATE": "1"})
    small = harness.run_celery(["guard", "check", "-c", "16", *QUIET], env, [make_cgroup(GIB).path])
    assert small.returncode == 78, small.stderr
    recommended = float(lines(small.stdout, "check")[0]["recommended_memory_limit_mib"])
    assert recommended > 1024

    sized = make_cgroup(int(recommended) * MIB)
    done = harness.run_celery(["guard", "check", "-c", "16", *QUIET], env, [sized.path])
    assert done.returncode == 0, done.stdout + done.stderr
    (check,) = lines(done.stdout, "check")
    assert (check["action"], check["concurrency"]) == ("kept", "16")
    below = make_cgroup((int(recommended) - 16) * MIB)
    short = harness.run_celery(["guard", "check", "-c", "16", *QUIET], env, [below.path])
    assert short.returncode == 78, short.stdout + short.stderr


def test_check_out_of_a_cgroup_limit_and_in_json(redis: harness.RedisServer) -> None:
    """No memory limit above this process: physical memory is the budget (24 GiB here,
    -c 4 fits); --format json prints one object a line, the same keys."""
    env = harness.worker_env(redis)
    done = harness.run_celery(["guard", "check", "-c", "4", "--format", "json"], env)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert records[0]["event"] == "check"
    assert records[0]["requested"] == 4 and isinstance(records[0]["limit_mib"], float)
    assert {r["event"] for r in records[1:]} <= {"advice", "task_limit"}
    advice = [r for r in records[1:] if r["event"] == "advice"]
    assert advice, done.stdout  # early acks, prefetch 4...: Celery's defaults are advised on
    assert all(r["reason"] and r["fix"] for r in advice)
    limits = [r for r in records if r["event"] == "task_limit"]
    assert [r["task"] for r in limits] == ["heavy_app.limited", "heavy_app.stubborn"]
    assert limits[0]["memory_limit_mib"] == 160.0 and limits[0]["reachable"] is True
    text = harness.run_celery(["guard", "check", "-c", "4"], env)
    assert set(lines(text.stdout, "check")[0]) == set(records[0])


def test_check_advice_with_reasons_and_fixes(redis: harness.RedisServer) -> None:
    """Celery's defaults (early acks, prefetch 4, gossip, mingle and heartbeat on) each
    get a line; the worker options that change them silence it."""
    env = harness.worker_env(redis)
    done = harness.run_celery(["guard", "check", "-c", "2", "--max-memory-per-child=1000"], env)
    topics = [a["topic"] for a in lines(done.stdout, "advice")]
    assert topics == [
        "max_memory_per_child_below_parent",
        "acks_early",
        "prefetch_multiplier",
        "gossip_mingle_heartbeat",
    ]
    quiet = harness.run_celery(
        ["guard", "check", "-c", "2", *QUIET], {**env, "HEAVY_APP_ACKS_LATE": "1"}
    )
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    assert len(lines(quiet.stdout, "check")) == 1  # it ran and said what it checked
    assert lines(quiet.stdout, "advice") == []


@pytest.mark.cgroup
def test_check_advises_against_host_cpus_under_a_cpu_quota(
    redis: harness.RedisServer, cpu_quota: Callable[[float], Path]
) -> None:
    """-c left unset: Celery starts one child per host CPU (billiard's cpu_count). Under
    a 1-CPU quota the check says so, with Celery's own -c auto as the fix; with -c given
    it does not."""
    host = os.cpu_count() or 1
    if host < 2:
        needs.unavailable("a 1-CPU quota is no smaller than this host's one CPU")
    env = {**harness.worker_env(redis, {"HEAVY_APP_ACKS_LATE": "1"})}
    quota = cpu_quota(1.0)
    done = harness.run_celery(["guard", "check", *QUIET], env, [quota])
    assert done.returncode == 0, done.stdout + done.stderr
    (advice,) = lines(done.stdout, "advice")
    assert (advice["topic"], advice["cpu_budget"], advice["host_cpus"]) == (
        "concurrency_from_host_cpus",
        "1",
        str(host),
    )
    assert advice["fix"].startswith("-c auto")
    given = harness.run_celery(["guard", "check", "-c", "2", *QUIET], env, [quota])
    assert given.returncode == 0, given.stdout + given.stderr
    assert len(lines(given.stdout, "check")) == 1
    assert lines(given.stdout, "advice") == []


def test_check_reads_c_auto_as_celery_does(
    redis: harness.RedisServer, cpu_quota: Callable[[float], Path]
) -> None:
    """-c auto under a 1-CPU quota: Celery starts one child (its CPU budget reads the
    quota), so the check weighs one, fits, and gives no advice about host CPUs."""
    env = harness.worker_env(redis, {"HEAVY_APP_ACKS_LATE": "1"})
    done = harness.run_celery(["guard", "check", "-c", "auto", *QUIET], env, [cpu_quota(1.0)])
    assert done.returncode == 0, done.stdout + done.stderr
    (check,) = lines(done.stdout, "check")
    assert (check["requested"], check["concurrency"]) == ("1", "1")
    assert lines(done.stdout, "advice") == []


def test_check_weighs_the_autoscale_max(redis: harness.RedisServer) -> None:
    """--autoscale MAX,MIN: the check weighs MAX, the most children the autoscaler may
    start; in 1 GiB, 16 do not fit (exit 78, lowered), 4 do (exit 0)."""
    env = harness.worker_env(redis, {"HEAVY_APP_ACKS_LATE": "1", "CELERY_GUARD_MEMORY_LIMIT": "1G"})
    many = harness.run_celery(["guard", "check", "--autoscale", "16,2", *QUIET], env)
    assert many.returncode == 78, many.stdout + many.stderr
    (check,) = lines(many.stdout, "check")
    assert (check["requested"], check["action"]) == ("16", "scaled")
    assert int(check["concurrency"]) < 16
    few = harness.run_celery(["guard", "check", "--autoscale", "4,2", *QUIET], env)
    assert few.returncode == 0, few.stdout + few.stderr
    (check,) = lines(few.stdout, "check")
    assert (check["requested"], check["concurrency"], check["action"]) == ("4", "4", "kept")


def test_check_of_a_pool_that_does_not_fork(redis: harness.RedisServer) -> None:
    """-P threads -c 8 in 256 MiB: eight forked children would not fit, but threads are
    not forked: exit 0, no count of children that fit (``fits`` empty), and the
    container limit is the main process's with the headroom (no child in it)."""
    env = harness.worker_env(
        redis, {"HEAVY_APP_ACKS_LATE": "1", "CELERY_GUARD_MEMORY_LIMIT": "256M"}
    )
    done = harness.run_celery(["guard", "check", "-P", "threads", "-c", "8", *QUIET], env)
    assert done.returncode == 0, done.stdout + done.stderr
    (check,) = lines(done.stdout, "check")
    assert (check["pool"], check["requested"]) == ("threads", "8")
    assert check["fits"] == ""
    parent = float(check["parent_rss_mib"])
    assert (
        parent
        < float(check["recommended_memory_limit_mib"])
        < parent + float(check["child_estimate_mib"])
    )


def test_check_with_a_bad_setting_exits_78_with_one_line(redis: harness.RedisServer) -> None:
    env = harness.worker_env(redis, {"CELERY_GUARD_HEADROOM": "lots"})
    done = harness.run_celery(["guard", "check"], env)
    assert done.returncode == 78
    (error,) = lines(done.stdout, "config_error")
    assert error["variable"] == "CELERY_GUARD_HEADROOM" and error["value"] == "lots"
    assert "Traceback" not in done.stderr + done.stdout


def test_imports_measures_each_task_module_largest_first(redis: harness.RedisServer) -> None:
    """heavy_app builds 300k small objects at import; heavy_reports 40k rows. Each is
    imported in a fresh interpreter: the larger costs more per child, and listed first;
    a tenth of the objects costs far less."""
    env = harness.worker_env(redis, {"HEAVY_APP_REPORTS": "1"})
    done = harness.run_celery(["guard", "imports"], env)
    assert done.returncode == 0, done.stderr
    rows = lines(done.stdout, "imports")
    assert [r["module"] for r in rows] == ["heavy_app", "heavy_reports"]
    app_cost, reports_cost = (float(r["child_mib"]) for r in rows)
    assert app_cost > 4 * reports_cost > 0
    assert rows[1]["defined_tasks"] == "1"

    small = harness.run_celery(
        ["guard", "imports", "--format", "json"], {**env, "HEAVY_APP_OBJECTS": "30000"}
    )
    costs = {r["module"]: r["child_mib"] for r in map(json.loads, small.stdout.splitlines())}
    assert costs["heavy_app"] < app_cost / 3


def test_imports_runs_as_the_readme_shows_without_pythonpath(redis: harness.RedisServer) -> None:
    """`celery -A heavy_app guard imports` in examples/, with nothing on PYTHONPATH but
    this package: the app is found where `celery -A` found it (the current directory)."""
    env = {**harness.worker_env(redis), "PYTHONPATH": str(harness.ROOT)}
    celery = Path(sys.executable).parent / "celery"  # the command, not python -m celery,
    # whose sys.path[0] is the current directory anyway
    done = subprocess.run(
        [str(celery), "-A", "heavy_app", "guard", "imports"],
        cwd=harness.EXAMPLES, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (row,) = lines(done.stdout, "imports")
    assert row["module"] == "heavy_app" and "error" not in row, row
    assert float(row["child_mib"]) > 0


@pytest.mark.cgroup
def test_worker_options_win_over_the_environment(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """--guard-mode refuse beats CELERY_GUARD_MODE=scale: -c 16 in 1 GiB exits 78;
    a bad option value names the option."""
    env = harness.worker_env(redis, {"CELERY_GUARD_MODE": "scale"})
    worker = make_worker(["-c", "16", "--guard-mode", "refuse"], env, make_cgroup(GIB))
    assert worker.wait_exit(60) == 78
    startup = worker.startup()
    assert startup["action"] == "refused" and startup["mode"] == "refuse"

    bad = make_worker(["-c", "1", "--guard-headroom", "lots"], env)
    assert bad.wait_exit(60) == 78
    (error,) = bad.events("config_error")
    assert (error["option"], error["variable"], error["source"]) == (
        "--guard-headroom",
        "CELERY_GUARD_HEADROOM",
        "option",
    )
    assert "Traceback" not in bad.log


def test_the_gevent_example_runs_as_documented(redis: harness.RedisServer, tmp_path: Path) -> None:
    """examples/gevent_app.py under -P gevent -c 50: the guard keeps the concurrency (the
    pool does not fork), and 50 one-second I/O tasks finish together, not in turn."""
    env = {
        **harness.worker_env(None),
        "GEVENT_APP_BROKER": redis.url(0),
        "GEVENT_APP_BACKEND": redis.url(1),
        "CELERY_GUARD_MAX_WORKER_MEMORY": "512M",
    }
    worker = harness.Worker(
        ["-P", "gevent", "-c", "50"], env, tmp_path / "gevent.log", app="gevent_app"
    ).start()
    try:
        startup = worker.startup()
        assert (startup["pool"], startup["action"], startup["concurrency"]) == (
            "gevent",
            "kept",
            "50",
        )
        worker.wait_ready(60)
        began = time.monotonic()
        results = harness.send_tasks(redis, worker.queue, "fetch", 50, ("u", 1.0), app="gevent_app")
        assert harness.wait_for_results(results, 60)
        assert time.monotonic() - began < 10
        assert worker.events("pressure") == []
    finally:
        worker.stop()


def test_check_lists_the_tasks_that_declare_memory_limits(redis: harness.RedisServer) -> None:
    """The example app's ``limited`` (160M) and ``stubborn`` (96M) declare limits. With a
    400M budget (the main process holds about 180 MiB of it, 40 MiB are headroom) one child
    can have about 180 MiB: both limits can be reached. With a budget where one child
    still fits but has less than 96 MiB (set from the main process and the estimate the
    first check measured, so that the packages' size on the machine does not move it past
    either bound): neither can, and the check says so."""
    env = harness.worker_env(redis, {"CELERY_GUARD_MEMORY_LIMIT": "400M"})
    done = harness.run_celery(["guard", "check", "-c", "1", *QUIET], env)
    assert done.returncode == 0, done.stderr
    (check,) = lines(done.stdout, "check")
    one_child = float(check["parent_rss_mib"]) + float(check["child_estimate_mib"])
    small_budget = math.ceil((one_child + 4) / 0.9)  # 4 MiB above one child, 10% headroom
    limits = {line["task"]: line for line in lines(done.stdout, "task_limit")}
    assert sorted(limits) == ["heavy_app.limited", "heavy_app.stubborn"]
    assert limits["heavy_app.limited"]["memory_limit_mib"] == "160.0"
    assert limits["heavy_app.limited"]["soft_memory_limit_mib"] == "96.0"
    assert all(line["reachable"] == "true" for line in limits.values())
    assert not [a for a in lines(done.stdout, "advice") if a["topic"] == "task_limit_above_budget"]

    small = harness.worker_env(redis, {"CELERY_GUARD_MEMORY_LIMIT": f"{small_budget}M"})
    done = harness.run_celery(["guard", "check", "-c", "1", *QUIET], small)
    assert done.returncode == 0, done.stdout + done.stderr
    limits = {line["task"]: line for line in lines(done.stdout, "task_limit")}
    assert sorted(limits) == ["heavy_app.limited", "heavy_app.stubborn"]
    room = float(limits["heavy_app.limited"]["child_room_mib"])
    assert room < 96
    assert all(line["reachable"] == "false" for line in limits.values())
    flagged = [
        a["task"] for a in lines(done.stdout, "advice") if a["topic"] == "task_limit_above_budget"
    ]
    assert sorted(flagged) == ["heavy_app.limited", "heavy_app.stubborn"]


def test_report_asks_every_worker_through_the_remote_control(
    redis: harness.RedisServer, make_worker: MakeWorker
) -> None:
    """Two workers on two queues: one table row each, with their queues and the
    recommendations, and one row per queue."""
    env = harness.worker_env(redis, {"HEAVY_APP_OBJECTS": "1000", "HEAVY_APP_BUFFER_MIB": "1",
                                     "CELERY_GUARD_SAMPLE_INTERVAL": "0.3"})  # fmt: skip
    one = make_worker(["-c", "1"], env)
    two = make_worker(["-c", "2"], env)
    nodes = {}
    for worker in (one, two):
        worker.wait_ready(60)
        nodes[worker.queue] = worker.wait_for(r"(\S+@\S+) ready\.").group(1)
        assert harness.wait_for_results(
            harness.send_tasks(redis, worker.queue, "add", 2, (1, 1)), 60
        )
    done = harness.run_celery(["guard", "report", "-j", "-t", "5"], env)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    workers = {w["hostname"]: w for w in data["workers"]}
    assert set(nodes.values()) <= set(workers)
    for queue, node in nodes.items():
        assert queue in workers[node]["queues"]
        assert workers[node]["limit_mib"] > 0 and workers[node]["requested"] >= 1
    queues = {q["queue"]: q for q in data["queues"]}
    assert queues[one.queue]["workers"] == [nodes[one.queue]]
    assert queues[two.queue]["concurrency"] == 2
    text = harness.run_celery(["guard", "report"], env)
    assert text.returncode == 0 and nodes[one.queue] in text.stdout
    assert text.stdout.splitlines()[1].startswith("worker")


def test_without_proc_the_check_says_so_in_one_line_and_exits_69(tmp_path: Path) -> None:
    """Where /proc is not mounted (a mount namespace with an empty one, as a system
    without /proc looks to the guard) nothing can be measured: the check prints its line
    with the reason, no traceback, and exits 69 (EX_UNAVAILABLE)."""
    import shutil

    if shutil.which("unshare") is None or os.geteuid() != 0:
        needs.unavailable("needs root and unshare(1) to hide /proc in a mount namespace")
    env = harness.worker_env(None, {"HEAVY_APP_OBJECTS": "1000", "HEAVY_APP_BUFFER_MIB": "1"})
    command = [sys.executable, "-m", "celery", "-A", "heavy_app", "guard", "check", "-c", "2"]
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", 'mount -t tmpfs none /proc && exec "$@"', "sh", *command],
        cwd=harness.EXAMPLES, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 69, done.stdout + done.stderr
    (line,) = lines(done.stdout, "check")
    assert line["action"] == "kept" and line["concurrency"] == "2"
    assert line["error"].startswith("cannot read /proc/self/stat"), line
    assert "Traceback" not in done.stdout + done.stderr
