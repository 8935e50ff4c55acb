"""What the guard costs per task: the same no-op tasks through real workers, with and
without celery-guard, in alternating bursts, by wall time and by CPU time.

Usage (redis-server installed; from the repository, after ``bash tests/run.sh``)::

    .venv/bin/python bench/overhead.py [--tasks 1000] [--rounds 15] [--concurrency 2]

It starts an unguarded and a guarded worker of the example app (small data, Redis broker
and result backend, default guard settings) side by side, each in a memory cgroup of its
own whose limit (``--limit-mib``) is far above what they use: the guard's governor (the
gate every task passes, the ledger) acts only under a cgroup's limit, and a figure taken
without it would leave out the main process' share of the cost. So far below its limit
the governor has room to spare and tracks no task (``policy.roomy``): the figure is that
of a worker with room to spare (docs/how-it-works.md gives what tracking costs). The
guarded worker's ``guard_stats`` must say so (``tracking`` false) after its warm-up, else
the run stops. Then it runs them in turn, the
order swapped every round: a burst queues ``--tasks`` no-op tasks where the worker does
not consume, tells the worker to consume that queue (``add_consumer``) and waits for the
last result. The sender's work is not in the figure. Each burst is timed by the wall
clock, from the first task's end to the last's as the worker stored them (the results'
``date_done``: the time Redis' transport takes to notice a new queue, up to its
``brpop_timeout`` of 1 s, is left out), and by the CPU time of the worker's processes
over the whole burst (the main process and its pool children, user + system, from
psutil); the main process' CPU is also shown alone (its one
thread limits Celery's throughput of short tasks). The speed of this shared machine's
CPUs drifts by tens of percent within a minute, so the figure is the median of the
ratios of bursts run next to each other (guarded/unguarded), with its quartiles; and the
guard's median hold decision (``guard_stats``; holds come only under memory pressure, so
often there is none). It also times the guard's per-task code alone, warm, in a loop: the
child's hooks, and the main process's path (the hand-over, the child's acceptance and the
task's end, through a real ``PoolControl`` and a ``Governor`` with room to spare, over a
pool with no children: ``main_path_cost``), against the same loop without the guard.

Exit status 0 whatever the figures: they are reported, not asserted (a timed assertion
on a shared 2-CPU machine fails for reasons that are not the code's).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
import timeit
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

import harness  # noqa: E402
from celery_guard import cgroups  # noqa: E402
from celery_guard.actuator import Child, PoolControl  # noqa: E402
from celery_guard.config import Settings, load_settings  # noqa: E402
from celery_guard.exits import ExitCauses  # noqa: E402
from celery_guard.governor import Governor  # noqa: E402
from celery_guard.ledger import Record  # noqa: E402
from celery_guard.limit import LiveLimit  # noqa: E402
from celery_guard.telemetry import ChildProbe, ExitListener  # noqa: E402

SMALL_APP = {"HEAVY_APP_OBJECTS": "1000", "HEAVY_APP_BUFFER_MIB": "1"}
MIB = 1024 * 1024


@dataclass
class Burst:
    wall: float  # seconds from the first task's end to the last's, by the worker's clock
    cpu: float  # CPU seconds of the worker's processes over that time
    main_cpu: float  # of its main process alone


def _cpu(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


def _wait_last(results: list, timeout: float) -> None:
    """Wait for every result, asking Redis about one unfinished result at a time (the
    results come back in about the order sent)."""
    deadline = time.monotonic() + timeout
    index = 0
    while index < len(results):
        if results[index].ready():
            if not results[index].successful():
                raise SystemExit(f"task {results[index].id} failed")
            index += 1
            continue
        if time.monotonic() > deadline:
            raise SystemExit(f"{len(results) - index} tasks unfinished after {timeout} s")
        time.sleep(0.005)


class Contender:
    """One worker, started once, run in bursts of queued tasks."""

    def __init__(
        self,
        redis: harness.RedisServer,
        workdir: Path,
        concurrency: int,
        guard: bool,
        limit_mib: int,
    ) -> None:
        from celery import Celery

        self.redis, self.guard = redis, guard
        self.cgroup = harness.Cgroup(harness.own_memory_cgroup(), limit=limit_mib * MIB)
        env = harness.worker_env(redis, SMALL_APP, guard=guard)
        self.worker = harness.Worker(
            args=["-c", str(concurrency), "-l", "warning"],
            env=env,
            log_path=workdir / f"w-{concurrency}-{int(guard)}.log",
            cgroup=self.cgroup,
        )
        self.worker.start()
        self.node = f"{self.worker.queue}@{socket.gethostname()}"
        self.client = Celery("client", broker=redis.url(0), backend=redis.url(1))
        self.bursts = 0
        _wait_last(harness.send_tasks(redis, self.worker.queue, "noop", 200), 120)
        governor = self.governor() if guard else {}
        if governor is None:
            self.stop()
            raise SystemExit(
                "the guarded worker runs no governor (guard_stats has no 'governor'):"
                " its gate would not be in the figure"
            )
        # the governor judges its room at each tick of its clock: the first after the
        # warm-up's tasks were measured
        deadline = time.monotonic() + 10
        while governor.get("tracking") and time.monotonic() < deadline:
            time.sleep(0.1)
            governor = self.governor() or {}
        if governor.get("tracking"):
            self.stop()
            raise SystemExit("the guarded worker tracks every task: it has no room to spare")

    def governor(self) -> dict | None:
        """The governor's section of ``guard_stats``: present when its gate runs."""
        (reply,) = self.client.control.broadcast(
            "guard_stats", reply=True, destination=[self.node], timeout=10
        )
        return reply[self.node].get("governor")

    def burst(self, tasks: int) -> Burst:
        """Queue ``tasks`` where the worker does not consume, then let it consume them."""
        self.bursts += 1
        queue = f"{self.worker.queue}-{self.bursts}"
        results = harness.send_tasks(self.redis, queue, "noop", tasks)
        assert self.worker.process is not None
        main = psutil.Process(self.worker.process.pid)
        processes = [main, *main.children(recursive=True)]
        before = [_cpu(p) for p in processes]
        self.client.control.add_consumer(queue, destination=[self.node], reply=True, timeout=10)
        _wait_last(results, 600)
        after = [_cpu(p) for p in processes]
        self.client.control.cancel_consumer(queue, destination=[self.node], reply=True)
        done = [harness.date_done(result) for result in results]
        wall = (max(done) - min(done)).total_seconds()
        return Burst(wall, sum(after) - sum(before), after[0] - before[0])

    def hold_decision_p50_us(self) -> float | None:
        value = (self.governor() or {}).get("hold_decision_p50_us")
        return float(value) if value is not None else None

    def stop(self) -> None:
        try:
            self.worker.stop()
        finally:
            self.cgroup.close()


