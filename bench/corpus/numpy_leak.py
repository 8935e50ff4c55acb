"""Leaky numpy tasks: each task keeps its result array in module state for the life of
its child (a cache nobody empties), as in the field report of issue 20.

``CORPUS_TASK_SECONDS`` is the CPU a task spends; ``CORPUS_CHILD_START_SECONDS`` the CPU
a child spends when it starts (a model loaded in ``worker_process_init``): the run-time
patterns leaky x fast/slow x cheap/dear fork.

- ``features``: computes a 24 MiB array and keeps it;
- ``light``: a small computation that keeps nothing.
"""

from __future__ import annotations

import os
import time

import numpy as np
from celery import signals
from corpus_common import make_app

TASK_SECONDS = float(os.environ.get("CORPUS_TASK_SECONDS", "0.005"))
CHILD_START_SECONDS = float(os.environ.get("CORPUS_CHILD_START_SECONDS", "0"))
KEPT: list[np.ndarray] = []
app = make_app("numpy_leak")


def _spend(seconds: float) -> None:
    until = time.process_time() + seconds
    while time.process_time() < until:
        pass


@signals.worker_process_init.connect
def _warm_up(**_: object) -> None:
    _spend(CHILD_START_SECONDS)


@app.task
def features(mib: int = 24) -> float:
    array = np.ones(mib * 1024 * 1024 // 8)
    _spend(TASK_SECONDS)
    KEPT.append(array)
    return float(array[0])


@app.task
def light() -> float:
    return float(np.arange(1000).sum())
