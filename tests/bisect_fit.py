"""Find the largest concurrency at which vanilla Celery runs the workload in a cgroup.

Usage (root, cgroup v1, redis-server installed)::

    .venv/bin/python tests/bisect_fit.py --limit 1G [--high 16] [--guarded]

Each trial starts the example app *without* celery-guard at concurrency N in a fresh
memory cgroup, sends 3*N ``walk`` tasks (each child reads the whole catalogue), and
passes when every task completes with no OOM kill. The integration tests cite and
re-check the result; this script is how to find it. ``--guarded`` also starts the guarded
worker at ``--high`` and prints its startup line.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness
from celery_guard.sizes import parse_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", required=True, help="cgroup limit, e.g. 1G")
    parser.add_argument("--high", type=int, default=16)
    parser.add_argument("--guarded", action="store_true")
    options = parser.parse_args()
    limit = parse_size(options.limit)
    root = harness.own_memory_cgroup()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        redis = harness.RedisServer(workdir)

        def trial(concurrency: int, guard: bool = False) -> bool:
            group = harness.Cgroup(root, limit)
            log = workdir / f"trial-{concurrency}-{int(guard)}.log"
            try:
                ok = harness.runs_walk_workload(redis, group, concurrency, log, guard)
                print(
                    f"  c={concurrency:2d} guard={guard} ok={ok} oom_kills={group.oom_kills()}"
                    f" max_usage={group.max_usage() / harness.MIB:.0f}MiB",
                    flush=True,
                )
                if guard:
                    print(
                        *[line for line in log.read_text().splitlines() if "celery-guard" in line],
                        sep="\n",
                    )
                return ok
            finally:
                group.close()

        try:
            low, high = 0, options.high + 1  # low runs it (0 trivially); high does not
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (middle, high) if trial(middle) else (low, middle)
            print(f"limit={options.limit}: vanilla runs the workload at {low}, not at {high}")
            if options.guarded:
                trial(options.high, guard=True)
        finally:
            redis.close()


if __name__ == "__main__":
    main()
