"""The worker's one guard object without a worker: which parts it makes and how it wires
them (the governor's first wave, the order of the pool's listeners, a pool forked whole
when the hooks cannot be placed, installed once). What the parts do in a running worker
is the integration tests' (tests/integration)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from celery_guard import governor
from celery_guard.config import load_settings
from celery_guard.guard import Guard
from celery_guard.telemetry import ExitListener


class Control:
    """The pool's hooks: whether they can be placed, what was wired to them."""

    def __init__(self, w: Any, placed: bool = True) -> None:
        self.w = w
        self.placed = placed
        self.installed = False
        self.listeners: list[Any] = []
        self.read_records: Any = None
        self.on_lost: Any = None
        self.installs = 0

    def install(self) -> bool:
        self.installs += 1
        self.installed = self.placed
        return self.placed

    def grow(self, count: int) -> None:
        self.w.pool.num_processes += count


def worker(min_concurrency: int = 8, autoscale: list[int] | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        app=SimpleNamespace(conf={}), autoscale=autoscale, concurrency=8,
        min_concurrency=min_concurrency, pool_cls="prefork", hostname="w@h",
        pool=SimpleNamespace(num_processes=min_concurrency, limit=8),
    )  # fmt: skip


def guard(
    w: SimpleNamespace, env: dict[str, str] | None = None, source: str = "cgroup-v1"
) -> Guard:
    """A guard whose startup found a cgroup limit (``source``), with its pool's hooks."""
    found = Guard(w, load_settings(env or {}, {}))
    budget = SimpleNamespace(cgroup=object(), source=source)
    found.measured = SimpleNamespace(budget=budget)  # type: ignore[assignment]
    found.control = Control(w)  # type: ignore[assignment]
    return found


@pytest.mark.parametrize(
    ("env", "autoscale", "source", "governs", "first_wave"),
    [
        ({}, None, "cgroup-v1", True, True),  # scale mode: forked a wave at a time
        ({"CELERY_GUARD_MODE": "refuse"}, None, "cgroup-v1", True, False),
        ({"CELERY_GUARD_GOVERNOR": "observe"}, None, "cgroup-v2", True, False),
        ({"CELERY_GUARD_GOVERNOR": "off"}, None, "cgroup-v1", False, False),
        ({}, [8, 1], "cgroup-v1", False, False),  # the autoscaler owns the size
        ({}, None, "physical", False, False),  # no limit to keep
    ],
)
def test_the_governor_applies_where_it_can_act_and_forks_the_first_wave(
    env: dict[str, str], autoscale: list[int] | None, source: str, governs: bool,
    first_wave: bool,
) -> None:  # fmt: skip
    w = worker(autoscale=autoscale)
    found = guard(w, env, source)
    assert found.add_governor() is governs
    cpus = max(int(-(-governor.available_cpus() // 1)), 1)
    if first_wave and cpus < 8:
        assert (found.whole, w.min_concurrency) == (8, cpus)
        found.started()
        assert w.pool.limit == 8  # what `celery inspect stats` shows: the whole pool
    else:
        assert (found.whole, w.min_concurrency) == (None, 8)


def test_the_pools_listeners_are_wired_in_order_once() -> None:
    w = worker()
    found = guard(w, {"CELERY_GUARD_GOVERNOR": "off"})
    collector = SimpleNamespace(on_lost=object(), exits=None)
    found.collector = collector  # type: ignore[assignment]
    found.enforcer = enforcer = object()  # type: ignore[assignment]
    found.install()
    found.install()  # registered again after a lost broker connection
    control = found.control
    assert isinstance(control, Control) and control.installs == 1
    first, second = control.listeners
    assert isinstance(first, ExitListener) and first.collector is collector
    assert second is enforcer
    assert control.on_lost is collector.on_lost
    assert found.governor is None


def test_a_pool_whose_hooks_cannot_be_placed_is_forked_whole() -> None:
    """The first wave waits for a governor that will not start: the rest is forked."""
    w = worker(min_concurrency=2)
    found = guard(w)
    found.whole = 8
    found.control = Control(w, placed=False)  # type: ignore[assignment]
    found.collector = SimpleNamespace(on_lost=None)  # type: ignore[assignment]
    found.install()
    assert w.pool.num_processes == 8 and found.whole is None
    assert found.control.listeners == []


class Recorder:
    """A part that records what it is told."""

    def __init__(self) -> None:
        self.told: list[tuple[str, Any]] = []

    def post(self, record: Any) -> None:
        self.told.append(("record", record))

    def on_hit(self, hit: Any) -> None:
        self.told.append(("hit", hit))

    def calibrated(self, cost: int) -> None:
        self.told.append(("calibrated", cost))


def test_the_childrens_lines_reach_the_parts_that_act_on_them(tmp_path: Any) -> None:
    """The collector takes the lines into its figures and says what came; the guard tells
    each part its share: the measured cost to the state file and the resizer, the limit
    hits to the enforcer, the records to the governor."""
    w = worker()
    state = tmp_path / "state.json"
    found = guard(w, {"CELERY_GUARD_STATE_FILE": str(state)})
    heard = SimpleNamespace(records=["r1", "r2"], hits=["h1"], calibrated=40 << 20)
    found.collector = SimpleNamespace(read_lines=lambda lines: heard)  # type: ignore[assignment]
    found.governor = found.enforcer = found.resizer = part = Recorder()  # type: ignore[assignment]
    found.read_lines(["T ..."])
    assert part.told == [("calibrated", 40 << 20), ("hit", "h1"), ("record", "r1"),
                         ("record", "r2")]  # fmt: skip
    assert str(40 << 20) in state.read_text()  # kept at once for the next start
    heard.calibrated = None
    part.told.clear()
    found.read_lines(["T ..."])
    assert ("calibrated", 40 << 20) not in part.told
