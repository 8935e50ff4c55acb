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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

PATH_VARIABLE = "CELERY_GUARD_PROBE_PATH"  # the caller's sys.path, as JSON
TIMEOUT = 120  # seconds for one module's import


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
    env = {**os.environ, PATH_VARIABLE: json.dumps(sys.path)}
    costs = []
    for module in order:
        below = "" if module == base else (base or "")
        costs.append(_probe(python, below, module, modules.get(module, 0), env))
    return costs


def _probe(python: str, base: str, module: str, tasks: int, env: dict[str, str]) -> Cost:
    command = [python, "-m", "celery_guard.imports_cost", base, module]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=TIMEOUT, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return Cost(module, tasks, None, None, f"import took over {TIMEOUT} s")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Cost(module, tasks, None, None, last[:200])
    figures = json.loads(lines[-1])
    return Cost(module, tasks, figures["child"], figures["rss"])


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
    base, module = list(argv)
    path = os.environ.get(PATH_VARIABLE)
    if path:
        sys.path[:] = json.loads(path)
    print(json.dumps(probe(base, module)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
