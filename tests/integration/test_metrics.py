"""The Prometheus endpoint, scraped over loopback and read with the client's own parser."""

from __future__ import annotations

import os
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

import harness
from harness import MIB

MakeCgroup = Callable[..., harness.Cgroup]
MakeWorker = Callable[..., harness.Worker]
SMALL_APP = {"HEAVY_APP_OBJECTS": "1000", "HEAVY_APP_BUFFER_MIB": "1"}


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)], parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    ((_, number),) = samples[name]
    return number


def listening(pid: int, port: int) -> list[str]:
    return [
        c.laddr.ip
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]


def inspect_stats(redis: harness.RedisServer, node: str) -> dict[str, Any]:
    """The worker's ``celery inspect stats`` reply (each step's ``info()`` in it)."""
    from celery import Celery

    client = Celery("client", broker=redis.url(0))
    try:
        return (client.control.inspect([node], timeout=10).stats() or {})[node]
    finally:
        client.close()


@pytest.mark.cgroup
def test_metrics_are_served_by_the_main_process_only(
    redis: harness.RedisServer, make_cgroup: MakeCgroup, make_worker: MakeWorker
) -> None:
    """Port 0 asks for any free port; the line and ``inspect stats`` say which. The
    figures match the worker's own lines, and children forked after the server started
    (replacements for recycled ones) do not hold the port."""
    probe = make_worker(["-c", "1"], harness.worker_env(redis, SMALL_APP))
    parent_kib = int(float(probe.startup()["parent_rss_mib"]) * 1024)
    probe.stop()

    env = harness.worker_env(redis, {**SMALL_APP, "CELERY_GUARD_METRICS_PORT": "0"})
    max_kib = parent_kib + 24 * 1024  # a child that keeps 32 MiB is recycled
    group = make_cgroup(1024 * MIB)
    worker = make_worker(["-c", "2", f"--max-memory-per-child={max_kib}"], env, group)
    worker.wait_ready(60)
    (serving,) = worker.events("metrics")
    assert (serving["action"], serving["address"]) == ("serving", "127.0.0.1")
    port = int(serving["port"])
    assert port > 0

    samples = scrape(port)
    assert value(samples, "celery_guard_limit_bytes") == 1024 * MIB
    assert value(samples, "celery_guard_children") == 2
    assert value(samples, "celery_guard_concurrency") == 2
    assert value(samples, "celery_guard_requested_concurrency") == 2
    assert 0 < value(samples, "celery_guard_working_set_bytes")
    assert value(samples, "celery_guard_working_set_bytes") <= value(
        samples, "celery_guard_usage_bytes"
    )
    # celery-exporter's labels: `hostname` the host part of the node name, `name` a
    # task's; `worker` the whole node name. The children are two gauges, not a series
    # per pid nor a histogram recomputed at each scrape
    node = worker.wait_for(r"(\S+@\S+) ready\.").group(1)
    assert inspect_stats(redis, node)["guard_metrics"] == {"port": port}
    ours = [labels for name, series in samples.items() if name.startswith("celery_guard_")
            for labels, _ in series]  # fmt: skip
    assert {(labels["hostname"], labels["worker"]) for labels in ours} == {
        (node.partition("@")[2], node)
    }
    assert not any("task" in labels or "pid" in labels for labels in ours)
    together = value(samples, "celery_guard_children_private_bytes")
    assert 0 < value(samples, "celery_guard_child_max_private_bytes") <= together
    # counters exist at 0 before their first event; the process' own figures are served
    assert ({"hostname": node.partition("@")[2], "worker": node, "name": "heavy_app.leak"},
            0.0) in samples["celery_guard_task_memory_kills_total"]  # fmt: skip
    assert value(samples, "process_resident_memory_bytes") > 0
    (info,) = samples["celery_guard_info"]
    assert info[0]["version"] and info[1] == 1
    started = {int(pid) for pid in re.findall(r"pool child started pid=(\d+)", worker.log)}
    assert value(samples, "celery_guard_recycles_total") == 0

    results = harness.send_tasks(redis, worker.queue, "leak", 4, (32,))
    assert harness.wait_for_results(results, 60, group)
    assert harness.eventually(lambda: len(worker.events("recycle")) >= 4, 20)
    samples = scrape(port)
    assert value(samples, "celery_guard_recycles_total") == len(worker.events("recycle")) == 4
    assert value(samples, "celery_guard_oom_kills_total") == 0
    by_task = {labels["name"]: n for labels, n in samples["celery_guard_task_recycles_total"]}
    assert by_task["heavy_app.leak"] == 4.0
    assert set(by_task.values()) == {0.0, 4.0}  # the app's other tasks, at 0
    peaks = {
        labels["le"]: n
        for labels, n in samples["celery_guard_task_peak_growth_bytes_bucket"]
        if labels["name"] == "heavy_app.leak"
    }
    assert peaks[str(float(64 * MIB))] == peaks["+Inf"] >= 4  # each run grew about 32 MiB

    assert worker.process is not None
    assert listening(worker.process.pid, port) == ["127.0.0.1"]
    replacements = {int(p) for p in re.findall(r"pool child started pid=(\d+)", worker.log)}
    replacements -= started
    assert replacements
    alive = replacements & set(group.pids())
    assert alive  # the children forked in place of the recycled ones, running now
    for pid in alive:
        assert listening(pid, port) == []


