"""A module-level cache (``functools.lru_cache``) and a dict of records: each pool child
builds its own cache as it runs tasks (a slow leak that stops at the cache's size).

- ``price_history``: a costly computation per product, cached per child (unbounded cache:
  grows with every new product the child sees);
- ``lookup``: one record of the dict loaded at import (reads a part).
"""

from __future__ import annotations

import functools
import random

from corpus_common import make_app

RECORDS = {f"sku-{i}": {"name": f"product {i}", "stock": i % 50} for i in range(200_000)}
app = make_app("cache_lookups")


@functools.cache
def _history(product: int) -> tuple[float, ...]:
    rows = random.Random(product)
    return tuple(rows.random() * 100 for _ in range(25_000))  # about 0.8 MiB


@app.task
def price_history(product: int) -> float:
    history = _history(product)
    return sum(history[-30:]) / 30


@app.task
def lookup(sku: int) -> int:
    return RECORDS[f"sku-{sku % 200_000}"]["stock"]
