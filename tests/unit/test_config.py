"""Tests for celery_guard.config: where each setting comes from and how bad ones fail.

A worker option wins over the environment, which wins over app.conf, which wins over the
default, option by option; a value that does not parse must name the variable, the
setting, the value, the accepted forms and where it came from (and the worker option,
when it came from one), because that is all the CRITICAL line can tell the user.
"""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from celery_guard.config import ConfigError, Settings, load_settings

MIB = 1 << 20

SIZE_FORMS = "bytes (536870912), or a number with K, M, G, T, KB, MiB, GiB... (512M, 1.5GiB)"
BUDGET = "a size of at least 16M: " + SIZE_FORMS
PAGE = "a size of at least 4K: " + SIZE_FORMS
SECONDS = "seconds from 0.01 to 86400"
WATER = "a percentage from 50% to 99.5% or a fraction from 0.5 to 0.995"
ACCEPTED = {
    "mode": "scale | refuse | warn | off",
    "memory_limit": "auto, or " + BUDGET,
    "headroom": "a percentage from 0% to 50% or a fraction from 0 to 0.5 (10%, 0.1)",
    "child_memory": "auto, or " + PAGE,
    "min_concurrency": "a whole number from 1 to 10000",
    "log_format": "text | json",
    "child_log": "growth | all | off",
    "child_log_step": PAGE,
    "sample_interval": SECONDS + " (10, 2.5, 10s)",
    "summary_interval": SECONDS + " (300, 60s)",
    "state_file": "a file path, or empty for none",
    "child_oom_score_adj": "off, or a whole number from -1000 to 1000",
    "gc_freeze": "1 or 0 (true/false, yes/no, on/off)",
    "malloc_trim": "1 or 0 (true/false, yes/no, on/off)",
    "max_worker_memory": "empty for none, or " + BUDGET,
    "brake": "1 or 0 (true/false, yes/no, on/off)",
    "governor": "on | observe | off",
    "recycle": "1 or 0 (true/false, yes/no, on/off)",
    "min_tasks_per_child": "a whole number from 1 to 1000",
    "max_memory_kills": "a whole number from 1 to 100",
    "task_memory_limit": "empty for none, or " + PAGE,
    "task_soft_memory_limit": "empty for none, or " + PAGE,
    "brake_interval": SECONDS + " (0.25, 1, 2s)",
    "low_water": WATER + " (85%, 0.85)",
    "high_water": WATER + " (95%, 0.95)",
    "hard_water": WATER + " (98%, 0.98)",
    "metrics_port": "empty for none, or a port up to 65535, 0 for any free",
    "metrics_address": "an IP address or a host name (127.0.0.1, ::, 0.0.0.0, localhost)",
}
DEFAULT_SOURCES = {name: "default" for name in ACCEPTED}


def test_defaults() -> None:
    """With nothing set, every option has its documented default and source "default"."""
    settings = load_settings({}, {})
    assert settings == Settings(
        mode="scale",
        memory_limit=None,
        headroom=0.1,
        child_memory=None,
        min_concurrency=1,
        log_format="text",
        child_log="growth",
        child_log_step=16 * MIB,
        sample_interval=10.0,
        summary_interval=300.0,
        state_file=None,
        child_oom_score_adj=500,
        gc_freeze=True,
        malloc_trim=True,
        max_worker_memory=None,
        brake=True,
        governor="on",
        recycle=True,
        min_tasks_per_child=4,
        max_memory_kills=3,
        task_memory_limit=None,
        task_soft_memory_limit=None,
        brake_interval=0.25,
        low_water=0.85,
        high_water=0.95,
        hard_water=0.98,
        metrics_port=None,
        metrics_address="127.0.0.1",
        sources=DEFAULT_SOURCES,
    )
    assert dict(settings.sources or {}) == DEFAULT_SOURCES


