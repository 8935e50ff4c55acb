"""An import-heavy Celery app: the kind of worker the prefork pool multiplies.

At import it builds what real apps carry in every process: a catalogue of many small
Python objects (ORM rows, vocabularies, registries) and a large read-only buffer (a model,
a lookup table). The startup line's ``parent_rss_mib`` says what the parent holds; every
forked child starts as a copy.

Settings come from the environment so tests and the demo share one app:
``HEAVY_APP_BROKER`` (default ``filesystem://``), ``HEAVY_APP_BACKEND``,
``HEAVY_APP_DATA_DIR`` (folder for the filesystem broker and result backend),
``HEAVY_APP_OBJECTS`` and ``HEAVY_APP_BUFFER_MIB`` (the size of what is imported),
``HEAVY_APP_CHILD_START_SECONDS`` (CPU seconds each pool child spends starting, as a
child that loads a model in ``worker_process_init`` does: a dear fork),
``HEAVY_APP_REPORTS=1`` to import a second, lighter task module (``heavy_reports``),
``HEAVY_APP_DEQUE=N`` to hold N distinct ints in a ``collections.deque``,
``HEAVY_APP_PROXY=1`` to hold an unbound Werkzeug ``LocalProxy`` (as a Flask app does),
``HEAVY_APP_VISIBILITY_TIMEOUT`` (seconds: Redis' ``visibility_timeout``),
``HEAVY_APP_CONSUMER_TIMEOUT`` (seconds: the RabbitMQ server's ``consumer_timeout``),
``HEAVY_APP_CONTAINERS=1`` to hold the catalogue in lists, which the garbage collector
tracks (tuples of numbers and strings it stops tracking), ``HEAVY_APP_ACKS_LATE=1`` for
``task_acks_late`` with ``task_reject_on_worker_lost`` (a task whose child is killed goes
back to the queue), and ``HEAVY_APP_GUARD=0`` to run the same app without celery-guard.
"""

from __future__ import annotations

import gc
import logging
import os
import time

from celery import Celery, signals

OBJECTS = int(os.environ.get("HEAVY_APP_OBJECTS", "300000"))
BUFFER_MIB = int(os.environ.get("HEAVY_APP_BUFFER_MIB", "48"))

#: Small objects: every task that reads them writes their reference counts, so each
#: child ends up with its own copy of the pages that hold them.
CATALOG: dict[str, tuple[int, str, float] | list[object]] = {
    f"item-{i}": (i, f"name-{i}", float(i)) for i in range(OBJECTS)
}
if os.environ.get("HEAVY_APP_CONTAINERS") == "1":
    CATALOG = {key: list(value) for key, value in CATALOG.items()}
#: One large buffer: reading it never writes to its pages, so children keep sharing it.
BUFFER = bytes(range(256)) * (BUFFER_MIB * 1024 * 1024 // 256)

_broker = os.environ.get("HEAVY_APP_BROKER", "filesystem://")
_data_dir = os.environ.get("HEAVY_APP_DATA_DIR", "/tmp/celery-guard-demo")
app = Celery(
    "heavy_app",
    broker=_broker,
    backend=os.environ.get("HEAVY_APP_BACKEND", f"file://{_data_dir}/results"),
)
app.conf.worker_hijack_root_logger = True
if os.environ.get("HEAVY_APP_VISIBILITY_TIMEOUT"):  # Redis re-delivers unacked tasks after it
    app.conf.broker_transport_options = {
        "visibility_timeout": float(os.environ["HEAVY_APP_VISIBILITY_TIMEOUT"])
    }
if os.environ.get("HEAVY_APP_CONSUMER_TIMEOUT"):  # what the RabbitMQ server was given
    app.conf.broker_transport_options = {
        "consumer_timeout": float(os.environ["HEAVY_APP_CONSUMER_TIMEOUT"])
    }
if os.environ.get("HEAVY_APP_ACKS_LATE") == "1":
    app.conf.task_acks_late = True
    app.conf.task_reject_on_worker_lost = True
if _broker.startswith("filesystem://"):
    for sub in ("queue", "results", "control"):
        os.makedirs(os.path.join(_data_dir, sub), exist_ok=True)
    queue_dir = os.path.join(_data_dir, "queue")
    app.conf.broker_transport_options = {
        "data_folder_in": queue_dir,
        "data_folder_out": queue_dir,
        "control_folder": os.path.join(_data_dir, "control"),
    }

if os.environ.get("HEAVY_APP_DEQUE"):  # a work queue kept at module level
    import collections

    QUEUE = collections.deque(range(int(os.environ["HEAVY_APP_DEQUE"])))

if os.environ.get("HEAVY_APP_PROXY") == "1":  # flask.request, outside a request
    from contextvars import ContextVar

    from werkzeug.local import LocalProxy

    REQUEST = LocalProxy(ContextVar("request"))

if os.environ.get("HEAVY_APP_OPEN_FILES"):  # an app that holds many descriptors at import
    import resource

    _wanted = int(os.environ["HEAVY_APP_OPEN_FILES"])
    _soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(_soft, _wanted + 256), _hard))
    OPEN_FILES = [os.open(os.devnull, os.O_RDONLY) for _ in range(_wanted)]

