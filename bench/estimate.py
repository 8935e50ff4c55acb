"""The child estimate against real children, on six shapes of app.

Usage (root, cgroup v1, redis-server installed; ``pip install -e '.[test,bench,shapes]'``)::

    .venv/bin/python bench/estimate.py [--shape numpy dicts ...] [--scale 1]
        [--no-bisect] [--limit 768 1024] [--detail] [--gc-freeze 0] [--malloc-trim 0]

For each shape (``examples/shape_*.py``) it starts the guarded worker at two
concurrencies (``LOW`` and ``HIGH`` children) in a memory cgroup with no limit, sends
``use`` tasks until every child has run at least ``TASKS_PER_CHILD`` of them, and reads
what the cgroup is charged for other than page cache (``Cgroup.private``). The measured
cost of one child is its growth per added child, ``(p(HIGH) - p(LOW)) / (HIGH - LOW)``;
what the main process grows by after its measurement is the same at both and drops out.
Next to it, the figure ``tests/integration/test_startup.py`` takes, ``(ws(HIGH) - in_use)
/ HIGH`` with the working set, which also spreads the main process's growth over its
children. The estimate is the guard's startup line at ``HIGH``.

Page cache is left out because a file page is charged to the first cgroup that reads it,
not to each child that maps it: the worker measured first is charged for the library
files its children load and the next one is not. With the working set in its place,
numpy's slope was 10.1 MiB per child in one run and 12.1 in the next (2.7 MiB per child
of active file pages charged to one worker and not the other), while this figure was 12.8
and 12.9. :func:`measure_shape` prints both.

Then, for each limit, the largest ``-c`` at which vanilla Celery runs the workload (every
child runs its tasks; late acks) with no OOM kill, by bisection as ``bench/run.py`` does,
and the guard asked for ``-c 16`` in that limit: what it starts with, what it settles on
after rounds of the workload, its OOM kills and whether every task was done.
``--detail`` prints, per child, where its private memory is (by kind of mapping, from
/proc/<pid>/smaps).

``bench/run.py`` calls :func:`measure_all` and writes the rows into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT)]

import harness  # noqa: E402
from harness import MIB  # noqa: E402

SHAPES = ("baseline", "numpy", "dicts", "lists", "registry", "pandas", "cext")
#: ``baseline``: the dicts app with two entries, what a child costs with no app data
#: (footprint.CHILD_BASE).
MODULES = {"baseline": ("dicts", 1e-5)}
LOW, HIGH = 2, 6
TASKS_PER_CHILD = 3
REQUESTED = 16
LIMITS = (768, 1024)
SETTLE = 60.0  # seconds a guarded run may go on while the guard still changes the pool


@dataclass
class Sample:
    """One worker of a shape at one concurrency, after every child ran its tasks."""

    concurrency: int
    private: int  # Cgroup.private
    working_set: int
    startup: dict[str, str]
    detail: dict[int, dict[str, int]] = field(default_factory=dict)  # pid -> kind -> bytes

    @property
    def in_use(self) -> int:
        return int(float(self.startup["in_use_mib"]) * MIB)


@dataclass
class Guarded:
    """The guard asked for ``-c REQUESTED`` in a limit, running the shape's workload."""

    started: int
    settled: int | None  # its final concurrency (the summary line), None if it had none
    oom_kills: int
    done: bool  # every task sent succeeded

    @property
    def clean(self) -> bool:
        return self.done and self.oom_kills == 0


@dataclass
class Row:
    shape: str
    estimate: float  # MiB
    method: str
    measured: float  # MiB per child: the slope
    per_child_with_main: float  # MiB per child as test_startup measures it
    parent_rss: float
    guarded: dict[int, Guarded] = field(default_factory=dict)  # limit -> the guard at -c 16
    vanilla: dict[int, int] = field(default_factory=dict)  # limit -> vanilla's largest

    @property
    def ratio(self) -> float:
        return self.estimate / self.measured


def smaps_kinds(pid: int) -> dict[str, int]:
    """A process's private dirty bytes by kind of mapping (analysis only)."""
    kinds: dict[str, int] = defaultdict(int)
    kind = "anon"
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return {}
    for line in text.splitlines():
        first = line.split(None, 1)[0]
        if "-" in first and not first.endswith(":"):
            parts = line.split(None, 5)
            name = parts[5].strip() if len(parts) > 5 else ""
            if name == "[heap]":
                kind = "heap"
            elif name.startswith("["):
                kind = name.strip("[]")
            elif name:
                kind = "file"
            else:
                kind = "anon"
        elif first == "Private_Dirty:":
            kinds[kind] += int(line.split()[1]) * 1024
    status = Path(f"/proc/{pid}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmPTE:"):
            kinds["pte"] = int(line.split()[1]) * 1024
    return dict(kinds)


