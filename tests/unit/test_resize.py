"""The pool size where no governor runs: sized again when the first child is measured and
when the limit changes, the autoscaler's max under ``--autoscale``, else the pool."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

from celery_guard.config import load_settings
from celery_guard.limit import LiveLimit
from celery_guard.logline import parse_line
from celery_guard.resize import Resizer

MIB = 1024 * 1024


class Hub:
    """The event loop: what was scheduled, run on demand."""

    def __init__(self) -> None:
        self.scheduled: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def call_soon(self, function: Callable[..., Any], *args: Any) -> None:
        self.scheduled.append((function, args))

    def run(self) -> None:
        scheduled, self.scheduled = self.scheduled, []
        for function, args in scheduled:
            function(*args)


class Autoscaler:
    def __init__(self, max_concurrency: int) -> None:
        self.max_concurrency = max_concurrency

    def update(self, max: int | None = None, min: int | None = None) -> None:
        assert max is not None
        self.max_concurrency = max


class Worker:
    hostname = "w@h"

    def __init__(self, autoscaler: Autoscaler | None) -> None:
        self.autoscaler = autoscaler
        self.autoscale = [8, 1] if autoscaler is not None else None


class Control:
    """The pool: children by pid, all idle."""

    installed = True

    def __init__(self, size: int) -> None:
        self.children = list(range(100, 100 + size))

    @property
    def size(self) -> int:
        return len(self.children)

    def pids(self) -> list[int]:
        return list(self.children)

    def grow(self, count: int) -> None:
        self.children += [max(self.children) + 1 + i for i in range(count)]

    def retire(self, pid: int) -> bool:
        self.children.remove(pid)
        return True


def resizer(
    limit_mib: int, *, autoscaler: Autoscaler | None = None, control: Control | None = None,
    governed: bool = False, hub: Hub | None = None,
) -> Resizer:  # fmt: skip
    """1 GiB or so, the main process using 100 MiB, 8 asked for, children estimated at
    50 MiB; the default 10% headroom."""
    live = LiveLimit(limit_mib * MIB, load_settings({}, {}))
    found = Resizer(
        Worker(autoscaler), live, 100 * MIB, 8, 1, 50 * MIB, control,  # type: ignore[arg-type]
        governed=lambda: governed,
    )  # fmt: skip
    found.hub = hub
    return found


@pytest.mark.parametrize(
    ("limit_mib", "cost_mib", "expected"),
    [
        (1000, 50, 8),  # 800 MiB free: 16 fit, 8 asked for
        (400, 50, 5),  # 400 - 40 - 100 = 260 MiB: 5 children
        (150, 50, 1),  # nothing free: the minimum
        (400, 10, 8),
    ],
)
def test_the_target_is_what_fits_in_the_limit_of_now(
    limit_mib: int, cost_mib: int, expected: int
) -> None:
    found = resizer(1000)
    found.live.set(limit_mib * MIB)
    found.cost = cost_mib * MIB
    assert found.target() == expected


def pressure(caplog: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    found = [r.getMessage() for r in caplog.records]
    return [parse_line(message) for message in found if "event=pressure" in message]


def test_a_lowered_limit_lowers_the_autoscalers_max_with_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="celery_guard")
    hub, autoscaler = Hub(), Autoscaler(8)
    found = resizer(1000, autoscaler=autoscaler, hub=hub)
    found.check()
    assert hub.scheduled == []  # the limit the startup decision used: nothing to do
    found.live.set(400 * MIB)
    found.check()
    found.check()  # once per change, not once per look
    hub.run()
    assert autoscaler.max_concurrency == 5
    (line,) = pressure(caplog)
    assert line["level"] == "limit" and line["what"] == "autoscale_max"
    assert (line["before"], line["concurrency"], line["limit_mib"]) == ("8", "5", "400.0")
    assert line["child_cost_mib"] == "50.0"


def test_a_measured_child_resizes_the_pool_in_the_limit_of_now(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="celery_guard")
    hub, control = Hub(), Control(2)
    found = resizer(1000, control=control, hub=hub)
    found.live.set(500 * MIB)  # lowered before the first child was measured
    found.calibrated(40 * MIB)  # 500 - 50 - 100 = 350 MiB: 8 children of 40 MiB
    hub.run()
    assert control.size == 8
    (line,) = pressure(caplog)
    assert (line["level"], line["what"], line["before"], line["concurrency"]) == (
        "calibration", "pool", "2", "8",
    )  # fmt: skip
    found.check()  # the limit it was sized in: nothing more
    assert hub.scheduled == []


def test_a_raised_limit_grows_and_a_lowered_one_retires_idle_children() -> None:
    hub, control = Hub(), Control(3)
    found = resizer(300, control=control, hub=hub)
    found.live.set(1000 * MIB)
    found.check()
    hub.run()
    assert control.size == 8
    found.live.set(300 * MIB)  # 300 - 30 - 100 = 170 MiB: 3 children
    found.check()
    hub.run()
    assert control.size == 3


def test_nothing_is_resized_where_the_governor_owns_the_pool() -> None:
    hub, autoscaler = Hub(), Autoscaler(8)
    found = resizer(1000, autoscaler=autoscaler, hub=hub, governed=True)
    found.live.set(400 * MIB)
    found.check()
    found.calibrated(10 * MIB)
    hub.run()
    assert hub.scheduled == [] and autoscaler.max_concurrency == 8


def test_an_unchanged_target_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="celery_guard")
    hub, autoscaler = Hub(), Autoscaler(8)
    found = resizer(1000, autoscaler=autoscaler, hub=hub)
    found.live.set(2000 * MIB)  # raised: 8 still fit, 8 were asked for
    found.check()
    hub.run()
    assert autoscaler.max_concurrency == 8 and pressure(caplog) == []
