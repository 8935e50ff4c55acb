"""The measured per-child cost, kept across restarts (``CELERY_GUARD_STATE_FILE``).

JSON, never pickle: the file may outlive the code that wrote it, and reading it must
never run anything. Written atomically with mode 0600; a file that cannot be read or
parsed is ignored (the caller logs why) and the estimate is measured afresh.

It is read at every worker start, before the pool forks, so reading it never raises and
never blocks: only a regular file is opened (a FIFO would block ``open``, /dev/zero never
ends), with O_NONBLOCK in case one is swapped in after the check, and at most MAX_BYTES
are read. A cost no machine can have (above physical memory, below one page) would fix
the pool's size for good: refused too.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import mmap
import os
import stat
import tempfile
import time
from collections.abc import Callable
from typing import Any

from . import cgroups
from .logline import emit

VERSION = 1
#: The file is about 150 bytes; anything larger was not written by ``save``.
MAX_BYTES = 64 * 1024
#: Digits of a JSON integer: more are not a byte count (and int() refuses 4300+).
_MAX_DIGITS = 30
#: The ceiling when physical memory cannot be read: 1 PiB.
_NO_MACHINE_HAS = 1 << 50
NO_FILE = "no state file yet"


def _physical() -> int:
    found, _ = cgroups.physical_memory()
    return found or _NO_MACHINE_HAS


def _read(path: str) -> tuple[bytes | None, str]:
    """The file's bytes, or (None, why not), from a regular file only, without blocking."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None, "unreadable: not a regular file"
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None, NO_FILE
    except (OSError, ValueError) as error:  # ValueError: a NUL in the path
        return None, f"unreadable: {getattr(error, 'strerror', None) or error}"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # swapped since the check
            return None, "unreadable: not a regular file"
        if info.st_size > MAX_BYTES:
            return None, f"unreadable: larger than {MAX_BYTES} bytes"
        if _planted(path, info):
            return None, "unreadable: another user's file in a directory anyone may write"
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(MAX_BYTES + 1)
        if len(data) > MAX_BYTES:  # grew since the fstat
            return None, f"unreadable: larger than {MAX_BYTES} bytes"
        return data, ""
    except OSError as error:
        return None, f"unreadable: {error.strerror or error}"
    finally:
        os.close(fd)


def _planted(path: str, info: os.stat_result) -> bool:
    """A file another user (not root) may have put there for us to trust: theirs, in a
    directory anyone may write to (``/tmp``)."""
    if info.st_uid in (os.geteuid(), 0):
        return False
    directory = os.stat(os.path.dirname(os.path.abspath(path)))
    return bool(directory.st_mode & stat.S_IWOTH)


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_DIGITS:
        raise ValueError("a number too long for a byte count")
    return int(text)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _decode(data: bytes) -> tuple[Any, str]:
    """The JSON value, or (None, why not); nesting too deep is a RecursionError."""
    try:
        return json.loads(
            data.decode("utf-8"), parse_int=_bounded_int, parse_constant=_no_constant
        ), ""
    except UnicodeDecodeError:
        return None, "unreadable: not UTF-8 text"
    except (ValueError, RecursionError) as error:
        return None, f"unreadable: not JSON ({type(error).__name__}: {str(error)[:80]})"


def _record(path: str) -> tuple[dict[str, Any] | None, str]:
    """The file's JSON object of this VERSION, or (None, why not)."""
    data, why = _read(path)
    if data is None:
        return None, why
    record, why = _decode(data)
    if why:
        return None, why
    version = record.get("version") if isinstance(record, dict) else None
    if type(version) is not int or version != VERSION:  # true == 1 in Python
        return None, "unknown format"
    return record, ""


