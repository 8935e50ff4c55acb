"""The worker steps without a worker: the blueprint they form (``MemoryGuard`` brings in
every step, each after what it needs) and the Fit step's refusal of a bad setting (one
line naming the option, exit 78, nothing forked). The steps' behaviour in a running
worker is the integration tests' (tests/integration)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from celery.worker.components import Pool

from celery_guard import steps
from celery_guard.logline import parse_line
from celery_guard.startup import EX_CONFIG


def test_the_one_step_users_add_brings_in_every_other() -> None:
    assert set(steps.MemoryGuard.requires) == {
        steps.Fit, steps.Telemetry, steps.Protection, steps.TaskLimits, steps.Governor,
        steps.Metrics,
    }  # fmt: skip


@pytest.mark.parametrize(
    "step,after",
    [
        (steps.Fit, {Pool}),  # before any child is forked: right after Pool.__init__
        (steps.Telemetry, {steps.Fit}),
        (steps.Governor, {steps.Telemetry, steps.TaskLimits}),
    ],
)
def test_each_step_comes_after_what_it_needs(step: type, after: set[type]) -> None:
    assert after <= set(step.requires)


def worker() -> SimpleNamespace:
    return SimpleNamespace(
        app=SimpleNamespace(conf={}), autoscale=None, concurrency=4, min_concurrency=4,
        pool_cls="prefork", hostname="w@h",
    )  # fmt: skip


def test_a_bad_worker_option_is_one_line_and_exit_78(caplog: pytest.LogCaptureFixture) -> None:
    w = worker()
    with caplog.at_level(logging.INFO, logger="celery_guard"):
        with pytest.raises(SystemExit) as exited:
            steps.Fit(w, guard_headroom="lots")
    assert exited.value.code == EX_CONFIG
    (line,) = [parse_line(r.getMessage()) for r in caplog.records]
    assert line["event"] == "config_error" and line["variable"] == "CELERY_GUARD_HEADROOM"
    assert (line["option"], line["source"], line["value"]) == ("--guard-headroom", "option", "lots")
    assert not hasattr(w, "memory_guard")  # nothing set up


def test_the_guard_is_found_on_the_worker_or_not_at_all() -> None:
    assert steps.state_of(SimpleNamespace()) is None
    guard = object()
    assert steps.state_of(SimpleNamespace(memory_guard=guard)) is guard
