"""Shape ``lists``: many small lists (mutable rows), containers the garbage collector
tracks for as long as they live.

Without ``gc.freeze()`` before the fork, a full collection in a child writes the header of
every tracked container it shares with the main process, so the child copies them even
where no task reads them; with it, only what tasks read is copied. The task reads every
row and then collects, as a long-running child does sooner or later. At
``SHAPE_SCALE=1``: 300k rows.
"""

from __future__ import annotations

import gc
import os
from typing import Any

from shape_common import make_app, scaled

ROWS: list[list[Any]] = [[i, f"row {i}", i * 0.25] for i in range(scaled(300_000))]

app = make_app("shape_lists")


@app.task
def use() -> tuple[int, int]:
    """Read every row, then run a full collection."""
    total = 0
    for number, name, value in ROWS:
        total += number + len(name) + int(value)
    gc.collect()
    return os.getpid(), total
