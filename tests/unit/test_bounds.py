"""Bounds and idempotence: per-task tables stop growing at MAX_TASK_NAMES names (the rest
is counted as ``other``), and ``install`` called twice changes nothing the second time."""

from __future__ import annotations

from celery import Celery

import celery_guard
from celery_guard.config import OPTIONS
from celery_guard.ledger import MAX_TASK_NAMES
from celery_guard.steps import MemoryGuard

from .test_adversarial_pipe import collector

MIB = 1024 * 1024


def record(name: str, delta: int = MIB) -> str:
    return f"T 101 {delta} 1 {delta} {delta} {200 * MIB} -1 -1 -1 -1 1 {name}"


def test_the_task_name_after_the_200th_is_counted_as_other() -> None:
    """A worker that runs endless distinct task names (generated, or a name per tenant)
    must not grow its tables without end: 200 names are kept, the 201st and later are
    summed under ``other``, and a name already kept goes on counting as itself."""
    assert MAX_TASK_NAMES == 200
    c = collector({101})
    c.read_lines([record(f"app.t{i}") for i in range(200)])
    assert len(c.tasks) == 200 and "other" not in c.tasks
    c.read_lines([record("app.t200", 2 * MIB), record("app.t201", 3 * MIB), record("app.t0")])
    assert len(c.tasks) == 201
    assert c.tasks["other"].events == 2 and c.tasks["other"].total == 5 * MIB
    assert "app.t200" not in c.tasks and "app.t201" not in c.tasks
    assert c.tasks["app.t0"].events == 2  # a kept name is still itself


def test_task_events_share_the_one_bound_on_names() -> None:
    """Counts by task name (recycles, holds...) are kept in the same table as the
    records' figures: one bound, whichever figure brought a name first."""
    c = collector({101})
    c.read_lines([record(f"app.t{i}") for i in range(100)])
    for i in range(100, 201):
        c.count_task("recycle", f"app.t{i}")
    c.count_task("recycle", "app.t0")
    assert len(c.tasks) == 201
    assert c.snapshot().task_counts()["other"] == {"recycle": 1}
    assert c.snapshot().task_counts()["app.t0"] == {"recycle": 1}
    assert c.tasks["app.t0"].events == 1  # its record's figures, beside its counts


def test_install_twice_adds_one_step_and_one_set_of_options() -> None:
    """Two modules that both call ``install(app)`` (an app and a plugin): one MemoryGuard
    step, one ``--guard-*`` option per setting, no click error for a duplicate flag."""
    app = Celery("twice", set_as_current=False)
    assert celery_guard.install(app) is app
    assert celery_guard.install(app) is app
    assert [step for step in app.steps["worker"] if step is MemoryGuard] == [MemoryGuard]
    names = [param.name for param in app.user_options["worker"]]
    guard = sorted(name for name in names if name and name.startswith("guard_"))
    assert guard == sorted("guard_" + option.name for option in OPTIONS)


def test_installed_options_are_one_group_in_the_workers_help() -> None:
    """``celery worker --help`` groups Celery's own options by kind (its CeleryOption's
    ``help_group``); the guard's settings are one group of their own, not loose among
    ``Options``."""
    from celery.bin.base import CeleryOption

    app = Celery("grouped", set_as_current=False)
    celery_guard.install(app)
    guard = [p for p in app.user_options["worker"] if (p.name or "").startswith("guard_")]
    assert len(guard) == len(OPTIONS)
    assert {(type(p), getattr(p, "help_group", None)) for p in guard} == {
        (CeleryOption, "celery-guard Options")
    }
