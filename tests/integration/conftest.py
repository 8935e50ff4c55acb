"""The integration tests' fixtures: real Redis, real memory cgroups, real workers (see
harness/, which bench/ uses too). A part that is missing skips the test with the reason;
``GUARD_TESTS_STRICT=1`` turns the skip into a failure. A test marked ``cgroup`` needs a
writable cgroup-v1 memory controller, whether or not it asks for a cgroup fixture."""

from __future__ import annotations

import functools
import gc
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # needs
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # harness

from needs import unavailable as _unavailable

import harness


@functools.cache
def _memory_cgroup() -> Path | harness.Unavailable:
    """This process's cgroup-v1 memory directory, or why there is none; looked for once."""
    try:
        return harness.own_memory_cgroup()
    except harness.Unavailable as error:
        return error


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked ``cgroup`` skips (or fails, strict) where no writable cgroup-v1 memory
    controller exists, before any of its fixtures starts."""
    if item.get_closest_marker("cgroup") is not None:
        found = _memory_cgroup()
        if isinstance(found, harness.Unavailable):
            _unavailable(str(found))


@pytest.fixture(scope="session")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.RedisServer]:
    try:
        server = harness.RedisServer(tmp_path_factory.mktemp("redis"))
    except harness.Unavailable as error:
        _unavailable(str(error))
    yield server
    # Results the tests dropped unsubscribe from the backend when they are collected: let
    # them do it while Redis still answers, not at the interpreter's exit (with Celery 5.3
    # that ends the run with "Exception ignored in AsyncResult.__del__" and a failed exit).
    gc.collect()
    server.close()


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.RabbitServer]:
    try:
        server = harness.RabbitServer(tmp_path_factory.mktemp("rabbitmq"))
    except harness.Unavailable as error:
        _unavailable(str(error))
    yield server
    gc.collect()
    server.close()


@pytest.fixture
def make_rabbitmq(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., harness.RabbitServer]]:
    """Private RabbitMQ nodes for one test, which sets the server's ``consumer_timeout`` or
    stops and restarts the node; stopped after the test."""
    started: list[harness.RabbitServer] = []

    def make(consumer_timeout: float | None = None) -> harness.RabbitServer:
        try:
            server = harness.RabbitServer(tmp_path_factory.mktemp("rabbitmq"), consumer_timeout)
        except harness.Unavailable as error:
            _unavailable(str(error))
        started.append(server)
        return server

    yield make
    gc.collect()
    for server in started:
        server.close()


@pytest.fixture(scope="session")
def cgroup_root() -> Path:
    found = _memory_cgroup()
    if isinstance(found, harness.Unavailable):
        _unavailable(str(found))
        raise found
    return found


@pytest.fixture
def make_cgroup(cgroup_root: Path) -> Iterator[Callable[..., harness.Cgroup]]:
    made: list[harness.Cgroup] = []

    def make(limit: int | None = None) -> harness.Cgroup:
        made.append(harness.Cgroup(cgroup_root, limit))
        return made[-1]

    yield make
    for group in reversed(made):
        group.close()


WORKERS = pytest.StashKey[list[harness.Worker]]()
LOG_TAIL = 150  # lines of each worker's log a failed test's report shows


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report ends with its workers' logs: a failure seen once in CI is
    explained by what the worker said, not lost with the run's temporary files."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    for number, worker in enumerate(item.stash.get(WORKERS, [])):
        try:
            lines = worker.log.splitlines()[-LOG_TAIL:]
        except OSError as error:
            lines = [f"(unreadable: {error})"]
        report.sections.append((f"worker {number} log, last {LOG_TAIL} lines", "\n".join(lines)))


@pytest.fixture
def make_worker(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., harness.Worker]]:
    started: list[harness.Worker] = []
    request.node.stash[WORKERS] = started

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
