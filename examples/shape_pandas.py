"""Shape ``pandas``: a DataFrame of numbers, a category and Python strings (a product
table loaded at import).

Numeric columns are NumPy blocks that tasks read without writing; the object column is a
NumPy array of pointers to Python strings, whose reference counts every task that reads
them writes. The task aggregates by category and reads every string. At
``SHAPE_SCALE=1``: 1M rows, 200k distinct strings.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from shape_common import make_app, scaled

ROWS = scaled(1_000_000)
_names = [f"customer-{i:06d}@example.com" for i in range(scaled(200_000))]
rng = np.random.default_rng(7)
FRAME = pd.DataFrame(
    {
        "amount": rng.random(ROWS) * 100,
        "quantity": rng.integers(1, 20, ROWS),
        "region": pd.Categorical(rng.choice(["north", "south", "east", "west"], ROWS)),
        "customer": pd.Series(
            np.array(_names, dtype=object)[rng.integers(0, len(_names), ROWS)], dtype=object
        ),
    }
)
del _names

app = make_app("shape_pandas")


@app.task
def use() -> tuple[int, float]:
    """Revenue by region, and the length of every customer's address."""
    by_region = FRAME.groupby("region", observed=True)["amount"].sum()
    lengths = sum(len(name) for name in FRAME["customer"].array)
    return os.getpid(), float(by_region.sum()) + lengths
