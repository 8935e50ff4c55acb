"""Adversarial tests for the configuration boundary (celery_guard.config).

Every setting comes from people and deployment tools: environment variables, app.conf
(any Python object), worker options. Whatever arrives, the worker either gets a value
inside the documented range or one CRITICAL ``event=config_error`` line that names the
variable and the accepted range (exit 78). No other exception, no value out of range, no
non-ASCII look-alike digits, no line broken in two.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_guard.config import (
    HEADROOM_RANGE,
    INTERVAL_RANGE,
    MIN_BUDGET,
    MIN_CONCURRENCY_RANGE,
    MIN_PAGE,
    OPTIONS,
    SHOWN,
    WATER_RANGE,
    ConfigError,
    Option,
    error_fields,
    load_settings,
    valid_hostname,
)
from celery_guard.logline import format_event, parse_line

QUICK = settings(max_examples=300, deadline=None, database=None)
BY_NAME = {option.name: option for option in OPTIONS}
INTERVALS = ("sample_interval", "summary_interval", "brake_interval")
WATER = ("low_water", "high_water", "hard_water")
#: Options where an empty value means "none" rather than a bad value.
EMPTY_IS_NONE = (
    "state_file", "max_worker_memory", "metrics_port", "task_memory_limit",
    "task_soft_memory_limit",
)  # fmt: skip
#: Options whose values are not ASCII-only (a path is whatever bytes the file system has).
ANY_CHARACTERS = ("state_file",)
GOOD = {
    "mode": "scale",
    "memory_limit": "1G",
    "headroom": "10%",
    "child_memory": "40M",
    "min_concurrency": "2",
    "log_format": "json",
    "child_log": "all",
    "child_log_step": "16M",
    "sample_interval": "2.5",
    "summary_interval": "60s",
    "state_file": "/var/lib/guard.json",
    "child_oom_score_adj": "-500",
    "gc_freeze": "yes",
    "malloc_trim": "no",
    "max_worker_memory": "512M",
    "brake": "0",
    "governor": "observe",
    "recycle": "no",
    "min_tasks_per_child": "4",
    "max_memory_kills": "3",
    "task_memory_limit": "512M",
    "task_soft_memory_limit": "400M",
    "brake_interval": "0.25",
    "low_water": "80%",
    "high_water": "0.9",
    "hard_water": "97%",
    "metrics_port": "9808",
    "metrics_address": "::",
}


def _parsed(option: Option, text: str) -> Any:
    """The parsed value, or the ValueError; any other exception fails the test."""
    try:
        return option.parse(text)
    except ValueError as error:
        return error


def test_every_option_has_a_good_value() -> None:
    assert set(GOOD) == set(BY_NAME)
    for name, text in GOOD.items():
        assert not isinstance(_parsed(BY_NAME[name], text), ValueError), name


# --- regressions: issue 13, findings 3, 5 and 11 ------------------------------------------


def test_low_water_of_zero_is_refused_with_the_range() -> None:
    """Finding 3: ``0%`` was accepted and the brake paused consumption for good."""
    with pytest.raises(ConfigError) as raised:
        load_settings({"CELERY_GUARD_LOW_WATER": "0%"}, {})
    error = raised.value
    assert (error.variable, error.value) == ("CELERY_GUARD_LOW_WATER", "0%")
    assert "from 50% to 99.5%" in error.accepted


# option, value outside its range (each was accepted before the ranges)
OUT_OF_RANGE = [
    ("low_water", "0%"),
    ("low_water", "0.1"),
    ("high_water", "49.9%"),
    ("hard_water", "99.9%"),
    ("headroom", "60%"),
    ("headroom", "0.95"),
    ("sample_interval", "0.0000000001"),
    ("sample_interval", "1" + "0" * 400),  # float() is inf
    ("summary_interval", "0.001"),
    ("brake_interval", "86401"),
    ("brake_interval", "100000s"),
    ("min_concurrency", "10001"),
    ("min_concurrency", "9" * 5000),  # int() refuses 4300+ digits
    ("memory_limit", "512"),  # bytes meant as MiB
    ("max_worker_memory", "1M"),
    ("child_memory", "1"),
    ("child_log_step", "1K"),
    ("min_tasks_per_child", "0"),
    ("min_tasks_per_child", "1001"),
    ("max_memory_kills", "0"),
    ("max_memory_kills", "101"),
    ("task_memory_limit", "1K"),
]


@pytest.mark.parametrize(("name", "text"), OUT_OF_RANGE)
def test_values_out_of_range_are_refused(name: str, text: str) -> None:
    """Findings 3 and 11: every mark, interval and count has a range, checked at startup."""
    option = BY_NAME[name]
    with pytest.raises(ConfigError) as raised:
        load_settings({option.variable: text}, {})
    assert (raised.value.variable, raised.value.accepted) == (option.variable, option.accepted)


# option, text with digits that are not ASCII (int() and str.isdigit() take them)
NON_ASCII_DIGITS = [
    ("min_concurrency", "\u0663"),  # ARABIC-INDIC DIGIT THREE
    ("min_concurrency", "\uff12"),  # FULLWIDTH DIGIT TWO
    ("max_memory_kills", "\u0663"),
    ("min_tasks_per_child", "\uff14"),
    ("metrics_port", "\u0669\u0661\u0660\u0660"),
    ("child_oom_score_adj", "\u0665\u0660\u0660"),
    ("sample_interval", "\u0661\u0660"),
    ("memory_limit", "\uff11G"),
    ("headroom", "\u0661\u0660%"),
    ("mode", "scale\u00a0"),  # a no-break space is not a blank to strip
]


@pytest.mark.parametrize(("name", "text"), NON_ASCII_DIGITS)
def test_non_ascii_digits_are_refused(name: str, text: str) -> None:
    """Finding 11: ``_positive_int`` accepted ``\\u0663`` as 3, unlike the other parsers."""
    assert isinstance(_parsed(BY_NAME[name], text), ValueError)


BAD_ADDRESSES = [
    "a" * 64,  # a label over 63 characters: idna raised UnicodeError at bind
    "x..y",  # an empty label: the same
    ".",
    "..",
    "-lead.example",
    "trail-.example",
    "under_score",
    "a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 62,  # 254 characters
    "1.2.3",  # the last label all digits: read as an IPv4 address, not a name
    "256.1.1.1",
    "[::1]",
    "b\u00fccher.example",
    "host name",
    "host\nname",
    "",
    "   ",
]
GOOD_ADDRESSES = [
    "127.0.0.1",
    "0.0.0.0",
    "::",
    "::1",
    "fe80::1%eth0",
    "localhost",
    "localhost.",
    "metrics-1.svc.cluster.local",
    "a" * 63,
    "a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 61,  # 253 characters
    "3com.example",
]


@pytest.mark.parametrize("text", BAD_ADDRESSES, ids=repr)
def test_bad_metrics_addresses_are_refused_at_parse_time(text: str) -> None:
    """Finding 5: these passed validation and crashed the worker when it bound."""
    with pytest.raises(ConfigError) as raised:
        load_settings({"CELERY_GUARD_METRICS_ADDRESS": text}, {})
    assert raised.value.variable == "CELERY_GUARD_METRICS_ADDRESS"


@pytest.mark.parametrize("text", GOOD_ADDRESSES)
def test_ip_literals_and_host_names_are_accepted(text: str) -> None:
    assert load_settings({"CELERY_GUARD_METRICS_ADDRESS": text}, {}).metrics_address == text


def test_a_bad_address_is_refused_before_it_can_reach_idna() -> None:
    """What binding would do with the addresses the parser now refuses: idna's error."""
    for text in ("a" * 64, "x..y"):
        with pytest.raises(UnicodeError):
            text.encode("idna")
        assert not valid_hostname(text)


