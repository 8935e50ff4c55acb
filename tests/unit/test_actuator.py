"""PoolControl's hand-over: where received tasks wait for the governor's gate.

A worker and an AsynPool made of the attributes PoolControl wraps (Celery's
``process_task``/``_process_task_sem``/``_process_task`` and semaphore, billiard's
result handlers and process hooks); ``install`` wraps them as on a real worker. What is
handed to the "pool" is what reached the worker's original ``_process_task``.

- Before the governor exists (no gate) a request goes straight to the pool: tasks a
  worker receives at once, from a queue that was full when it started, are not held.
- A request the gate holds (Verdict.HOLD) is held, and so are the ones behind it, unasked;
  once the gate admits, they are handed over oldest first, by ``release()`` or by the
  next result that comes in from a child.
- A request the gate defers (Verdict.DEFER) lets the ones behind it go first, and goes itself once
  the gate admits it.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from billiard.pool import ACK, READY

from celery_guard.actuator import Listener, PoolControl, Verdict


class FakeAsynPool:
    """What PoolControl.install wraps on billiard's AsynPool; no child."""

    def __init__(self) -> None:
        self._pool: list[Any] = []
        self._cache: dict[int, Any] = {}
        self.results: list[int] = []
        self._result_handler = SimpleNamespace(state_handlers={ACK: self._ack, READY: self._ready})
        self.on_process_up: Callable[[Any], Any] | None = None
        self.on_process_down: Callable[[Any], Any] | None = None
        self.on_job_process_down: Callable[..., Any] = lambda job, pid: None
        self.on_job_process_lost: Callable[..., Any] = lambda job, pid, code: None

    def _ack(self, *args: Any) -> None:
        return None

    def _ready(self, job: int, i: int, obj: Any, inqw_fd: int) -> None:
        self.results.append(job)


class FakeWorker:
    """Celery's WorkController as far as the hand-over goes."""

    def __init__(self) -> None:
        self.pool = SimpleNamespace(_pool=FakeAsynPool(), num_processes=2)
        self.semaphore = SimpleNamespace(clear=lambda: None)
        self.process_task = self._process_task_sem
        self.handed: list[str] = []  # what reached the pool, in order

    def _process_task_sem(self, request: Any) -> None:
        self._process_task(request)

    def _process_task(self, request: Any) -> None:
        self.handed.append(request.id)


def request(task_id: str, name: str = "heavy_app.add") -> Any:
    return SimpleNamespace(id=task_id, name=name)


def installed() -> tuple[FakeWorker, PoolControl]:
    w = FakeWorker()
    control = PoolControl(w)
    assert control.install()
    return w, control


def receive(w: FakeWorker, *requests: Any) -> None:
    """The consumer passes each request on, as the semaphore does once it has a slot."""
    for each in requests:
        w._process_task(each)


class Gate:
    """The governor's verdict by task id (HAND_OVER unless set), and the ids it was asked."""

    def __init__(self, verdicts: dict[str, Verdict]) -> None:
        self.verdicts = verdicts
        self.asked: list[str] = []

    def __call__(self, request: Any) -> Verdict:
        self.asked.append(request.id)
        return self.verdicts.get(request.id, Verdict.HAND_OVER)


def gated(verdicts: dict[str, Verdict]) -> tuple[FakeWorker, PoolControl, Gate]:
    """An installed PoolControl whose gate gives ``verdicts`` (HAND_OVER for any other)."""
    w, control = installed()
    gate = Gate(verdicts)
    control.gate = gate
    return w, control, gate


def test_without_a_gate_every_request_goes_straight_to_the_pool() -> None:
    w, control = installed()
    assert control.gate is None  # no governor yet
    receive(w, request("a"), request("b"), request("c"))
    assert w.handed == ["a", "b", "c"]
    assert list(control.held) == []


def test_a_refused_request_holds_the_ones_behind_until_the_gate_admits() -> None:
    w, control, gate = gated({"a": Verdict.HOLD})
    receive(w, request("a"), request("b"), request("c"))
    assert w.handed == []
    assert [r.id for r in control.held] == ["a", "b", "c"]
    assert set(gate.asked) == {"a"}  # the ones behind are not asked past a refusal
    gate.verdicts["a"] = Verdict.HAND_OVER
    control.release()
    assert w.handed == ["a", "b", "c"]
    assert list(control.held) == []


