"""What every corpus app shares: its Celery app, configured from the environment the
bench sets (``make_app``, the shape apps' own: ``examples/shape_common.py``), with the
guard unless the bench asks for none.

The apps themselves are written the way their libraries' users write Celery tasks: data
loaded at import (shared by the pool's children until they write to it), tasks that read
all of it, a part, or none; per-child caches; leaks through module state. Nothing in
them is shaped to the guard's estimator.

Variables (the names the test harness sets for every app it starts; ``examples/`` is on
the workers' path):
``HEAVY_APP_BROKER``, ``HEAVY_APP_BACKEND``, ``HEAVY_APP_ACKS_LATE=1`` (late acks, a lost
child's task rejected), ``HEAVY_APP_GUARD=0`` (no guard). ``CORPUS_DATA`` is a folder for
the files an app builds once (SQLite databases), default ``/tmp/celery-guard-corpus``.
"""

from __future__ import annotations

import os
from pathlib import Path

from shape_common import make_app  # examples/: the same environment as the shape apps

DATA = Path(os.environ.get("CORPUS_DATA", "/tmp/celery-guard-corpus"))


def built_once(path: Path, build) -> Path:
    """A file built by the first process that needs it (written aside, then renamed): the
    workers of later runs open it as a deployed app opens its database."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        build(partial)
        os.replace(partial, path)
    return path


__all__ = ["DATA", "built_once", "make_app"]