# option, env value (None: unset), conf value (None: unset), expected value, expected source
PRECEDENCE: list[tuple[str, str | None, Any, Any, str]] = [
    ("mode", "warn", "refuse", "warn", "env"),
    ("mode", None, "refuse", "refuse", "config"),
    ("mode", None, None, "scale", "default"),
    ("memory_limit", "512M", "1G", 512 * MIB, "env"),
    ("memory_limit", None, "1G", 1024 * MIB, "config"),
    ("memory_limit", "auto", "1G", None, "env"),
    ("memory_limit", None, None, None, "default"),
    ("headroom", "20%", "0.3", 0.2, "env"),
    ("headroom", None, "0.3", 0.3, "config"),
    ("headroom", None, None, 0.1, "default"),
    ("child_memory", "43M", "100M", 43 * MIB, "env"),
    ("child_memory", None, "100M", 100 * MIB, "config"),
    ("child_memory", None, "auto", None, "config"),
    ("child_memory", None, None, None, "default"),
    ("min_concurrency", "3", "2", 3, "env"),
    ("min_concurrency", None, "2", 2, "config"),
    ("min_concurrency", None, None, 1, "default"),
    ("log_format", "json", "text", "json", "env"),
    ("log_format", None, "json", "json", "config"),
    ("log_format", None, None, "text", "default"),
    ("child_log", "all", "off", "all", "env"),
    ("child_log", None, "OFF", "off", "config"),
    ("child_log_step", "4M", "8M", 4 * MIB, "env"),
    ("child_log_step", None, 1048576, MIB, "config"),
    ("sample_interval", "2.5", "5", 2.5, "env"),
    ("sample_interval", None, "5s", 5.0, "config"),
    ("summary_interval", "60s", "120", 60.0, "env"),
    ("summary_interval", None, 30, 30.0, "config"),
    ("state_file", "/var/lib/w.json", "/tmp/x", "/var/lib/w.json", "env"),
    ("state_file", None, "/tmp/x", "/tmp/x", "config"),
    ("state_file", "", "/tmp/x", None, "env"),
    ("child_oom_score_adj", "800", "100", 800, "env"),
    ("child_oom_score_adj", "off", "100", None, "env"),
    ("child_oom_score_adj", None, -200, -200, "config"),
    ("child_oom_score_adj", None, "+1000", 1000, "config"),
    ("gc_freeze", "1", "0", True, "env"),
    ("gc_freeze", None, True, True, "config"),
    ("gc_freeze", None, "no", False, "config"),
    ("malloc_trim", "off", "1", False, "env"),
    ("malloc_trim", None, "0", False, "config"),
    ("max_worker_memory", "1G", "2G", 1024 * MIB, "env"),
    ("max_worker_memory", None, "2G", 2048 * MIB, "config"),
    ("max_worker_memory", "", "2G", None, "env"),
    ("brake", "0", "1", False, "env"),
    ("governor", "observe", "off", "observe", "env"),
    ("governor", None, "OFF", "off", "config"),
    ("brake_interval", None, "0.5", 0.5, "config"),
    ("high_water", "92%", "0.85", 0.92, "env"),
    ("metrics_port", "9808", "9000", 9808, "env"),
    ("metrics_port", None, 0, 0, "config"),
    ("metrics_port", "", 9000, None, "env"),
    ("metrics_address", None, "0.0.0.0", "0.0.0.0", "config"),
]


@pytest.mark.parametrize(
    "name,env_value,conf_value,expected,source",
    PRECEDENCE,
    ids=[f"{p[0]}-{p[4]}" + ("-auto" if "auto" in (p[1], p[2]) else "") for p in PRECEDENCE],
)
def test_precedence(
    name: str, env_value: str | None, conf_value: Any, expected: Any, source: str
) -> None:
    """env > app.conf > default for each option, and the source is recorded."""
    env = {} if env_value is None else {f"CELERY_GUARD_{name.upper()}": env_value}
    conf = {} if conf_value is None else {f"guard_{name}": conf_value}
    settings = load_settings(env, conf)
    assert getattr(settings, name) == expected
    assert settings.source(name) == source
    # the other options stay at their defaults
    assert dict(settings.sources or {}) == {**DEFAULT_SOURCES, name: source}


def test_mixed_sources_recorded_per_option() -> None:
    """Each option is resolved on its own: one from env, one from conf, the rest defaults."""
    settings = load_settings(
        {"CELERY_GUARD_MODE": "refuse", "CELERY_GUARD_HEADROOM": "5%"},
        {"guard_mode": "warn", "guard_memory_limit": "600M", "guard_log_format": "json"},
    )
    assert (settings.mode, settings.memory_limit, settings.headroom, settings.log_format) == (
        "refuse",
        600 * MIB,
        0.05,
        "json",
    )
    assert settings.sources == {
        "mode": "env",
        "memory_limit": "config",
        "headroom": "env",
        "child_memory": "default",
        "min_concurrency": "default",
        "log_format": "config",
        **{name: "default" for name in list(ACCEPTED)[6:]},
    }


