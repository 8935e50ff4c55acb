"""A probe child beside the census (issue 20, item 3): what a forked child copies when it
reads all of the main process's data, against the guard's startup estimate.

Usage (root: a child's private memory is read from ``smaps_rollup``; the ``corpus``
extra; from the repository)::

    .venv/bin/python bench/probe.py [--workload django-report ...]

For each app of ``bench/corpus/``, in a fresh process: import it as ``celery -A`` does (the
module, then the modules its tasks are in), collect and freeze the collector as the guard
does before the first fork, take the guard's startup estimate of a child
(``startup.measure``: the census of the app's data), then fork two children. One does
nothing; the other touches every object the collector tracks and every object they refer
to (``gc.get_referents``: a reference taken writes the object's header, as a task that
reads it does). Each reads its private memory. The probe's estimate is the walker's: a
child whose tasks read all of the data. Compare with what a child copied as the guard
measured it (``bench/corpus.py`` prints that per app).

Exit status 0 whatever the figures: they are reported, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import corpus  # noqa: E402

MIB = 1024 * 1024

#: Run in the fresh process: ``APP`` is the corpus module to import.
PROBE = r"""
import gc, importlib, json, os, sys, time
from celery_guard import startup
from celery_guard.config import load_settings
from celery_guard.procfs import known, private

module = importlib.import_module(os.environ["APP"])
app = getattr(module, "app")
app.loader.import_default_modules()
began = time.perf_counter()
measured = startup.measure(load_settings({}, {}), "prefork", 16)
census_seconds = time.perf_counter() - began
gc.collect()
tracked = gc.get_objects()  # before the freeze: frozen objects are not listed after
gc.freeze()


def child(walk):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        began = time.perf_counter()
        if walk:
            for obj in tracked:
                gc.get_referents(obj)
        seconds = time.perf_counter() - began
        os.write(write, json.dumps([known(private()), seconds]).encode())
        os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 4096):
        data += chunk
    os.waitpid(pid, 0)
    return json.loads(data)


idle, _ = child(False)
walked, walk_seconds = child(True)
print(json.dumps({
    "estimate": measured.child, "method": measured.estimate.method,
    "census_seconds": census_seconds, "idle": idle, "walked": walked,
    "walk_seconds": walk_seconds,
}))
"""


def probe(name: str, env: dict[str, str]) -> dict[str, float | str]:
    workload = corpus.WORKLOADS[name][0]
    run_env = {**os.environ, **env, **dict(workload.env), "APP": workload.app}
    run_env["HEAVY_APP_GUARD"] = "0"
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=run_env, capture_output=True, text=True,
        timeout=600, cwd=corpus.CORPUS,
    )  # fmt: skip
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "?"}
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--workload", nargs="+", choices=corpus.WORKLOADS)
    options = parser.parse_args()
    names = options.workload or list(corpus.WORKLOADS)
    server = corpus.serve()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = corpus.corpus_env(server, Path(tmp))
            Path(env["CORPUS_DATA"]).mkdir()
            for name in names:
                found = probe(name, env)
                if "error" in found:
                    print(f"{name}: failed: {found['error']}", flush=True)
                    continue
                walked = float(found["walked"] or 0)
                print(
                    f"{name}: census estimate {float(found['estimate']) / MIB:.1f} MiB"
                    f" ({found['method']}, {float(found['census_seconds']) * 1e3:.0f} ms);"
                    f" probe: a child that does nothing {float(found['idle'] or 0) / MIB:.1f}"
                    f" MiB, one that reads everything {walked / MIB:.1f} MiB"
                    f" ({float(found['walk_seconds']) * 1e3:.0f} ms);"
                    f" tasks read {corpus.WORKLOADS[name][1]}",
                    flush=True,
                )
    finally:
        server.shutdown()


if __name__ == "__main__":
    main()
