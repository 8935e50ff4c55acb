"""The measured per-child cost, kept across restarts (``CELERY_GUARD_STATE_FILE``).

JSON, never pickle: the file may outlive the code that wrote it, and reading it must
never run anything. Written atomically with mode 0600; a file that cannot be read or
parsed is ignored (the caller logs why) and the estimate is measured afresh.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from typing import Any

VERSION = 1


def load(path: str) -> tuple[int | None, str]:
    """(child cost in bytes, "") or (None, why it was not used)."""
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except FileNotFoundError:
        return None, "no state file yet"
    except (OSError, ValueError) as error:
        return None, f"unreadable: {error}"
    if not isinstance(data, dict) or data.get("version") != VERSION:
        return None, "unknown format"
    cost = data.get("child_cost_bytes")
    if not isinstance(cost, int) or isinstance(cost, bool) or cost <= 0:
        return None, "no valid child_cost_bytes"
    return cost, ""


def save(path: str, child_cost: int, samples: int, extra: dict[str, Any] | None = None) -> None:
    """Replace the file atomically: a crash leaves the old file or the new, never half."""
    record = {
        "version": VERSION,
        "child_cost_bytes": int(child_cost),
        "samples": samples,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".celery-guard-", dir=directory)  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(record, file, indent=1)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
