"""What a module costs every pool child: imported in a fresh interpreter and measured.

A module imported in the main process is copied into every forked child as the child
touches it, so its cost is paid once per child. Importing each module alone, on top of
Celery and the module that defines the app, shows which imports to make lazy.

Run as ``python -m celery_guard.imports_cost BASE MODULE``, it is the probe itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

PATH_VARIABLE = "CELERY_GUARD_PROBE_PATH"  # the caller's sys.path, as JSON
TIMEOUT = 120  # seconds for one module's import
MAX_RESULT = 4096  # bytes: the figures are about 40


@dataclass(frozen=True)
class Cost:
    module: str
    tasks: int  # tasks the module defines
    child: int | None  # bytes: what one forked child is estimated to copy of it
    rss: int | None  # bytes: what it adds to the main process's RSS
    error: str = ""


def app_module(app: Any) -> str | None:
    """The module whose globals hold ``app``: what every task module imports first."""
    for name, module in list(sys.modules.items()):
        if name == "__main__" or module is None:
            continue
        try:
            if any(value is app for value in vars(module).values()):
                return name
        except TypeError:
            continue
    return None


def task_modules(app: Any) -> dict[str, int]:
    """Module -> number of tasks, for the app's own tasks (not Celery's built-ins)."""
    counts: dict[str, int] = {}
    for name, task in list(app.tasks.items()):
        module = getattr(task, "__module__", None) or getattr(type(task), "__module__", "")
        if name.startswith("celery.") or not module or module.startswith("celery."):
            continue
        counts[module] = counts.get(module, 0) + 1
    return counts


def measure_all(modules: dict[str, int], base: str | None, python: str) -> list[Cost]:
    """Each task module over Celery and ``base``; ``base`` itself over Celery alone."""
    order = ([base] if base else []) + sorted(m for m in modules if m != base)
    try:
        cwd: str | None = os.getcwd()
    except OSError:  # removed under us: Celery then adds nothing either
        cwd = None
    env = {**os.environ, PATH_VARIABLE: json.dumps(probe_path(sys.path, cwd))}
    costs = []
    for module in order:
        below = "" if module == base else (base or "")
        costs.append(_probe(python, below, module, modules.get(module, 0), env))
    return costs


def probe_path(path: list[str], cwd: str | None) -> list[str]:
    """The import path the worker's main process had while it imported the app: ``celery
    -A`` puts the current directory first for that import only (``cwd_in_path``); without
    it a probe could not import an app defined where the command was started."""
    return path if not cwd or cwd in path else [cwd, *path]


def _probe(python: str, base: str, module: str, tasks: int, env: dict[str, str]) -> Cost:
    """Run the probe; its figures come back on a pipe of their own, not on stdout, which
    the module may print on. stderr goes to a file: a process the module started may keep
    a pipe open after the probe exits."""
    read_end, write_end = os.pipe()
    try:
        with tempfile.TemporaryFile() as stderr:
            command = [python, "-m", "celery_guard.imports_cost", base, module, str(write_end)]
            try:
                child = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    env=env,
                    pass_fds=(write_end,),
                )
            except OSError as error:
                return Cost(module, tasks, None, None, f"cannot run {python}: {error.strerror}")
            os.close(write_end)
            write_end = -1
            try:
                child.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                return Cost(module, tasks, None, None, f"import took over {TIMEOUT} s")
            result = _read_result(read_end)
            stderr.seek(max(stderr.seek(0, os.SEEK_END) - MAX_RESULT, 0))
            tail = stderr.read().decode("utf-8", "replace")
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    figures = _figures(result)
    if figures is None:  # written last: without it the import failed, whatever the status
        last = (tail.strip().splitlines() or [f"exit status {child.returncode}, no result"])[-1]
        return Cost(module, tasks, None, None, last[:200])
    return Cost(module, tasks, figures["child"], figures["rss"])


def _read_result(fd: int) -> bytes:
    """What the probe wrote on its pipe, without waiting: it has exited, and a process
    the module forked may still hold the write end."""
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    while sum(map(len, chunks)) <= MAX_RESULT:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _figures(result: bytes) -> dict[str, int] | None:
    """{"child": bytes, "rss": bytes} from the probe's result, or None if it is not that."""
    try:
        figures = json.loads(result.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if not isinstance(figures, dict):
        return None
    values = [figures.get("child"), figures.get("rss")]
    if not all(type(value) is int and value >= 0 for value in values):
        return None
    return {"child": figures["child"], "rss": figures["rss"]}


def _measure() -> tuple[int, int]:
    import gc

    from .footprint import estimate_child, measure, read_allocators

    gc.collect()
    footprint = measure(allocators=read_allocators())
    return estimate_child(footprint).bytes, footprint.rss


def probe(base: str, module: str) -> dict[str, int]:
    """In a fresh interpreter: import Celery and ``base``, measure, import ``module``,
    measure again; the difference is the module's cost."""
    import importlib

    import celery  # noqa: F401 - in every worker before any task module

    if base:
        importlib.import_module(base)
    child_before, rss_before = _measure()
    importlib.import_module(module)
    child_after, rss_after = _measure()
    return {"child": max(child_after - child_before, 0), "rss": max(rss_after - rss_before, 0)}


def main(argv: Iterable[str]) -> int:
    """The probe: ``BASE MODULE FD``, the figures written as JSON to the pipe ``FD``."""
    base, module, fd = list(argv)
    result = int(fd)
    os.set_inheritable(result, False)  # not for what the module starts
    path = os.environ.get(PATH_VARIABLE)
    if path:
        sys.path[:] = json.loads(path)
    figures = json.dumps(probe(base, module)).encode()
    with os.fdopen(result, "wb") as channel:
        channel.write(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