def test_a_result_from_a_child_releases_the_held_requests() -> None:
    w, control, gate = gated({"a": Verdict.HOLD})
    receive(w, request("a"), request("b"))
    assert w.handed == []
    gate.verdicts["a"] = Verdict.HAND_OVER  # room again
    ready = w.pool._pool._result_handler.state_handlers[READY]
    ready(7, 0, None, 3)  # a task's result comes in
    assert w.pool._pool.results == [7]  # billiard's own handler still ran
    assert w.handed == ["a", "b"]
    assert list(control.held) == []


def test_a_lost_broker_connection_drops_the_held_requests_with_the_semaphore() -> None:
    """Celery clears its semaphore when the broker connection is lost: the broker delivers
    the unacknowledged messages again, so a request still held here must go too, or it
    would run twice once the gate lets it through."""
    cleared: list[bool] = []
    w = FakeWorker()
    w.semaphore.clear = lambda: cleared.append(True)
    control = PoolControl(w)
    assert control.install()
    gate = control.gate = Gate({"a": Verdict.HOLD})
    receive(w, request("a"), request("b"))
    assert [r.id for r in control.held] == ["a", "b"]
    w.semaphore.clear()
    assert list(control.held) == [] and control.held_since == {}
    assert cleared == [True]  # Celery's own clear still runs
    gate.verdicts["a"] = Verdict.HAND_OVER
    control.release()
    assert w.handed == []  # nothing held was handed over after the connection was lost


def test_a_deferred_request_lets_the_ones_behind_go_first() -> None:
    w, control, gate = gated({"new": Verdict.DEFER})
    receive(w, request("new", "heavy_app.hog"), request("b"), request("c"))
    assert w.handed == ["b", "c"]
    assert [r.id for r in control.held] == ["new"]
    gate.verdicts["new"] = Verdict.HAND_OVER  # its kind has been measured
    control.release()
    assert w.handed == ["b", "c", "new"]
    assert list(control.held) == []


class RefusingWorker(FakeWorker):
    """Celery's ``_process_task``: a revoked or expired request never reaches the pool
    (``execute_using_pool`` raises ``TaskRevokedError`` before ``apply_async`` and
    ``_process_task`` swallows it); one that does keeps the pool's result."""

    def __init__(self, revoked: set[str]) -> None:
        super().__init__()
        self.revoked = revoked

    def _process_task(self, request: Any) -> None:
        if request.id in self.revoked:
            return
        request._apply_result = object()
        self.handed.append(request.id)


def test_only_requests_that_reached_the_pool_are_reported_handed() -> None:
    w = RefusingWorker({"revoked"})
    control = PoolControl(w)
    assert control.install()
    control.gate = Gate({})
    handed: list[str] = []

    class Hears(Listener):
        tracks_tasks = True

        def task_handed(self, request: Any) -> None:
            handed.append(request.id)

    control.listeners.append(Hears())
    # as Celery's Request class: ``_apply_result`` is None until the pool has the task
    received = [SimpleNamespace(id=i, name="heavy_app.add", _apply_result=None) for i in "ab"]
    receive(w, received[0], SimpleNamespace(id="revoked", name="t", _apply_result=None))
    receive(w, received[1])
    assert w.handed == ["a", "b"]
    assert handed == ["a", "b"]  # the revoked one never enters the governor's ledger


def test_a_listener_that_fails_is_logged_and_the_next_is_still_told(
    caplog: pytest.LogCaptureFixture,
) -> None:
    w = RefusingWorker(set())
    control = PoolControl(w)
    assert control.install()
    control.gate = Gate({})
    handed: list[str] = []

    class Broken(Listener):
        tracks_tasks = True

        def task_handed(self, request: Any) -> None:
            raise KeyError(request.id)

    class Hears(Listener):
        tracks_tasks = True

        def task_handed(self, request: Any) -> None:
            handed.append(request.id)

    control.listeners += [Broken(), Hears()]
    receive(w, SimpleNamespace(id="a", name="heavy_app.add", _apply_result=None))
    assert w.handed == ["a"] and handed == ["a"]
    assert "celery-guard event=error stage=task_handed" in caplog.text


