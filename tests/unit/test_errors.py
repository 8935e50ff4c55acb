"""The exceptions a task may see because of memory travel through Celery's result backend,
which rebuilds an exception from its class name, module and arguments: each must come
back from the backend's serialisation equal in kind and message."""

from __future__ import annotations

import pickle

import pytest
from billiard.exceptions import WorkerLostError
from celery.utils.serialization import create_exception_cls, get_pickleable_exception

from celery_guard import MemoryLimitExceeded, SoftMemoryLimitExceeded
from celery_guard.errors import MemoryKilled

KINDS = [MemoryLimitExceeded, SoftMemoryLimitExceeded, MemoryKilled]


@pytest.mark.parametrize("kind", KINDS, ids=[k.__name__ for k in KINDS])
def test_an_exception_comes_back_from_the_backend_as_it_left(kind: type[Exception]) -> None:
    error = kind("task app.t held 612.0 MiB, its memory_limit is 512.0 MiB")
    again = pickle.loads(pickle.dumps(get_pickleable_exception(error)))
    assert type(again) is kind and again.args == error.args
    # a client without celery_guard installed rebuilds it by name alone
    rebuilt = create_exception_cls(kind.__name__, kind.__module__)(*error.args)
    assert type(rebuilt).__name__ == kind.__name__ and rebuilt.args == error.args


def test_a_memory_kill_is_also_a_lost_worker() -> None:
    """So that task_reject_on_worker_lost sends its message back to the queue."""
    assert issubclass(MemoryKilled, WorkerLostError)
    assert issubclass(MemoryKilled, MemoryLimitExceeded)
    assert not issubclass(SoftMemoryLimitExceeded, MemoryLimitExceeded)  # caught apart