# --- conf values of any Python type -------------------------------------------------------


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


@pytest.mark.parametrize(
    "raw",
    [10**5000, -(10**400), float("inf"), float("-inf"), float("nan"), Unprintable(), [1, 2]],
    ids=["int-5000-digits", "int-negative-huge", "inf", "-inf", "nan", "unprintable", "list"],
)
@pytest.mark.parametrize("name", [*INTERVALS, "min_concurrency", "headroom", "memory_limit"])
def test_odd_conf_objects_are_config_errors(name: str, raw: Any) -> None:
    """app.conf holds Python objects: str() of a 5000-digit int raises ValueError, an
    object's __str__ may raise anything; either is a bad value, never a traceback."""
    option = BY_NAME[name]
    with pytest.raises(ConfigError) as raised:
        load_settings({}, {option.setting: raw})
    assert (raised.value.variable, raised.value.source) == (option.variable, "config")


def test_a_huge_int_in_conf_is_a_config_error_even_for_a_path() -> None:
    """A path never parses a value's text that could not be made."""
    with pytest.raises(ConfigError) as raised:
        load_settings({}, {"guard_state_file": 10**5000})
    assert raised.value.value.startswith("<an integer of")


def test_the_error_line_is_one_line_and_bounded() -> None:
    """A value with line breaks and of any length still gives one short line."""
    text = "1\n2\r3\x1b[31m" + "x" * 100_000
    with pytest.raises(ConfigError) as raised:
        load_settings({"CELERY_GUARD_SAMPLE_INTERVAL": text}, {})
    for log_format in ("text", "json"):
        line = format_event("config_error", error_fields(raised.value), log_format)
        assert "\n" not in line and "\r" not in line and "\x1b" not in line
        assert len(line) < SHOWN + 1000
    fields = parse_line(format_event("config_error", error_fields(raised.value)))
    assert fields["value"] == text[:SHOWN] + "..."
    assert fields["variable"] == "CELERY_GUARD_SAMPLE_INTERVAL"


