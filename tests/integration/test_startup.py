"""The startup decision, end to end: real ``celery worker`` processes of the example app,
a real Redis broker, and real cgroup-v1 memory limits enforced by the kernel.

The example app (examples/heavy_app.py) holds about 180 MiB in the main process (its
startup line's ``parent_rss_mib``); each child that runs ``walk`` tasks copies a large
part of it, which the headline test below compares with the startup estimate.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import needs
import pytest

import harness
from harness import MIB, Cgroup, Worker

GIB_LIMIT = 1024 * MIB
#: Found with ``python tests/bisect_fit.py --limit 1G`` (vanilla Celery, same app and
#: workload, 3 walk tasks per child): 8 children run it; at 9 the OOM killer fires.
#: ``test_bisection_figure_holds_here`` re-checks both sides on the machine under test.
REALLY_FIT_IN_1G = 8

SMALL_APP = {"HEAVY_APP_OBJECTS": "1000", "HEAVY_APP_BUFFER_MIB": "1"}

CONTRACT_KEYS = {
    "event", "mode", "pool", "limit_mib", "limit_source", "headroom_mib", "parent_rss_mib",
    "child_estimate_mib", "child_estimate_source", "requested", "concurrency", "action",
}  # fmt: skip

MakeWorker = Callable[..., Worker]
MakeCgroup = Callable[..., Cgroup]


@pytest.mark.cgroup
def test_vanilla_dies_where_guarded_scales_and_finishes(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """The headline case: -c 16 of an import-heavy app in a 1 GiB cgroup.

    Vanilla Celery is OOM-killed. The guarded worker reads the cgroup limit itself,
    starts at most the 8 children the bisection found really fit (at least 80% of them),
    finishes every task, and the kernel never kills anything.
    """
    vanilla_group = make_cgroup(GIB_LIMIT)
    vanilla = make_worker(["-c", "16"], harness.worker_env(redis, guard=False), vanilla_group)
    vanilla.wait_ready(60)
    results = harness.send_tasks(redis, vanilla.queue, "walk", 32)
    assert not harness.wait_for_results(results, 90, vanilla_group)
    assert vanilla_group.oom_kills() >= 1
    vanilla.stop()

    group = make_cgroup(GIB_LIMIT)
    worker = make_worker(["-c", "16"], harness.worker_env(redis), group)
    startup = worker.startup()
    assert startup["action"] == "scaled"
    assert startup["limit_source"] == "cgroup-v1"
    assert float(startup["limit_mib"]) == 1024.0
    assert startup["requested"] == "16"
    concurrency = int(startup["concurrency"])
    assert REALLY_FIT_IN_1G * 0.8 <= concurrency <= REALLY_FIT_IN_1G
    worker.wait_ready(60)
    # forked in waves (one child per CPU, then doubling on the children measured), whole
    # under tasks that wait on I/O (all that fit add to the rate); never more
    waiting = harness.send_tasks(redis, worker.queue, "hog", 8 * concurrency, (0, 0.3))
    assert harness.eventually(lambda: worker.forks() == concurrency, 60), worker.log[-3000:]
    assert harness.wait_for_results(waiting, 120, group)
    results = harness.send_tasks(redis, worker.queue, "walk", 32)
    assert harness.wait_for_results(results, 120, group)
    assert group.oom_kills() == 0

    # The estimate against reality: what each child added once it had walked the whole
    # catalogue. Counted: the children that ran tasks, no more than are alive now (the
    # guard may grow the pool once the first child is measured; a child it adds after the
    # last task has copied next to nothing, and counting it would lower the average by
    # about a ninth; and the walk is CPU-bound, so once planned for throughput the pool
    # keeps the few children that keep the CPUs busy).
    assert worker.process is not None
    children = {pid for pid in group.pids() if pid != worker.process.pid}
    ran = set(re.findall(r"ForkPoolWorker-(\d+)\] Task heavy_app.walk\S* succeeded", worker.log))
    assert len(ran) >= REALLY_FIT_IN_1G * 0.8  # the children started ran tasks
    counted = min(len(ran), len(children))
    assert counted >= 2
    real_per_child = (group.working_set() - float(startup["in_use_mib"]) * MIB) / counted
    estimate = float(startup["child_estimate_mib"]) * MIB
    assert 0.95 * real_per_child <= estimate <= 1.2 * real_per_child, (
        f"estimate {estimate / MIB:.1f} MiB, real {real_per_child / MIB:.1f} MiB per child"
    )


@pytest.mark.cgroup
def test_bisection_figure_holds_here(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, tmp_path: Path
) -> None:
    """Vanilla Celery runs the workload at REALLY_FIT_IN_1G children in 1 GiB, not at one
    more: the figure the 80% comparison above rests on is true on this machine."""
    fits = harness.runs_walk_workload(
        redis, make_cgroup(GIB_LIMIT), REALLY_FIT_IN_1G, tmp_path / "fits.log"
    )
    assert fits
    one_more = make_cgroup(GIB_LIMIT)
    assert not harness.runs_walk_workload(
        redis, one_more, REALLY_FIT_IN_1G + 1, tmp_path / "one-more.log"
    )
    assert one_more.oom_kills() >= 1


@pytest.mark.cgroup
def test_smoke_fitted_in_a_cgroup_runs_tasks_and_stops_cleanly(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """The short end-to-end check, a few seconds (.ci/oldest-celery also runs it on the
    oldest Celery supported): -c 8 of a small app at 96 MiB a child in a 512 MiB cgroup.
    The pool is fitted before it forks, the children run tasks and report them through
    the guard's pipe, guard_stats answers through the remote control, and a warm shutdown
    logs the final summary, with no OOM kill and no error from the guard."""
    group = make_cgroup(512 * MIB)
    env = harness.worker_env(redis, {**SMALL_APP, "CELERY_GUARD_CHILD_MEMORY": "96M"})
    worker = make_worker(["-c", "8"], env, group)
    startup = worker.startup()
    assert startup["limit_source"] == "cgroup-v1" and float(startup["limit_mib"]) == 512.0
    assert startup["action"] == "scaled" and startup["requested"] == "8"
    concurrency = int(startup["concurrency"])
    assert 1 <= concurrency < 8
    worker.wait_ready(60)
    assert f".> concurrency: {concurrency} (prefork)" in worker.log
    waiting = harness.send_tasks(redis, worker.queue, "hog", 4 * concurrency, (0, 0.2))
    # forked in waves, each once the children forked last have finished a task
    assert harness.eventually(lambda: worker.forks() >= concurrency, 30), worker.log
    results = harness.send_tasks(redis, worker.queue, "leak", 4, (8,))
    assert harness.wait_for_results(waiting + results, 60, group), worker.log
    stats = harness.broadcast_guard_stats(redis, worker)
    assert stats["children"] >= 1 and "heavy_app.leak" in stats["tasks"]
    worker.stop()
    assert [s["final"] for s in worker.events("summary")] == ["true"], worker.log
    assert group.oom_kills() == 0
    log = worker.log
    assert "celery-guard event=error" not in log and "Traceback" not in log, log


@pytest.mark.cgroup
def test_refuse_exits_78_before_forking(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """refuse: one CRITICAL line, exit 78, no banner, no child, no traceback."""
    group = make_cgroup(GIB_LIMIT)
    worker = make_worker(
        ["-c", "16"], harness.worker_env(redis, {"CELERY_GUARD_MODE": "refuse"}), group
    )
    assert worker.wait_exit(60) == 78
    log = worker.log
    lines = [line for line in log.splitlines() if "celery-guard" in line]
    assert len(lines) == 1 and "CRITICAL" in lines[0] and "action=refused" in lines[0]
    assert worker.forks() == 0
    assert "Traceback" not in log
    assert "[config]" not in log  # the banner is printed after the steps' __init__
    assert group.pids() == []


BAD_VALUES = [
    ("CELERY_GUARD_MODE", "scaler"),
    ("CELERY_GUARD_MODE", ""),
    ("CELERY_GUARD_MEMORY_LIMIT", "lots"),
    ("CELERY_GUARD_MEMORY_LIMIT", "512B"),
    ("CELERY_GUARD_MEMORY_LIMIT", "0"),
    ("CELERY_GUARD_MEMORY_LIMIT", "1.5"),
    ("CELERY_GUARD_HEADROOM", "5"),
    ("CELERY_GUARD_HEADROOM", "100%"),
    ("CELERY_GUARD_CHILD_MEMORY", "-1M"),
    ("CELERY_GUARD_CHILD_MEMORY", "big"),
    ("CELERY_GUARD_MIN_CONCURRENCY", "0"),
    ("CELERY_GUARD_MIN_CONCURRENCY", "two"),
    ("CELERY_GUARD_LOG_FORMAT", "xml"),
    # issue 13: out of range, non-ASCII, an address idna refuses at bind
    ("CELERY_GUARD_LOW_WATER", "0%"),
    ("CELERY_GUARD_SAMPLE_INTERVAL", "0.0000000001"),
    ("CELERY_GUARD_MIN_CONCURRENCY", "\u0663"),
    ("CELERY_GUARD_METRICS_ADDRESS", "a" * 64),
    ("CELERY_GUARD_METRICS_ADDRESS", "x..y"),
]


@pytest.mark.parametrize("variable,value", BAD_VALUES, ids=[f"{v}={x}" for v, x in BAD_VALUES])
def test_bad_value_exits_78_naming_the_variable(
    make_worker: MakeWorker, variable: str, value: str
) -> None:
    """Every variable, bad values: one CRITICAL line naming it, exit 78, no traceback."""
    env = harness.worker_env(None, {**SMALL_APP, variable: value})
    worker = make_worker(["-c", "2"], env)
    assert worker.wait_exit(60) == 78
    log = worker.log
    lines = [line for line in log.splitlines() if "event=config_error" in line]
    assert len(lines) == 1, log
    line = lines[0]
    assert "CRITICAL" in line
    assert f"variable={variable} " in line
    assert f"value={value} " in line or f'value="{value}"' in line
    assert "accepted=" in line
    assert "Traceback" not in log
    assert worker.forks() == 0


def test_json_log_format(redis: harness.RedisServer, make_worker: MakeWorker) -> None:
    """With LOG_FORMAT=json the message is one JSON object, numbers as numbers."""
    env = harness.worker_env(
        redis,
        {**SMALL_APP, "CELERY_GUARD_LOG_FORMAT": "json", "CELERY_GUARD_MEMORY_LIMIT": "200M"},
    )
    worker = make_worker(["-c", "16"], env)
    message = worker.wait_for(r"(?m)/MainProcess\] (\{.*\})$").group(1)
    record = json.loads(message)
    assert CONTRACT_KEYS <= set(record)
    assert record["event"] == "startup" and record["limit_source"] == "env"
    assert record["limit_mib"] == 200.0
    for key in ("limit_mib", "headroom_mib", "parent_rss_mib", "child_estimate_mib"):
        assert isinstance(record[key], float)
    assert isinstance(record["requested"], int) and isinstance(record["concurrency"], int)
    assert record["action"] == "scaled" and 1 <= record["concurrency"] < 16
    assert "celery-guard" not in worker.log  # no text prefix anywhere
    worker.wait_ready(60)
    assert f".> concurrency: {record['concurrency']} (prefork)" in worker.log
    worker.stop()  # the lines of a worker that ran, its final summary among them, too
    assert "celery-guard" not in worker.log
    summaries = re.findall(r'(?m)\] (\{"event":"summary".*\})$', worker.log)
    assert [json.loads(line)["final"] for line in summaries] == [True]


@pytest.mark.parametrize("pool,banner", [("solo", "16 (solo)"), ("threads", "16 (thread)")])
def test_pools_that_do_not_fork_are_kept(
    redis: harness.RedisServer, make_worker: MakeWorker, pool: str, banner: str
) -> None:
    """solo and threads share one process: a tiny budget changes nothing."""
    env = harness.worker_env(redis, {**SMALL_APP, "CELERY_GUARD_MEMORY_LIMIT": "100M"})
    worker = make_worker(["-P", pool, "-c", "16"], env)
    startup = worker.startup()
    assert startup["pool"] == pool
    assert startup["action"] == "kept"
    assert startup["requested"] == startup["concurrency"] == "16"
    worker.wait_ready(60)
    assert f".> concurrency: {banner}" in worker.log
    (result,) = harness.send_tasks(redis, worker.queue, "noop", 1)
    assert result.get(timeout=30) is None


@pytest.mark.cgroup
def test_autoscale_max_is_lowered(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """--autoscale 16,2: MAX is what must fit; the pool never grows past the new max."""
    group = make_cgroup(GIB_LIMIT)
    worker = make_worker(["--autoscale", "16,2"], harness.worker_env(redis), group)
    startup = worker.startup()
    assert startup["action"] == "scaled" and startup["requested"] == "16"
    new_max = int(startup["concurrency"])
    assert 2 <= new_max <= REALLY_FIT_IN_1G
    assert startup["autoscale_min"] == "2"
    worker.wait_ready(60)
    results = harness.send_tasks(redis, worker.queue, "walk", 40)
    assert harness.wait_for_results(results, 150, group)
    assert 2 < worker.forks() <= new_max  # it did scale up, and stopped at the new max
    assert group.oom_kills() == 0


@pytest.mark.cgroup
def test_limit_on_an_ancestor_only_is_found(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """A limit set on the parent cgroup shows only in hierarchical_memory_limit."""
    parent = make_cgroup(GIB_LIMIT)
    leaf = parent.child()
    assert int((leaf.path / "memory.limit_in_bytes").read_text()) > 2**62
    worker = make_worker(["-c", "16"], harness.worker_env(redis), leaf)
    startup = worker.startup()
    assert startup["limit_source"] == "cgroup-v1"
    assert float(startup["limit_mib"]) == 1024.0
    assert "hierarchical_memory_limit" in startup["limit_detail"]
    assert startup["action"] == "scaled"


@pytest.mark.cgroup
def test_no_limit_anywhere_falls_back_to_physical_memory(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    group = make_cgroup(None)
    worker = make_worker(["-c", "2"], harness.worker_env(redis, SMALL_APP), group)
    startup = worker.startup()
    assert startup["limit_source"] == "physical"
    physical = int(re.search(r"MemTotal:\s+(\d+) kB", open("/proc/meminfo").read()).group(1))
    assert float(startup["limit_mib"]) == round(physical / 1024, 1)
    assert startup["action"] == "kept" and startup["concurrency"] == "2"


MODES = [
    # mode, extra settings, action, level, concurrency ("16" = unchanged)
    ("warn", {}, "warned", "WARNING", "16"),
    ("off", {}, "off", "INFO", "16"),
    ("scale", {"CELERY_GUARD_MIN_CONCURRENCY": "3"}, "over_budget", "ERROR", "3"),
]


@pytest.mark.parametrize("mode,extra,action,level,concurrency", MODES, ids=[m[2] for m in MODES])
def test_modes_that_start_anyway(
    redis: harness.RedisServer,
    make_worker: MakeWorker,
    mode: str,
    extra: dict[str, str],
    action: str,
    level: str,
    concurrency: str,
) -> None:
    """A budget too small for even one child: each mode's action, level and pool size."""
    env = harness.worker_env(
        redis,
        {**SMALL_APP, "CELERY_GUARD_MODE": mode, "CELERY_GUARD_MEMORY_LIMIT": "40M", **extra},
    )
    worker = make_worker(["-c", "16"], env)
    startup = worker.startup()
    assert startup["action"] == action
    assert startup["concurrency"] == concurrency
    line = next(line for line in worker.log.splitlines() if "event=startup" in line)
    assert f"{level}/MainProcess" in line
    worker.wait_ready(60)
    assert f".> concurrency: {concurrency} (prefork)" in worker.log


