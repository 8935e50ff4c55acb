"""Run time under memory pressure: celery-guard against the best hand-tuned vanilla worker.

Usage (root, cgroup v1, redis-server installed; from the repository)::

    .venv/bin/python bench/runtime.py [--quick] [--workload leaky transient]
        [--limit 768 1024] [--rounds 3]

Two workloads of the example app (``examples/heavy_app.py``, about 180 MiB main process),
the guard asked for ``-c 16``:

- ``leaky``: 240 tasks that each keep 24 MiB for the life of their child (``leak``);
- ``transient``: 160 tasks that each use 60 MiB for 0.3 s, then free it (``hog``).

For each workload and limit, vanilla Celery runs a small grid of ``-c`` and
``--max-memory-per-child`` (in KiB, set from the main process's RSS as a user would: room
for N leaks above it); the best hand-tuned vanilla is the fastest grid run that finished
every task with no OOM kill. Then ``--rounds`` rounds, in turn, of that vanilla setting
and of the guard with early and with late acks; the ratio is of the medians. Every run is
timed alike: its tasks wait in the queue before the worker starts, the clock runs from the
worker's start to the last result stored. What fits is
the largest ``-c`` of the grid that ran clean. ``run.py`` writes the rows into
BENCHMARKS.md; ``--quick`` (CI) runs one limit, a two-point grid and one round.

Exit status 1 when a guarded run lost, stopped or did not finish a task, or had an OOM
kill (what the guard is for); the times are reported, not judged.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT)]

import harness  # noqa: E402
from harness import MIB  # noqa: E402

REQUESTED = 16
TIMEOUT = 240.0


@dataclass(frozen=True)
class Workload:
    name: str
    task: str
    args: tuple[Any, ...] | Callable[[int], tuple[Any, ...]]  # or the n-th task's args
    tasks: int
    concurrencies: tuple[int, ...]  # vanilla's grid
    leaks: tuple[int, ...]  # vanilla's grid: --max-memory-per-child room, in leaks (0: none)
    quick: tuple[tuple[int, int], ...]  # the grid of --quick: (-c, leaks)
    env: tuple[tuple[str, str], ...] = ()  # the app's settings (both workers)
    app: str = "heavy_app"  # the module of the Celery app (-A)
    leak_mib: int = 0  # what one task keeps, a step of vanilla's --max-memory-per-child grid
    #: more kinds of task sent with the first, interleaved: (task, args, count)
    more: tuple[tuple[str, Any, int], ...] = ()

    def sends(self) -> list[tuple[str, tuple[Any, ...]]]:
        """(task, args) of every task, in the order sent: the kinds interleaved."""
        kinds = [(self.task, self.args, self.tasks), *self.more]
        out = []
        for n in range(max(count for _, _, count in kinds)):
            for task, args, count in kinds:
                if n < count:
                    out.append((task, args(n) if callable(args) else args))
        return out

    @property
    def count(self) -> int:
        return self.tasks + sum(count for _, _, count in self.more)


LEAK_MIB = 24
WORKLOADS = {
    "leaky": Workload("leaky", "leak", (LEAK_MIB,), 240, (3, 4, 5, 6, 8), (0, 2, 4, 6),
                      ((4, 4), (5, 4)), leak_mib=LEAK_MIB),
    # Leaky, fast tasks, dear children, a small main process: each task keeps 24 MiB and
    # takes 5 ms; a child spends 0.5 s of CPU starting (a model loaded in
    # worker_process_init).
    "leaky-fast": Workload("leaky-fast", "leak", (LEAK_MIB, 0.005), 240, (2, 3, 4, 6, 8, 12),
                           (1, 2, 4, 8, 16), ((2, 8), (4, 4)),
                           (("HEAVY_APP_CHILD_START_SECONDS", "0.5"),
                            ("HEAVY_APP_OBJECTS", "1000"), ("HEAVY_APP_BUFFER_MIB", "1")),
                           leak_mib=LEAK_MIB),
    "transient": Workload("transient", "hog", (60, 0.3), 160, (4, 5, 6, 7, 8), (0,),
                          ((6, 0), (7, 0))),
}  # fmt: skip


@dataclass
class Outcome:
    """One worker run of a workload."""

    label: str
    seconds: float | None  # None: not every task finished in time
    succeeded: int
    sent: int
    failed: dict[str, int]  # exception class name (or "unfinished") -> tasks
    oom_kills: int
    main_cpu: float | None = None  # CPU seconds of the main process
    #: CPU seconds of the worker's processes over the worker's whole life, startup and
    #: stop included (what this process reaped: the worker, and the children it reaped)
    cpu: float | None = None
    #: from the results' end times: seconds from the worker's start to the end of the
    #: first tenth of them (the pool's start), and milliseconds per task from there to
    #: the end of nine tenths (its pace once started)
    ramp: float | None = None
    pace: float | None = None
    peak_usage: float | None = None  # MiB: the cgroup's own record of its highest usage
    #: the guard's figures: smallest pool after startup, its stops, recycles, holds, and
    #: the reaction times of its final summary
    smallest_pool: int | None = None
    stopped: int = 0
    recycles: int = 0
    holds: int = 0
    turns: int | None = None  # the pool's changes of direction after its first plan
    summary: dict[str, str] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return self.seconds is not None and self.succeeded == self.sent and not self.oom_kills

    log: Path | None = None

    def problems(self) -> list[str]:
        """What makes a guarded run fail what the guard is for: a task lost or not
        finished, an OOM kill, a running task stopped."""
        found = []
        if self.seconds is None:
            found.append("unfinished")
        if self.succeeded != self.sent:
            failed = ", ".join(f"{k} {v}" for k, v in sorted(self.failed.items()))
            found.append(f"{self.sent - self.succeeded} of {self.sent} not done ({failed})")
        if self.oom_kills:
            found.append(f"{self.oom_kills} OOM kills")
        if self.stopped:
            found.append(f"{self.stopped} running tasks stopped by the guard")
        return found

    def line(self, best: float | None = None) -> str:
        seconds = f"{self.seconds:6.1f} s" if self.seconds is not None else "   n/a  "
        ratio = f", ratio {self.seconds / best:.2f}" if best and self.seconds else ""
        failed = ", ".join(f"{k} {v}" for k, v in sorted(self.failed.items())) or "none"
        guard = (
            f", smallest pool {self.smallest_pool}, stopped {self.stopped}, recycles "
            f"{self.recycles}, holds {self.holds}, turns after the plan "
            f"{'none planned' if self.turns is None else self.turns}, working set at most "
            f"{self.summary.get('working_set_max_mib') or '?'} MiB"
            if self.smallest_pool is not None
            else ""
        )
        peak = f", peak usage {self.peak_usage:.0f} MiB" if self.peak_usage else ""
        pace = (
            f", first tenth {self.ramp:.2f} s, pace {self.pace:.2f} ms/task, CPU {self.cpu:.1f} s"
            if self.ramp is not None and self.pace is not None and self.cpu is not None
            else ""
        )
        return (
            f"{self.label:28} {seconds} {self.succeeded}/{self.sent} ok, failed: {failed}, "
            f"OOM kills {self.oom_kills}{peak}{guard}{pace}{ratio} "
            f"[{self.log.name if self.log else ''}]"
        )


class Runner:
    """Real parts for the runs: Redis, this process's memory cgroup, a work folder."""

    def __init__(
        self, workdir: Path, redis: harness.RedisServer | None = None,
        guard_env: dict[str, str] | None = None, env: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.workdir = workdir
        self.guard_env = guard_env or {}  # settings of the guarded runs
        self.env = env or {}  # of every run (the corpus: its PYTHONPATH, its server)
        self.root = harness.own_memory_cgroup()
        self.redis = redis or harness.RedisServer(workdir)
        self.count = 0
        #: the main process's RSS in KiB, as a user reads it, by the app's settings
        self.parent_kib: dict[tuple[tuple[str, str], ...], int] = {}  # by app and settings

    def run(
        self, workload: Workload, limit_mib: int, args: list[str], guard: bool,
        acks_late: bool, label: str,
    ) -> Outcome:  # fmt: skip
        self.count += 1
        group = harness.Cgroup(self.root, limit_mib * MIB)
        extra = dict(workload.env)
        if acks_late:
            extra["HEAVY_APP_ACKS_LATE"] = "1"
        extra.update(self.guard_env if guard else {})
        env = harness.worker_env(self.redis, {**self.env, **extra}, guard)
        log = self.workdir / f"runtime-{self.count}.log"
        worker = harness.Worker(args, env, log, cgroup=group, app=workload.app)
        # The tasks wait in the queue before the worker starts: each send costs this
        # process CPU time, which the worker would lose to it while thousands are sent. The
        # clock runs from the worker's start: what each worker does before its first task
        # (imports, forks, children that load a model) counts alike, guarded or not.
        results = send(self.redis, worker.queue, workload)
        seconds, main_cpu = None, None
        cpu_before = _reaped_cpu()
        start, started_at = time.monotonic(), time.time()
        worker.start()
        try:
            worker.wait_ready(90)
            seconds = _wait(worker, results, start + TIMEOUT)
            if seconds is not None:
                seconds -= start
            main_cpu = _cpu_seconds(worker.process.pid) if worker.process else None
        except AssertionError:  # the worker died before it was ready
            pass
        finally:
            worker.stop()
            oom_kills = group.oom_kills()
            peak_usage = group.max_usage() / MIB
            group.close()
        failed: dict[str, int] = {}
        succeeded = 0
        for r in results:
            if r.ready() and r.successful():
                succeeded += 1
            else:
                name = type(r.result).__name__ if r.ready() else "unfinished"
                failed[name] = failed.get(name, 0) + 1
        outcome = Outcome(label, seconds, succeeded, len(results), failed, oom_kills, main_cpu)
        outcome.cpu = _reaped_cpu() - cpu_before
        if seconds is not None and succeeded == len(results) >= 20:
            outcome.ramp, outcome.pace = _ramp_and_pace(results, started_at)
        outcome.log = log
        outcome.peak_usage = peak_usage
        if guard:
            _guard_figures(worker, outcome)
        return outcome


def send(redis: harness.RedisServer, queue: str, workload: Workload) -> list[Any]:
    """Send the workload's tasks by name, without importing its app here."""
    from celery import Celery

    client = Celery("client", broker=redis.url(0), backend=redis.url(1))
    return [
        client.send_task(f"{workload.app}.{task}", args=args, queue=queue)
        for task, args in workload.sends()
    ]


def _wait(worker: harness.Worker, results: list[Any], deadline: float) -> float | None:
    """When the last result came in (monotonic), or None: the deadline, or the main
    process died. Each look is one question to Redis, how many of the results are
    stored, so that waiting costs the CPUs the worker runs on next to nothing (asking
    for each unfinished result in turn made a round trip per result per look)."""
    if not results:
        return time.monotonic()
    backend = results[0].backend
    keys = [backend.get_key_for_task(r.id) for r in results]
    while time.monotonic() < deadline:
        if backend.client.exists(*keys) == len(keys):
            return time.monotonic()
        if worker.process is None or worker.process.poll() is not None:
            return None
        time.sleep(0.05)
    return time.monotonic() if backend.client.exists(*keys) == len(keys) else None


def _reaped_cpu() -> float:
    """User and system CPU seconds of the processes this one has reaped so far."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def _ramp_and_pace(results: list[Any], started_at: float) -> tuple[float, float]:
    """(seconds from ``started_at`` to the end of the first tenth of the tasks, milliseconds
    per task from there to the end of nine tenths), from the results' end times."""
    ends = sorted(harness.date_done(r).timestamp() for r in results)
    first, last = len(ends) // 10, len(ends) * 9 // 10
    return ends[first] - started_at, (ends[last] - ends[first]) / (last - first) * 1000


def _cpu_seconds(pid: int) -> float | None:
    """User and system CPU seconds of a process so far (``/proc/<pid>/stat``)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            fields = file.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _guard_figures(worker: harness.Worker, outcome: Outcome) -> None:
    startup = worker.events("startup")
    sizes = [int(s["concurrency"]) for s in startup[:1]]
    pressure = worker.events("pressure")
    recycles = [r for r in worker.events("recycle") if r.get("reason") == "budget"]
    smallest = worker.smallest_pool()  # once forked: the start's waves are no shrinking
    sizes += [smallest] if smallest is not None else []
    outcome.smallest_pool = min(sizes) if sizes else None
    outcome.stopped = sum(p["action"] == "terminate" for p in pressure)
    outcome.turns = worker.turns_after_plan()
    outcome.recycles = len(recycles)
    outcome.summary = worker.final_summary()
    outcome.holds = int(outcome.summary.get("holds") or 0)


def parent_kib(runner: Runner, workload: Workload) -> int:
    """The main process's RSS in KiB, as a user tuning vanilla reads it: from the guard's
    startup line (``parent_rss_mib``), once per app setting."""
    key = (("app", workload.app), *workload.env)
    if key not in runner.parent_kib:
        env = harness.worker_env(runner.redis, {**runner.env, **dict(workload.env)})
        runner.count += 1
        worker = harness.Worker(
            ["-c", "1"], env, runner.workdir / "parent.log", app=workload.app
        ).start()
        try:
            kib = int(float(worker.startup()["parent_rss_mib"]) * 1024)
        finally:
            worker.stop()
        runner.parent_kib[key] = kib
    return runner.parent_kib[key]


@dataclass
class Comparison:
    workload: str
    limit: int
    grid: list[Outcome]
    best: Outcome | None
    fits: int  # the largest -c of the grid that ran clean
    vanilla: list[Outcome]  # rounds of the best setting
    guard: dict[str, list[Outcome]]  # acks -> rounds
    #: settings that ran clean in the grid but not in every one of their rounds, with
    #: those rounds: a user would not keep them, so the next fastest clean run was timed
    rejected: list[tuple[str, list[Outcome]]] = field(default_factory=list)
    #: rounds of a vanilla worker set as the guard's final summary recommends
    recommended: list[Outcome] = field(default_factory=list)

    @staticmethod
    def median(outcomes: list[Outcome]) -> float | None:
        times = [o.seconds for o in outcomes if o.clean and o.seconds is not None]
        return statistics.median(times) if len(times) == len(outcomes) and times else None

    def plain(self) -> float | None:
        """The best hand-tuned vanilla time: the grid's fastest setting's, or the
        recommended pair's where it ran faster (a setting a user can make by hand too,
        so the grid missed a better one)."""
        times = [t for t in (self.median(self.vanilla), self.median(self.recommended)) if t]
        return min(times) if times else None

    def recommended_best(self) -> bool:
        plain, recommended = self.median(self.vanilla), self.median(self.recommended)
        return bool(plain and recommended and recommended < plain)

    def best_label(self) -> str:
        if self.recommended_best():
            return self.recommended[0].label + " (the recommended pair)"
        return self.best.label if self.best else "none"

    def ratio(self, acks: str) -> float | None:
        plain, guarded = self.plain(), self.median(self.guard[acks])
        return guarded / plain if plain and guarded else None

    def recommended_ratio(self) -> float | None:
        """The recommended pair's time against the best hand-tuned vanilla's."""
        plain, recommended = self.plain(), self.median(self.recommended)
        return recommended / plain if plain and recommended else None


def pace_lines(comparisons: list[Comparison]) -> list[str]:
    """Where the time went, beside the best hand-tuned vanilla setting's: the pool's start
    (the first tenth of the tasks), its pace once started and the CPU the worker used
    (medians of the rounds); rows measured before these figures were kept are left out."""
    lines = []
    for c in comparisons:
        vanilla = c.recommended if c.recommended_best() else c.vanilla
        rows = [("vanilla", vanilla)] + [(f"guard, {acks} acks", c.guard[acks]) for acks in c.guard]
        figures = []
        for label, runs in rows:
            ramp, pace, cpu = (
                [getattr(o, key) for o in runs if getattr(o, key) is not None]
                for key in ("ramp", "pace", "cpu")
            )
            if not runs or not len(ramp) == len(pace) == len(cpu) == len(runs):
                break
            figures.append(
                f"{label} {statistics.median(ramp):.2f} s, {statistics.median(pace):.2f} "
                f"ms/task, CPU {statistics.median(cpu):.1f} s"
            )
        else:
            lines.append(f"{c.workload} at {c.limit} MiB: " + "; ".join(figures))
    return lines


def compare(
    runner: Runner, workload: Workload, limit: int, rounds: int, quick: bool, say: Any = print
) -> Comparison:
    """The grid, the best of it, then rounds of the best and of the guard in turn."""
    kib = parent_kib(runner, workload)
    points = workload.quick if quick else [
        (c, n) for c in workload.concurrencies for n in workload.leaks
    ]  # fmt: skip
    grid = []
    for c, leaks in points:
        args = ["-c", str(c)]
        label = f"vanilla -c {c}"
        if leaks:
            max_kib = kib + leaks * workload.leak_mib * 1024
            args.append(f"--max-memory-per-child={max_kib}")
            label += f" --max-memory-per-child={max_kib}"
        outcome = runner.run(workload, limit, args, False, True, label)
        say("  " + outcome.line())
        grid.append(outcome)
    clean = sorted((o for o in grid if o.clean), key=lambda o: o.seconds or 0.0)
    best = clean.pop(0) if clean else None
    fits = max((int(o.label.split()[2]) for o in grid if o.clean), default=0)
    vanilla: list[Outcome] = []
    guard: dict[str, list[Outcome]] = {"early": [], "late": []}
    for index in range(rounds):
        if best is not None and (index or not quick):  # quick: the grid run is the round
            vanilla.append(_vanilla_round(runner, workload, limit, best, say))
        elif best is not None:
            vanilla.append(best)
        for acks in ("early", "late"):
            outcome = runner.run(
                workload, limit, ["-c", str(REQUESTED)], True, acks == "late",
                f"guard -c {REQUESTED} acks={acks}",
            )  # fmt: skip
            say("  " + outcome.line(best.seconds if best else None))
            guard[acks].append(outcome)
    rejected: list[tuple[str, list[Outcome]]] = []
    while best is not None and not all(o.clean for o in vanilla):
        rejected.append((best.label, vanilla))
        best = clean.pop(0) if clean else None
        say(f"  not clean in its rounds; next: {best.label if best else 'none'}")
        vanilla = [] if best is None else [
            _vanilla_round(runner, workload, limit, best, say) for _ in range(rounds)
        ]  # fmt: skip
    recommended = [
        runner.run(workload, limit, args, False, True, "vanilla " + " ".join(args))
        for args in [_recommended_args(guard["late"][-1])] * rounds
        if args
    ]
    for outcome in recommended:
        say("  recommended: " + outcome.line(best.seconds if best else None))
    return Comparison(workload.name, limit, grid, best, fits, vanilla, guard, rejected, recommended)


def _recommended_args(outcome: Outcome) -> list[str]:
    """A vanilla worker's options as the guard's final summary recommends them; none
    when it recommends nothing."""
    concurrency = outcome.summary.get("recommended_concurrency")
    kib = outcome.summary.get("recommended_max_memory_per_child_kib")
    if not concurrency:
        return []
    return ["-c", concurrency] + ([f"--max-memory-per-child={kib}"] if kib else [])


def _vanilla_round(
    runner: Runner, workload: Workload, limit: int, setting: Outcome, say: Any
) -> Outcome:
    outcome = runner.run(workload, limit, setting.label.split()[1:], False, True, setting.label)
    say("  " + outcome.line())
    return outcome


def _cell(outcomes: list[Outcome]) -> str:
    """Median seconds, and what went wrong in any round."""
    times = [o.seconds for o in outcomes if o.seconds is not None]
    text = f"{statistics.median(times):.1f} s" if len(times) == len(outcomes) and times else "n/a"
    oom = sum(o.oom_kills for o in outcomes)
    lost = sum(o.sent - o.succeeded for o in outcomes)
    stopped = sum(o.stopped for o in outcomes)
    if oom or lost or stopped:
        text += f" ({oom} OOM kills, {lost} tasks not done, {stopped} stopped)"
    return text


def render(comparisons: list[Comparison], rounds: int) -> list[str]:
    """The BENCHMARKS.md section: the grid's best, the rounds, the guard's figures."""
    lines = [
        "## Run time: against the best hand-tuned vanilla worker",
        "",
        f"`bench/runtime.py`. Leaky: {WORKLOADS['leaky'].tasks} tasks that each keep "
        f"{LEAK_MIB} MiB for the life of their child; leaky-fast: "
        f"{WORKLOADS['leaky-fast'].tasks} tasks that each keep {LEAK_MIB} MiB and take 5 ms, "
        "in the example app with small data whose children each spend 0.5 s of CPU "
        f"starting (dear children); transient: {WORKLOADS['transient'].tasks} tasks that "
        "each use 60 MiB for 0.3 s. The example app (its default size but for leaky-fast), "
        f"the guard asked for `-c {REQUESTED}` with default settings. "
        "Vanilla Celery ran a grid of `-c` and `--max-memory-per-child` (the main process's "
        "RSS plus room for 2, 4 or 6 leaks, or none); the best hand-tuned vanilla is the "
        "fastest grid run that did every task with no OOM kill, and *fits* is the largest "
        f"`-c` that ran clean. Then {rounds} rounds, in turn, of that setting and of the "
        "guard with early and with late acks: median seconds from the first task sent to "
        "the last result, and the ratio of the medians. A setting that ran clean in the "
        "grid but had an OOM kill or an unfinished task in one of its rounds is not one a "
        "user would keep: the next fastest clean grid run is timed in its place, in as "
        "many rounds (listed below the table). *Turns after the plan*: how often the "
        "guard's pool changed direction (grew after shrinking, or back) after its first "
        "throughput plan, the most of its rounds. *Recommended pair*: a vanilla worker "
        "started with the `--concurrency` and `--max-memory-per-child` of the guard's "
        "final summary (its last late-acks round), in as many rounds. Target: every task "
        "done, 0 OOM kills, 0 running tasks stopped by the guard, the pool never below half "
        "of what fits, at most the best vanilla time (issue 20), at most 2 turns, and the "
        "recommended pair within 10% of the best vanilla time.",
        "",
        *table(comparisons),
    ]
    return lines


def table(comparisons: list[Comparison]) -> list[str]:
    """The rows of the comparisons, what was rejected, and how fast the guard acted."""
    lines = [
        "| workload | limit | best vanilla (grid) | fits | vanilla | guard, early acks "
        "(ratio) | guard, late acks (ratio) | guard's smallest pool | recycles | holds | "
        "turns after the plan | recommended pair, vanilla (ratio) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        best = c.best_label().removeprefix("vanilla ") if c.best else "none ran clean"
        cells = []
        for acks in ("early", "late"):
            ratio = c.ratio(acks)
            cells.append(f"{_cell(c.guard[acks])} ({ratio:.2f})" if ratio else _cell(c.guard[acks]))
        guards = c.guard["early"] + c.guard["late"]
        smallest = min((o.smallest_pool for o in guards if o.smallest_pool), default=None)
        turns = [o.turns for o in guards if o.turns is not None]
        pair = c.recommended[0].label.removeprefix("vanilla ") if c.recommended else "none"
        ratio = c.recommended_ratio()
        lines.append(
            f"| {c.workload} | {c.limit} MiB | `{best}` | {c.fits} | {_cell(c.vanilla)} | "
            f"{cells[0]} | {cells[1]} | {smallest} | "
            f"{sum(o.recycles for o in guards) // max(len(guards), 1)} | "
            f"{sum(o.holds for o in guards) // max(len(guards), 1)} | "
            f"{max(turns) if turns else 'no plan'} | `{pair}`: {_cell(c.recommended)}"
            f"{f' ({ratio:.2f})' if ratio else ''} |"
        )
    for c in comparisons:
        for label, outcomes in c.rejected:
            lines += [
                "",
                f"{c.workload} at {c.limit} MiB: `{label.removeprefix('vanilla ')}` was the "
                f"fastest in the grid, but not clean in its rounds: {_cell(outcomes)}.",
            ]
    lines += [
        "",
        "How fast the guard acted, from its final summary lines (all guarded rounds):",
        "",
    ]
    decisions = _hold_decisions(comparisons)
    reactions = [float(o.summary["reaction_max_ms"]) for c in comparisons
                 for acks in c.guard for o in c.guard[acks]
                 if o.summary.get("reaction_max_ms")]  # fmt: skip
    if decisions:
        lines.append(
            f"- a task that would not fit is held before it reaches a child: the decision took "
            f"{statistics.median(decisions):.1f} us (median of the runs' medians, each "
            f"weighed by the decisions it held; "
            f"{min(decisions):.1f} to {max(decisions):.1f} us)"
        )
    else:
        lines.append("- no task was held")
    if reactions:
        lines.append(
            f"- from the working set passing the high-water mark to the safety net's action: "
            f"at most {max(reactions):.0f} ms"
        )
    else:
        lines.append(
            "- the working set never passed the high-water mark, so the safety net never had to act"
        )
    return [*lines, ""]


def targets(comparisons: list[Comparison]) -> list[str]:
    """Each run-time target, met or missed, with what missed it."""
    lines = []
    for c in comparisons:
        for acks in ("early", "late"):
            runs = c.guard[acks]
            ratio = c.ratio(acks)
            clean = not any(o.problems() for o in runs)
            smallest = min((o.smallest_pool or 0 for o in runs), default=0)
            fast = ratio is not None and ratio <= 1.0
            shown = f"{ratio:.2f}" if ratio is not None else "n/a"
            lines.append(
                f"- {c.workload} at {c.limit} MiB, {acks} acks: every task, 0 OOM kills, none "
                f"stopped: {_mark(clean)}; smallest pool {smallest} of {c.fits} that fit, at "
                f"least half: {_mark(2 * smallest >= c.fits)}; time ratio {shown} <= 1.0: "
                f"{_mark(fast)}"
            )
        turns = [o.turns for acks in c.guard for o in c.guard[acks] if o.turns is not None]
        most = max(turns, default=0)
        lines.append(
            f"- {c.workload} at {c.limit} MiB: the pool changed direction at most {most} "
            f"times after its first plan (<= 2): {_mark(most <= 2)}"
        )
        ratio = c.recommended_ratio()
        shown = f"{ratio:.2f}" if ratio is not None else "n/a"
        met = ratio is not None and ratio <= 1.1
        faster = " (faster than the grid's best: it is the best hand-tuned time)"
        lines.append(
            f"- {c.workload} at {c.limit} MiB: the recommended pair in a vanilla worker, time "
            f"ratio {shown}{faster if c.recommended_best() else ''} <= 1.1: "
            f"{_mark(met)}"
        )
    decisions = _hold_decisions(comparisons)
    if decisions:
        median = statistics.median(decisions)
        lines.append(
            f"- the hold decision's median under 20 us ({median:.1f} us, median of the guarded "
            f"runs' medians, each weighed by its holds): {_mark(median < 20)}"
        )
    return lines


def _mark(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _hold_decisions(comparisons: list[Comparison]) -> list[float]:
    """Each guarded run's median hold decision, once for each decision it held (its last
    256): the median of these is that of the decisions, not of the runs (a run that held
    one task, just after a fork, weighs as one decision, not as a run of hundreds)."""
    return [float(o.summary["hold_decision_p50_us"]) for c in comparisons
            for acks in c.guard for o in c.guard[acks]
            if o.summary.get("hold_decision_p50_us")
            for _ in range(min(int(o.summary.get("holds") or 1), 256))]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the short form, for CI")
    parser.add_argument("--workload", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--limit", nargs="+", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--logs", type=Path, help="keep the workers' logs in this folder")
    parser.add_argument("--guard-env", nargs="*", default=[], help="NAME=VALUE for the guard")
    options = parser.parse_args()
    limits = options.limit or ([768] if options.quick else [768, 1024])
    rounds = options.rounds or (1 if options.quick else 3)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = options.logs or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        runner = Runner(workdir, guard_env=dict(a.split("=", 1) for a in options.guard_env))
        comparisons = []
        try:
            for name in options.workload:
                for limit in limits:
                    print(f"{name} at {limit} MiB", flush=True)
                    c = compare(runner, WORKLOADS[name], limit, rounds, options.quick)
                    comparisons.append(c)
                    for acks in ("early", "late"):
                        ratio = c.ratio(acks)
                        shown = f"{ratio:.2f}" if ratio is not None else "n/a"
                        smallest = min((o.smallest_pool or 0 for o in c.guard[acks]), default=0)
                        print(
                            f"  {name} {limit} MiB acks={acks}: guard/best vanilla time "
                            f"{shown} (best: {c.best_label()}; fits "
                            f"{c.fits}; guard's smallest pool {smallest})",
                            flush=True,
                        )
                    ratio = c.recommended_ratio()
                    print(
                        f"  {name} {limit} MiB: the recommended pair in vanilla / best "
                        f"vanilla time {f'{ratio:.2f}' if ratio is not None else 'n/a'}",
                        flush=True,
                    )
            print("\n".join(targets(comparisons)))
        finally:
            runner.redis.close()
    unclean = not_clean(comparisons)
    if unclean:
        print(f"runtime: {len(unclean)} guarded runs lost, stopped or did not finish a task,"
              " or had an OOM kill:")  # fmt: skip
        print("\n".join(f"  {line}" for line in unclean))
        sys.exit(1)


def not_clean(comparisons: list[Comparison]) -> list[str]:
    """The guarded runs that failed what the guard is for (every task done, none stopped,
    no OOM kill), as their lines: the status CI reads. Times are reported, not judged."""
    return [
        f"{c.workload} {c.limit} MiB acks={acks}: {o.line()}"
        for c in comparisons
        for acks, runs in c.guard.items()
        for o in runs
        if o.problems()
    ]


if __name__ == "__main__":
    main()