def test_a_gate_that_fails_hands_the_request_over_and_keeps_the_ones_behind() -> None:
    def failing(r: Any) -> Verdict:
        if r.id == "bad":
            raise OverflowError("int too large to convert to float")
        return Verdict.HAND_OVER

    w, control = installed()
    control.gate = failing
    receive(w, request("a"), request("bad"), request("c"))
    assert w.handed == ["a", "bad", "c"]
    assert list(control.held) == []


def test_a_held_request_given_back_is_rejected_with_requeue_and_frees_its_slot() -> None:
    """Past the broker's timer a held request goes back to its queue: rejected with
    requeue (the broker delivers it again), its semaphore slot released, out of the
    worker's state; the ones behind it stay held in order."""
    from celery.worker import state

    w, control, _ = gated({"a": Verdict.HOLD})
    released: list[int] = []
    w._quick_release = lambda: released.append(1)  # type: ignore[attr-defined]
    rejected: list[tuple[str, bool]] = []
    requests = []

    class Request:  # Celery's state keeps requests in weak sets
        def __init__(self, task_id: str) -> None:
            self.id, self.name = task_id, "heavy_app.add"

        def reject(self, requeue: bool) -> None:
            rejected.append((self.id, requeue))

    for task_id in ("a", "b"):
        each = Request(task_id)
        state.task_reserved(each)
        requests.append(each)
    receive(w, *requests)
    assert [r.id for r in control.held] == ["a", "b"]
    later = max(control.held_since.values()) + 10
    assert control.overdue(later, 10) == requests and control.overdue(later, 11) == []
    assert control.give_back(requests[0])
    assert rejected == [("a", True)] and released == [1]
    assert [r.id for r in control.held] == ["b"] and "a" not in control.held_since
    assert requests[0] not in state.reserved_requests and requests[1] in state.reserved_requests
    assert not control.give_back(requests[0])  # gone already: nothing twice
    state.task_ready(requests[1])


