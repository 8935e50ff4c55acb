"""The one place that touches Celery's and billiard's internals (prefork on the event loop).

Everything the guard does to the pool goes through ``PoolControl``: it hears the pool's
events (a task handed over, accepted by a child, finished; a child up or down; a job
lost) and carries out grow, retire, recycle, kill, hold and release. The hooks it uses,
checked in Celery 5.7.0 and billiard 4.3.2 (see the README's how-it-works):

- hand-over: every received task waits in the worker's ``LaxBoundedSemaphore`` and is
  then passed to ``WorkController._process_task``, looked up on the instance at each
  call: replacing it there holds a task *after* it took a slot and *before* it reaches
  the pool (unacknowledged, also with early acks, which happen when a child accepts it);
- accepted / finished: the result handler's ``state_handlers[ACK]`` and ``[READY]``,
  looked up at each message;
- child up / down, job lost: AsynPool's ``on_process_up``, ``on_process_down``,
  ``on_job_process_down`` and ``on_job_process_lost`` instance attributes;
- recycle: ``Process.terminate_controlled`` on an idle child, kept marked busy so the fair
  scheduler writes nothing more to it (billiard's own shrink uses the same signal);
- every signal goes to a pid checked to be a current pool child by its start time.
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from billiard.pool import ACK, READY
from celery.concurrency.asynpool import WORKER_UP  # type: ignore[attr-defined]
from celery.worker import state as worker_state

from . import procfs
from .exits import LostJob
from .logline import logger


class Verdict(enum.Enum):
    """The gate's word on a request."""

    HAND_OVER = "hand_over"  # to the pool now
    HOLD = "hold"  # no room, or no free child: it and the ones behind it wait
    DEFER = "defer"  # a run of its kind is being measured: the ones behind may go first


class Listener:
    """What the pool's events are told to (why a child exited, the task limits'
    enforcer, the governor), in that order: each overrides the events it needs."""

    #: Follows tasks one by one (each hand-over and acceptance; the children's records
    #: read before each task's end). While none does, the per-task path costs next to nothing.
    tracks_tasks: bool = False
    #: The tasks (by name) whose end it must hear after their child's records, tracking
    #: or not (the task limits' enforcer: a limit hit recycles the child at that end).
    records_before_end: frozenset[str] = frozenset()

    def child_up(self, pid: int) -> None:
        """A child was forked."""

    def child_alive(self, pid: int) -> None:
        """A child is ready for work (its WORKER_UP message)."""

    def child_down(self, pid: int, exitcode: int | None, task: tuple[str, str] | None) -> None:
        """A child exited (``task``: the one its lost job was)."""

    def task_handed(self, request: Any) -> None:
        """A request the gate admitted reached the pool; one Celery refuses on the way
        (revoked, expired: ``TaskRevokedError``) never does."""

    def task_accepted(self, pid: int, task_id: str, name: str) -> None:
        """A child took a task (its ACK)."""

    def task_ready(self, pid: int, task_id: str) -> bool:
        """A task ended in ``pid``; True: replace that child."""
        return False

    def resized(self, added: int) -> None:
        """Someone but the guard resized the pool (remote control ``pool_grow`` and
        ``pool_shrink``): children added, or taken away when negative."""


@dataclass
class Child:
    """A pool child as the guard knows it."""

    pid: int
    started: int | None  # start time (ticks since boot), None if unreadable at fork
    process: Any  # billiard's Process


def pool_size(w: Any) -> int:
    """The worker's pool size now: its pool's, else the concurrency it was given."""
    try:
        return int(w.pool.num_processes)
    except (AttributeError, TypeError):
        return int(w.concurrency)


def reached_pool(request: Any) -> bool:
    """Did Celery hand ``request`` to the pool? ``execute_using_pool`` keeps the pool's
    result on it; a revoked or expired one raises first. Without it (another Celery): yes."""
    return getattr(request, "_apply_result", True) is not None