def test_source_without_sources_is_default() -> None:
    """A Settings built by hand (no sources) reports "default" rather than failing."""
    assert Settings().source("mode") == "default"


# setting, conf value of a Python type other than str, expected parsed value
TYPED_CONF: list[tuple[str, Any, Any]] = [
    ("guard_headroom", 0.2, 0.2),
    ("guard_headroom", 0, 0.0),
    ("guard_min_concurrency", 2, 2),
    ("guard_memory_limit", 536870912, 536870912),
    ("guard_child_memory", 45088768, 45088768),
]


@pytest.mark.parametrize(
    "setting,value,expected", TYPED_CONF, ids=[f"{t[0]}={t[1]!r}" for t in TYPED_CONF]
)
def test_conf_values_that_are_numbers(setting: str, value: Any, expected: Any) -> None:
    """app.conf is Python, so users write numbers there, not strings; those must work."""
    settings = load_settings({}, {setting: value})
    name = setting.removeprefix("guard_")
    assert getattr(settings, name) == expected
    assert settings.source(name) == "config"


def test_conf_value_none_falls_back_to_default() -> None:
    """A setting explicitly set to None in app.conf is treated as unset."""
    settings = load_settings({}, {"guard_mode": None, "guard_min_concurrency": None})
    assert (settings.mode, settings.min_concurrency) == ("scale", 1)
    assert (settings.source("mode"), settings.source("min_concurrency")) == ("default", "default")


def test_env_overrides_a_bad_conf_value() -> None:
    """A bad value in app.conf is never parsed when the environment overrides it."""
    settings = load_settings({"CELERY_GUARD_MODE": "warn"}, {"guard_mode": "bogus"})
    assert (settings.mode, settings.source("mode")) == ("warn", "env")


def test_celery_app_conf() -> None:
    """A real Celery app.conf works as the conf mapping."""
    app = Celery("config-test", set_as_current=False)
    app.conf.guard_mode = "refuse"
    app.conf.guard_headroom = 0.25
    settings = load_settings({"CELERY_GUARD_LOG_FORMAT": "json"}, app.conf)
    assert (settings.mode, settings.headroom, settings.log_format, settings.memory_limit) == (
        "refuse",
        0.25,
        "json",
        None,
    )
    assert (settings.source("mode"), settings.source("log_format")) == ("config", "env")


# option, raw value, parsed value
CASE_INSENSITIVE = [
    ("mode", "SCALE", "scale"),
    ("mode", "Refuse", "refuse"),
    ("mode", " warn ", "warn"),
    ("mode", "OFF", "off"),
    ("log_format", "JSON", "json"),
    ("log_format", "Text", "text"),
    ("memory_limit", "AUTO", None),
    ("child_memory", "Auto", None),
]


@pytest.mark.parametrize(
    "name,raw,expected", CASE_INSENSITIVE, ids=[f"{c[0]}={c[1].strip()}" for c in CASE_INSENSITIVE]
)
@pytest.mark.parametrize("where", ["env", "config"])
def test_words_are_case_insensitive(name: str, raw: str, expected: Any, where: str) -> None:
    """Mode, log format and "auto" are words: any case (and surrounding blanks) is accepted."""
    if where == "env":
        settings = load_settings({f"CELERY_GUARD_{name.upper()}": raw}, {})
    else:
        settings = load_settings({}, {f"guard_{name}": raw})
    assert getattr(settings, name) == expected
    assert settings.source(name) == where