# --- properties -------------------------------------------------------------------------


ANY_TEXT = st.one_of(
    st.text(max_size=60),
    st.text(alphabet=st.characters(codec="ascii"), max_size=30),
    st.from_regex(r"\s*[0-9]{0,12}(\.[0-9]{0,12})?\s?(%|s|K|M|G|T|KiB|MB)?\s*", fullmatch=True),
    st.sampled_from(["", " ", "auto", "off", "0", "-0", "+0", "1e3", "1_0", "nan", "inf", "."]),
)


@QUICK
@given(option=st.sampled_from(OPTIONS), text=ANY_TEXT)
def test_any_text_parses_or_raises_value_error(option: Option, text: str) -> None:
    """Never-raises: the parse gives a value or ValueError (load_settings turns that into
    the one line), whatever the text."""
    _parsed(option, text)


#: The bounds of each number a setting can hold: (low, high), inclusive.
BOUNDS: dict[str, tuple[float, float]] = {
    **{name: INTERVAL_RANGE for name in INTERVALS},
    **{name: WATER_RANGE for name in WATER},
    "headroom": HEADROOM_RANGE,
    "min_concurrency": MIN_CONCURRENCY_RANGE,
    "memory_limit": (MIN_BUDGET, 2**63 - 1),
    "max_worker_memory": (MIN_BUDGET, 2**63 - 1),
    "child_memory": (MIN_PAGE, 2**63 - 1),
    "child_log_step": (MIN_PAGE, 2**63 - 1),
    "child_oom_score_adj": (-1000, 1000),
    "metrics_port": (0, 65535),
}


@QUICK
@given(name=st.sampled_from(sorted(BOUNDS)), text=ANY_TEXT)
def test_whatever_parses_is_within_the_range(name: str, text: str) -> None:
    """Bounds: a numeric setting is None (auto, empty, off) or finite and in its range."""
    value = _parsed(BY_NAME[name], text)
    if isinstance(value, ValueError) or value is None:
        return
    low, high = BOUNDS[name]
    assert math.isfinite(value) and low <= value <= high, (text, value)


@QUICK
@given(
    name=st.sampled_from([n for n in BY_NAME if n not in ANY_CHARACTERS]),
    at=st.integers(0, 40),
    character=st.characters(min_codepoint=0x80),
)
def test_a_non_ascii_character_anywhere_is_refused(name: str, at: int, character: str) -> None:
    """ASCII-only: a good value with any non-ASCII character in it (a look-alike digit, a
    no-break space at either end) is refused, for every setting but the path."""
    good = GOOD[name]
    text = good[:at] + character + good[at:]
    assert isinstance(_parsed(BY_NAME[name], text), ValueError), repr(text)


