"""An HTTP API client: a ``requests.Session`` made at import, JSON fetched per task from a
local server (``CORPUS_HTTP_URL``, which the bench starts).

- ``sync_orders``: fetch a page of orders, parse the JSON (a transient peak), sum them;
- ``health``: a small request.
"""

from __future__ import annotations

import os

import requests
from corpus_common import make_app

BASE = os.environ.get("CORPUS_HTTP_URL", "http://127.0.0.1:8000")
session = requests.Session()  # one per process: fork gives each child a copy
app = make_app("http_client")


@app.task
def sync_orders(page: int = 0) -> float:
    response = session.get(f"{BASE}/orders.json", timeout=30)
    response.raise_for_status()
    return sum(order["amount"] for order in response.json()["orders"])


@app.task
def health() -> int:
    return session.get(f"{BASE}/health.json", timeout=30).status_code
