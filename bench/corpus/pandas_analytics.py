"""Analytics on pandas/numpy: a frame of events loaded at import, reports per task.

- ``daily_summary``: a group-by over every row (reads all: strings and numbers);
- ``top_users``: the largest values of one numeric column (reads a part);
- ``sample``: a few rows (reads almost nothing).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from corpus_common import make_app

ROWS = 800_000
_random = np.random.default_rng(3)
EVENTS = pd.DataFrame(
    {
        "user": _random.integers(0, 50_000, ROWS),
        "kind": pd.Series(_random.choice(["view", "click", "buy", "share"], ROWS)),
        "page": [f"/page/{n}" for n in _random.integers(0, 20_000, ROWS)],
        "amount": _random.random(ROWS) * 100,
        "day": _random.integers(0, 365, ROWS),
    }
)

app = make_app("pandas_analytics")


@app.task
def daily_summary() -> int:
    summary = EVENTS.groupby(["day", "kind"]).agg(
        users=("user", "nunique"), amount=("amount", "sum"), pages=("page", "nunique")
    )
    return len(summary)


@app.task
def top_users(count: int = 100) -> list[int]:
    return EVENTS.nlargest(count, "amount")["user"].tolist()


@app.task
def sample(rows: int = 5) -> list[dict[str, object]]:
    return EVENTS.sample(rows, random_state=rows).to_dict("records")