@pytest.mark.parametrize("name", [n for n in BY_NAME if n not in EMPTY_IS_NONE])
@pytest.mark.parametrize("text", ["", " ", "\t\n"], ids=["empty", "space", "blanks"])
def test_empty_values_are_refused(name: str, text: str) -> None:
    """A variable that is set but empty is a bad value, not the default."""
    assert isinstance(_parsed(BY_NAME[name], text), ValueError)


@pytest.mark.parametrize("name", EMPTY_IS_NONE)
def test_empty_means_none_where_documented(name: str) -> None:
    assert BY_NAME[name].parse("  ") is None


@QUICK
@given(
    seconds=st.decimals(
        min_value=Decimal(str(INTERVAL_RANGE[0])),
        max_value=Decimal(str(INTERVAL_RANGE[1])),
        places=3,
    ),
    suffix=st.sampled_from(["", "s", " ", "S"]),
)
def test_intervals_round_trip(seconds: Decimal, suffix: str) -> None:
    """Round trip: any interval in the range written out in full reads back as itself."""
    text = format(seconds, "f") + suffix
    for name in INTERVALS:
        assert BY_NAME[name].parse(text) == float(seconds)


@QUICK
@given(per_mille=st.integers(500, 995), as_percent=st.booleans())
def test_water_marks_round_trip(per_mille: int, as_percent: bool) -> None:
    """Round trip: any mark in the band reads back as itself, as a percentage or not."""
    text = f"{per_mille / 10}%" if as_percent else str(per_mille / 1000)
    assert math.isclose(BY_NAME["low_water"].parse(text), per_mille / 1000)


@QUICK
@given(size=st.integers(MIN_BUDGET, 2**63 - 1))
def test_budget_sizes_round_trip(size: int) -> None:
    for name in ("memory_limit", "max_worker_memory"):
        assert BY_NAME[name].parse(str(size)) == size


@QUICK
@given(
    env=st.dictionaries(
        st.sampled_from([option.variable for option in OPTIONS]), ANY_TEXT, max_size=6
    ),
    conf=st.dictionaries(
        st.sampled_from([option.setting for option in OPTIONS]),
        st.one_of(
            st.integers(),
            st.floats(),
            st.booleans(),
            st.none(),
            st.text(max_size=20),
            st.just(10**5000),
        ),
        max_size=6,
    ),
)
def test_load_settings_raises_only_config_error(env: dict[str, str], conf: dict[str, Any]) -> None:
    """Never-raises: whatever env and app.conf hold, Settings or one ConfigError; and any
    Settings it returns has every number in range and the marks in order."""
    try:
        result = load_settings(env, conf)
    except ConfigError as error:
        assert error.variable in {option.variable for option in OPTIONS}
        assert "\n" not in format_event("config_error", error_fields(error))
        return
    for name, (low, high) in BOUNDS.items():
        value = getattr(result, name)
        assert value is None or low <= value <= high
    assert result.low_water < result.high_water < result.hard_water


def test_marks_in_the_band_but_out_of_order_still_name_the_order() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({"CELERY_GUARD_LOW_WATER": "90%", "CELERY_GUARD_HIGH_WATER": "80%"}, {})
    assert raised.value.accepted.startswith("CELERY_GUARD_LOW_WATER < ")


@pytest.mark.parametrize("text", ["/tmp/st\u00e4te.json", "  /tmp/x  "])
def test_paths_keep_any_characters_but_the_blanks_around(text: str) -> None:
    assert BY_NAME["state_file"].parse(text) == text.strip()


@pytest.mark.parametrize("text", ["/tmp/a\0b", "/" + "a" * 5000])
def test_paths_the_kernel_refuses_are_refused(text: str) -> None:
    """A NUL byte or a path over PATH_MAX could only fail later, when the file is read."""
    with pytest.raises(ConfigError):
        load_settings({}, {"guard_state_file": text})
