"""A lighter task module of the example app (``HEAVY_APP_REPORTS=1``): a report table
of about 8 MiB of small objects, to set beside ``heavy_app`` in ``guard imports``."""

from __future__ import annotations

import os

from heavy_app import app

ROWS = int(os.environ.get("HEAVY_REPORTS_ROWS", "40000"))
TABLE = [(f"region-{i % 50}", i, float(i) / 3) for i in range(ROWS)]


@app.task
def totals() -> int:
    return sum(amount for _, amount, _ in TABLE)