# option, where the value is set, raw value, the value ConfigError must report
BAD: list[tuple[str, str, Any, str]] = [
    ("mode", "env", "scaled", "scaled"),
    ("mode", "env", "scale,warn", "scale,warn"),
    ("mode", "config", "fail", "fail"),
    ("mode", "config", 1, "1"),
    ("memory_limit", "env", "512B", "512B"),
    ("memory_limit", "env", "0", "0"),
    ("memory_limit", "config", "lots", "lots"),
    ("memory_limit", "config", -1, "-1"),
    ("memory_limit", "config", 536870912.5, "536870912.5"),
    ("headroom", "env", "100%", "100%"),
    ("headroom", "env", "10 percent", "10 percent"),
    ("headroom", "config", 1.5, "1.5"),
    ("headroom", "config", "-5%", "-5%"),
    ("child_memory", "env", "1e9", "1e9"),
    ("child_memory", "env", "43MiB of RAM", "43MiB of RAM"),
    ("child_memory", "config", "automatic", "automatic"),
    ("child_memory", "config", 0, "0"),
    ("min_concurrency", "env", "0", "0"),
    ("min_concurrency", "env", "2.5", "2.5"),
    ("min_concurrency", "env", "-1", "-1"),
    ("min_concurrency", "config", 0, "0"),
    ("min_concurrency", "config", "two", "two"),
    ("min_concurrency", "config", 2.0, "2.0"),
    ("log_format", "env", "logfmt", "logfmt"),
    ("log_format", "env", "yaml", "yaml"),
    ("log_format", "config", "JSONL", "JSONL"),
    ("log_format", "config", True, "True"),
    ("child_log", "env", "growing", "growing"),
    ("child_log", "config", "", ""),
    ("child_log_step", "env", "auto", "auto"),
    ("child_log_step", "config", 0, "0"),
    ("sample_interval", "env", "0", "0"),
    ("sample_interval", "env", "-1", "-1"),
    ("sample_interval", "config", "1m", "1m"),
    ("summary_interval", "env", "soon", "soon"),
    ("summary_interval", "config", "1..2", "1..2"),
    ("child_oom_score_adj", "env", "1001", "1001"),
    ("child_oom_score_adj", "env", "high", "high"),
    ("child_oom_score_adj", "config", 2.5, "2.5"),
    ("child_oom_score_adj", "config", "--5", "--5"),
    ("gc_freeze", "env", "2", "2"),
    ("gc_freeze", "config", "freeze", "freeze"),
    ("max_worker_memory", "env", "auto", "auto"),
    ("max_worker_memory", "config", "0", "0"),
    ("brake", "env", "sometimes", "sometimes"),
    ("brake_interval", "config", "0", "0"),
    ("hard_water", "env", "100%", "100%"),
    ("metrics_port", "env", "65536", "65536"),
    ("metrics_port", "env", "http", "http"),
    ("metrics_port", "config", -1, "-1"),
    ("metrics_address", "env", "", ""),
    ("metrics_address", "config", "local host", "local host"),
]


# low, high, hard: the marks must rise
MARKS = [("90%", "90%", "97%"), ("80%", "98%", "97%"), ("0.95", "0.9", "0.97")]


@pytest.mark.parametrize("low,high,hard", MARKS, ids=["low=high", "high>hard", "low>high"])
def test_water_marks_must_rise(low: str, high: str, hard: str) -> None:
    """low < high < hard, or the brake would act against itself: one error naming them."""
    env = {
        "CELERY_GUARD_LOW_WATER": low,
        "CELERY_GUARD_HIGH_WATER": high,
        "CELERY_GUARD_HARD_WATER": hard,
    }
    with pytest.raises(ConfigError) as caught:
        load_settings(env, {})
    assert caught.value.variable == "CELERY_GUARD_HIGH_WATER"
    assert "LOW_WATER < CELERY_GUARD_HIGH_WATER < CELERY_GUARD_HARD_WATER" in caught.value.accepted


@pytest.mark.parametrize(
    "name,where,raw,reported",
    BAD,
    ids=[f"{b[0]}-{b[1]}-{b[2]!r}" for b in BAD],
)
def test_bad_values_raise_config_error(name: str, where: str, raw: Any, reported: str) -> None:
    """The error names the variable, setting, value, accepted forms and source."""
    variable, setting = f"CELERY_GUARD_{name.upper()}", f"guard_{name}"
    env, conf = ({variable: raw}, {}) if where == "env" else ({}, {setting: raw})
    with pytest.raises(ConfigError) as caught:
        load_settings(env, conf)
    error = caught.value
    assert (error.variable, error.setting, error.value, error.accepted, error.source) == (
        variable,
        setting,
        reported,
        ACCEPTED[name],
        where,
    )
    assert str(error) == f"{variable}={reported!r}: expected {ACCEPTED[name]}"


def test_first_bad_option_is_reported() -> None:
    """With several bad values, the error is about the first option (mode comes first)."""
    with pytest.raises(ConfigError) as caught:
        load_settings({"CELERY_GUARD_LOG_FORMAT": "xml"}, {"guard_mode": "nope"})
    assert (caught.value.variable, caught.value.value, caught.value.source) == (
        "CELERY_GUARD_MODE",
        "nope",
        "config",
    )


def test_small_float_headroom_in_conf() -> None:
    """A float in app.conf is a number, whatever notation str() would print it in."""
    assert load_settings({}, {"guard_headroom": 1e-05}).headroom == 1e-05