@pytest.mark.cgroup
@pytest.mark.parametrize("mode", ["scale", "off"])
def test_a_huge_deque_in_the_app_starts_where_it_starts_unguarded(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker, mode: str
) -> None:
    """A module-level deque of five million ints in a 700 MiB cgroup: the unguarded worker
    starts; so does the guarded one (its census once pushed every item and the kernel
    killed the main process), in every mode."""
    app = {**SMALL_APP, "HEAVY_APP_DEQUE": "5000000"}
    for guard in (False, True):
        group = make_cgroup(700 * MIB)
        env = harness.worker_env(redis, {**app, "CELERY_GUARD_MODE": mode}, guard=guard)
        worker = make_worker(["-c", "1"], env, group)
        worker.wait_ready(120)
        (done,) = harness.send_tasks(redis, worker.queue, "add", 1, (2, 3))
        assert done.get(timeout=60) == 5
        assert group.oom_kills() == 0, (guard, worker.log)
        if guard:
            assert worker.startup()["action"] in ("kept", "off")
        worker.stop()


@pytest.mark.cgroup
def test_an_unbound_local_proxy_in_the_app_leaves_the_guard_on(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """A Flask app's ``request`` proxy at module level raises RuntimeError outside a
    request: the census counts it as opaque and the guard measures, governs and limits
    tasks as usual (it once logged ``event=error`` and switched itself off)."""
    needs.module("werkzeug")
    env = harness.worker_env(redis, {**SMALL_APP, "HEAVY_APP_PROXY": "1"})
    worker = make_worker(["-c", "2"], env, make_cgroup(1024 * MIB))  # a limit to govern
    startup = worker.startup()
    assert "error" not in startup, startup
    assert startup["child_estimate_method"] == "census"
    worker.wait_ready(60)
    assert "stage=startup" not in worker.log
    stats = harness.guard_stats(worker, env)
    assert "error" not in stats and "governor" in stats, " ".join(sorted(stats))
