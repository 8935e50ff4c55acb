"""Bad input to ``celery guard check`` / ``imports``: one clear line and the usual status.

Celery's own options (``-c``, ``--autoscale``, ``--max-memory-per-child``,
``--prefetch-multiplier``) and Celery's settings in app.conf: click's usage error, exit
2, as ``celery worker`` gives for its own options. The guard's settings (``--guard-*``,
``CELERY_GUARD_*``, ``guard_*``): one ``event=config_error`` line, exit 78, as the worker.
Never a traceback.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from click.testing import CliRunner, Result

from celery_guard.commands import MAX_CONCURRENCY, _requested, guard
from celery_guard.logline import parse_line

USAGE = 2
EX_CONFIG = 78


def _app(**conf: Any) -> Celery:
    app = Celery("input-test", broker="memory://", set_as_current=False)
    app.conf.update(conf)
    return app


def _check(*args: str, app: Celery | None = None) -> Result:
    runner = CliRunner()
    return runner.invoke(guard, ["check", *args], obj=SimpleNamespace(app=app or _app()))


def _assert_usage_error(result: Result, option: str) -> None:
    assert result.exit_code == USAGE, result.output
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    ), result.exception
    assert "Traceback" not in result.output
    (error,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert option in error


# option, value: each gave a traceback or was taken (issue 13, finding 13)
BAD_WORKER_OPTIONS = [
    ("--concurrency", "abc"),
    ("--concurrency", "-5"),
    ("--concurrency", "\u0663"),
    ("--concurrency", "1_0"),
    ("--concurrency", "2.5"),
    ("--concurrency", str(MAX_CONCURRENCY + 1)),
    ("--concurrency", ""),
    ("--autoscale", "x,1"),
    ("--autoscale", "1,x"),
    ("--autoscale", "10,2,3"),
    ("--autoscale", "-5,1"),
    ("--autoscale", "0,0"),
    ("--autoscale", ","),
    ("--autoscale", ""),
    ("--max-memory-per-child", "-5"),
    ("--max-memory-per-child", "lots"),
    ("--prefetch-multiplier", "-1"),
    ("--prefetch-multiplier", "\u0664"),
]


@pytest.mark.parametrize(("option", "value"), BAD_WORKER_OPTIONS)
def test_bad_worker_options_are_one_usage_error(option: str, value: str) -> None:
    _assert_usage_error(_check(option, value), option)


@pytest.mark.parametrize("short", [["-c", "abc"], ["-c", "-5"]])
def test_the_short_option_too(short: list[str]) -> None:
    _assert_usage_error(_check(*short), "--concurrency")


def test_a_bad_top_for_imports_is_a_usage_error() -> None:
    result = CliRunner().invoke(guard, ["imports", "--top", "-3"], obj=SimpleNamespace(app=_app()))
    _assert_usage_error(result, "--top")


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("worker_concurrency", "abc"),
        ("worker_concurrency", -5),
        ("worker_max_memory_per_child", "lots"),
        ("worker_prefetch_multiplier", -1),
    ],
)
def test_bad_celery_settings_are_one_usage_error(setting: str, value: Any) -> None:
    result = _check("--guard-memory-limit", "1G", app=_app(**{setting: value}))
    _assert_usage_error(result, setting)


def test_bad_guard_settings_are_one_config_error_line_exit_78() -> None:
    result = _check("--guard-low-water", "0%")
    assert result.exit_code == EX_CONFIG, result.output
    (line,) = result.output.splitlines()
    fields = parse_line(line)
    assert fields["event"] == "config_error" and fields["option"] == "--guard-low-water"


# concurrency, autoscale, app.conf, expected (requested, from the host's CPUs)
REQUESTED: list[
    tuple[int | str | None, tuple[int, int] | None, dict[str, Any], tuple[int, bool]]
] = [
    (4, None, {}, (4, False)),
    (4, None, {"worker_concurrency": 9}, (4, False)),
    (0, None, {"worker_concurrency": 9}, (9, False)),  # 0: the setting, as in Celery
    (None, None, {"worker_concurrency": "9"}, (9, False)),
    (None, (10, 2), {"worker_concurrency": 9}, (10, False)),
]


@pytest.mark.parametrize(("concurrency", "autoscale", "conf", "expected"), REQUESTED)
def test_requested(
    concurrency: int | str | None,
    autoscale: tuple[int, int] | None,
    conf: dict[str, Any],
    expected: tuple[int, bool],
) -> None:
    assert _requested(concurrency, autoscale, conf, True) == expected


def test_requested_from_the_host() -> None:
    requested, from_host = _requested(None, None, {}, True)
    assert requested >= 1 and from_host


@pytest.mark.parametrize(
    ("text", "expected"), [("10,2", (10, 2)), ("2,10", (10, 2)), ("7", (7, 0))]
)
def test_autoscale_max_is_the_larger_as_in_celery(text: str, expected: tuple[int, int]) -> None:
    """Celery sorts the two numbers; the check took the first one for the maximum."""
    from celery_guard.commands import Autoscale

    assert Autoscale().convert(text, None, None) == expected


@pytest.mark.parametrize("args", [["-c", "2"], ["-c", "auto"], ["--autoscale", "1,3"], []])
def test_good_input_gives_the_check_line(args: list[str]) -> None:
    result = _check(*args, "--guard-memory-limit", "64G", "--max-memory-per-child", "200000")
    assert result.exit_code in (0, EX_CONFIG), result.output
    assert parse_line(result.output.splitlines()[0])["event"] == "check"


def test_autoscale_written_min_first_checks_the_max() -> None:
    """``--autoscale 2,10``: Celery starts up to 10; the check took 2 and passed."""
    result = _check("--autoscale", "2,10", "--guard-memory-limit", "64G")
    assert parse_line(result.output.splitlines()[0])["requested"] == "10"


@pytest.mark.parametrize("pool", ["bogus", "os:nothere", ":"])
def test_a_pool_that_cannot_be_loaded_is_a_usage_error(pool: str) -> None:
    """-P bogus raised ModuleNotFoundError out of the check: a traceback."""
    _assert_usage_error(_check("-P", pool), "--pool")


def test_a_bad_worker_pool_setting_is_a_usage_error() -> None:
    _assert_usage_error(_check(app=_app(worker_pool="bogus")), "worker_pool")


def test_config_prints_each_setting_with_where_it_came_from(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``guard config``: one line a setting, its value in effect and its source, in the
    order a worker reads them (a --guard- option over the environment over app.conf over
    the default)."""
    from celery_guard.config import OPTIONS

    monkeypatch.setenv("CELERY_GUARD_HEADROOM", "20%")
    monkeypatch.setenv("CELERY_GUARD_MODE", "refuse")  # the option below wins
    app = _app(guard_min_concurrency=3, guard_headroom="30%")  # the environment wins
    result = CliRunner().invoke(
        guard, ["config", "--guard-mode", "warn"], obj=SimpleNamespace(app=app)
    )
    assert result.exit_code == 0, result.output
    lines = {f["setting"][6:]: f for f in map(parse_line, result.output.splitlines())}
    assert list(lines) == [option.name for option in OPTIONS]
    assert (lines["mode"]["value"], lines["mode"]["source"]) == ("warn", "option")
    assert (lines["headroom"]["value"], lines["headroom"]["source"]) == ("0.2", "env")
    assert (lines["min_concurrency"]["value"], lines["min_concurrency"]["source"]) == (
        "3", "config",
    )  # fmt: skip
    assert lines["child_log_step"] == {
        "event": "config", "setting": "guard_child_log_step",
        "variable": "CELERY_GUARD_CHILD_LOG_STEP", "value": str(16 * 1024 * 1024),
        "source": "default", "default": "16M",
    }  # fmt: skip