def load(path: str, physical: int | None = None, page: int | None = None) -> tuple[int | None, str]:
    """(child cost in bytes, "") or (None, why it was not used). Never raises, never blocks.
    ``physical`` and ``page`` bound a plausible cost (default: this machine's)."""
    try:
        record, why = _record(path)
        if record is None:
            return None, why
        cost = record.get("child_cost_bytes")
        if type(cost) is not int or cost <= 0:
            return None, "no valid child_cost_bytes"
        low = page if page is not None else mmap.PAGESIZE
        high = physical if physical is not None else _physical()
        if not low <= cost <= high:
            return None, f"implausible child_cost_bytes {cost}: not from {low} to {high}"
        return cost, ""
    except Exception as error:  # noqa: BLE001 - a state file must never stop a worker
        return None, f"unreadable: {type(error).__name__}"


def _sync_directory(directory: str, fsync: Callable[[int], None]) -> None:
    """Make the rename durable: without it a crash may bring back the old file or none.
    File systems that cannot sync a directory say EINVAL; the rename is done anyway."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def save(
    path: str,
    child_cost: int,
    samples: int,
    extra: dict[str, Any] | None = None,
    fsync: Callable[[int], None] = os.fsync,
) -> None:
    """Replace the file atomically: a crash leaves the old file or the new, never half.
    Raises OSError when it cannot, ValueError for a NaN in ``extra``."""
    record = {
        "version": VERSION,
        "child_cost_bytes": int(child_cost),
        "samples": samples,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    _replace(path, record, fsync)


def _replace(path: str, record: dict[str, Any], fsync: Callable[[int], None]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".celery-guard-", dir=directory)  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(record, file, indent=1, allow_nan=False)  # what load would refuse
            file.flush()
            fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_directory(directory, fsync)


def keep(path: str | None, child_cost: int, samples: int) -> None:
    """``save`` for a running worker: a figure not saved (a full disk, a path it may not
    write) is one WARNING line, never an error out of the worker's shutdown or sampler."""
    if path is None or child_cost <= 0 or samples <= 0:
        return
    try:
        save(path, child_cost, samples)
    except (OSError, ValueError, OverflowError) as error:
        emit(logging.WARNING, "history", {"action": "not_saved", "path": path,
                                          "reason": str(error)})  # fmt: skip


# -- memory kills by task id ------------------------------------------------------------
#: The task ids whose memory kills are kept in the file, the latest: a task id and its
#: count take about 50 bytes, so the file stays under MAX_BYTES.
KILLS_KEPT = 1000
_MAX_TASK_ID = 255


def kills_path(state_file: str | None) -> str | None:
    """Where the memory kills are kept: beside the state file, which a worker that keeps
    anything across restarts already has (``CELERY_GUARD_STATE_FILE``)."""
    return None if state_file is None else state_file + ".kills"


def load_kills(path: str) -> tuple[dict[str, int], str]:
    """(memory kills by task id, "") or ({}, why not). Never raises, never blocks: a
    count that cannot be read starts again from none."""
    try:
        record, why = _record(path)
        if record is None:
            return {}, why
        kills = record.get("memory_kills")
        if not isinstance(kills, dict):
            return {}, "unknown format"
        return {
            task_id: count
            for task_id, count in list(kills.items())[-KILLS_KEPT:]
            if len(task_id) <= _MAX_TASK_ID and type(count) is int and count > 0
        }, ""
    except Exception as error:  # noqa: BLE001 - a state file must never stop a worker
        return {}, f"unreadable: {type(error).__name__}"


def recall_kills(path: str) -> dict[str, int]:
    """``load_kills`` for a worker starting: a file there that cannot be used is one
    WARNING line, and counting starts from none."""
    kills, why = load_kills(path)
    if why and why != NO_FILE:
        emit(logging.WARNING, "history", {"action": "ignored", "path": path, "reason": why})
    return kills


def keep_kills(path: str, kills: dict[str, int], fsync: Callable[[int], None] = os.fsync) -> None:
    """Replace the file with the latest KILLS_KEPT counts. Not saved (a full disk, a
    path it may not write) is one WARNING line: the count goes on in memory."""
    latest = dict(list(kills.items())[-KILLS_KEPT:])
    try:
        _replace(path, {"version": VERSION, "memory_kills": latest}, fsync)
    except (OSError, ValueError) as error:
        emit(logging.WARNING, "history", {"action": "not_saved", "path": path,
                                          "reason": str(error)})  # fmt: skip
