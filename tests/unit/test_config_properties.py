"""Property tests (hypothesis) of celery_guard.config: load_settings returns Settings
or raises a ConfigError that names the variable, the source and the accepted values;
the water marks out of order name the high-water mark."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from strategies import QUICK, _mostly

from celery_guard.config import OPTIONS, ConfigError, Option, Settings, load_settings
from celery_guard.sizes import parse_fraction

#: Values each option accepts, to reach the later options and the water-mark check.
GOOD: dict[str, list[str]] = {
    "mode": ["scale", "refuse", "warn", "off", " WARN "],
    "memory_limit": ["auto", "512M", "1GiB", "536870912", "1.5G"],
    "headroom": ["10%", "0.1", "0", "0%", "50%"],
    "child_memory": ["auto", "100M", "64MiB"],
    "min_concurrency": ["1", "4", "16"],
    "log_format": ["text", "json", "JSON"],
    "child_log": ["growth", "all", "off"],
    "child_log_step": ["16M", "1M", "4096"],
    "sample_interval": ["10", "2.5", "10s"],
    "summary_interval": ["300", "60s"],
    "state_file": ["", "/tmp/state.json"],
    "child_oom_score_adj": ["off", "500", "-1000", "+1000", "0"],
    "gc_freeze": ["1", "0", "true", "no", "ON"],
    "malloc_trim": ["1", "0", "false", "yes", "Off"],
    "max_worker_memory": ["", "2G"],
    "brake": ["1", "0", "yes", "off"],
    "governor": ["on", "observe", "off", " Observe "],
    "recycle": ["1", "0", "no"],
    "min_tasks_per_child": ["1", "4", "10"],
    "max_memory_kills": ["1", "3"],
    "task_memory_limit": ["", "512M"],
    "task_soft_memory_limit": ["", "256M"],
    "brake_interval": ["0.25", "1", "2s"],
    "low_water": ["70%", "80%", "0.85", "90%"],
    "high_water": ["80%", "90%", "0.95", "85%"],
    "hard_water": ["90%", "97%", "0.99", "95%"],
    "metrics_port": ["", "0", "9100", "65535"],
    "metrics_address": ["127.0.0.1", "::", "0.0.0.0"],
}
#: Text any option might be given (max 40 characters: see test_size_overflow_in_settings).
ANY_TEXT = st.one_of(
    st.sampled_from(sorted({v for values in GOOD.values() for v in values})),
    st.sampled_from(["-1", "1001", "65536", "100%", "1", "a b", "0s", "auto", "\u0663", "1_0"]),
    st.text(max_size=40),
)
WATER_ORDER = "CELERY_GUARD_LOW_WATER < CELERY_GUARD_HIGH_WATER < CELERY_GUARD_HARD_WATER"
BY_VARIABLE = {option.variable: option for option in OPTIONS}


def _value(option: Option) -> st.SearchStrategy[str]:
    """Mostly accepted values, sometimes anything."""
    return _mostly(st.sampled_from([option.default, *GOOD[option.name]]), ANY_TEXT)


def _given(
    option: Option, env: Mapping[str, str], conf: Mapping[str, Any], options: Mapping[str, Any]
) -> tuple[Any, str]:
    """The value load_settings must use, and where it comes from."""
    for raw, source in (
        (options.get(option.name), "option"),
        (env.get(option.variable), "env"),
        (conf.get(option.setting), "config"),
    ):
        if raw is not None:
            return raw, source
    return option.default, "default"


def test_every_option_has_good_values() -> None:
    assert set(GOOD) == {option.name for option in OPTIONS}


def _examples(accepted: str) -> list[str]:
    """The values an ``accepted`` text shows: "a | b" choices, and "(x, y, z)" examples."""
    if " | " in accepted:
        return accepted.split(" | ")
    found = re.findall(r"\(([^)]*)\)", accepted)
    return [word for group in found for part in group.split(", ") for word in part.split("/")]


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.name)
def test_the_examples_an_error_shows_are_accepted(option: Option) -> None:
    """A ConfigError prints ``accepted``: every example it shows must parse."""
    for example in _examples(option.accepted):
        option.parse(example)


@QUICK
@given(
    option=st.sampled_from(OPTIONS),
    text=ANY_TEXT,
    source=st.sampled_from(["option", "env", "config"]),
)
def test_one_value_names_its_own_variable(option: Option, text: str, source: str) -> None:
    """Everything else left to its default: the value parses, or the ConfigError names
    its variable (a water mark may also break the order, which names the high mark)."""
    given_as = {"option": option.name, "env": option.variable, "config": option.setting}
    where = {name: {} for name in given_as}
    where[source] = {given_as[source]: text}
    refused = object()
    try:
        parsed = option.parse(text)
    except ValueError:
        parsed = refused
    try:
        result = load_settings(where["env"], where["config"], where["option"])
    except ConfigError as error:
        if error.accepted == WATER_ORDER:
            assert option.name.endswith("_water") and parsed is not refused
            assert error.variable == "CELERY_GUARD_HIGH_WATER"
        else:
            assert parsed is refused
            assert (error.variable, error.accepted) == (option.variable, option.accepted)
            assert (error.value, error.source) == (text, source)
            assert error.flag == (option.flag if source == "option" else "")
        return
    assert getattr(result, option.name) == parsed
    assert result.source(option.name) == source


#: The water marks alone, each from one source or none: the combination check.
MARK = st.sampled_from(["55%", "50%", "70%", "80%", "0.8", "85%", "90%", "0.9", "97%", "99.5%"])


@QUICK
@given(
    marks=st.fixed_dictionaries(
        {},
        optional={
            name: st.tuples(st.sampled_from(["option", "env", "config"]), MARK)
            for name in ("low_water", "high_water", "hard_water")
        },
    )
)
def test_water_marks_out_of_order_name_the_high_water_mark(
    marks: dict[str, tuple[str, str]],
) -> None:
    by_name = {option.name: option for option in OPTIONS}
    options = {name: text for name, (where, text) in marks.items() if where == "option"}
    env = {by_name[n].variable: text for n, (where, text) in marks.items() if where == "env"}
    conf = {by_name[n].setting: text for n, (where, text) in marks.items() if where == "config"}
    low, high, hard = (
        parse_fraction(marks.get(name, ("default", by_name[name].default))[1])
        for name in ("low_water", "high_water", "hard_water")
    )
    if low < high < hard:
        assert load_settings(env, conf, options).high_water == high
        return
    with pytest.raises(ConfigError) as raised:
        load_settings(env, conf, options)
    error = raised.value
    assert (error.variable, error.setting) == ("CELERY_GUARD_HIGH_WATER", "guard_high_water")
    assert error.accepted == WATER_ORDER
    assert error.value == f"{low}/{high}/{hard}"
    assert error.source == marks.get("high_water", ("default", ""))[0]


@QUICK
@given(
    env=st.fixed_dictionaries(
        {"CELERY_GUARD_UNKNOWN": ANY_TEXT},
        optional={option.variable: _value(option) for option in OPTIONS},
    ),
    conf=st.fixed_dictionaries(
        {},
        optional={
            option.setting: _mostly(
                _value(option),
                st.one_of(
                    st.none(),
                    st.booleans(),
                    st.integers(-2000, 2**40),
                    st.floats(allow_nan=True, allow_infinity=True),
                ),
            )
            for option in OPTIONS
        },
    ),
    options=st.fixed_dictionaries(
        {}, optional={option.name: st.one_of(st.none(), _value(option)) for option in OPTIONS}
    ),
)
def test_load_settings_raises_only_config_errors_that_name_the_variable(
    env: dict[str, str], conf: dict[str, Any], options: dict[str, Any]
) -> None:
    try:
        result = load_settings(env, conf, options)
    except ConfigError as error:
        event(f"ConfigError {error.variable}")
        assert error.variable in BY_VARIABLE, error.variable
        option = BY_VARIABLE[error.variable]
        assert error.setting == option.setting
        assert error.variable in str(error)
        if error.accepted == WATER_ORDER:
            assert error.variable == "CELERY_GUARD_HIGH_WATER"
            return
        assert error.accepted == option.accepted
        raw, source = _given(option, env, conf, options)
        assert error.source == source
        assert error.flag == (option.flag if source == "option" else "")
        if isinstance(raw, str):
            assert error.value == raw
        with pytest.raises(ValueError):
            option.parse(error.value)
        # ... and it is the first option that does not parse
        for before in OPTIONS[: OPTIONS.index(option)]:
            raw, _ = _given(before, env, conf, options)
            if isinstance(raw, str):
                before.parse(raw)
        return
    event("settings")
    assert isinstance(result, Settings)
    assert result.low_water < result.high_water < result.hard_water
    for option in OPTIONS:
        raw, source = _given(option, env, conf, options)
        assert result.source(option.name) == source
        if isinstance(raw, str):
            parsed = option.parse(raw)
            if option.name == "governor" and not result.brake:
                parsed = "off"  # the older switch says the same (load_settings)
            assert getattr(result, option.name) == parsed


# ---------------------------------------------------------------------------------------
# regressions: the smallest inputs of the bugs the properties above found, now fixed;
# each docstring says what the code did before


def test_size_overflow_in_settings() -> None:
    """config.py load_settings catches ValueError only: the worker dies with a traceback
    instead of the one-line ConfigError."""
    with pytest.raises(ConfigError):
        load_settings({"CELERY_GUARD_MEMORY_LIMIT": "2" + "0" * 308}, {})