class Runner:
    def __init__(
        self,
        workdir: Path,
        scale: float,
        extra: dict[str, str] | None = None,
        redis: harness.RedisServer | None = None,
        root: Path | None = None,
    ) -> None:
        self.workdir = workdir
        self.scale = scale
        self.extra = extra or {}
        self.root = root or harness.own_memory_cgroup()
        self.own_redis = redis is None
        self.redis = redis or harness.RedisServer(workdir)
        self.count = 0

    def close(self) -> None:
        if self.own_redis:
            self.redis.close()

    def cost(self, shape: str, low: int = LOW, high: int = HIGH) -> tuple[float, float]:
        """(the startup estimate, the measured cost of one child), in bytes: the growth
        of ``Cgroup.private`` per added child, every child having run its tasks."""
        first = self.sample(shape, low)
        second = self.sample(shape, high)
        slope = (second.private - first.private) / (high - low)
        return float(second.startup["child_estimate_mib"]) * MIB, slope

    def worker(
        self, shape: str, concurrency: int, group: harness.Cgroup, guard: bool,
        extra: dict[str, str] | None = None,
    ) -> harness.Worker:  # fmt: skip
        self.count += 1
        module, scale = MODULES.get(shape, (shape, self.scale))
        env = harness.worker_env(
            self.redis,
            {"SHAPE_SCALE": str(scale), "HEAVY_APP_ACKS_LATE": "1", **self.extra, **(extra or {})},
            guard=guard,
        )
        return harness.Worker(
            ["-c", str(concurrency)],
            env,
            self.workdir / f"{shape}-{self.count}.log",
            cgroup=group,
            app=f"shape_{module}",
        ).start()

    def run_tasks(
        self,
        worker: harness.Worker,
        shape: str,
        children: set[int],
        group: harness.Cgroup,
        timeout: float = 240,
    ) -> bool:
        """Send ``use`` tasks until each child in ``children`` ran TASKS_PER_CHILD of them;
        False on a failed task, an OOM kill in ``group`` (at once: a bisection step that
        fails ends in seconds) or the timeout."""
        runs: dict[int, int] = defaultdict(int)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if children and all(runs[pid] >= TASKS_PER_CHILD for pid in children):
                return True
            count = max(len(children), 1) * TASKS_PER_CHILD
            module = MODULES.get(shape, (shape, 0))[0]
            results = harness.send_tasks(
                self.redis, worker.queue, "use", count, app=f"shape_{module}"
            )
            if not harness.wait_for_results(results, deadline - time.monotonic(), group):
                return False
            for result in results:
                pid, _ = result.get(timeout=1)
                runs[pid] += 1
        return False

    def sample(self, shape: str, concurrency: int, detail: bool = False) -> Sample:
        group = harness.Cgroup(self.root, None)
        worker = self.worker(shape, concurrency, group, guard=True)
        try:
            startup = worker.startup()
            worker.wait_ready(120)
            main = worker.process.pid if worker.process else -1
            children = set(_children(group, main, concurrency))
            if not self.run_tasks(worker, shape, children, group):
                raise RuntimeError(f"{shape} at -c {concurrency}: tasks did not complete")
            time.sleep(1.0)
            result = Sample(concurrency, group.private(), group.working_set(), startup)
            if detail:
                result.detail = {pid: smaps_kinds(pid) for pid in [main, *sorted(children)]}
            return result
        finally:
            worker.stop()
            group.close()

    def runs_clean(self, shape: str, limit_mib: int, concurrency: int) -> bool:
        """Vanilla Celery at ``concurrency``: every child runs its tasks, no OOM kill."""
        group = harness.Cgroup(self.root, limit_mib * MIB)
        worker = self.worker(shape, concurrency, group, guard=False)
        try:
            worker.wait_ready(120)
            main = worker.process.pid if worker.process else -1
            children = set(_children(group, main, concurrency))
            return self.run_tasks(worker, shape, children, group, 180) and group.oom_kills() == 0
        except (AssertionError, RuntimeError):
            return False
        finally:
            worker.stop()
            group.close()

    def largest_vanilla(self, shape: str, limit_mib: int, high: int = 24) -> int:
        low, top = 0, high + 1
        while top - low > 1:
            middle = (low + top) // 2
            ok = self.runs_clean(shape, limit_mib, middle)
            print(f"    vanilla c={middle}: {'ok' if ok else 'fails'}", flush=True)
            low, top = (middle, top) if ok else (low, middle)
        return low

    def guarded(self, shape: str, limit_mib: int, rounds: int = 2) -> Guarded:
        """The guard asked for ``-c REQUESTED``: ``rounds`` rounds of TASKS_PER_CHILD
        ``use`` tasks for each requested child, and more while it still changes the pool
        (up to SETTLE seconds)."""
        group = harness.Cgroup(self.root, limit_mib * MIB)
        worker = self.worker(shape, REQUESTED, group, guard=True)
        module = MODULES.get(shape, (shape, 0))[0]
        done, started = True, 0
        try:
            started = int(worker.startup()["concurrency"])
            worker.wait_ready(120)
            deadline = time.monotonic() + SETTLE
            count = 0
            while count < rounds or (worker.still_moving() and time.monotonic() < deadline):
                count += 1
                results = harness.send_tasks(
                    self.redis, worker.queue, "use", REQUESTED * TASKS_PER_CHILD,
                    app=f"shape_{module}",
                )  # fmt: skip
                done = harness.wait_for_results(results, 240, group) and done
                if not done:
                    break
        except AssertionError:  # the worker died before it was ready
            done = False
        finally:
            worker.stop()
            oom_kills = group.oom_kills()
            group.close()
        final = worker.final_summary()
        settled = int(final["concurrency"]) if final else None
        return Guarded(started, settled, oom_kills, done)


