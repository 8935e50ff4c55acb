"""Shape ``numpy``: large NumPy arrays (a model's weights, a lookup table) and many small
ones (feature vectors), imported by the main process.

Reading an array never writes its data, so children keep sharing the payload; what they
copy is each array's object header (its reference count) and what the task allocates.
At ``SHAPE_SCALE=1``: 10 arrays of 1M floats (80 MB) and 20k vectors of 32 floats.
"""

from __future__ import annotations

import os

import numpy as np
from shape_common import make_app, scaled

rng = np.random.default_rng(12)
#: Large buffers: NumPy's own allocations of megabytes, each an mmap chunk or heap block.
ARRAYS = {f"table-{i}": rng.random(1_000_000) for i in range(scaled(10))}
#: Small arrays: a header object each and a 256-byte buffer in the malloc heap.
VECTORS = [rng.random(32) for _ in range(scaled(20_000))]
WEIGHTS = rng.random(32)

app = make_app("shape_numpy")


@app.task
def use() -> tuple[int, float]:
    """Score every vector and summarise every table: reads all the arrays, writes none."""
    total = sum(float(table.mean()) for table in ARRAYS.values())
    total += sum(float(vector @ WEIGHTS) for vector in VECTORS)
    return os.getpid(), total
