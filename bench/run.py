"""The benchmark suite: vanilla Celery, the rule of thumb and celery-guard, side by side,
on real workers in real memory cgroups. Writes BENCHMARKS.md and PNG plots.

Usage (root, cgroup v1, redis-server installed; ``pip install -e '.[test,bench]'``)::

    .venv/bin/python bench/run.py [--quick] [--out BENCHMARKS.md]

Three workloads of the example app, each at two limits:

- ``import-heavy``: a 256 MiB read-only buffer and 150k small objects imported by the
  main process; tasks read every object (``walk``), so children copy the pages that hold
  the objects and share the buffer;
- ``gc-heavy``: 300k lists (containers the garbage collector tracks); tasks run a full
  collection (``collect``), which writes every container's header;
- ``leaky``: tasks that each keep 24 MiB for the life of the child (``leak``).

For each: the largest concurrency at which vanilla Celery runs the workload with no OOM
kill (bisection), the rule of thumb ``floor(limit / per-worker RSS)``, what the guard
starts with and settles on at ``-c 16``, and survival (tasks completed, OOM kills) for
vanilla at the default concurrency and at ``-c 16`` versus guarded. Then the per-task
overhead, the startup time the guard adds, the GC-freeze saving, and the cgroup's usage
over time, vanilla versus guarded. Every figure is measured in this run.
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import corpus  # noqa: E402
import estimate  # noqa: E402
import overhead  # noqa: E402
import runtime  # noqa: E402

import harness  # noqa: E402
from celery_guard.config import Settings  # noqa: E402
from harness import MIB  # noqa: E402

REQUESTED = 16
ROUNDS, TASKS = 15, 1000  # of the overhead measure: pairs of bursts, tasks a burst
SETTLE = 60.0  # seconds a guarded run may go on while the guard still changes the pool
RUNTIME_ROUNDS = 3  # of the run-time comparison


@dataclass(frozen=True)
class Workload:
    name: str
    env: dict[str, str]
    task: str
    args: tuple[Any, ...]
    per_child: int  # tasks per child in one round
    limits: tuple[int, int]  # MiB


WORKLOADS = [
    Workload(
        "import-heavy",
        {"HEAVY_APP_OBJECTS": "150000", "HEAVY_APP_BUFFER_MIB": "256"},
        "walk",
        (),
        2,
        (768, 1024),
    ),
    Workload(
        "gc-heavy",
        {"HEAVY_APP_CONTAINERS": "1", "HEAVY_APP_OBJECTS": "300000", "HEAVY_APP_BUFFER_MIB": "1"},
        "collect",
        (),
        2,
        (768, 1024),
    ),
    Workload(
        "leaky",
        {"HEAVY_APP_OBJECTS": "50000", "HEAVY_APP_BUFFER_MIB": "1"},
        "leak",
        (24,),
        3,
        (768, 1024),
    ),
]
ACKS_LATE = {"HEAVY_APP_ACKS_LATE": "1"}


@dataclass
class Run:
    """One worker run of a workload: what it started with, did, and ended at."""

    concurrency: int
    completed: int
    sent: int
    oom_kills: int
    started: int | None = None  # the guard's startup concurrency
    startup: dict[str, str] = field(default_factory=dict)  # its startup line
    settled: int | None = None  # the guard's final concurrency
    child_rss_mib: float | None = None
    usage: list[tuple[float, float]] = field(default_factory=list)  # (s, MiB)

    @property
    def ok(self) -> bool:
        return self.completed == self.sent and self.oom_kills == 0

    @property
    def fits(self) -> bool:
        """What the vanilla bisection asks: no OOM kill. A run that did not finish in time
        without one was slow (more children, more tasks, two CPUs), not too big."""
        return self.oom_kills == 0

    def verdict(self) -> str:
        if not self.fits:
            return f"fails ({self.oom_kills} OOM kills)"
        if self.ok:
            return "ok"
        return f"fits (no OOM kill; {self.completed}/{self.sent} done in time)"


class Bench:
    def __init__(
        self, workdir: Path, quick: bool, results: Path, corpus_apps: list[str] | None = None
    ) -> None:
        self.workdir = workdir
        self.quick = quick
        self.results = results  # where sections are kept: the corpus adds to its own
        self.corpus_apps = corpus_apps  # None: every app of the corpus
        self.root = harness.own_memory_cgroup()
        self.redis = harness.RedisServer(workdir)
        self.count = 0

    def close(self) -> None:
        self.redis.close()

    # -- one run ---------------------------------------------------------------------
    def run(
        self,
        workload: Workload,
        limit_mib: int,
        concurrency: int | None,
        guard: bool,
        rounds: int = 1,
        sample: bool = False,
        extra: dict[str, str] | None = None,
        settle: bool = False,
    ) -> Run:
        """Start a worker (``concurrency`` None: Celery's default), run ``rounds`` rounds of
        ``per_child`` tasks for each requested child (with ``settle``, more rounds while
        the guard still changes the pool, up to SETTLE seconds), and stop it."""
        self.count += 1
        group = harness.Cgroup(self.root, limit_mib * MIB)
        env = harness.worker_env(
            self.redis, {**workload.env, **ACKS_LATE, **(extra or {})}, guard=guard
        )
        args = [] if concurrency is None else ["-c", str(concurrency)]
        worker = harness.Worker(
            args, env, self.workdir / f"run-{self.count}.log", cgroup=group
        ).start()
        usage: list[tuple[float, float]] = []
        stop = threading.Event()
        began = time.monotonic()

        def sampler() -> None:
            while not stop.is_set():
                try:
                    usage.append((time.monotonic() - began, group.usage() / MIB))
                except OSError:
                    pass
                stop.wait(0.1)

        thread = threading.Thread(target=sampler, daemon=True)
        if sample:
            thread.start()
        size = concurrency or os.cpu_count() or 1
        sent = completed = 0
        result = Run(size, 0, 0, 0)
        try:
            if guard:
                result.startup = worker.startup()
                result.started = int(result.startup["concurrency"])
            worker.wait_ready(90)
            deadline = time.monotonic() + SETTLE
            done = 0
            while done < rounds or (
                settle and worker.still_moving() and time.monotonic() < deadline
            ):
                done += 1
                count = workload.per_child * size
                results = harness.send_tasks(
                    self.redis, worker.queue, workload.task, count, workload.args
                )
                sent += count
                _wait(worker, results, 120)
                completed += sum(1 for r in results if r.ready() and r.successful())
                if not worker.process or worker.process.poll() is not None:
                    break  # the main process is gone: nothing more will complete
            result.child_rss_mib = _child_rss(worker, group)
        except AssertionError:  # the worker died before it was ready
            pass
        finally:
            worker.stop()
            stop.set()
            if sample:
                thread.join(2)
            result.oom_kills = group.oom_kills()
            group.close()
        result.sent, result.completed, result.usage = sent, completed, usage
        if guard:
            final = worker.final_summary()
            result.settled = int(final["concurrency"]) if final else None
        return result

    def largest_vanilla(self, workload: Workload, limit_mib: int, high: int = 24) -> int:
        """The largest concurrency vanilla Celery runs the workload at with no OOM kill."""

        def fits(concurrency: int) -> bool:
            run = self.run(workload, limit_mib, concurrency, guard=False)
            print(f"    vanilla c={concurrency}: {run.verdict()}", flush=True)
            return run.fits

        return largest(fits, high)


def largest(fits: Callable[[int], bool], high: int) -> int:
    """Bisection over 1..high: the largest concurrency that fits (0: none does)."""
    low, top = 0, high + 1
    while top - low > 1:
        middle = (low + top) // 2
        low, top = (middle, top) if fits(middle) else (low, middle)
    return low


def _wait(worker: harness.Worker, results: list[Any], timeout: float) -> None:
    """Until every result is in, the timeout, or the worker's main process is gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(r.ready() for r in results):
            return
        if worker.process is None or worker.process.poll() is not None:
            return
        time.sleep(0.25)


def _child_rss(worker: harness.Worker, group: harness.Cgroup) -> float | None:
    """The largest child's RSS now: the per-worker figure ``ps`` and ``top`` show."""
    import psutil

    main = worker.process.pid if worker.process else -1
    sizes = []
    for pid in group.pids():
        if pid != main:
            try:
                sizes.append(psutil.Process(pid).memory_info().rss / MIB)
            except psutil.Error:
                pass
    return max(sizes) if sizes else None


# -- the other measures ------------------------------------------------------------------
def startup_cost(workload: Workload, repeat: int = 5) -> tuple[float, float]:
    """(first, median) milliseconds of the guard's startup measurement, in a process that
    imported the app as the worker's main process has."""
    code = (
        "import time, heavy_app\n"
        "from celery_guard import startup\n"
        "from celery_guard.config import load_settings\n"
        "settings = load_settings({}, {})\n"
        f"for _ in range({repeat}):\n"
        "    t = time.perf_counter(); startup.measure(settings, 'prefork', 16)\n"
        "    print((time.perf_counter() - t) * 1000)\n"
    )
    env = harness.worker_env(None, {**workload.env, "HEAVY_APP_GUARD": "0"})
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=harness.EXAMPLES, env=env, capture_output=True,
        text=True, check=True, timeout=300,
    )  # fmt: skip
    times = [float(line) for line in out.stdout.split()]
    return times[0], statistics.median(times)


