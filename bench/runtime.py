"""Run time under memory pressure: celery-guard against the best hand-tuned vanilla worker.

Usage (root, cgroup v1, redis-server installed; from the repository)::

    .venv/bin/python bench/runtime.py [--workload leaky transient] [--limit 768 1024]
        [--acks early late] [--grid 4,5,6,7:0,200000,230000] [--tasks N]

Two workloads of the example app (about 170 MiB main process), asked for ``-c 16``:

- ``leaky``: each task keeps 24 MiB for the life of its child (``leak``);
- ``transient``: each task uses 60 MiB for a moment (``hog``), then frees it.

For each workload and limit, vanilla Celery runs over a small grid of ``-c`` and
``--max-memory-per-child``; the best hand-tuned vanilla is the fastest that finished every
task with no OOM kill. The guard runs at ``-c 16`` with default settings, with early and
with late acks. For each run it prints: seconds to finish, tasks that succeeded, tasks
the guard killed (``MemoryLimitExceeded``) or lost (``WorkerLostError``), OOM kills (the
cgroup's counter), the smallest pool after the first task, and the guard's ratio to the
best vanilla time.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import harness  # noqa: E402
from harness import MIB  # noqa: E402

REQUESTED = 16
TIMEOUT = 180.0


@dataclass(frozen=True)
class Workload:
    name: str
    task: str
    args: tuple[Any, ...]
    tasks: int
    grid: tuple[tuple[int, ...], tuple[int, ...]]  # vanilla -c values, max-memory KiB values


WORKLOADS = {
    "leaky": Workload("leaky", "leak", (24,), 240, ((4, 5, 6, 7, 8), (0, 200000, 230000, 260000))),
    "transient": Workload("transient", "hog", (60, 0.3), 160, ((3, 4, 5, 6, 8), (0,))),
}


@dataclass
class Outcome:
    label: str
    seconds: float | None  # None: not every task finished
    succeeded: int
    sent: int
    failed: dict[str, int]  # exception class name -> count
    oom_kills: int
    smallest_pool: int | None
    largest_pool: int | None
    guard_lines: dict[str, int] = field(default_factory=dict)
    log: Path | None = None
    main_cpu: float | None = None  # CPU seconds the main process used

    @property
    def clean(self) -> bool:
        return self.seconds is not None and self.succeeded == self.sent and not self.oom_kills


def run(
    redis: harness.RedisServer,
    root: Path,
    workdir: Path,
    workload: Workload,
    limit_mib: int,
    args: list[str],
    guard: bool,
    acks_late: bool,
    extra: dict[str, str] | None = None,
    label: str = "",
) -> Outcome:
    group = harness.Cgroup(root, limit_mib * MIB)
    env = harness.worker_env(
        redis, {**({"HEAVY_APP_ACKS_LATE": "1"} if acks_late else {}), **(extra or {})}, guard
    )
    log = workdir / f"{label or 'run'}-{time.monotonic_ns()}.log".replace(" ", "_")
    worker = harness.Worker(args, env, log, cgroup=group).start()
    pool: list[int] = []
    stop = threading.Event()

    def count_children() -> None:
        main = worker.process.pid if worker.process else -1
        while not stop.is_set():
            try:
                pool.append(len([p for p in group.pids() if p != main]))
            except OSError:
                pass
            stop.wait(0.1)

    seconds: float | None = None
    results: list[Any] = []
    first_done: int | None = None
    try:
        worker.wait_ready(90)
        thread = threading.Thread(target=count_children, daemon=True)
        start = time.monotonic()
        results = harness.send_tasks(
            redis, worker.queue, workload.task, workload.tasks, workload.args
        )
        pending = list(results)
        deadline = start + TIMEOUT
        thread.start()
        while pending and time.monotonic() < deadline:
            pending = [r for r in pending if not r.ready()]
            if first_done is None and len(pending) < len(results):
                first_done = len(pool)
            if worker.process is None or worker.process.poll() is not None:
                break
            time.sleep(0.05)
        if not pending:
            seconds = time.monotonic() - start
    except AssertionError:
        pass
    finally:
        stop.set()
        main_cpu = _cpu_seconds(worker.process.pid) if worker.process else None
        worker.stop()
        oom_kills = group.oom_kills()
        group.close()
    failed: dict[str, int] = {}
    succeeded = 0
    for r in results:
        if r.ready() and r.successful():
            succeeded += 1
        elif r.ready():
            name = type(r.result).__name__
            failed[name] = failed.get(name, 0) + 1
        else:
            failed["unfinished"] = failed.get("unfinished", 0) + 1
    after_first = pool[first_done or 0 :] or pool
    lines: dict[str, int] = {}
    for match in re.finditer(r"celery-guard event=(\w+)(?:.*?action=(\w+))?", worker.log):
        key = match.group(1) + (f":{match.group(2)}" if match.group(2) else "")
        lines[key] = lines.get(key, 0) + 1
    return Outcome(
        label,
        seconds,
        succeeded,
        len(results),
        failed,
        oom_kills,
        min(after_first) if after_first else None,
        max(after_first) if after_first else None,
        lines,
        log,
        main_cpu,
    )


def _cpu_seconds(pid: int) -> float | None:
    """User and system CPU seconds of a process so far (``/proc/<pid>/stat``)."""
    import os

    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            fields = file.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def show(outcome: Outcome, best: float | None = None) -> str:
    seconds = f"{outcome.seconds:6.1f} s" if outcome.seconds is not None else "   n/a  "
    ratio = f" ratio {outcome.seconds / best:.2f}" if best and outcome.seconds else ""
    failed = ", ".join(f"{k} {v}" for k, v in sorted(outcome.failed.items())) or "none"
    guard = " ".join(f"{k}={v}" for k, v in sorted(outcome.guard_lines.items()))
    return (
        f"{outcome.label:34} {seconds} {outcome.succeeded}/{outcome.sent} ok, failed: {failed}, "
        f"oom {outcome.oom_kills}, pool {outcome.smallest_pool}-{outcome.largest_pool}, "
        f"main cpu {outcome.main_cpu}"
        f"{ratio}  {guard}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--limit", nargs="+", type=int, default=[768, 1024])
    parser.add_argument("--acks", nargs="+", default=["early", "late"])
    parser.add_argument("--grid", help="C1,C2,...:K1,K2,... (KiB; 0 = none)")
    parser.add_argument("--no-vanilla", action="store_true")
    parser.add_argument("--guard-env", nargs="*", default=[], help="NAME=VALUE for the guard")
    parser.add_argument("--keep-logs", type=Path)
    options = parser.parse_args()
    extra = dict(item.split("=", 1) for item in options.guard_env)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = options.keep_logs or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        root = harness.own_memory_cgroup()
        redis = harness.RedisServer(Path(tmp))
        try:
            for name in options.workload:
                workload = WORKLOADS[name]
                grid = workload.grid
                if options.grid:
                    cs, ks = options.grid.split(":")
                    grid = (tuple(map(int, cs.split(","))), tuple(map(int, ks.split(","))))
                for limit in options.limit:
                    print(f"== {name} at {limit} MiB", flush=True)
                    best: Outcome | None = None
                    if not options.no_vanilla:
                        for c in grid[0]:
                            for k in grid[1]:
                                args = ["-c", str(c)] + (
                                    [f"--max-memory-per-child={k}"] if k else []
                                )
                                label = f"vanilla -c {c}" + (f" K={k}" if k else "")
                                out = run(
                                    redis,
                                    root,
                                    workdir,
                                    workload,
                                    limit,
                                    args,
                                    False,
                                    True,
                                    label=label,
                                )
                                print("  " + show(out), flush=True)
                                if out.clean and (best is None or out.seconds < best.seconds):  # type: ignore[operator]
                                    best = out
                        print(f"  best vanilla: {best.label if best else 'none'}", flush=True)
                    for acks in options.acks:
                        label = f"guard -c {REQUESTED} acks={acks}"
                        out = run(
                            redis,
                            root,
                            workdir,
                            workload,
                            limit,
                            ["-c", str(REQUESTED)],
                            True,
                            acks == "late",
                            extra,
                            label=label,
                        )
                        print("  " + show(out, best.seconds if best else None), flush=True)
        finally:
            redis.close()


if __name__ == "__main__":
    main()
