"""The integration tests' fixtures: real Redis, real memory cgroups, real workers (see
tests/integration/harness.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness


def _unavailable(reason: str) -> None:
    if harness.STRICT:
        pytest.fail(f"{reason} (GUARD_TESTS_STRICT=1: real parts are required here)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.RedisServer]:
    try:
        server = harness.RedisServer(tmp_path_factory.mktemp("redis"))
    except harness.Unavailable as error:
        _unavailable(str(error))
    yield server
    server.close()


@pytest.fixture(scope="session")
def cgroup_root() -> Path:
    try:
        return harness.own_memory_cgroup()
    except harness.Unavailable as error:
        _unavailable(str(error))
        raise


@pytest.fixture
def make_cgroup(cgroup_root: Path) -> Iterator[Callable[..., harness.Cgroup]]:
    made: list[harness.Cgroup] = []

    def make(limit: int | None = None) -> harness.Cgroup:
        made.append(harness.Cgroup(cgroup_root, limit))
        return made[-1]

    yield make
    for group in reversed(made):
        group.close()


@pytest.fixture
def make_worker(tmp_path: Path) -> Iterator[Callable[..., harness.Worker]]:
    started: list[harness.Worker] = []

    def make(
        args: list[str],
        env: dict[str, str],
        cgroup: harness.Cgroup | None = None,
        queue: str | None = None,
    ) -> harness.Worker:
        log = tmp_path / f"worker-{len(started)}.log"
        worker = harness.Worker(args=args, env=env, log_path=log, cgroup=cgroup)
        if queue is not None:  # another worker for the same queue, as after a restart
            worker.queue = queue
        started.append(worker.start())
        return worker

    yield make
    for worker in started:
        worker.stop()