class PoolControl:
    """Hears the pool and acts on it; holds the tasks the governor does not start yet."""

    def __init__(self, w: Any, proc: str = procfs.ROOT) -> None:
        self.w = w
        self.proc = proc  # where the children's /proc files are read
        self.children: dict[int, Child] = {}
        self.listeners: list[Listener] = []
        self.held: deque[Any] = deque()  # requests that took a slot, not handed over
        self.held_since: dict[str, float] = {}  # task id -> when it was first held
        self.recycling: set[int] = set()  # pids told to exit after their task
        #: The governor's verdict on a request (``Verdict``).
        self.gate: Callable[[Any], Verdict] | None = None
        #: Told of a task lost with its child; returns the exception it fails with
        #: instead of billiard's WorkerLostError, or None to leave it.
        self.on_lost: Callable[[LostJob], Exception | None] | None = None
        #: Reads the children's records before the listeners hear a task's end or a child's
        #: exit (a child writes its record before its result, whose pipe may be read first).
        self.read_records: Callable[[], None] | None = None
        self._resizing = False  # the guard's own grow is under way
        #: children forked, and the seconds the main thread spent on them (billiard's
        #: set-up, Celery's collection before each fork, the fork itself)
        self.forks = 0
        self.fork_seconds = 0.0
        self._start_task: Callable[[Any], Any] | None = None
        self.installed = False

    # -- installing ------------------------------------------------------------------
    @property
    def pool(self) -> Any:
        return self.w.pool._pool

    def install(self) -> bool:
        """Wrap the hooks, once (the consumer registers with the event loop again after a
        lost broker connection); False when this pool does not have them (not prefork
        on the event loop), and then the guard leaves it alone."""
        if self.installed:
            return True
        w, pool = self.w, getattr(getattr(self.w, "pool", None), "_pool", None)
        handler = getattr(pool, "_result_handler", None)
        handlers = getattr(handler, "state_handlers", None)
        semaphore = getattr(w, "semaphore", None)
        needed = ("on_process_up", "on_process_down", "on_job_process_lost")
        if pool is None or handlers is None or not all(hasattr(pool, n) for n in needed):
            return False
        self._wrap_pool(pool, handlers)
        self._wrap_fork(pool)
        self._wrap_resize(w.pool)
        if semaphore is not None and getattr(w, "process_task", None) == getattr(
            w, "_process_task_sem", None
        ):
            self._wrap_hand_over(w, semaphore)
        for process in list(pool._pool):
            if process.pid and process.exitcode is None:
                self._up(process)
        self.installed = True
        return True

    def _wrap_pool(self, pool: Any, handlers: dict[int, Any]) -> None:
        process_up, process_down = pool.on_process_up, pool.on_process_down
        job_down, job_lost = pool.on_job_process_down, pool.on_job_process_lost
        ack, ready, alive = handlers[ACK], handlers[READY], handlers.get(WORKER_UP)
        held_task: dict[int, tuple[str, str]] = {}  # pid -> the task its lost job was

        def on_process_up(process: Any) -> Any:
            result = process_up(process) if process_up else None
            self._guarded("process_up", self._up, process)
            return result

        def on_job_process_down(job: Any, pid_gone: int) -> Any:
            with contextlib.suppress(Exception):
                held_task[pid_gone] = self._task_of(job)
            return job_down(job, pid_gone)

        def on_job_process_lost(job: Any, pid: int, exitcode: int | None) -> Any:
            error = self._guarded("job_lost", self._lost, job, pid, exitcode)
            if error is None:
                return job_lost(job, pid, exitcode)
            try:
                raise error
            except Exception:  # noqa: BLE001 - ExceptionInfo takes the one raised here
                from billiard.einfo import ExceptionInfo

                job._set(None, (False, ExceptionInfo()))
            return None

        def on_process_down(process: Any) -> Any:
            task = held_task.pop(process.pid, None)
            self._guarded("process_down", self._down, process, task)
            return process_down(process) if process_down else None

        # The two handlers below and ``process_task`` run for every task, on the main
        # process's one thread: no call there that a test of ``tracked``/``held`` saves.
        def on_ack(job: int, i: int, time_accepted: float, pid: int, *rest: Any) -> Any:
            result = ack(job, i, time_accepted, pid, *rest)
            if self.tracked():
                self._guarded("ack", self._accepted, job, pid)
            return result

        def on_ready(job: int, i: int, obj: Any, inqw_fd: int) -> Any:
            pid = self._guarded("ready", self._ready, job)
            result = ready(job, i, obj, inqw_fd)
            if pid in self.recycling:  # nothing more is written to a child on its way out
                with contextlib.suppress(AttributeError):
                    pool._busy_workers.add(inqw_fd)
            if self.held:
                self._guarded("release", self.release)
            return result

        def on_alive(pid: int) -> Any:
            result = alive(pid) if alive else None
            self._tell("child_alive", pid)
            return result

        if alive is not None:
            handlers[WORKER_UP] = on_alive
        pool.on_process_up, pool.on_process_down = on_process_up, on_process_down
        pool.on_job_process_down = on_job_process_down
        pool.on_job_process_lost = on_job_process_lost
        handlers[ACK], handlers[READY] = on_ack, on_ready

    def _wrap_fork(self, pool: Any) -> None:
        """Time what a fork costs the main process's one thread: its event loop waits
        that long, once for every child replaced."""
        create = getattr(pool, "_create_worker_process", None)
        if create is None:
            return

        def create_worker_process(*args: Any, **kwargs: Any) -> Any:
            began = time.thread_time()
            try:
                return create(*args, **kwargs)
            finally:  # the main process only: billiard's child leaves through os._exit
                self.fork_seconds += time.thread_time() - began
                self.forks += 1

        pool._create_worker_process = create_worker_process

    def _wrap_resize(self, task_pool: Any) -> None:
        """Hear a resize asked of Celery's pool by anyone but the guard."""
        grow, shrink = getattr(task_pool, "grow", None), getattr(task_pool, "shrink", None)
        if grow is None or shrink is None:
            return

        def grown(n: int = 1) -> Any:
            result = grow(n)
            if not self._resizing:
                self._tell("resized", n)
            return result

        def shrunk(n: int = 1) -> Any:
            result = shrink(n)
            self._tell("resized", -n)
            return result

        task_pool.grow, task_pool.shrink = grown, shrunk

    def _wrap_hand_over(self, w: Any, semaphore: Any) -> None:
        start = self._start_task = w._process_task
        clear = semaphore.clear

        def process_task(request: Any) -> None:
            if self.held:  # behind the ones held: in order
                self._hold(request)
                self._guarded("release", self.release)
            elif self._verdict(request) is Verdict.HAND_OVER:  # most of them, at once
                self._hand_over(request, start)
            else:
                self._hold(request)

        def clear_semaphore() -> None:
            # Celery clears its semaphore when the broker connection is lost: the
            # messages come back from the broker, so held requests are dropped too.
            self.held.clear()
            self.held_since.clear()
            clear()

        w._process_task = process_task
        semaphore.clear = clear_semaphore

    def _tell(self, event: str, *args: Any) -> None:
        """Tell every listener of ``event``; one that fails is logged, the next still told."""
        for listener in self.listeners:
            try:
                getattr(listener, event)(*args)
            except Exception:  # noqa: BLE001 - the pool's own callback must still run
                logger.exception("celery-guard event=error stage=%s", event)

    def _guarded(self, stage: str, function: Callable[..., Any], *args: Any) -> Any:
        """Run a guard callback inside the pool's: an error is logged, never raised."""
        try:
            return function(*args)
        except Exception:  # noqa: BLE001 - the pool's own callback must still run
            logger.exception("celery-guard event=error stage=%s", stage)
            return None

    # -- events ----------------------------------------------------------------------
    def _up(self, process: Any) -> None:
        pid = process.pid
        self.children[pid] = Child(pid, procfs.known(procfs.start_time(pid, self.proc)), process)
        for listener in self.listeners:
            listener.child_up(pid)

    def _down(self, process: Any, task: tuple[str, str] | None) -> None:
        pid = process.pid
        self.children.pop(pid, None)
        self.recycling.discard(pid)
        if self.read_records is not None:
            self._guarded("records", self.read_records)
        for listener in self.listeners:
            listener.child_down(pid, process.exitcode, task)

    def _accepted(self, job: int, pid: int) -> None:
        result = self.pool._cache.get(job)
        if result is None:
            return
        name, task_id = self._task_of(result)
        for listener in self.listeners:
            listener.task_accepted(pid, task_id, name)

    def _ready(self, job: int) -> int | None:
        """A child finished a job: tell the listeners, recycle it when one asks; its pid."""
        result = self.pool._cache.get(job)
        pids = result.worker_pids() if result is not None else []
        if not pids:
            return None
        pid, task_id = pids[0], result.correlation_id
        if self.read_records is not None and self._records_first(result):
            self._guarded("records", self.read_records)
        recycle = False
        for listener in self.listeners:
            recycle = listener.task_ready(pid, task_id) or recycle
        if recycle:
            self.recycle(pid, task_ended=True)
        return pid

    def _lost(self, job: Any, pid: int, exitcode: int | None) -> Exception | None:
        if self.on_lost is None:
            return None
        request = worker_state.requests.get(job.correlation_id)
        task = getattr(request, "task", None)
        lost = LostJob(
            pid,
            exitcode,
            job.correlation_id,
            getattr(request, "name", None) or "?",
            bool(getattr(task, "acks_late", False)),
            bool(getattr(task, "reject_on_worker_lost", False)),
        )
        return self.on_lost(lost)

    @staticmethod
    def _task_of(job: Any) -> tuple[str, str]:
        """(name, id) of a billiard job: its correlation id is the task id."""
        request = worker_state.requests.get(job.correlation_id)
        return (request.name if request is not None else "?"), job.correlation_id

    # -- the hand-over gate ----------------------------------------------------------
    def release(self) -> None:
        """Hand over held requests, oldest first, while the gate lets them; a request the
        gate defers (its kind is being measured) does not block the ones behind, one it
        holds does."""
        start = self._start_task
        if not self.held or start is None:
            return
        kept: deque[Any] = deque()
        while self.held:
            request = self.held.popleft()
            verdict = self._verdict(request)
            if verdict is Verdict.HAND_OVER:
                self.held_since.pop(request.id, None)
                self._hand_over(request, start)
            elif verdict is Verdict.DEFER:  # try the next one
                kept.append(request)
            else:  # held: no room or no child, keep the order
                kept.append(request)
                kept.extend(self.held)
                self.held.clear()
        self.held = kept

    def _hold(self, request: Any) -> None:
        self.held.append(request)
        self.held_since.setdefault(request.id, time.monotonic())

    def _hand_over(self, request: Any, start: Callable[[Any], Any]) -> None:
        try:
            start(request)
        except Exception:  # noqa: BLE001 - as ``_guarded``, one call less per task
            logger.exception("celery-guard event=error stage=hand_over")
        if self.tracked() and reached_pool(request):
            self._tell("task_handed", request)

    def tracked(self) -> bool:
        """Does a listener follow tasks one by one now (``Listener.tracks_tasks``)?"""
        for listener in self.listeners:
            if listener.tracks_tasks:
                return True
        return False

    def _records_first(self, job: Any) -> bool:
        """Must the children's records be read before ``job``'s end is told?"""
        name = None  # looked up only when a listener watches some task
        for listener in self.listeners:
            if listener.tracks_tasks:
                return True
            if listener.records_before_end:
                name = name or self._task_of(job)[0]
                if name in listener.records_before_end:
                    return True
        return False

    def in_flight(self) -> list[tuple[str, str, int | None]]:
        """(task id, name, pid: None until a child accepts it) of each task in billiard's
        result cache: what a listener that starts following tasks begins from."""
        found = []
        for job in list(self.pool._cache.values()):
            if getattr(job, "correlation_id", None) is None:
                continue  # not a task's job (Celery hands the pool nothing else)
            name, task_id = self._task_of(job)
            pids = job.worker_pids()
            found.append((task_id, name, pids[0] if pids else None))
        return found

    def overdue(self, now: float, bound: float) -> list[Any]:
        """Held requests that have waited ``bound`` seconds or more."""
        since = self.held_since
        return [r for r in self.held if now - since.get(r.id, now) >= bound]

    def give_back(self, request: Any) -> bool:
        """Return a held request's message to its queue (rejected with requeue: delivered
        again, here or elsewhere, with a new timer) and free its slot, as Celery does with
        a request it will not run. False when it was not held (handed over meanwhile)."""
        try:
            self.held.remove(request)
        except ValueError:
            return False
        self.held_since.pop(request.id, None)
        request.reject(requeue=True)
        worker_state.task_ready(request)
        release = getattr(self.w, "_quick_release", None)
        if release is not None:
            release()
        return True

    def _verdict(self, request: Any) -> Verdict:
        gate = self.gate
        if gate is None:
            return Verdict.HAND_OVER
        try:
            return gate(request)
        except Exception:  # noqa: BLE001 - a failed decision must not lose the task
            name = getattr(request, "name", None) or "?"
            logger.exception("celery-guard event=error stage=gate task=%s", name)
            return Verdict.HAND_OVER

    # -- reading the pool ------------------------------------------------------------
    @property
    def size(self) -> int:
        return int(self.w.pool.num_processes)

    def pids(self) -> list[int]:
        """The pool's children, as its hooks saw them come and go (read from other threads:
        ``dict.copy`` is one step for the interpreter, iterating is not)."""
        return list(self.children.copy())

    def rss(self, pid: int) -> int | None:
        return procfs.known(procfs.rss(pid, self.proc))

    def _current(self, pid: int) -> Child | None:
        """The child ``pid`` if it is still the process that was forked: alive, in the
        pool, and with the start time it had then (the pid was not reused). A start time
        the guard may not read (``hidepid``) leaves the pool's word standing."""
        child = self.children.get(pid)
        if child is None or child.process.exitcode is not None:
            return None
        if child.started is not None:
            now = procfs.start_time(pid, self.proc)
            if now is procfs.Unread.GONE or (isinstance(now, int) and now != child.started):
                return None
        return child

    def ready(self, pid: int) -> bool:
        """Has the child said it is ready for work (billiard's WORKER_UP)? Asked of
        AsynPool's ``_waiting_to_start``: the message of a child forked before the hooks
        may have come before them. Not known or not said: ready."""
        child = self.children.get(pid)
        if child is None or child.process is None:
            return True
        waiting = getattr(getattr(getattr(self.w, "pool", None), "_pool", None),
                          "_waiting_to_start", None)  # fmt: skip
        return waiting is None or child.process not in waiting

    # -- acting ----------------------------------------------------------------------
    def grow(self, count: int = 1) -> None:
        """Add children now, not at billiard's next maintenance (every few seconds)."""
        self._resizing = True
        try:
            self.w.pool.grow(count)
        finally:
            self._resizing = False
        maintain = getattr(getattr(self.w.pool, "_pool", None), "maintain_pool", None)
        if maintain is not None:  # a pool without it forks them at its own pace
            maintain()

    def replace_exited(self) -> None:
        """Join children that exited and fork their replacements now: one seen closing its
        sentinel before the kernel reports its exit is otherwise joined at the next
        periodic maintenance, up to 5 seconds later, its slot empty all that time."""
        self.pool.maintain_pool()

    def exited_unjoined(self) -> tuple[int, int]:
        """Children that exited and the pool has not joined, and how many of those it missed
        (Celery stops watching a sentinel once it fires: ``_sentinel_poll`` None). Reaps
        them (waitpid, WNOHANG): billiard's join takes the status it keeps."""
        exited = missed = 0
        for process in list(self.pool._pool):
            popen = getattr(process, "_popen", None)
            if popen is not None and popen.poll() is not None:
                exited += 1
                missed += getattr(process, "_sentinel_poll", 0) is None
        return exited, missed

    def recycle(self, pid: int, task_ended: bool = False) -> bool:
        """Replace an idle child: it exits (billiard's controlled termination) and the pool
        forks a new one in its place. ``task_ended``: called as its task's result came
        in; else it must be idle in the pool's own eyes too (no job written to it)."""
        child = self._current(pid)
        if child is None or (not task_ended and self._written_to(child)):
            return False
        self._leave(child)
        return True

    def retire(self, pid: int, task_ended: bool = False) -> bool:
        """Take an idle child out of the pool for good: the pool is one smaller.
        ``task_ended``: as for ``recycle``."""
        child = self._current(pid)
        if child is None or self.size <= 1 or (not task_ended and self._written_to(child)):
            return False
        self._one_slot_fewer()
        self._leave(child)
        return True

    def _one_slot_fewer(self) -> None:
        """The pool one smaller, as billiard's own ``Pool.shrink`` makes it (its slot count,
        its put lock, its hook); the child in that slot is told to leave by the caller."""
        pool = self.pool
        pool._processes -= 1
        if pool._putlock:
            pool._putlock.shrink()
        pool.on_shrink(1)

    def _written_to(self, child: Child) -> bool:
        """Has the pool scheduled a job for this child (the fair scheduler marks it busy
        when it picks it, before the write)?"""
        busy = getattr(self.pool, "_busy_workers", None)
        return busy is not None and getattr(child.process, "inqW_fd", None) in busy

    def _leave(self, child: Child) -> None:
        """Let a child exit between tasks, marked busy first: nothing more is written to it."""
        self.recycling.add(child.pid)
        busy = getattr(self.pool, "_busy_workers", None)
        fd = getattr(child.process, "inqW_fd", None)
        if busy is not None and fd is not None:
            busy.add(fd)
        child.process.terminate_controlled()

    def kill(self, pid: int, shrink: bool) -> bool:
        """SIGKILL a child, its task lost (the last resort); ``shrink``: its slot too, never
        the last."""
        child = self._current(pid)
        if child is None:
            return False
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        if shrink and self.size > 1:
            self._one_slot_fewer()
        return True


__all__ = ["Child", "Listener", "PoolControl", "Verdict", "pool_size"]