def _children(group: harness.Cgroup, main: int, expected: int, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        pids = [pid for pid in group.pids() if pid != main]
        if len(pids) >= expected or time.monotonic() > deadline:
            return pids
        time.sleep(0.2)


def measure_shape(
    runner: Runner, shape: str, limits: tuple[int, ...], bisect: bool, detail: bool
) -> Row:
    low = runner.sample(shape, LOW)
    high = runner.sample(shape, HIGH, detail)
    slope = (high.private - low.private) / (HIGH - LOW)
    by_working_set = (high.working_set - low.working_set) / (HIGH - LOW) / MIB
    line = high.startup
    row = Row(
        shape,
        float(line["child_estimate_mib"]),
        line.get("child_estimate_method", ""),
        slope / MIB,
        (high.working_set - high.in_use) / HIGH / MIB,
        float(line["parent_rss_mib"]),
    )
    print(
        f"  {shape}: estimate {row.estimate:.1f} MiB ({row.method}), measured "
        f"{row.measured:.1f} MiB (ratio {row.ratio:.2f}); with the main process's growth "
        f"{row.per_child_with_main:.1f}; by the working set (page cache included) "
        f"{by_working_set:.1f}; parent RSS {row.parent_rss:.1f}",
        flush=True,
    )
    if detail:
        for pid, kinds in high.detail.items():
            text = " ".join(f"{k}={v / MIB:.1f}" for k, v in sorted(kinds.items()) if v)
            print(f"    pid {pid}: {text}", flush=True)
    for limit in limits:
        guarded = row.guarded[limit] = runner.guarded(shape, limit)
        if bisect:
            row.vanilla[limit] = runner.largest_vanilla(shape, limit)
        print(
            f"  {shape} at {limit} MiB: guard starts {guarded.started}, settles "
            f"{guarded.settled}, {guarded.oom_kills} OOM kills, every task done: "
            f"{'yes' if guarded.done else 'no'}; vanilla largest "
            f"{row.vanilla.get(limit, 'n/a')}",
            flush=True,
        )
    return row


def measure_all(
    workdir: Path,
    shapes: tuple[str, ...] = SHAPES,
    scale: float = 1.0,
    limits: tuple[int, ...] = LIMITS,
    bisect: bool = True,
    detail: bool = False,
    extra: dict[str, str] | None = None,
    redis: harness.RedisServer | None = None,
) -> list[Row]:
    """Every shape; with ``redis`` None, on a Redis of its own that is closed at the end."""
    runner = Runner(workdir, scale, extra, redis)
    try:
        return [measure_shape(runner, shape, limits, bisect, detail) for shape in shapes]
    finally:
        runner.close()


def render(rows: list[Row], limits: tuple[int, ...] = LIMITS) -> list[str]:
    """The rows for BENCHMARKS.md."""
    head = " | ".join(f"start / settle / vanilla largest, {limit} MiB" for limit in limits)
    lines = [
        f"| shape | estimate | method | measured per child | ratio | {head} |",
        "|---|---|---|---|---|" + "---|" * len(limits),
    ]
    for r in rows:
        starts = " | ".join(_cell(r.guarded.get(limit), r.vanilla.get(limit)) for limit in limits)
        lines.append(
            f"| {r.shape} | {r.estimate:.1f} MiB | {r.method} | {r.measured:.1f} MiB | "
            f"{r.ratio:.2f} | {starts} |"
        )
    return lines


def _cell(guarded: Guarded | None, vanilla: int | None) -> str:
    if guarded is None:
        return "n/a"
    text = f"{guarded.started} / {guarded.settled or 'n/a'} / {vanilla or 'n/a'}"
    if not guarded.clean:
        text += f" ({guarded.oom_kills} OOM kills, {'' if guarded.done else 'not '}every task done)"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", nargs="+", default=list(SHAPES), choices=SHAPES)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--limit", nargs="*", type=int, default=list(LIMITS))
    parser.add_argument("--no-bisect", action="store_true")
    parser.add_argument("--detail", action="store_true")
    parser.add_argument("--gc-freeze", choices=("0", "1"), default="1")
    parser.add_argument("--malloc-trim", choices=("0", "1"), default="1")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure_all(
            Path(tmp), tuple(options.shape), options.scale, tuple(options.limit),
            not options.no_bisect, options.detail,
            {"CELERY_GUARD_GC_FREEZE": options.gc_freeze,
             "CELERY_GUARD_MALLOC_TRIM": options.malloc_trim},
        )  # fmt: skip
    print("\n".join(render(rows, tuple(options.limit))))
    within = all(0.9 <= r.ratio <= 1.1 for r in rows)
    print(f"every estimate within +-10% of the measured cost: {'yes' if within else 'no'}")


if __name__ == "__main__":
    main()
