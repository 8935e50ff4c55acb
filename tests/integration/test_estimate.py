"""The child estimate against real children, per shape of app (``examples/shape_*.py``):
real ``celery worker`` processes in real cgroup-v1 memory cgroups, a real Redis.

For each shape, at a small scale so the whole file takes a few minutes, the guarded worker
runs at 1 and at 3 children; every child runs its ``use`` tasks (which read the data the
app imported); the measured cost of one child is the growth of the cgroup's working set per
added child. The startup estimate must be within 10% of it either way. ``bench/estimate.py``
measures the same at full scale, with more children.
"""

from __future__ import annotations

import sys
from pathlib import Path

import harness
import needs
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import estimate

SCALE = 0.25
SHAPES = [
    pytest.param("numpy"),
    pytest.param("dicts"),
    pytest.param("lists"),
    pytest.param("registry"),
    pytest.param(
        "pandas",
        marks=pytest.mark.xfail(
            strict=True,
            reason="the task runs pandas' own code (a group-by), whose code objects and "
            "caches each child then writes: library code a task runs, which the census "
            "does not count (bench/estimate.py --shape pandas --scale 0.25: ratio 0.82)",
        ),
    ),
    pytest.param("cext"),
]


@pytest.mark.cgroup
@pytest.mark.parametrize("shape", SHAPES)
def test_estimate_within_ten_percent(
    shape: str, redis: harness.RedisServer, cgroup_root: Path, tmp_path: Path
) -> None:
    needs.module({"numpy": "numpy", "pandas": "pandas", "cext": "lxml"}.get(shape, "os"))
    runner = estimate.Runner(tmp_path, SCALE, redis=redis, root=cgroup_root)
    guess, measured = runner.cost(shape, low=1, high=3)
    assert 0.9 * measured <= guess <= 1.1 * measured, (
        f"{shape}: estimate {guess / harness.MIB:.1f} MiB, "
        f"measured {measured / harness.MIB:.1f} MiB per child"
    )
