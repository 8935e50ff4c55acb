"""Settings: a ``--guard-<name>`` worker option, else ``CELERY_GUARD_<NAME>`` in the
environment, else ``guard_<name>`` in app.conf, else the default.

Everything is parsed up front and strictly, so a typo stops the worker before it forks
anything, with one line that says what to fix, instead of a budget quietly ignored.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from .sizes import PAGE, SIZE_FORMS, parse_fraction, parse_size

MODES = ("scale", "refuse", "warn", "off")
LOG_FORMATS = ("text", "json")
CHILD_LOGS = ("growth", "all", "off")
GOVERNOR_MODES = ("on", "observe", "off")


class ConfigError(Exception):
    """A setting that cannot be parsed; carries what the CRITICAL line must name."""

    def __init__(
        self, variable: str, setting: str, value: str, accepted: str, source: str, flag: str = ""
    ):
        super().__init__(f"{variable}={value!r}: expected {accepted}")
        self.variable, self.setting, self.value = variable, setting, value
        self.accepted, self.source = accepted, source
        self.flag = flag  # the worker option, when that is where the value came from


#: The blanks stripped around a value: ASCII only. A no-break space or an ideographic one is
#: not what the documentation shows, so it makes the value wrong rather than invisible.
_BLANKS = " \t\r\n\f\v"
#: A number as the documentation writes it: ASCII digits, an optional point, no sign, no
#: exponent, no ``_``; int() and float() would also take ``\u0663``, ``1_0`` and ``1e3``.
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
#: Digits beyond these are a typo, and int() refuses more than 4300 of them anyway.
_MAX_DIGITS = 30

#: Seconds between two checks, samples or summaries: below 10 ms a timer loop only burns
#: the CPU the tasks want; above a day it never runs in a worker's life (a typo).
INTERVAL_RANGE = (0.01, 86400.0)
#: The water marks, fractions of the limit: below one half the brake would pause a pool
#: that fits; above 99.5% there is no room left to act before the OOM killer does.
WATER_RANGE = (0.5, 0.995)
#: The part of the limit kept free at startup: more than half is written the wrong way
#: round (0.9 for 10%).
HEADROOM_RANGE = (0.0, 0.5)
#: ``CELERY_GUARD_MIN_CONCURRENCY``: none is not a pool, more than 10000 is beyond what one
#: worker runs.
MIN_CONCURRENCY_RANGE = (1, 10000)
#: The smallest budget (``memory_limit``, ``max_worker_memory``): an interpreter with
#: Celery does not fit in less, so a smaller figure is bytes meant as MiB.
MIN_BUDGET = 16 * 1024 * 1024
#: min_tasks_per_child and max_memory_kills: a pool sized for up to this many runs
TASKS_PER_CHILD_RANGE = (1, 1000)
MEMORY_KILLS_RANGE = (1, 100)
#: The smallest per-child figure (``child_memory``, ``child_log_step``, limits): one page.
MIN_PAGE = PAGE
#: Longer paths are refused by the kernel (PATH_MAX).
MAX_PATH = 4096
#: Longest value an ``event=config_error`` line shows; the rest is cut.
SHOWN = 200


def _ascii(text: str) -> str:
    """The value without surrounding ASCII blanks; refused if anything else is not ASCII."""
    value = text.strip(_BLANKS)
    if not value.isascii() or not value.isprintable():
        raise ValueError(text)
    return value


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = _ascii(text).lower()
        if value not in choices:
            raise ValueError(text)
        return value

    return parse


def _decimal(text: str) -> Decimal:
    """An ASCII decimal, exactly: comparing a Decimal with the bounds cannot overflow to
    inf the way float("1" + "0" * 400) does."""
    if not _DECIMAL.fullmatch(text) or len(text) > _MAX_DIGITS:
        raise ValueError(text)
    return Decimal(text)


def _whole(low: int, high: int) -> Callable[[str], int]:
    """A whole number of ASCII digits from ``low`` to ``high``."""

    def parse(text: str) -> int:
        value = _ascii(text)
        if not value.isdigit() or len(value) > _MAX_DIGITS or not low <= int(value) <= high:
            raise ValueError(text)
        return int(value)

    return parse


def _size(minimum: int) -> Callable[[str], int]:
    """A size (see sizes.py) of at least ``minimum`` bytes."""

    def parse(text: str) -> int:
        value = parse_size(_ascii(text))
        if value < minimum:
            raise ValueError(text)
        return value

    return parse


def _auto_or(parse: Callable[[str], int]) -> Callable[[str], int | None]:
    def parse_auto(text: str) -> int | None:
        return None if _ascii(text).lower() == "auto" else parse(text)

    return parse_auto


def _empty_or(parse: Callable[[str], int]) -> Callable[[str], int | None]:
    def parse_empty(text: str) -> int | None:
        return parse(text) if _ascii(text) else None

    return parse_empty


def _fraction(low: float, high: float) -> Callable[[str], float]:
    """A percentage or a fraction (see sizes.py) from ``low`` to ``high``."""

    def parse(text: str) -> float:
        value = parse_fraction(_ascii(text))
        if not low <= value <= high:
            raise ValueError(text)
        return value

    return parse


def _seconds(text: str) -> float:
    """Seconds within INTERVAL_RANGE, with an optional ``s``."""
    value = _decimal(_ascii(text).lower().removesuffix("s"))
    low, high = INTERVAL_RANGE
    if not Decimal(repr(low)) <= value <= Decimal(repr(high)):
        raise ValueError(text)
    return float(value)


def _oom_score_adj(text: str) -> int | None:
    value = _ascii(text).lower()
    if value == "off":
        return None
    number = value[1:] if value[:1] in "+-" else value
    if not number.isdigit() or len(number) > _MAX_DIGITS or not -1000 <= int(value) <= 1000:
        raise ValueError(text)
    return int(value)


def _flag(text: str) -> bool:
    value = _ascii(text).lower()
    if value not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise ValueError(text)
    return value in ("1", "true", "yes", "on")


def _path_or_none(text: str) -> str | None:
    """Any path the kernel could open (not ASCII only: paths are bytes); NUL never is."""
    value = text.strip(_BLANKS)
    if "\0" in value or len(value) > MAX_PATH:
        raise ValueError(text)
    return value or None


_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def valid_hostname(name: str) -> bool:
    """RFC 1123 host name: dot-separated labels of 1 to 63 letters, digits and hyphens, not
    starting or ending with a hyphen, at most 253 characters (one trailing dot allowed).
    The last label is not all digits (RFC 3696): ``1.2.3`` would be read as an IP address."""
    name = name[:-1] if name.endswith(".") else name
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    return all(_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()


def _address(text: str) -> str:
    """An IP address literal or a valid host name: anything else would fail only when the
    metrics endpoint binds, inside the running worker (idna raises UnicodeError on a label
    of 64 characters or an empty one)."""
    value = _ascii(text)
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not valid_hostname(value):
            raise ValueError(text) from None
    return value


def _as_text(raw: Any) -> str:
    """app.conf may hold numbers; write floats out in full (1e-05 -> 0.00001). ValueError
    for what cannot be shown as text (an int of 4300+ digits, a ``str`` that fails)."""
    if isinstance(raw, float) and math.isfinite(raw):
        return format(Decimal(repr(raw)), "f")
    if isinstance(raw, int) and not isinstance(raw, bool) and raw.bit_length() > 256:
        raise ValueError(f"an integer of {raw.bit_length()} bits")
    try:
        return str(raw)
    except Exception as error:  # any object may sit in app.conf
        raise ValueError(f"a {type(raw).__name__} that cannot be shown") from error


def error_fields(error: ConfigError) -> dict[str, Any]:
    """The keys of the ``event=config_error`` line, from the worker and ``guard check``."""
    return {
        "variable": error.variable,
        "setting": error.setting,
        **({"option": error.flag} if error.flag else {}),
        "source": error.source,
        "value": error.value if len(error.value) <= SHOWN else error.value[:SHOWN] + "...",
        "accepted": error.accepted,
    }


@dataclass(frozen=True)
class Option:
    name: str
    default: str
    accepted: str
    parse: Callable[[str], Any]

    @property
    def variable(self) -> str:
        return f"CELERY_GUARD_{self.name.upper()}"

    @property
    def setting(self) -> str:
        return f"guard_{self.name}"

    @property
    def flag(self) -> str:
        """The ``celery worker`` option that ``celery_guard.install`` adds."""
        return "--guard-" + self.name.replace("_", "-")


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def _range_forms(low: float, high: float, examples: str) -> str:
    return (
        f"a percentage from {_percent(low)} to {_percent(high)}"
        f" or a fraction from {low:g} to {high:g} ({examples})"
    )


_SECONDS = f"seconds from {INTERVAL_RANGE[0]:g} to {INTERVAL_RANGE[1]:g}"
_BUDGET = f"a size of at least {MIN_BUDGET >> 20}M: {SIZE_FORMS}"
_PAGE = f"a size of at least {MIN_PAGE >> 10}K: {SIZE_FORMS}"
_WATER = _fraction(*WATER_RANGE)
_PORT = _empty_or(_whole(0, 65535))

OPTIONS = (
    Option("mode", "scale", " | ".join(MODES), _choice(MODES)),
    Option("memory_limit", "auto", f"auto, or {_BUDGET}", _auto_or(_size(MIN_BUDGET))),
    Option(
        "headroom", "10%", _range_forms(*HEADROOM_RANGE, "10%, 0.1"), _fraction(*HEADROOM_RANGE)
    ),
    Option("child_memory", "auto", f"auto, or {_PAGE}", _auto_or(_size(MIN_PAGE))),
    Option(
        "min_concurrency",
        "1",
        "a whole number from {} to {}".format(*MIN_CONCURRENCY_RANGE),
        _whole(*MIN_CONCURRENCY_RANGE),
    ),
    Option("log_format", "text", " | ".join(LOG_FORMATS), _choice(LOG_FORMATS)),
    Option("child_log", "growth", " | ".join(CHILD_LOGS), _choice(CHILD_LOGS)),
    Option("child_log_step", "16M", _PAGE, _size(MIN_PAGE)),
    Option("sample_interval", "10", f"{_SECONDS} (10, 2.5, 10s)", _seconds),
    Option("summary_interval", "300", f"{_SECONDS} (300, 60s)", _seconds),
    Option("state_file", "", "a file path, or empty for none", _path_or_none),
    Option(
        "child_oom_score_adj", "500", "off, or a whole number from -1000 to 1000", _oom_score_adj
    ),
    Option("gc_freeze", "1", "1 or 0 (true/false, yes/no, on/off)", _flag),
    Option("malloc_trim", "1", "1 or 0 (true/false, yes/no, on/off)", _flag),
    Option("max_worker_memory", "", f"empty for none, or {_BUDGET}", _empty_or(_size(MIN_BUDGET))),
    Option("brake", "1", "1 or 0 (true/false, yes/no, on/off)", _flag),
    Option("governor", "on", " | ".join(GOVERNOR_MODES), _choice(GOVERNOR_MODES)),
    Option("recycle", "1", "1 or 0 (true/false, yes/no, on/off)", _flag),
    Option(
        "min_tasks_per_child",
        "4",
        "a whole number from {} to {}".format(*TASKS_PER_CHILD_RANGE),
        _whole(*TASKS_PER_CHILD_RANGE),
    ),
    Option(
        "max_memory_kills",
        "3",
        "a whole number from {} to {}".format(*MEMORY_KILLS_RANGE),
        _whole(*MEMORY_KILLS_RANGE),
    ),
    Option("task_memory_limit", "", f"empty for none, or {_PAGE}", _empty_or(_size(MIN_PAGE))),
    Option("task_soft_memory_limit", "", f"empty for none, or {_PAGE}", _empty_or(_size(MIN_PAGE))),
    Option("brake_interval", "0.25", f"{_SECONDS} (0.25, 1, 2s)", _seconds),
    Option("low_water", "85%", _range_forms(*WATER_RANGE, "85%, 0.85"), _WATER),
    Option("high_water", "95%", _range_forms(*WATER_RANGE, "95%, 0.95"), _WATER),
    Option("hard_water", "98%", _range_forms(*WATER_RANGE, "98%, 0.98"), _WATER),
    Option("metrics_port", "", "empty for none, or a port up to 65535, 0 for any free", _PORT),
    Option(
        "metrics_address",
        "127.0.0.1",
        "an IP address or a host name (127.0.0.1, ::, 0.0.0.0, localhost)",
        _address,
    ),
)


@dataclass(frozen=True)
class Settings:
    mode: str = "scale"
    memory_limit: int | None = None
    headroom: float = 0.1
    child_memory: int | None = None
    min_concurrency: int = 1
    log_format: str = "text"
    child_log: str = "growth"
    child_log_step: int = 16 * 1024 * 1024
    sample_interval: float = 10.0
    summary_interval: float = 300.0
    state_file: str | None = None
    child_oom_score_adj: int | None = 500
    gc_freeze: bool = True
    malloc_trim: bool = True
    max_worker_memory: int | None = None
    brake: bool = True
    governor: str = "on"
    recycle: bool = True
    min_tasks_per_child: int = 4
    max_memory_kills: int = 3
    task_memory_limit: int | None = None
    task_soft_memory_limit: int | None = None
    brake_interval: float = 0.25
    low_water: float = 0.85
    high_water: float = 0.95
    hard_water: float = 0.98
    metrics_port: int | None = None
    metrics_address: str = "127.0.0.1"
    #: where each value came from: "option", "env", "config" or "default", by name
    sources: Mapping[str, str] | None = None

    def source(self, name: str) -> str:
        return (self.sources or {}).get(name, "default")


def given_options(params: Mapping[str, Any]) -> dict[str, Any]:
    """The ``--guard-<name>`` values from a click command's (or a step's) keyword
    arguments, by option name; None where not given."""
    return {option.name: params.get("guard_" + option.name) for option in OPTIONS}


def load_settings(
    env: Mapping[str, str], conf: Mapping[str, Any] | Any, options: Mapping[str, Any] | None = None
) -> Settings:
    """Read every option: worker options (by name, None when not given) first, then the
    environment, then app.conf (anything with ``.get``); ConfigError for the first value
    that does not parse."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in OPTIONS:
        raw: Any = (options or {}).get(option.name)
        source = "option"
        if raw is None:
            raw, source = env.get(option.variable), "env"
        if raw is None:
            raw, source = conf.get(option.setting), "config"
        if raw is None:
            raw, source = option.default, "default"
        flag = option.flag if source == "option" else ""
        try:
            text = _as_text(raw)
        except ValueError as error:
            shown = f"<{error}>"
            raise ConfigError(
                option.variable, option.setting, shown, option.accepted, source, flag
            ) from None
        try:
            values[option.name] = option.parse(text)
        except ValueError:
            raise ConfigError(
                option.variable, option.setting, text, option.accepted, source, flag
            ) from None
        sources[option.name] = source
    if not values["low_water"] < values["high_water"] < values["hard_water"]:
        option = next(o for o in OPTIONS if o.name == "high_water")
        marks = f"{values['low_water']}/{values['high_water']}/{values['hard_water']}"
        raise ConfigError(
            option.variable,
            option.setting,
            marks,
            "CELERY_GUARD_LOW_WATER < CELERY_GUARD_HIGH_WATER < CELERY_GUARD_HARD_WATER",
            sources["high_water"],
        )
    if not values["brake"]:  # the older switch: the run-time budget off, one way to read it
        values["governor"] = "off"
    return Settings(**values, sources=sources)