def gc_freeze_charge(bench: Bench, freeze: bool) -> float:
    """MiB each of 4 children adds to the cgroup's working set after a full collection."""
    group = harness.Cgroup(bench.root, None)
    env = harness.worker_env(
        bench.redis,
        {"HEAVY_APP_CONTAINERS": "1", "HEAVY_APP_OBJECTS": "300000", "HEAVY_APP_BUFFER_MIB": "1",
         "CELERY_GUARD_GC_FREEZE": "1" if freeze else "0"},
    )  # fmt: skip
    bench.count += 1
    worker = harness.Worker(
        ["-c", "4"], env, bench.workdir / f"gc-{bench.count}.log", cgroup=group
    ).start()
    try:
        in_use = float(worker.startup()["in_use_mib"]) * MIB
        worker.wait_ready(90)
        for result in harness.send_tasks(bench.redis, worker.queue, "collect", 4):
            result.get(timeout=120)
        harness.wait_for_results(harness.send_tasks(bench.redis, worker.queue, "collect", 8), 120)
        time.sleep(2)
        return (group.working_set() - in_use) / 4 / MIB
    finally:
        worker.stop()
        group.close()


def plot_usage(runs: dict[str, Run], limit_mib: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4))
    for label, run in runs.items():
        if run.usage:
            xs, ys = zip(*run.usage, strict=True)
            axes.plot(xs, ys, label=label)
    axes.axhline(limit_mib, color="red", linestyle="--", label=f"limit {limit_mib} MiB")
    axes.set_xlabel("seconds since the worker started")
    axes.set_ylabel("cgroup memory usage (MiB)")
    axes.set_title(title)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_efficiency(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['workload']}\n{r['limit']} MiB" for r in rows]
    series = [
        ("vanilla largest (bisection)", "vanilla"),
        ("rule of thumb", "thumb"),
        ("guard starts", "started"),
        ("guard settles", "settled"),
        ("guard restarts (state file)", "restarted"),
    ]
    figure, axes = plt.subplots(figsize=(10, 4))
    width = 0.16
    for i, (name, key) in enumerate(series):
        xs = [j + (i - 2) * width for j in range(len(rows))]
        axes.bar(xs, [r[key] or 0 for r in rows], width, label=name)
    axes.set_xticks(range(len(rows)), labels, fontsize=8)
    axes.set_ylabel("pool children")
    axes.set_title("Concurrency that fits: vanilla, rule of thumb, celery-guard (-c 16)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def machine() -> list[str]:
    with open("/proc/meminfo") as file:
        total = int(file.readline().split()[1]) / 1024 / 1024
    found = harness.cgroups.find_memory_cgroup("/")
    cgroup = f"v{found.cgroup.version}" if found.cgroup else "none"
    packages = ", ".join(
        f"{name} {version(name)}" for name in ("celery", "kombu", "billiard", "psutil")
    )
    return [
        f"- Linux {platform.release()}, {os.cpu_count()} CPUs, {total:.1f} GiB, "
        f"memory cgroup {cgroup}",
        f"- Python {platform.python_version()}; {packages}; redis-server "
        + subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
        .stdout.split()[2]
        .removeprefix("v="),
        f"- run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
    ]


def _main_path(found: tuple[float, float] | None) -> list[str]:
    """The main process's per-task path alone (``overhead.main_path_cost``); results kept
    before it was measured have none."""
    if found is None:
        return []
    plain, guarded = found
    return [
        "",
        f"The main process's per-task path alone (the hand-over, the child's acceptance and "
        f"the task's end through the pool's handlers, warm, with room to spare): "
        f"{guarded:.2f} us per task with the guard, {plain:.2f} us without.",
    ]


def targets(
    rows: list[dict[str, Any]],
    overhead_rows: list[overhead.Comparison],
    startup_ms: tuple[float, float],
    gc: tuple[float, float],
    hook_us: float,
    comparisons: list[runtime.Comparison],
    shapes: list[estimate.Row],
) -> list[str]:
    """Each target, met or missed, from the figures above."""

    def mark(ok: bool) -> str:
        return "met" if ok else "**missed**"

    lines = ["## Targets", ""]
    for r in rows:
        best = min(r["vanilla"], REQUESTED)
        settled = (r["settled"] or 0) / best if best else 0.0
        survived = r["guarded"].oom_kills == 0 and r["guarded"].completed == r["guarded"].sent
        lines.append(
            f"- {r['workload']} at {r['limit']} MiB: efficiency >= 0.9 (settled "
            f"{settled:.2f}): {mark(settled >= 0.9)}; 0 OOM kills and every task done "
            f"guarded: {mark(survived)}"
        )
        if settled < 0.9:
            lines.append(f"  - why: {why_short(r)}")
        started = (r["started"] or 0) / best if best else 0.0
        again = (r["restarted"] or 0) / best if best else 0.0
        lines.append(
            f"  - starts at >= 0.85 (started {started:.2f}): {mark(started >= 0.85)}; "
            f"restarted with the state file at {again:.2f}, 0 OOM kills and every task done: "
            f"{mark(again >= 0.85 and r['again'].ok)}"
        )
        if started < 0.85:
            lines.append(f"    - why: {why_low_start(r, shapes, gc)}")
        if not survived:
            lines.append(f"  - why: {WHY_KILLED.get(r['workload'], 'see the log')}")
    lines += runtime.targets(comparisons)
    for shape in shapes:
        if shape.shape == "baseline":
            continue
        within = 0.9 <= shape.ratio <= 1.1
        lines.append(
            f"- {shape.shape}: estimate within 10% of the measured cost "
            f"(ratio {shape.ratio:.2f}): {mark(within)}"
        )
        for limit, guarded in sorted(shape.guarded.items()):
            largest = min(shape.vanilla.get(limit) or 0, REQUESTED)
            start = guarded.started / largest if largest else 0.0
            settle = (guarded.settled or 0) / largest if largest else 0.0
            lines.append(
                f"  - at {limit} MiB it starts {guarded.started} of vanilla's {largest} "
                f"({start:.2f}), >= 0.85: {mark(start >= 0.85)}; settles at "
                f"{guarded.settled} ({settle:.2f}), >= 0.9: {mark(settle >= 0.9)}; "
                f"{guarded.oom_kills} OOM kills, every task done: {mark(guarded.clean)}"
            )
    for found in overhead_rows:
        wall, cpu = found.ratio("wall"), found.ratio("cpu")
        lines.append(
            f"- per-task overhead at -c {found.concurrency} <= 1.02 in wall time "
            f"({wall:.3f}) and in CPU time ({cpu:.3f}): {mark(wall <= 1.02 and cpu <= 1.02)}"
        )
    lines.append(
        f"- startup time added <= 50 ms ({startup_ms[0]:.0f} ms): {mark(startup_ms[0] <= 50)}"
    )
    saving = 1 - gc[1] / gc[0] if gc[0] else 0.0
    lines.append(f"- GC freeze >= 30% less ({saving * 100:.0f}%): {mark(saving >= 0.3)}")
    return [*lines, ""]


WHY_KILLED: dict[str, str] = {}  # a workload whose guarded run is known to lose tasks, and why


def why_low_start(r: dict[str, Any], shapes: list[estimate.Row], gc: tuple[float, float]) -> str:
    """Why the guard starts below 0.85 of vanilla's largest."""
    text = why_short(r)
    lists = {shape.shape: shape for shape in shapes}.get("lists")
    if r["workload"] == "gc-heavy" and lists is not None:
        text += (
            "; the app holds the kind of data the lists shape holds, and one of its tasks "
            "(`walk`) reads all of it, as the lists shape's task does (there a child costs "
            f"{lists.measured:.1f} MiB, estimated {lists.estimate:.1f}); this workload only "
            f"collects, which with `CELERY_GUARD_GC_FREEZE` copies {gc[1]:.1f} MiB a child. "
            "Before a task has run, nothing in the main process tells the two apart, so the "
            "guard starts with what fits if tasks read the data, and grows once the first "
            "task's calibration shows less"
        )
    return text


def why_short(r: dict[str, Any]) -> str:
    """Why the guard stays below vanilla's largest, from its own startup line."""
    line, limit, vanilla = r["guarded"].startup, r["limit"], r["vanilla"]
    if not line:
        return "no startup line"
    estimate, headroom = float(line["child_estimate_mib"]), float(line["headroom_mib"])
    in_use = float(line["in_use_mib"])
    real = (limit - in_use) / (vanilla + 1)  # vanilla + 1 did not fit: a lower bound
    without = int((limit - in_use) // estimate)
    if (r["started"] or 0) > vanilla:
        return (
            f"it started {r['started']} (the leak is not in the main process, so the "
            "estimate cannot see it); the pool is then sized so that each child holds "
            "its baseline and room for a few leaks between recycles, fewer children than "
            "vanilla runs without recycling"
        )
    text = (
        f"the guard estimated {estimate:.1f} MiB a child (vanilla's largest implies more "
        f"than {real:.1f}) and keeps {headroom:.0f} MiB free ({headroom / estimate:.1f} "
        f"children at its estimate); without the headroom it would start {without}"
    )
    if (r["settled"] or 0) > (r["started"] or 0):
        text += (
            "; the pool grew to the children that fit at their measured peak cost under "
            f"the high-water mark ({Settings().high_water:.0%} of the limit by default)"
        )
    return text


def _unclean(run: Run) -> str:
    if run.ok:
        return ""
    return f", {run.oom_kills} OOM kills, {run.completed}/{run.sent} done"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "n/a"


#: The sections of the suite, each measured on its own and kept in ``bench/results``: a
#: full run takes longer than one sitting, so each section says when, and on which
#: commit, it was measured.
SECTIONS = ("efficiency", "runtime", "corpus", "estimate", "overhead")
RESULTS = HERE / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--quick", action="store_true", help="one limit per workload")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS),
        help=f"the sections to measure now, comma-separated (default: all of {SECTIONS}); "
        "the others are read from --results",
    )  # fmt: skip
    parser.add_argument("--results", default=str(RESULTS), help="where sections are kept")
    parser.add_argument(
        "--corpus-apps", default="",
        help="the corpus apps to measure now, comma-separated (default: all); the others "
        "stay as kept",
    )  # fmt: skip
    options = parser.parse_args()
    apps = [name for name in options.corpus_apps.split(",") if name]
    if sorted(set(apps) - set(corpus.WORKLOADS)):
        parser.error(f"no corpus app {sorted(set(apps) - set(corpus.WORKLOADS))}; apps: "
                     f"{', '.join(corpus.WORKLOADS)}")  # fmt: skip
    wanted = [name for name in options.sections.split(",") if name]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        parser.error(f"no section {', '.join(unknown)}; sections: {', '.join(SECTIONS)}")
    out, results = Path(options.out), Path(options.results)
    plots = out.parent / "bench" / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp), options.quick, results, apps or None)
        try:
            for name in wanted:  # kept as each ends: a run stopped keeps what it measured
                print(f"== {name}", flush=True)
                keep(results, name, MEASURE[name](bench, plots), options.quick)
        finally:
            bench.close()
    kept = {name: load(results, name) for name in SECTIONS}
    missing = [name for name, found in kept.items() if found is None]
    quick = {found["quick"] for found in kept.values() if found is not None}
    if missing or len(quick) > 1:
        print(f"{out} not written: missing {missing or 'none'}; quick and full mixed: "
              f"{len(quick) > 1}")  # fmt: skip
        return
    sections = {name: found for name, found in kept.items() if found is not None}
    out.write_text(render(sections, plots, out.parent))
    print(f"wrote {out}")