def test_config_refuses_what_the_worker_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_GUARD_HEADROOM", "lots")
    result = CliRunner().invoke(guard, ["config"], obj=SimpleNamespace(app=_app()))
    assert result.exit_code == EX_CONFIG, result.output
    (line,) = result.output.splitlines()
    assert parse_line(line)["event"] == "config_error"


class _Control:
    """Celery's remote control as ``guard report`` uses it: what it was asked, and no
    worker's reply but one."""

    def __init__(self) -> None:
        self.asked: list[tuple[float, list[str] | None]] = []

    def broadcast(self, command: str, reply: bool, timeout: float, destination: Any) -> Any:
        self.asked.append((timeout, destination))
        return [{"w1@a": {"error": "no figures yet"}}]

    def inspect(self, timeout: float, destination: Any) -> Any:
        return SimpleNamespace(active_queues=lambda: {})


@pytest.mark.parametrize(
    "args",
    [
        ["-d", "w1@a,w2@b", "-t", "2.5", "-j"],  # as celery inspect takes them
        ["--destination", "w1@a", "--destination", "w2@b", "--timeout", "2.5", "--format", "json"],
    ],
)
def test_report_takes_celery_inspects_options(args: list[str]) -> None:
    import json

    control = _Control()
    app = SimpleNamespace(control=control)
    result = CliRunner().invoke(guard, ["report", *args], obj=SimpleNamespace(app=app))
    assert result.exit_code == 0, result.output
    assert control.asked == [(2.5, ["w1@a", "w2@b"])]
    assert [w["hostname"] for w in json.loads(result.output)["workers"]] == ["w1@a"]