def test_a_child_that_exited_unjoined_is_found_and_reaped() -> None:
    """billiard joins a child when its sentinel becomes readable, which can come just
    before the kernel reports the exit; then only at its maintenance, 5 s later. The
    governor's clock asks ``exited_unjoined``: it reaps such a child, and billiard's join
    takes the status kept."""
    import os
    import time

    from billiard.popen_fork import Popen

    def child(exits: bool) -> Any:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            if not exits:
                time.sleep(60)
            os._exit(0)
        popen = Popen.__new__(Popen)
        popen.pid, popen.returncode = pid, None
        return SimpleNamespace(_popen=popen)

    running = child(exits=False)
    pool = FakeAsynPool()
    pool._pool = [running, SimpleNamespace(_popen=None)]  # one not started yet
    control = PoolControl(SimpleNamespace(pool=SimpleNamespace(_pool=pool)))
    try:
        assert control.exited_unjoined() == (0, 0)
        exited, missed = child(exits=True), child(exits=True)
        exited._sentinel_poll = 7  # Celery still watches its sentinel: the event to come
        missed._sentinel_poll = None  # its event handled: billiard missed the exit
        pool._pool += [exited, missed]
        deadline = time.monotonic() + 10
        while control.exited_unjoined() != (2, 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert exited._popen.returncode == 0 == missed._popen.returncode  # reaped, kept
        assert running._popen.returncode is None
        assert control.exited_unjoined() == (2, 1)  # until the pool joins them
    finally:
        os.kill(running._popen.pid, 9)
        os.waitpid(running._popen.pid, 0)


class Heard(Listener):
    """A listener that notes each event with what the records reader had read by then."""

    def __init__(self, read: list[int], tracks_tasks: bool = True) -> None:
        self.read, self.events = read, []  # type: list[tuple[str, int]]
        self.tracks_tasks = tracks_tasks

    def child_up(self, pid: int) -> None:
        pass

    def child_down(self, pid: int, exitcode: int | None, task: Any) -> None:
        self.events.append(("down", len(self.read)))

    def task_handed(self, request: Any) -> None:
        self.events.append(("handed", len(self.read)))

    def task_accepted(self, pid: int, task_id: str, name: str) -> None:
        self.events.append(("accepted", len(self.read)))

    def task_ready(self, pid: int, task_id: str) -> bool:
        self.events.append(("ready", len(self.read)))
        return False


def test_the_records_are_read_once_before_the_listeners_hear_a_task_end_or_an_exit() -> None:
    """A child writes its record before its result and before it exits, but the pool may
    read the result's pipe first: every listener must see the record, read once."""
    w, control = installed()
    read: list[int] = []
    control.read_records = lambda: read.append(1)
    first, second = Heard(read), Heard(read)
    control.listeners += [first, second]
    pool = w.pool._pool
    pool._cache[7] = SimpleNamespace(worker_pids=lambda: [101], correlation_id="t-7")
    pool._result_handler.state_handlers[READY](7, 0, None, 3)
    pool.on_process_down(SimpleNamespace(pid=101, exitcode=0))
    assert first.events == second.events == [("ready", 1), ("down", 2)]
    assert pool.results == [7]


def test_with_no_listener_tracking_tasks_a_task_costs_no_read_and_no_telling() -> None:
    """While no listener follows tasks one by one (the governor with room to spare, no
    task limits), a hand-over and an acceptance are told to no one and no record is read
    before a task's end; the end itself is still told, and an exit still reads first.
    Once one listener tracks tasks, both are back."""
    w, control = installed()
    read: list[int] = []
    control.read_records = lambda: read.append(1)
    heard = Heard(read, tracks_tasks=False)
    control.listeners.append(heard)
    pool = w.pool._pool
    receive(w, SimpleNamespace(id="t-7", name="heavy_app.add", _apply_result=object()))
    pool._cache[7] = SimpleNamespace(worker_pids=lambda: [101], correlation_id="t-7")
    pool._result_handler.state_handlers[ACK](7, 0, 0.0, 101)
    pool._result_handler.state_handlers[READY](7, 0, None, 3)
    assert heard.events == [("ready", 0)]
    heard.tracks_tasks = True
    receive(w, SimpleNamespace(id="t-8", name="heavy_app.add", _apply_result=object()))
    pool._cache[8] = SimpleNamespace(worker_pids=lambda: [101], correlation_id="t-8")
    pool._result_handler.state_handlers[ACK](8, 0, 0.0, 101)
    pool._result_handler.state_handlers[READY](8, 0, None, 3)
    assert heard.events[1:] == [("handed", 0), ("accepted", 0), ("ready", 1)]
    heard.tracks_tasks = False
    pool.on_process_down(SimpleNamespace(pid=101, exitcode=0))
    assert heard.events[-1] == ("down", 2)


def test_a_task_a_listener_watches_has_its_records_read_before_its_end_untracked() -> None:
    """The task limits' enforcer must hear a limit hit before the end of its task (it
    recycles the child then): untracked, the records are read before the end of the
    tasks some listener watches (``records_before_end``), and of no other."""
    from celery.worker import state

    w, control = installed()
    read: list[int] = []
    control.read_records = lambda: read.append(1)
    heard = Heard(read, tracks_tasks=False)
    heard.records_before_end = frozenset({"limited"})
    control.listeners.append(heard)
    pool = w.pool._pool

    class Request:  # Celery's state keeps requests in weak sets
        def __init__(self, task_id: str, name: str) -> None:
            self.id, self.name = task_id, name

    requests = [Request("t-1", "limited"), Request("t-2", "free")]
    for job, request in enumerate(requests):
        state.task_reserved(request)
        pool._cache[job] = SimpleNamespace(worker_pids=lambda: [101], correlation_id=request.id)
    try:
        pool._result_handler.state_handlers[READY](0, 0, None, 3)
        pool._result_handler.state_handlers[READY](1, 0, None, 3)
    finally:
        for request in requests:
            state.task_ready(request)
    assert heard.events == [("ready", 1), ("ready", 1)]