def describe() -> str:
    """The commit measured, ``-dirty`` when the tree had changes other than what this
    script writes itself (BENCHMARKS.md, the plots, the kept sections)."""

    def git(*args: str) -> str:
        found = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return found.stdout.strip()

    commit = git("rev-parse", "--short=7", "HEAD") or "?"
    ours = [f":!{path}" for path in ("BENCHMARKS.md", "bench/plots", "bench/results")]
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", *ours)
    return f"{commit}-dirty" if changed else commit


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def keep(results: Path, name: str, data: dict[str, Any], quick: bool) -> None:
    """A section's figures, with the commit and the machine they were measured on."""
    kept = {"commit": describe(), "when": now(), "machine": machine(), "quick": quick,
            "data": data}  # fmt: skip
    (results / f"{name}.pickle").write_bytes(pickle.dumps(kept))


def load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / f"{name}.pickle"
    if not path.exists():
        return None
    try:
        return pickle.loads(path.read_bytes())
    except Exception as error:  # noqa: BLE001 - a section kept by another bench version
        print(f"{path}: {type(error).__name__}: {error}; measure it again")
        return None


def measure_efficiency(bench: Bench, plots: Path) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    usage_plot: tuple[str, str] | None = None  # the plot's file in plots/, the limit
    for workload in WORKLOADS:
        for limit in workload.limits[-1:] if bench.quick else workload.limits:
            print(f"{workload.name} at {limit} MiB", flush=True)
            vanilla = bench.largest_vanilla(workload, limit)
            one = bench.run(workload, limit, 1, guard=False)
            thumb = int(limit // one.child_rss_mib) if one.child_rss_mib else None
            at_default = bench.run(workload, limit, None, guard=False, rounds=3)
            sample = workload.name == "import-heavy" and usage_plot is None
            at_requested = bench.run(
                workload, limit, REQUESTED, guard=False, rounds=3, sample=sample
            )
            # The state file keeps the children's measured cost for the next start.
            state_file = bench.workdir / f"state-{workload.name}-{limit}"
            state = {"CELERY_GUARD_STATE_FILE": str(state_file)}
            guarded = bench.run(
                workload, limit, REQUESTED, guard=True, rounds=3, sample=sample, settle=True,
                extra=state,
            )  # fmt: skip
            again = bench.run(workload, limit, REQUESTED, guard=True, rounds=1, extra=state)
            row = {
                "workload": workload.name, "limit": limit, "vanilla": vanilla,
                "child_rss": one.child_rss_mib, "thumb": thumb,
                "started": guarded.started, "settled": guarded.settled,
                "restarted": again.started, "again": again,
                "default": at_default, "requested": at_requested, "guarded": guarded,
            }  # fmt: skip
            print(f"  {row}", flush=True)
            rows.append(row)
            if sample:
                path = plots / "usage-import-heavy.png"
                plot_usage(
                    {"vanilla -c 16": at_requested, "guarded -c 16": guarded},
                    limit,
                    path,
                    f"import-heavy, {limit} MiB: cgroup usage, vanilla vs guarded",
                )
                usage_plot = (path.name, f"{limit} MiB")
    plot_efficiency(rows, plots / "efficiency.png")
    return {"rows": rows, "usage_plot": usage_plot, "default": os.cpu_count() or 1}


def measure_runtime(bench: Bench, plots: Path) -> dict[str, Any]:
    runner = runtime.Runner(bench.workdir, bench.redis)
    rounds = 1 if bench.quick else RUNTIME_ROUNDS
    comparisons = [
        runtime.compare(runner, workload, limit, rounds, quick=False)
        for workload in runtime.WORKLOADS.values()
        for limit in ((768,) if bench.quick else (768, 1024))
    ]
    return {"comparisons": comparisons, "rounds": rounds}


def measure_corpus(bench: Bench, plots: Path) -> dict[str, Any]:
    """Each app is kept with its own commit and date, beside the apps measured before: the
    whole corpus takes about five hours here, so ``--corpus-apps`` measures a part of it."""
    rounds = 1 if bench.quick else RUNTIME_ROUNDS
    kept = load(bench.results, "corpus")
    apps: dict[str, dict[str, Any]] = dict(kept["data"].get("apps", {})) if kept else {}
    if kept and kept["quick"] != bench.quick:
        apps = {}  # a quick corpus and a full one are not one table
    server = corpus.serve()
    try:
        folder = bench.workdir / "corpus"  # its own log names: the runner counts from 1
        folder.mkdir(exist_ok=True)
        corpus_runner = runtime.Runner(folder, bench.redis, env=corpus.corpus_env(server, folder))
        names = bench.corpus_apps or list(corpus.QUICK if bench.quick else corpus.WORKLOADS)
        limits = [768] if bench.quick else [768, 1024]
        for name in names:
            results = corpus.measure(corpus_runner, [name], limits, rounds)
            apps[name] = {
                "commit": describe(), "when": now(), "rounds": rounds, "results": results,
                "estimate": corpus.estimate_lines(results),
            }  # fmt: skip
            # kept after each app: a run stopped keeps the apps it measured
            keep(bench.results, "corpus", {"apps": apps}, bench.quick)
    finally:
        server.shutdown()
    return {"apps": apps}


def measure_estimate(bench: Bench, plots: Path) -> dict[str, Any]:
    # On the bench's Redis: results of a Redis closed under them are collected later, and
    # their backend then retries its connection from the collector, in a timed round.
    shapes = estimate.measure_all(
        bench.workdir, limits=(768,) if bench.quick else estimate.LIMITS, bisect=True,
        redis=bench.redis,
    )  # fmt: skip
    return {"shapes": shapes}


def measure_overhead(bench: Bench, plots: Path) -> dict[str, Any]:
    overhead_rows = [
        overhead.compare(bench.redis, bench.workdir, concurrency, TASKS, ROUNDS)
        for concurrency in (1, 2)
    ]
    hook_us = overhead.hook_cost() * 1e6
    main_path_us = tuple(seconds * 1e6 for seconds in overhead.main_path_cost())
    startup_ms = startup_cost(WORKLOADS[0])
    print("gc freeze", flush=True)
    gc = (gc_freeze_charge(bench, freeze=False), gc_freeze_charge(bench, freeze=True))
    return {"overhead_rows": overhead_rows, "hook_us": hook_us, "main_path_us": main_path_us,
            "startup_ms": startup_ms, "gc": gc}  # fmt: skip


MEASURE = {
    "efficiency": measure_efficiency,
    "runtime": measure_runtime,
    "corpus": measure_corpus,
    "estimate": measure_estimate,
    "overhead": measure_overhead,
}


def render(sections: dict[str, dict[str, Any]], plots: Path, base: Path) -> str:
    data = {key: value for kept in sections.values() for key, value in kept["data"].items()}
    rows, usage_plot, default = data["rows"], data["usage_plot"], data["default"]
    comparisons, rounds = data["comparisons"], data["rounds"]
    corpus_apps, shapes = data["apps"], data["shapes"]
    overhead_rows, hook_us = data["overhead_rows"], data["hook_us"]
    startup_ms, gc = data["startup_ms"], data["gc"]
    lines = [
        "# Benchmarks",
        "",
        "Written by `bench/run.py` (reproduce: `.venv/bin/python bench/run.py`, root, cgroup "
        "v1, redis-server; several hours here, so it runs in sections: `--sections runtime` "
        "measures one and keeps it in `bench/results`). Real `celery worker` processes of the "
        "example app (`examples/heavy_app.py`) against a real Redis, each in a fresh cgroup-v1 "
        "memory cgroup whose limit the kernel enforces; every figure of a section comes from "
        "the same run of it.",
        "",
        "## Machine",
        "",
        *sections["efficiency"]["machine"][:2],
        "",
        "| section | measured on | commit |",
        "|---|---|---|",
        *(
            f"| {name} | {kept['when']} | `{kept['commit']}` |"
            if name != "corpus"
            else f"| corpus | each app's own, in its section | {len(corpus_apps)} apps |"
            for name, kept in sections.items()
        ),
        "",
        "## Efficiency: the concurrency that fits",
        "",
        "Vanilla largest: the largest `-c` at which vanilla Celery runs the workload (each "
        "child runs its tasks; late acks) with no OOM kill, by bisection (a run that did "
        "not finish in time with no OOM kill fits: it was slow, not too big). Rule of thumb: "
        "`floor(limit / per-worker RSS)`, with the RSS of a vanilla child that ran the "
        "workload (what `ps` shows; it counts the pages the child shares with the main "
        "process). Guard: what celery-guard starts with and settles on when asked for "
        f"`-c {REQUESTED}` (default settings, 10% headroom); it settles after up to "
        f"{SETTLE:.0f} s more of the workload while it still changes the pool. Guard "
        "restarts: the same worker started again with `CELERY_GUARD_STATE_FILE` set in both "
        "runs, so it starts from the children's cost measured in the first (one round of "
        "the workload; OOM kills or unfinished tasks are shown next to it). Ratios are to "
        f"the vanilla largest, or to {REQUESTED} where more fit (the guard never goes above "
        "what was asked). Targets: guard settles / vanilla >= 0.9, starts >= 0.85.",
        "",
        "| workload | limit | vanilla largest | child RSS | rule of thumb (ratio) "
        "| guard starts (ratio) | guard settles (ratio) | guard restarts (ratio) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        best = min(r["vanilla"], REQUESTED)  # the guard never goes above what was asked
        lines.append(
            f"| {r['workload']} | {r['limit']} MiB | {r['vanilla']} | "
            f"{r['child_rss']:.0f} MiB | {r['thumb']} ({ratio(r['thumb'], best)}) | "
            f"{r['started']} ({ratio(r['started'], best)}) | "
            f"{r['settled']} ({ratio(r['settled'], best)}) | "
            f"{r['restarted']} ({ratio(r['restarted'], best)}){_unclean(r['again'])} |"
            if r["child_rss"] is not None
            else f"| {r['workload']} | {r['limit']} MiB | {r['vanilla']} | n/a | n/a | "
            f"{r['started']} | {r['settled']} | {r['restarted']}{_unclean(r['again'])} |"
        )
    lines += [
        "",
        f"![efficiency]({(plots / 'efficiency.png').relative_to(base)})",
        "",
        "## Survival: tasks completed and OOM kills",
        "",
        f"Three rounds of the workload. Vanilla at Celery's default concurrency (the host's "
        f"CPU count: {default} here) and at `-c {REQUESTED}`, versus guarded at "
        f"`-c {REQUESTED}`. Late acks: a task whose child is killed goes back to the queue.",
        "",
        f"| workload | limit | vanilla default (c={default}) | vanilla -c {REQUESTED} "
        f"| guarded -c {REQUESTED} |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            f"{run.completed}/{run.sent} done, {run.oom_kills} OOM kills"
            for run in (r["default"], r["requested"], r["guarded"])
        ]
        lines.append(f"| {r['workload']} | {r['limit']} MiB | " + " | ".join(cells) + " |")
    lines += ["", *runtime.render(comparisons, rounds), "", *corpus.render(corpus_apps), ""]
    lines += [
        "## The child estimate, by shape of app",
        "",
        "`bench/estimate.py`: six shapes of app (`examples/shape_*.py`) and a baseline with no "
        "data. Measured: the growth per added child of what the cgroup is charged for other "
        "than page cache (anonymous and kernel memory; a file page is charged once, to the "
        f"first worker that reads it), between a guarded worker at {estimate.LOW} and at "
        f"{estimate.HIGH} children, after every child ran {estimate.TASKS_PER_CHILD} tasks "
        "that use the app's data. The estimate and its method are the guard's startup line. "
        f"Start and settle: the guard asked for `-c {estimate.REQUESTED}` in the limit, what "
        "it starts with and its final concurrency after at least two rounds of "
        f"{estimate.TASKS_PER_CHILD} tasks per requested child (more while it still changes "
        "the pool); vanilla largest by bisection. Targets: the estimate within 10% of the "
        "measured cost, never more than 10% low; the start at least 0.85 and the settled "
        "pool at least 0.9 of vanilla's largest (or of 16 where more fit), with 0 OOM kills "
        "and every task done.",
        "",
        *estimate.render(shapes, tuple(sorted({k for r in shapes for k in r.guarded}))),
        "",
    ]
    lines += ["## Overhead", ""]
    lines.append(
        f"No-op tasks in bursts of {TASKS}, {ROUNDS} pairs of bursts: an unguarded and a "
        "guarded worker run side by side, each in a memory cgroup whose limit (4 GiB) "
        "it does not approach, so that the guard's governor and its gate run as in "
        "production; they take the bursts in turn, the order swapped "
        "every pair (`bench/overhead.py`). Each burst is queued first, then consumed; it is "
        "timed by the wall clock from its first task's end to its last's (the results' "
        "`date_done`), and by the CPU time of the worker's processes. The ratio is the "
        "median of the pairs' ratios (guarded/unguarded), with their quartiles. "
        "Target: <= 1.02 in both."
    )
    lines += [
        "",
        "| concurrency | wall: unguarded, guarded | wall ratio | CPU: unguarded, guarded "
        "| CPU ratio |",
        "|---|---|---|---|---|",
    ]
    for found in overhead_rows:
        cells = []
        for figure in ("wall", "cpu"):
            low, high = found.quartiles(figure)
            cells += [
                f"{found.median(False, figure):.2f} s, {found.median(True, figure):.2f} s",
                f"{found.ratio(figure):.3f} ({low:.3f}-{high:.3f})",
            ]
        lines.append(f"| {found.concurrency} | " + " | ".join(cells) + " |")
    first_ms, median_ms = startup_ms
    plain_gc, frozen_gc = gc
    lines += [
        "",
        f"The per-task hook alone, as a child runs it: {hook_us:.2f} us per task.",
        *_main_path(data.get("main_path_us")),
        "",
        f"Startup time the guard adds (its measurement before the fork, in a process that "
        f"imported the import-heavy app): {first_ms:.0f} ms the first time, {median_ms:.0f} ms "
        f"median of 5. Target: <= 50 ms.",
        "",
        "## `CELERY_GUARD_GC_FREEZE`",
        "",
        f"The gc-heavy app (300k lists), 4 children, each after a full collection: "
        f"{plain_gc:.1f} MiB per child without, {frozen_gc:.1f} MiB with "
        f"({(1 - frozen_gc / plain_gc) * 100:.0f}% less). Target: >= 30% less.",
        "",
    ]
    lines += targets(rows, overhead_rows, startup_ms, gc, hook_us, comparisons, shapes)
    if usage_plot is not None:
        name, limit = usage_plot
        lines += [
            "## Memory over time",
            "",
            f"The cgroup's usage (every 0.1 s) of the import-heavy workload at {limit}, "
            f"vanilla `-c {REQUESTED}` versus guarded `-c {REQUESTED}`, with the limit.",
            "",
            f"![usage]({(plots / name).relative_to(base)})",
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
