"""``celery inspect guard_stats``: the command reaches the worker's guard the way Celery's
own commands reach the worker (the consumer's controller), with no global of its own."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from celery_guard.control import guard_stats


class Guard:
    collector = object()

    def stats(self) -> dict[str, Any]:
        return {"limit_mib": 512.0}


def panel_state(worker: Any) -> SimpleNamespace:
    """What Celery's pidbox hands a control command: its consumer, whose controller is
    the worker."""
    return SimpleNamespace(consumer=SimpleNamespace(controller=worker))


def test_the_figures_come_from_the_workers_own_guard() -> None:
    worker = SimpleNamespace(memory_guard=Guard())
    assert guard_stats(panel_state(worker)) == {"limit_mib": 512.0}


def test_a_worker_without_a_collector_says_so() -> None:
    for worker in (
        SimpleNamespace(),
        SimpleNamespace(memory_guard=SimpleNamespace(collector=None)),
    ):
        assert "error" in guard_stats(panel_state(worker))
    assert "error" in guard_stats(SimpleNamespace())  # no consumer at all
