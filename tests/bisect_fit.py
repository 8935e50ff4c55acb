"""Find the largest concurrency at which vanilla Celery runs the workload in a cgroup.

Usage (root, cgroup v1, redis-server installed)::

    python tests/bisect_fit.py --limit 768M [--high 16] [--guarded]

Each trial starts the example app *without* celery-guard at concurrency N in a fresh
memory cgroup, sends 3*N ``walk`` tasks (each child reads the whole catalogue), and
passes when every task completes with no OOM kill. The integration tests cite the
result; this script is how to reproduce it. ``--guarded`` also runs the guarded worker
at ``--high`` and prints its startup line.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness

from celery_guard.sizes import parse_size


def trial(
    redis: harness.RedisServer,
    root: Path,
    limit: int,
    concurrency: int,
    workdir: Path,
    guard: bool = False,
) -> tuple[bool, harness.Worker, harness.Cgroup]:
    group = harness.Cgroup(root, limit)
    worker = harness.Worker(
        args=["-c", str(concurrency)],
        env=harness.worker_env(redis, guard=guard),
        log_path=workdir / f"trial-{concurrency}-{int(guard)}.log",
        cgroup=group,
    )
    ok = False
    try:
        worker.start()
        try:
            worker.wait_ready(60)
        except AssertionError:
            return False, worker, group
        results = harness.send_tasks(redis, worker.queue, "walk", 3 * concurrency)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if group.oom_kills() or worker.process.poll() is not None:
                break
            if all(r.ready() for r in results):
                ok = all(r.successful() for r in results)
                break
            time.sleep(0.2)
        ok = ok and group.oom_kills() == 0
        return ok, worker, group
    finally:
        worker.stop()
        print(
            f"  c={concurrency:2d} guard={guard} ok={ok} oom_kills={group.oom_kills()} "
            f"max_usage={group.max_usage() / harness.MIB:.0f}MiB",
            flush=True,
        )
        group.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", required=True, help="cgroup limit, e.g. 768M")
    parser.add_argument("--high", type=int, default=16)
    parser.add_argument("--guarded", action="store_true")
    options = parser.parse_args()
    limit = parse_size(options.limit)
    root = harness.own_memory_cgroup()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        redis = harness.RedisServer(workdir)
        try:
            low, high = 0, options.high  # low fits (0 trivially), high+1 assumed not to
            ok, *_ = trial(redis, root, limit, high, workdir)
            if ok:
                low = high
            while high - low > 1 and not ok:
                middle = (low + high) // 2
                ok_mid, *_ = trial(redis, root, limit, middle, workdir)
                low, high = (middle, high) if ok_mid else (low, middle)
            print(f"limit={options.limit} largest concurrency that runs the workload: {low}")
            if options.guarded:
                ok, worker, _ = trial(redis, root, limit, options.high, workdir, guard=True)
                print(f"guarded -c {options.high}: ok={ok}")
                print([line for line in worker.log.splitlines() if "celery-guard" in line])
        finally:
            redis.close()


if __name__ == "__main__":
    main()
