"""A heap left fragmented: each task builds many small objects, keeps one in fifty in
module state (a registry of recent events) and drops the rest; the allocator cannot give
back the arenas the kept ones pin.

- ``ingest``: parse a batch of small events, keep a few;
- ``count``: how many this child kept.
"""

from __future__ import annotations

from corpus_common import make_app

RECENT: list[dict[str, object]] = []
app = make_app("fragment_heap")


@app.task
def ingest(batch: int = 200_000, seed: int = 0) -> int:
    events = [{"id": i, "seed": seed, "payload": f"event {i} {seed}"} for i in range(batch)]
    RECENT.extend(events[::50])
    return len(RECENT)


@app.task
def count() -> int:
    return len(RECENT)
