"""Tests for celery_guard.imports_cost: the probe's figures come back whatever the module
does with stdout, stderr, its exit, or processes of its own.

Each probe is a real interpreter importing a real module from a temporary directory (the
probe imports Celery first, about a second each).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from celery_guard import imports_cost
from celery_guard.imports_cost import PATH_VARIABLE, Cost, _figures, _probe

MODULES = {
    # prints at exit: the last line of stdout was not the figures (issue 13, finding 8)
    "noisy_exit": "import atexit\natexit.register(print, 'bye')\n",
    # prints what looks like figures, last: the old probe took them for its own
    "fake_figures": 'import atexit\natexit.register(print, \'{"child": 12345678901, "rss": 0}\')\n',
    # shuts stdout and stderr: nothing for the figures to ride on
    "closes_stdio": "import os\nos.close(1)\nos.close(2)\n",
    # exits non-zero at exit, after the figures were written
    "exit_status": "import atexit, os\natexit.register(os._exit, 3)\n",
    "fails": "raise ImportError('boom')\n",
    "exits_at_import": "import sys\nsys.exit(4)\n",
    "writes_binary": "import sys\nsys.stdout.buffer.write(bytes(range(256)) * 100)\n",
}


@pytest.fixture(scope="module")
def modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("modules")
    for name, code in MODULES.items():
        (root / f"{name}.py").write_text(code)
    return root


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, PATH_VARIABLE: json.dumps([str(root), *sys.path])}


def _cost(root: Path, module: str) -> Cost:
    return _probe(sys.executable, "", module, 1, _env(root))


@pytest.mark.parametrize("module", ["noisy_exit", "fake_figures", "closes_stdio", "exit_status"])
def test_a_module_that_prints_or_exits_oddly_is_still_measured(modules: Path, module: str) -> None:
    """Finding 8: one noisy module made json.loads of stdout's last line raise, and
    ``celery guard imports`` aborted for every module."""
    cost = _cost(modules, module)
    assert cost.error == "" and cost.child is not None and cost.rss is not None
    assert cost.child >= 0 and cost.rss >= 0
    assert cost.child != 12345678901  # not the figures the module printed


@pytest.mark.parametrize(
    ("module", "error"),
    [
        ("fails", "ImportError: boom"),
        ("exits_at_import", "exit status 4, no result"),
        ("no_such_module", "ModuleNotFoundError: No module named 'no_such_module'"),
    ],
)
def test_a_module_that_cannot_be_imported_is_one_error(
    modules: Path, module: str, error: str
) -> None:
    assert _cost(modules, module) == Cost(module, 1, None, None, error)


def test_binary_on_stdout_does_not_matter(modules: Path) -> None:
    assert _cost(modules, "writes_binary").error == ""


def test_a_process_left_behind_does_not_hold_the_probe(tmp_path: Path) -> None:
    """A module that forks a long-lived process at import: that process holds a copy of
    the result pipe and stderr; the figures are read once the probe itself exits."""
    pid_file = tmp_path / "pid"
    (tmp_path / "forks.py").write_text(
        "import os, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        f"open({str(pid_file)!r}, 'w').write(str(pid))\n"
    )
    started = time.monotonic()
    try:
        cost = _cost(tmp_path, "forks")
        assert time.monotonic() - started < 40
        assert cost.error == "" and cost.child is not None
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_an_interpreter_that_cannot_run_is_one_error(modules: Path) -> None:
    cost = _probe(str(modules / "no-python"), "", "noisy_exit", 2, _env(modules))
    assert cost.child is None and cost.error.startswith("cannot run ")


@pytest.mark.parametrize(
    "result",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'{"child": -1, "rss": 0}',
        b'{"child": 1.5, "rss": 0}',
        b'{"child": true, "rss": 0}',
        b'{"child": 1}',
        b"[" * 100_000,
        bytes(range(256)),
    ],
)
def test_a_result_that_is_not_two_byte_counts_is_refused(result: bytes) -> None:
    assert _figures(result) is None


def test_the_figures_round_trip() -> None:
    assert _figures(json.dumps({"child": 3, "rss": 0}).encode()) == {"child": 3, "rss": 0}


def test_the_probe_writes_only_to_its_pipe(capfd: pytest.CaptureFixture[str]) -> None:
    """main() is the probe: the figures go to the fd it is given, nothing to stdout."""
    read_end, write_end = os.pipe()
    try:
        assert imports_cost.main(["", "json", str(write_end)]) == 0
        figures = _figures(os.read(read_end, imports_cost.MAX_RESULT))
    finally:
        os.close(read_end)
    assert figures is not None
    assert capfd.readouterr().out == ""


@pytest.mark.parametrize(
    ("path", "cwd", "expected"),
    [
        # `celery -A app` run where app.py is: Celery put the directory first for the
        # app's import and took it out again; the probe gets it back, first
        (
            ["/venv/bin", "/usr/lib/python3.11"],
            "/srv/proj",
            ["/srv/proj", "/venv/bin", "/usr/lib/python3.11"],
        ),
        # already on the path (PYTHONPATH=., or `python -m celery`): left where it is
        (["/srv/other", "/srv/proj"], "/srv/proj", ["/srv/other", "/srv/proj"]),
        # the directory was removed: Celery adds nothing then, nor does the probe
        (["/venv/bin"], None, ["/venv/bin"]),
    ],
)
def test_probe_path_is_the_path_the_app_was_imported_with(
    path: list[str], cwd: str | None, expected: list[str]
) -> None:
    assert imports_cost.probe_path(path, cwd) == expected