if os.environ.get("HEAVY_APP_BAD_LIMIT") == "1":  # a typo in a task's limit

    @app.task(name="heavy_app.typo", memory_limit="lots")
    def typo() -> None:
        return None


if os.environ.get("HEAVY_APP_ANNOTATE") == "1":  # a memory limit set from outside the task
    app.conf.task_annotations = {"heavy_app.hog": {"memory_limit": "100M"}}
if os.environ.get("HEAVY_APP_REPORTS") == "1":
    app.conf.imports = ("heavy_reports",)  # a second task module, for `guard imports`
if os.environ.get("HEAVY_APP_GUARD", "1") != "0":
    import celery_guard

    # The one line `app.steps["worker"].add(MemoryGuard)` is enough; install() also
    # adds the --guard-* options to `celery worker`.
    celery_guard.install(app)


if os.environ.get("HEAVY_APP_JSON_LOGS") == "1":  # a JSON log pipeline's formatter

    @signals.after_setup_logger.connect
    def _json_logs(logger: logging.Logger, **_: object) -> None:
        from pythonjsonlogger.json import JsonFormatter

        for handler in logger.handlers:
            handler.setFormatter(JsonFormatter("%(levelname)s %(name)s %(message)s"))


CHILD_START_SECONDS = float(os.environ.get("HEAVY_APP_CHILD_START_SECONDS", "0"))


@signals.worker_process_init.connect
def _child_started(**_: object) -> None:
    """One line per forked pool child, so a reader (or a test) can count forks; with
    ``HEAVY_APP_CHILD_START_SECONDS``, the CPU a child spends warming up first."""
    until = time.process_time() + CHILD_START_SECONDS
    while time.process_time() < until:
        pass
    logging.getLogger("heavy_app").warning("heavy_app pool child started pid=%d", os.getpid())


@signals.task_failure.connect
def _task_failed(
    task_id: str | None = None, exception: BaseException | None = None, **_: object
) -> None:
    """One line per failed task with the exception's class, as a monitoring hook sees it."""
    logging.getLogger("heavy_app").warning(
        "heavy_app task failed id=%s exception=%s", task_id, type(exception).__name__
    )


@app.task
def walk() -> int:
    """Read every catalogue entry, as a report or a search index rebuild would."""
    total = 0
    for key, (number, name, value) in CATALOG.items():
        total += number + len(name) + len(key) + int(value)
    return total


#: What ``leak`` keeps: a child that runs it grows by exactly what it was asked to.
_LEAKED: list[bytes] = []


@app.task
def leak(mib: int, seconds: float = 0.0) -> int:
    """Keep ``mib`` MiB for the life of the child: a cache that is never trimmed."""
    _LEAKED.append(b"x" * (mib * 1024 * 1024))
    time.sleep(seconds)
    return len(_LEAKED)


#: What ``churn`` keeps, as an app's caches do.
_KEPT: list[bytearray] = []


