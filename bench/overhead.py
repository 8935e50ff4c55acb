"""What the guard costs per task: the same no-op tasks through real workers, with and
without celery-guard, in one run.

Usage (redis-server installed; from the repository, after ``bash tests/run.sh``)::

    .venv/bin/python bench/overhead.py [--tasks 3000] [--rounds 5] [--concurrency 1 4]

For each concurrency it alternates unguarded and guarded workers of the example app
(small data, Redis broker and result backend, default guard settings), sends ``--tasks``
no-op tasks per round and times until every result is in. It prints the median time
per variant and the ratio guarded/unguarded. It also times the per-task hook alone.

The example app declares memory limits on two of its tasks (``limited``, ``stubborn``),
so the guarded children run the memory-limit watchdog; ``noop`` declares none: the
ratio is what a task without a limit pays.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests" / "integration"), str(HERE.parent)]

import harness  # noqa: E402

from celery_guard.config import load_settings  # noqa: E402
from celery_guard.telemetry import ChildProbe  # noqa: E402

SMALL_APP = {"HEAVY_APP_OBJECTS": "1000", "HEAVY_APP_BUFFER_MIB": "1"}


def timed_round(
    redis: harness.RedisServer, workdir: Path, concurrency: int, guard: bool, tasks: int, index: int
) -> float:
    env = harness.worker_env(redis, SMALL_APP, guard=guard)
    worker = harness.Worker(
        args=["-c", str(concurrency), "-l", "warning"],
        env=env,
        log_path=workdir / f"w-{concurrency}-{int(guard)}-{index}.log",
    )
    worker.start()
    try:
        # No wait for "ready": at -l warning Celery does not log it; the warm-up's
        # results coming back show the worker consumes.
        warm = harness.send_tasks(redis, worker.queue, "noop", 200)
        assert harness.wait_for_results(warm, 120)
        start = time.perf_counter()
        results = harness.send_tasks(redis, worker.queue, "noop", tasks)
        assert harness.wait_for_results(results, 600)
        return time.perf_counter() - start
    finally:
        worker.stop()


def hook_cost() -> float:
    """Seconds per call of the per-task hook, as a child runs it (no line logged)."""
    probe = ChildProbe(None, "bench@host", load_settings({}, {}), max_memory_kib=0)
    probe.on_child_start()

    class Task:
        name = "bench.noop"

    task = Task()
    calls = 100_000
    return timeit.timeit(lambda: probe.after_task(task_id="x", task=task), number=calls) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    options = parser.parse_args()
    print(f"per-task hook alone: {hook_cost() * 1e6:.2f} us per task")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        redis = harness.RedisServer(workdir)
        try:
            for concurrency in options.concurrency:
                times: dict[bool, list[float]] = {False: [], True: []}
                for index in range(options.rounds):
                    for guard in (False, True) if index % 2 == 0 else (True, False):
                        times[guard].append(
                            timed_round(redis, workdir, concurrency, guard, options.tasks, index)
                        )
                plain, guarded = statistics.median(times[False]), statistics.median(times[True])
                print(
                    f"-c {concurrency}: {options.tasks} no-op tasks, median of {options.rounds}:"
                    f" unguarded {plain:.3f} s, guarded {guarded:.3f} s,"
                    f" ratio {guarded / plain:.3f}"
                )
        finally:
            redis.close()


if __name__ == "__main__":
    main()
