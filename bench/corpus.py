"""The corpus: celery-guard on workloads written the way users of common libraries write
Celery tasks (issue 20), against the best hand-tuned vanilla worker.

Usage (root, cgroup v1, redis-server installed, the ``corpus`` extra; from the
repository)::

    .venv/bin/python bench/corpus.py --quick           # CI: a few apps, the guard only
    .venv/bin/python bench/corpus.py [--workload django-report ...] [--limit 768 1024]
        [--rounds 3]

The apps are in ``bench/corpus/`` (Django and SQLAlchemy over SQLite, pandas, scikit-learn,
Pillow, lxml and BeautifulSoup, pydantic, Jinja2, a ``functools`` cache, a ``requests``
session against a local HTTP server this script starts, leaky numpy tasks, a fragmented
heap, and two apps in one worker). Each workload sends its tasks to a worker in a memory
cgroup, the guard asked for ``-c 16``.

``--quick`` runs a few workloads once, guarded, early acks, in 768 MiB, and exits 1 when a
run lost a task (failed, unfinished), had an OOM kill or had a running task stopped by the
guard; the time is printed, not judged. The full form runs each workload through
``runtime.compare`` (a grid of vanilla ``-c`` x ``--max-memory-per-child``, the best of
it, then rounds of it and of the guard with early and late acks, and the guard's
recommended pair in vanilla) and prints the table and the targets.

Both print, per app, the guard's startup estimate of a child against what a child copied
as the guard measured it at the end (the final summary's ``expected_baseline_mib``) and
the first child after its first task (``event=calibration``), with what the tasks read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
sys.path[:0] = [str(HERE), str(HERE.parent)]

import runtime  # noqa: E402
from runtime import Outcome, Workload  # noqa: E402

import harness  # noqa: E402

#: The whole grid of vanilla -c; each workload adds its --max-memory-per-child steps.
CONCURRENCIES = (2, 4, 6, 8, 12, 16)
LEAKY = (1, 2, 4, 8, 16)  # --max-memory-per-child room, in leaks of the workload's task
QUICK_GRID = ((4, 0), (8, 0))


def _workload(
    name: str, app: str, task: str, args: Any, tasks: int, *, more: tuple = (),
    env: tuple = (), leak_mib: int = 0,
) -> Workload:  # fmt: skip
    leaks = LEAKY if leak_mib else (0,)
    quick = ((4, 4), (8, 2)) if leak_mib else QUICK_GRID
    return Workload(name, task, args, tasks, CONCURRENCIES, leaks, quick, env, app, leak_mib,
                    more)  # fmt: skip


def _leaky(name: str, task_seconds: str, start_seconds: str) -> Workload:
    env = (("CORPUS_TASK_SECONDS", task_seconds), ("CORPUS_CHILD_START_SECONDS", start_seconds))
    return _workload(name, "numpy_leak", "features", (24,), 240, env=env, leak_mib=24,
                     more=(("light", (), 240),))  # fmt: skip


#: name -> (workload, what its tasks read)
WORKLOADS: dict[str, tuple[Workload, str]] = {
    "django-report": (
        _workload("django-report", "django_shop", "sales_report", (), 40,
                  more=(("product_page", lambda n: (n * 7919,), 400), ("ping", (), 200))),
        "all of a cache of 60,000 model instances (reports), a part (pages), nothing",
    ),
    "sqlalchemy-totals": (
        _workload("sqlalchemy-totals", "sqlalchemy_billing", "customer_totals",
                  lambda n: (n,), 60, more=(("invoice", lambda n: (n * 31,), 400),)),
        "none of the module's data: each report loads 250,000 ORM objects (a peak)",
    ),
    "pandas-summary": (
        _workload("pandas-summary", "pandas_analytics", "daily_summary", (), 40,
                  more=(("top_users", (), 100), ("sample", lambda n: (n % 20 + 1,), 100))),
        "all of an 800,000-row frame (group-by), a column (top), a few rows",
    ),
    "sklearn-score": (
        _workload("sklearn-score", "sklearn_scoring", "score", lambda n: (20_000, n), 120,
                  more=(("explain", (), 60),)),
        "a model each child trains when it starts (dear children), batches per task",
    ),
    "pillow-thumbnails": (
        _workload("pillow-thumbnails", "pillow_images", "thumbnail", (), 120,
                  more=(("watermark", (), 120),)),
        "one encoded photo; each thumbnail decodes it (a transient peak)",
    ),
    "lxml-search": (
        _workload("lxml-search", "lxml_feeds", "search", lambda n: (f"t{n % 13}",), 120,
                  more=(("scrape", (), 80), ("item", lambda n: (n * 13,), 200))),
        "all of a parsed feed of 60,000 items (XPath), a page per task (BeautifulSoup)",
    ),
    "pydantic-import": (
        _workload("pydantic-import", "pydantic_imports", "import_batch",
                  lambda n: (n * 20_000,), 120, more=(("validate_one", lambda n: (n,), 200),)),
        "nothing at import; batches validated per task, their ids kept (a slow leak)",
    ),
    "jinja-render": (
        _workload("jinja-render", "jinja_mail", "render_invoice", lambda n: (n,), 3000,
                  more=(("newsletter", lambda n: (n * 200,), 40),)),
        "a part of 50,000 customers loaded at import; fast tasks (ms)",
    ),
    "cache-history": (
        _workload("cache-history", "cache_lookups", "price_history", lambda n: (n,), 1200,
                  more=(("lookup", lambda n: (n,), 400),)),
        "a part of a dict of 200,000 records; a per-child cache that grows",
    ),
    "http-sync": (
        _workload("http-sync", "http_client", "sync_orders", lambda n: (n,), 200,
                  more=(("health", (), 200),)),
        "nothing at import; JSON fetched from a local server per task",
    ),
    "fragment": (
        _workload("fragment", "fragment_heap", "ingest", lambda n: (200_000, n), 200),
        "nothing at import; small objects per task, one in fifty kept (a fragmented heap)",
    ),
    "mixed": (
        _workload("mixed", "mixed_queues", "render_invoice", lambda n: (n,), 2000,
                  more=(("daily_summary", (), 40),)),
        "fast mails and the frame's group-by in one worker",
    ),
    "leaky-fast-dear": (_leaky("leaky-fast-dear", "0.005", "0.5"),
                        "each task keeps 24 MiB; 5 ms tasks; 0.5 s child start"),
    "leaky-fast-cheap": (_leaky("leaky-fast-cheap", "0.005", "0"),
                         "each task keeps 24 MiB; 5 ms tasks; cheap forks"),
    "leaky-slow-dear": (_leaky("leaky-slow-dear", "0.2", "0.5"),
                        "each task keeps 24 MiB; 0.2 s tasks; 0.5 s child start"),
    "leaky-slow-cheap": (_leaky("leaky-slow-cheap", "0.2", "0"),
                         "each task keeps 24 MiB; 0.2 s tasks; cheap forks"),
}  # fmt: skip
QUICK = ("django-report", "pandas-summary", "pillow-thumbnails", "leaky-fast-dear", "mixed")


class _Orders(BaseHTTPRequestHandler):
    """The local API the http-sync app calls: a page of orders (about 4 MiB of JSON)."""

    body = json.dumps(
        {"orders": [{"id": i, "amount": i % 100 / 3, "note": "x" * 40} for i in range(50_000)]}
    ).encode()

    def do_GET(self) -> None:
        body = self.body if self.path.startswith("/orders") else b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def serve() -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Orders)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def estimate(outcome: Outcome) -> dict[str, float | str]:
    """The guard's startup estimate of a child against what children copied: the first
    child after its first task (``event=calibration``) and, at the end, what a new child
    is expected to copy as measured (the final summary's ``expected_baseline_mib``)."""
    if outcome.log is None:
        return {}
    worker = harness.Worker([], {}, outcome.log)
    found: dict[str, float | str] = {}
    startup = worker.events("startup")
    if startup and startup[0].get("child_estimate_mib"):
        found["estimate"] = float(startup[0]["child_estimate_mib"])
    first = worker.events("calibration")
    if first and first[0].get("measured_mib"):
        found["first"] = float(first[0]["measured_mib"])
        found["first_task"] = first[0].get("task", "?")
    final = outcome.summary.get("expected_baseline_mib")
    if final:
        found["copied"] = float(final)
    return found


def estimate_line(name: str, outcome: Outcome) -> str:
    found = estimate(outcome)
    reads = WORKLOADS[name][1]
    if "estimate" not in found or "copied" not in found:
        return f"  {name}: not measured ({found}); tasks read {reads}"
    first = (
        f", the first child after its first task ({found['first_task']}) {found['first']} MiB"
        if "first" in found
        else ""
    )
    ratio = float(found["estimate"]) / float(found["copied"]) if found["copied"] else 0.0
    return (
        f"  {name}: estimate {found['estimate']} MiB, copied by a child as measured at the "
        f"end {found['copied']} MiB (ratio {ratio:.2f}){first}; tasks read {reads}"
    )


def quick(runner: runtime.Runner, names: list[str], limit: int) -> int:
    failures = 0
    estimates = []
    for name in names:
        workload = WORKLOADS[name][0]
        outcome = runner.run(
            workload, limit, ["-c", str(runtime.REQUESTED)], True, False,
            f"guard -c {runtime.REQUESTED} {name}",
        )  # fmt: skip
        print("  " + outcome.line(), flush=True)
        found = outcome.problems()
        if found:
            failures += 1
            print(f"  FAILED {name} at {limit} MiB: {'; '.join(found)}", flush=True)
        estimates.append(estimate_line(name, outcome))
    print("the startup estimate against what a child copied:")
    print("\n".join(estimates))
    return failures


def measure(
    runner: runtime.Runner, names: list[str], limits: list[int], rounds: int
) -> list[tuple[str, runtime.Comparison]]:
    """Each workload at each limit against the best hand-tuned vanilla worker."""
    found = []
    for name in names:
        for limit in limits:
            print(f"{name} at {limit} MiB", flush=True)
            found.append((name, runtime.compare(runner, WORKLOADS[name][0], limit, rounds, False)))
    return found


def estimate_lines(results: list[tuple[str, runtime.Comparison]]) -> list[str]:
    """Read while the first guarded round's log is still there."""
    return [estimate_line(name, c.guard["early"][0]).strip() for name, c in results
            if c.guard["early"]]  # fmt: skip


def render(apps: dict[str, dict[str, Any]]) -> list[str]:
    """The BENCHMARKS.md section of the corpus from the apps kept so far, each measured on
    its own commit (``bench/run.py --corpus-apps``): the table, the targets, the estimates."""
    results = [found for name in WORKLOADS if name in apps for found in apps[name]["results"]]
    comparisons = [c for _, c in results]
    missing = [name for name in WORKLOADS if name not in apps]
    rounds = sorted({apps[name]["rounds"] for name in apps})
    lines = [
        "## The corpus: real workloads against the best hand-tuned vanilla worker",
        "",
        "`bench/corpus.py`, the apps of `bench/corpus/` (see docs/benchmarks.md), the guard "
        f"asked for `-c {runtime.REQUESTED}` with default settings; vanilla's grid and the "
        f"rounds ({', '.join(map(str, rounds))}) as in the run-time section above. The whole "
        "corpus takes about five hours here, so each app is measured and kept on its own "
        "(`bench/run.py --sections corpus --corpus-apps NAME,...`).",
        "",
        "| app | measured on | commit |",
        "|---|---|---|",
        *(
            f"| {name} | {apps[name]['when']} | `{apps[name]['commit']}` |"
            for name in WORKLOADS
            if name in apps
        ),
        "",
        f"Not measured yet: {', '.join(missing)}." if missing else "Every app measured.",
        "",
        *runtime.table(comparisons),
        "",
        "Targets:",
        "",
        *runtime.targets(comparisons),
        "",
        "Where the time went (`bench/runtime.py`: the first tenth of the tasks ended, "
        "the time per task from there to nine tenths, the CPU of the worker's processes "
        "over its life; medians of the rounds):",
        "",
        *(f"- {line}" for line in runtime.pace_lines(comparisons)),
        "",
        "The startup estimate of a child against what a child copied as the guard measured "
        "it at the end of the first guarded round (early acks), and the first child after "
        "its first task:",
        "",
    ]
    lines += [f"- {line}" for name in WORKLOADS if name in apps for line in apps[name]["estimate"]]
    return lines


def lost(results: list[tuple[str, runtime.Comparison]]) -> int:
    """Guarded runs that lost a task, had an OOM kill or stopped a task."""
    return sum(1 for _, c in results for acks in c.guard for o in c.guard[acks] if o.problems())


def corpus_env(server: ThreadingHTTPServer, workdir: Path) -> dict[str, str]:
    """What every corpus worker needs: the apps on its path, the local API, a data folder."""
    return {
        "PYTHONPATH": os.pathsep.join([str(CORPUS), str(harness.EXAMPLES), str(harness.ROOT)]),
        "CORPUS_HTTP_URL": f"http://127.0.0.1:{server.server_port}",
        "CORPUS_DATA": str(workdir / "corpus-data"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the short form, for CI")
    parser.add_argument("--workload", nargs="+", choices=WORKLOADS)
    parser.add_argument("--limit", nargs="+", type=int)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--logs", type=Path, help="keep the workers' logs in this folder")
    options = parser.parse_args()
    names = options.workload or (list(QUICK) if options.quick else list(WORKLOADS))
    limits = options.limit or ([768] if options.quick else [768, 1024])
    server = serve()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = options.logs or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        runner = runtime.Runner(workdir, env=corpus_env(server, workdir))
        try:
            if options.quick:
                failures = sum(quick(runner, names, limit) for limit in limits)
            else:
                results = measure(runner, names, limits, options.rounds)
                apps = {
                    name: {"commit": "this run", "when": "now", "rounds": options.rounds,
                           "results": [r for r in results if r[0] == name],
                           "estimate": estimate_lines([r for r in results if r[0] == name])}
                    for name in names
                }  # fmt: skip
                print("\n".join(render(apps)))
                failures = lost(results)
        finally:
            runner.redis.close()
            server.shutdown()
    if failures:
        print(f"corpus: {failures} runs lost a task, had an OOM kill or stopped a task")
        sys.exit(1)


if __name__ == "__main__":
    main()