@app.task
def churn(mib: int) -> int:
    """Allocate ``2 * mib`` blocks of 1 MiB, keep every other one for the life of the child
    (a cache) and free the rest. Once glibc has unmapped one such block it serves the next
    ones from its heap, and with the kept blocks between them it cannot give the freed ones
    back on its own: the child keeps ``2 * mib`` MiB where it uses ``mib``, unless the heap
    is trimmed."""
    bytearray(1 << 20)  # mapped, then unmapped: glibc raises its mmap threshold past it
    blocks = []
    for _ in range(2 * mib):
        block = bytearray(1 << 20)
        for offset in range(0, len(block), 4096):  # touch every page: make it resident
            block[offset] = 1
        blocks.append(block)
    _KEPT.extend(blocks[1::2])
    del blocks, block
    return os.getpid()


@app.task
def hog(mib: int, seconds: float = 1.0) -> int:
    """Use ``mib`` MiB for a moment, as a task that loads a large file would."""
    block = bytearray(mib * 1024 * 1024)
    for offset in range(0, len(block), 4096):  # touch every page: make it resident
        block[offset] = 1
    time.sleep(seconds)
    return len(block)


def _grow_in_steps(mib: int, step_mib: int, held: list[bytearray]) -> None:
    for _ in range(mib // step_mib):
        block = bytearray(step_mib * 1024 * 1024)
        for offset in range(0, len(block), 4096):  # touch every page: make it resident
            block[offset] = 1
        held.append(block)
        time.sleep(0.02)


@app.task(memory_limit="160M", soft_memory_limit="96M")
def limited(mib: int, step_mib: int = 8, on_soft: str = "raise") -> int:
    """Grow by ``mib`` MiB in steps, within its own memory limits. At its soft limit it
    lets the exception go (``raise``), stops and returns what it got through (``return``:
    partial work), or goes on towards its hard limit (``continue``)."""
    from celery_guard import SoftMemoryLimitExceeded

    held: list[bytearray] = []
    while len(held) * step_mib < mib:
        try:
            _grow_in_steps(step_mib, step_mib, held)
        except SoftMemoryLimitExceeded:
            if on_soft == "raise":
                raise
            if on_soft == "return":
                break
    return len(held) * step_mib


@app.task(memory_limit="96M")
def stubborn(mib: int) -> int:
    """Grow and swallow every exception, its memory limit's included: only stopping its
    child stops it."""
    held: list[bytearray] = []
    while len(held) * 8 < mib:
        try:
            _grow_in_steps(8, 8, held)
        except Exception:  # noqa: BLE001 - the point of this task
            continue
    return len(held)


@app.task
def forge() -> int:
    """Write garbage to the guard's pipe, as anything a task forks could: records with
    huge numbers, unknown pids, binary, a line cut short. Returns the bytes written."""
    from celery.app import trace

    written = 0
    # the guard's probe: around Celery's tracer in a child, else a task signal's receiver
    hooks = [trace.fast_trace_task, *(r[1] for r in signals.task_postrun.receivers)]
    for hook in hooks:
        probe = getattr(hook, "__self__", None)
        channel = getattr(probe, "channel", None)
        if channel is None:
            continue
        for line in (
            b"T 1 " + b"9" * 3900 + b" 1 1 1 1 -1 heavy_app.forged\n",
            b"T 424242 1 1 1 1 1 -1 heavy_app.forged\n",
            b"L 1 hard 1 2 id heavy_app.forged\n",
            bytes(range(256)) + b"\n",
            b"T 1 1 1 1 1 1 -1 heavy_app.cut-",  # no end of line
        ):
            written += os.write(channel, line)
    return written


@app.task
def collect() -> int:
    """A full collection in the child: what the collector does on its own, sooner or later."""
    return gc.collect()


@app.task
def read_file(path: str, times: int = 1, seconds: float = 0.0) -> int:
    """Read a file ``times`` times, 1 MiB at a time, keeping none of it, then sleep
    ``seconds``: the pages stay in the page cache (charged to the cgroup, reclaimable) and
    the child allocates nothing."""
    read = 0
    for _ in range(times):
        with open(path, "rb", buffering=0) as file:
            while chunk := file.read(1 << 20):
                read += len(chunk)
    time.sleep(seconds)
    return read


@app.task
def noop() -> None:
    return None


@app.task
def add(x: int, y: int) -> int:
    return x + y