def test_a_taken_port_is_one_error_line_and_the_worker_runs_on(
    redis: harness.RedisServer, make_worker: MakeWorker
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = harness.worker_env(redis, {**SMALL_APP, "CELERY_GUARD_METRICS_PORT": str(port)})
        worker = make_worker(["-c", "1"], env)
        worker.wait_ready(60)
        (line,) = worker.events("metrics")
        assert line["action"] == "off" and "Address already in use" in line["reason"]
        results = harness.send_tasks(redis, worker.queue, "add", 1, (2, 3))
        assert harness.wait_for_results(results, 30)


def served_names(port: int) -> set[str]:
    """Every sample name the endpoint can serve, from its families' names and types (a
    counter with no sample yet still names ``<family>_total``)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {
        family.name + suffix
        for family in text_string_to_metric_families(text)
        for suffix in suffixes.get(family.type, ("",))
    }


def test_the_dashboard_and_the_alerts_name_only_metrics_the_worker_serves(
    redis: harness.RedisServer, make_worker: MakeWorker
) -> None:
    """examples/grafana-dashboard.json and examples/prometheus-alerts.yml: every
    ``celery_guard_*`` name in them is served by a worker that ran a few tasks."""
    env = harness.worker_env(
        redis,
        {**SMALL_APP, "CELERY_GUARD_METRICS_PORT": "0", "CELERY_GUARD_SAMPLE_INTERVAL": "0.3"},
    )
    worker = make_worker(["-c", "2"], env)
    worker.wait_ready(60)
    assert harness.wait_for_results(harness.send_tasks(redis, worker.queue, "leak", 2, (8,)), 60)
    port = int(worker.events("metrics")[0]["port"])
    assert harness.eventually(
        lambda: "celery_guard_recommended_memory_limit_bytes" in served_names(port), 30
    )
    served = served_names(port)
    named: set[str] = set()
    for name in ("grafana-dashboard.json", "prometheus-alerts.yml"):
        text = (harness.EXAMPLES / name).read_text()
        named |= set(re.findall(r"\bcelery_guard_[a-z_]+", text))
    assert len(named) >= 15
    assert named - served == set()


def test_without_prometheus_client_the_worker_runs_and_says_so(
    redis: harness.RedisServer, make_worker: MakeWorker, tmp_path: Path
) -> None:
    """Metrics asked for where prometheus_client cannot be imported (a package of that
    name on the path that raises ImportError, as a missing one does): one ERROR line that
    names the extra to install, and the worker runs its tasks as without metrics."""
    shim = tmp_path / "shim" / "prometheus_client"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named prometheus_client')\n")
    env = harness.worker_env(redis, {**SMALL_APP, "CELERY_GUARD_METRICS_PORT": "0"})
    env["PYTHONPATH"] = os.pathsep.join([str(shim.parent), env["PYTHONPATH"]])
    worker = make_worker(["-c", "1"], env)
    worker.wait_ready(60)
    (line,) = worker.events("metrics")
    assert line["action"] == "off"
    assert "pip install 'celery-guard[prometheus]'" in line["reason"]
    assert "ERROR/MainProcess] celery-guard event=metrics" in worker.log
    results = harness.send_tasks(redis, worker.queue, "add", 2, (1, 2))
    assert harness.wait_for_results(results, 60)
    worker.stop()
    assert worker.process is not None and worker.process.returncode == 0