def hook_cost() -> float:
    """Seconds per task of the child's hooks, as a child runs them (no line logged)."""
    probe = ChildProbe(None, "bench@host", load_settings({}, {}), max_memory_kib=0)
    probe.on_child_start()

    class Task:
        name = "bench.noop"

    task = Task()

    def one() -> None:
        probe.before_task()
        probe.after_task(task_id="x", task=task)

    calls = 100_000
    return timeit.timeit(one, number=calls) / calls


class _Job:
    """A billiard job as PoolControl reads it from the pool's result cache."""

    def __init__(self, task_id: str, pid: int) -> None:
        self.correlation_id, self.pid = task_id, pid

    def worker_pids(self) -> list[int]:
        return [self.pid]


class _Pool:
    """What PoolControl wraps on billiard's AsynPool: its handlers do what billiard's
    must at the least (the result handler drops the job from the cache)."""

    def __init__(self) -> None:
        from billiard.pool import ACK, READY

        self._pool: list[Any] = []
        self._cache: dict[int, _Job] = {}
        self._busy_workers: set[int] = set()
        handlers = {ACK: lambda *_: None, READY: lambda job, *_: self._cache.pop(job, None)}
        self._result_handler = SimpleNamespace(state_handlers=handlers)
        self.on_process_up = self.on_process_down = None
        self.on_job_process_down = self.on_job_process_lost = lambda *_: None


class _Worker:
    """Celery's WorkController as far as the hand-over goes: its ``_process_task``
    puts the job in the pool's cache, for a child chosen in turn."""

    def __init__(self) -> None:
        self.pool = SimpleNamespace(_pool=_Pool(), num_processes=2)
        self.semaphore = SimpleNamespace(clear=lambda: None)
        self.process_task = self._process_task_sem
        self.jobs = 0

    def _process_task_sem(self, request: Any) -> None:
        self._process_task(request)

    def _process_task(self, request: Any) -> None:
        self.jobs += 1
        request.job = self.jobs
        self.pool._pool._cache[self.jobs] = _Job(request.id, 101 + self.jobs % 2)


def _guarded_worker(workdir: Path) -> _Worker:
    """A fake worker under a real PoolControl and Governor, with room to spare (the
    cgroup 300 MiB used of 4 GiB, two children measured at 30 MiB)."""
    (workdir / "memory.usage_in_bytes").write_text(f"{300 * MIB}\n")
    (workdir / "memory.stat").write_text("cache 0\ntotal_inactive_file 0\n")
    w = _Worker()
    control = PoolControl(w)
    if not control.install():
        raise SystemExit("PoolControl did not install on the fake pool")
    control.read_records = lambda: None  # as the guard sets it
    collector = SimpleNamespace(on_child_up=lambda pid: None, on_exit=lambda *_: None)
    control.listeners.append(ExitListener(collector))  # type: ignore[arg-type]
    for pid in (101, 102):
        control.children[pid] = Child(pid, None, None)
    settings = Settings()
    governor = Governor(
        control, settings, cgroups.Cgroup(1, str(workdir), str(workdir)),
        LiveLimit(4096 * MIB, settings), requested=2, estimate=30 * MIB, others=0,
        hostname="bench@host", exits=ExitCauses(None), cpus=2, may_untrack=True,
    )  # fmt: skip
    governor.start(SimpleNamespace(call_later=lambda *_: None, call_soon=lambda *_: None))
    for pid in (101, 102):
        governor.post(Record(pid, "t", 0, False, 0, 200 * MIB, 30 * MIB, cpu=1, tasks=1))
    governor.tick()
    if not governor.roomy:
        raise SystemExit("the governor found no room to spare on the fake pool")
    return w