# option, worker option value, env value, conf value, expected value, expected source
WITH_OPTIONS: list[tuple[str, Any, str | None, Any, Any, str]] = [
    ("mode", "refuse", "warn", "off", "refuse", "option"),
    ("mode", None, "warn", "off", "warn", "env"),
    ("memory_limit", "700M", "1G", "2G", 700 * MIB, "option"),
    ("metrics_port", "0", None, 9000, 0, "option"),
    ("child_memory", None, None, "40M", 40 * MIB, "config"),
]


@pytest.mark.parametrize(
    "name,option,env_value,conf_value,expected,source",
    WITH_OPTIONS,
    ids=[f"{w[0]}-{w[5]}" for w in WITH_OPTIONS],
)
def test_a_worker_option_wins_over_everything(
    name: str, option: Any, env_value: str | None, conf_value: Any, expected: Any, source: str
) -> None:
    """``--guard-<name>`` (celery_guard.install) > env > app.conf > default; an option
    not given (None, as click passes it) falls through."""
    env = {} if env_value is None else {f"CELERY_GUARD_{name.upper()}": env_value}
    conf = {} if conf_value is None else {f"guard_{name}": conf_value}
    settings = load_settings(env, conf, {name: option})
    assert (getattr(settings, name), settings.source(name)) == (expected, source)


def test_a_bad_worker_option_names_the_option_too() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"CELERY_GUARD_MODE": "warn"}, {}, {"mode": "sometimes"})
    error = caught.value
    assert (error.flag, error.variable, error.value, error.source) == (
        "--guard-mode",
        "CELERY_GUARD_MODE",
        "sometimes",
        "option",
    )


def test_a_bad_env_value_names_no_option() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"CELERY_GUARD_MODE": "sometimes"}, {}, {"mode": None})
    assert caught.value.flag == ""


@pytest.mark.parametrize("env", [{"CELERY_GUARD_BRAKE": "0"}, {"CELERY_GUARD_GOVERNOR": "off"}])
def test_the_two_switches_turn_off_one_run_time_budget(env: dict[str, str]) -> None:
    """``CELERY_GUARD_BRAKE=0`` (the older switch) and ``CELERY_GUARD_GOVERNOR=off`` say
    the same: the rest of the guard reads only ``governor``."""
    assert load_settings(env, {}).governor == "off"


def test_a_config_error_line_names_the_setting_its_value_and_what_is_accepted() -> None:
    from celery_guard.config import error_fields

    error = ConfigError(
        "CELERY_GUARD_MODE", "guard_mode", "fail", "scale | refuse | warn | off", "option",
        flag="--guard-mode",
    )  # fmt: skip
    assert error_fields(error) == {
        "variable": "CELERY_GUARD_MODE",
        "setting": "guard_mode",
        "option": "--guard-mode",
        "source": "option",
        "value": "fail",
        "accepted": "scale | refuse | warn | off",
    }


def test_a_config_error_from_the_environment_names_no_worker_option() -> None:
    from celery_guard.config import error_fields

    error = ConfigError("CELERY_GUARD_MODE", "guard_mode", "fail", "scale", "env")
    assert "option" not in error_fields(error)


def test_a_config_error_line_shows_a_value_of_200_characters_whole_and_cuts_a_longer_one() -> None:
    from celery_guard.config import error_fields

    whole = ConfigError("CELERY_GUARD_STATE_FILE", "guard_state_file", "a" * 200, "a path", "env")
    assert error_fields(whole)["value"] == "a" * 200
    cut = ConfigError("CELERY_GUARD_STATE_FILE", "guard_state_file", "a" * 201, "a path", "env")
    assert error_fields(cut)["value"] == "a" * 200 + "..."


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("1.a.", True),  # one trailing dot allowed: "1.a"
        ("a.1b.", True),  # "a.1b": the last label is not all digits
        ("a.1.", False),
        (".", False),
        ("a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 61, True),  # 253 characters
        ("a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 62, False),  # 254
    ],
    ids=["trailing-dot", "trailing-dot-last-label-mixed", "trailing-dot-digits", "only-a-dot",
         "253-characters", "254-characters"],
)  # fmt: skip
def test_a_host_name_is_at_most_253_characters_with_one_trailing_dot_allowed(
    name: str, valid: bool
) -> None:
    from celery_guard.config import valid_hostname

    assert valid_hostname(name) is valid
