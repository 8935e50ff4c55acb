"""The cgroup-v2 lane's fixtures: real Redis, real cgroup-v2 memory cgroups, real workers.

These tests need a kernel whose memory controller is on cgroup v2; this project's CI host
binds it to v1, so ``tests/v2/run`` boots one in a qemu guest and runs them there. The
main run (``pytest`` from the root, ``testpaths = tests``) must not collect them: on the
v1 host, under ``GUARD_TESTS_STRICT=1``, each would fail for want of v2. So they are
collected only when named (``pytest tests/v2``...) or in the lane
(``CELERY_GUARD_V2_LANE=1``, which ``tests/v2/run`` sets). Named on a v1 host they skip
with the reason (fail under strict mode), through ``needs.unavailable``.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # needs, integration
sys.path.insert(0, str(HERE.parents[1]))  # harness

from integration.conftest import (  # noqa: E402 - after the paths; fixtures and the log hook
    make_worker,
    pytest_runtest_makereport,
    redis,
)
from needs import unavailable  # noqa: E402

import harness  # noqa: E402

__all__ = ["make_worker", "pytest_runtest_makereport", "redis"]

LANE = os.environ.get("CELERY_GUARD_V2_LANE") == "1"


def _named(config: pytest.Config) -> bool:
    """Was this folder (or a file in it) named on the command line?"""
    if config.args_source is not pytest.Config.ArgsSource.ARGS:
        return False  # testpaths or the current folder: the main run
    for arg in config.args:
        path = Path(config.invocation_params.dir, arg.split("::")[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Leave this folder to the lane (or to a run that names it)."""
    if LANE or _named(config):
        return None
    return collection_path == HERE or HERE in collection_path.parents


@functools.cache
def _v2_cgroup() -> Path | harness.Unavailable:
    """Where test cgroups go (this process's own cgroup-v2 directory), or why there is none;
    looked for once."""
    try:
        return harness.own_memory_cgroup_v2()
    except harness.Unavailable as error:
        return error


@pytest.fixture(scope="session")
def v2_root() -> Path:
    found = _v2_cgroup()
    if isinstance(found, harness.Unavailable):
        unavailable(str(found))
    return found


@pytest.fixture
def make_v2_cgroup(v2_root: Path) -> Iterator[Callable[..., harness.CgroupV2]]:
    """cgroup-v2 memory cgroups for one test, removed (their processes killed) after it."""
    made: list[harness.CgroupV2] = []

    def make(limit: int | None = None, oom_group: bool = False) -> harness.CgroupV2:
        made.append(harness.CgroupV2(v2_root, limit, oom_group=oom_group))
        return made[-1]

    yield make
    for group in reversed(made):
        group.close()