def main_path_cost(tasks: int = 5000, repeats: int = 9) -> tuple[float, float]:
    """Seconds per task of the main process's path without and with the guard: each
    task handed over, accepted and ended through the pool's handlers; the fastest of
    ``repeats`` loops of each."""
    from billiard.pool import ACK, READY

    def loop_seconds(w: _Worker) -> float:
        handlers = w.pool._pool._result_handler.state_handlers
        ack, ready = handlers[ACK], handlers[READY]
        requests = [SimpleNamespace(id=f"id-{n}", name="t") for n in range(tasks)]
        began = time.perf_counter()
        for request in requests:
            w._process_task(request)
            ack(request.job, 0, 0.0, 101 + request.job % 2, 5)
            ready(request.job, 0, None, 5)
        return time.perf_counter() - began

    plain, guarded = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            plain.append(loop_seconds(_Worker()))
            guarded.append(loop_seconds(_guarded_worker(Path(tmp))))
    return min(plain) / tasks, min(guarded) / tasks


@dataclass
class Comparison:
    """Bursts run in turn by an unguarded and a guarded worker, in pairs."""

    concurrency: int
    tasks: int  # per burst
    pairs: list[dict[bool, Burst]]
    hold_p50_us: float | None  # the guarded worker's median hold decision (guard_stats)

    def median(self, guard: bool, figure: str) -> float:
        return statistics.median(getattr(p[guard], figure) for p in self.pairs)

    def ratios(self, figure: str) -> list[float]:
        """guarded/unguarded of each pair, sorted."""
        return sorted(getattr(p[True], figure) / getattr(p[False], figure) for p in self.pairs)

    def ratio(self, figure: str) -> float:
        return statistics.median(self.ratios(figure))

    def quartiles(self, figure: str) -> tuple[float, float]:
        found = self.ratios(figure)
        return found[len(found) // 4], found[(3 * len(found)) // 4]


def compare(
    redis: harness.RedisServer,
    workdir: Path,
    concurrency: int,
    tasks: int,
    rounds: int,
    verbose: bool = False,
    limit_mib: int = 4096,
) -> Comparison:
    contenders = {g: Contender(redis, workdir, concurrency, g, limit_mib) for g in (False, True)}
    try:
        pairs: list[dict[bool, Burst]] = []
        for index in range(rounds):
            pair = {}
            for guard in (False, True) if index % 2 == 0 else (True, False):
                pair[guard] = found = contenders[guard].burst(tasks)
                if verbose:
                    print(f"  {index + 1:3} {'guarded  ' if guard else 'unguarded'}"
                          f" wall {found.wall:.3f} s cpu {found.cpu:.3f} s"
                          f" main cpu {found.main_cpu:.3f} s", flush=True)  # fmt: skip
            pairs.append(pair)
        hold = contenders[True].hold_decision_p50_us()
    finally:
        for contender in contenders.values():
            contender.stop()
    return Comparison(concurrency, tasks, pairs, hold)


FIGURES = (("wall", "wall time"), ("cpu", "CPU time"), ("main_cpu", "main CPU"))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000, help="tasks per burst")
    parser.add_argument("--rounds", type=int, default=15, help="bursts per worker")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[2])
    parser.add_argument(
        "--limit-mib", type=int, default=4096, help="each worker's cgroup limit (MiB)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print every burst")
    options = parser.parse_args()
    print(f"the child's per-task hooks alone: {hook_cost() * 1e6:.2f} us per task")
    plain, guarded = main_path_cost()
    print(
        f"the main process's per-task path alone: {guarded * 1e6:.2f} us per task,"
        f" {plain * 1e6:.2f} us without the guard"
    )
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        redis = harness.RedisServer(workdir)
        try:
            for concurrency in options.concurrency:
                found = compare(
                    redis, workdir, concurrency, options.tasks, options.rounds,
                    options.verbose, options.limit_mib,
                )  # fmt: skip
                report(found)
        finally:
            redis.close()


def report(found: Comparison) -> None:
    print(
        f"-c {found.concurrency}: {len(found.pairs)} alternating pairs of bursts of"
        f" {found.tasks} no-op tasks"
    )
    for figure, label in FIGURES:
        low, high = found.quartiles(figure)
        print(
            f"  {label:9}: median unguarded {found.median(False, figure):.3f} s,"
            f" guarded {found.median(True, figure):.3f} s;"
            f" ratio of pairs: median {found.ratio(figure):.3f} (quartiles {low:.3f}-{high:.3f})"
        )
    hold = found.hold_p50_us
    print(
        "  hold decision p50: "
        + (f"{hold:.1f} us" if hold is not None else "no hold in these rounds")
    )


if __name__ == "__main__":
    main()
