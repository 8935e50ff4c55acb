"""Shape ``dicts``: a large dict of small tuples (an ORM cache, a vocabulary), the kind of
catalogue a task walks entry by entry.

Tuples of numbers and strings are not tracked by the garbage collector once it has seen
them; every task that reads an entry writes the reference counts of the key, the tuple
and its items, so each child copies the pages that hold them. The dict's hash table is
read, never written. At ``SHAPE_SCALE=1``: 200k entries.
"""

from __future__ import annotations

import os

from shape_common import make_app, scaled

CATALOG: dict[str, tuple[int, str, float]] = {
    f"sku-{i:07d}": (i, f"product name {i}", i * 0.5) for i in range(scaled(200_000))
}

app = make_app("shape_dicts")


@app.task
def use() -> tuple[int, int]:
    """Read every entry, as a report or a search-index rebuild would."""
    total = 0
    for key, (number, name, price) in CATALOG.items():
        total += number + len(name) + len(key) + int(price)
    return os.getpid(), total
