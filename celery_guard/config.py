"""Settings: a ``--guard-<name>`` worker option, else ``CELERY_GUARD_<NAME>`` in the
environment, else ``guard_<name>`` in app.conf, else the default.

Everything is parsed up front and strictly, so a typo stops the worker before it forks
anything, with one line that says what to fix, instead of a budget quietly ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable

from .sizes import FRACTION_FORMS, SIZE_FORMS, parse_fraction, parse_size

MODES = ("scale", "refuse", "warn", "off")
LOG_FORMATS = ("text", "json")
CHILD_LOGS = ("growth", "all", "off")


class ConfigError(Exception):
    """A setting that cannot be parsed; carries what the CRITICAL line must name."""

    def __init__(
        self, variable: str, setting: str, value: str, accepted: str, source: str, flag: str = ""
    ):
        super().__init__(f"{variable}={value!r}: expected {accepted}")
        self.flag = flag  # the worker option, when that is where the value came from
        self.variable = variable
        self.setting = setting
        self.value = value
        self.accepted = accepted
        self.source = source


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(text)
        return value

    return parse


def _auto_or_size(text: str) -> int | None:
    return None if text.strip().lower() == "auto" else parse_size(text)


def _seconds(text: str) -> float:
    value = text.strip().lower().removesuffix("s")
    if not value.replace(".", "", 1).isdigit() or not value.isascii() or float(value) <= 0:
        raise ValueError(text)
    return float(value)


def _oom_score_adj(text: str) -> int | None:
    value = text.strip().lower()
    if value == "off":
        return None
    number = value[1:] if value[:1] in "+-" else value
    if not number.isascii() or not number.isdigit() or not -1000 <= int(value) <= 1000:
        raise ValueError(text)
    return int(value)


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise ValueError(text)
    return value in ("1", "true", "yes", "on")


def _size_or_none(text: str) -> int | None:
    return parse_size(text) if text.strip() else None


def _path_or_none(text: str) -> str | None:
    return text.strip() or None


def _port_or_none(text: str) -> int | None:
    value = text.strip()
    if not value:
        return None
    if not value.isascii() or not value.isdigit() or int(value) > 65535:
        raise ValueError(text)
    return int(value)


def _address(text: str) -> str:
    value = text.strip()
    if not value or " " in value:
        raise ValueError(text)
    return value


def _positive_int(text: str) -> int:
    value = text.strip()
    if not value.isdigit() or int(value) < 1:
        raise ValueError(text)
    return int(value)


def _as_text(raw: Any) -> str:
    """app.conf may hold numbers; write floats out in full (1e-05 -> 0.00001)."""
    if isinstance(raw, float) and math.isfinite(raw):
        return format(Decimal(repr(raw)), "f")
    return str(raw)


def error_fields(error: ConfigError) -> dict[str, Any]:
    """The keys of the ``event=config_error`` line, from the worker and ``guard check``."""
    return {
        "variable": error.variable,
        "setting": error.setting,
        **({"option": error.flag} if error.flag else {}),
        "source": error.source,
        "value": error.value,
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


OPTIONS = (
    Option("mode", "scale", " | ".join(MODES), _choice(MODES)),
    Option("memory_limit", "auto", f"auto, or {SIZE_FORMS}", _auto_or_size),
    Option("headroom", "10%", FRACTION_FORMS, parse_fraction),
    Option("child_memory", "auto", f"auto, or {SIZE_FORMS}", _auto_or_size),
    Option("min_concurrency", "1", "a whole number of at least 1", _positive_int),
    Option("log_format", "text", " | ".join(LOG_FORMATS), _choice(LOG_FORMATS)),
    Option("child_log", "growth", " | ".join(CHILD_LOGS), _choice(CHILD_LOGS)),
    Option("child_log_step", "16M", SIZE_FORMS, parse_size),
    Option("sample_interval", "10", "seconds above 0 (10, 2.5, 10s)", _seconds),
    Option("summary_interval", "300", "seconds above 0 (300, 60s)", _seconds),
    Option("state_file", "", "a file path, or empty for none", _path_or_none),
    Option(
        "child_oom_score_adj", "500", "off, or a whole number from -1000 to 1000", _oom_score_adj
    ),
    Option("gc_freeze", "1", "1 or 0 (true/false, yes/no, on/off)", _flag),
    Option("max_worker_memory", "", f"empty for none, or {SIZE_FORMS}", _size_or_none),
    Option("brake", "1", "1 or 0 (true/false, yes/no, on/off)", _flag),
    Option("recycle", "1", "1 or 0 (true/false, yes/no, on/off)", _flag),
    Option("min_tasks_per_child", "4", "a whole number of at least 1", _positive_int),
    Option("max_memory_kills", "3", "a whole number of at least 1", _positive_int),
    Option("task_memory_limit", "", f"empty for none, or {SIZE_FORMS}", _size_or_none),
    Option("task_soft_memory_limit", "", f"empty for none, or {SIZE_FORMS}", _size_or_none),
    Option("brake_interval", "0.25", "seconds above 0 (0.25, 1, 2s)", _seconds),
    Option("low_water", "80%", FRACTION_FORMS, parse_fraction),
    Option("high_water", "90%", FRACTION_FORMS, parse_fraction),
    Option("hard_water", "97%", FRACTION_FORMS, parse_fraction),
    Option("metrics_port", "", "empty for none, or a port, 0 for any free", _port_or_none),
    Option("metrics_address", "127.0.0.1", "an address to bind (127.0.0.1, ::, 0.0.0.0)", _address),
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
    max_worker_memory: int | None = None
    brake: bool = True
    recycle: bool = True
    min_tasks_per_child: int = 4
    max_memory_kills: int = 3
    task_memory_limit: int | None = None
    task_soft_memory_limit: int | None = None
    brake_interval: float = 0.25
    low_water: float = 0.8
    high_water: float = 0.9
    hard_water: float = 0.97
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
    env: Mapping[str, str],
    conf: Mapping[str, Any] | Any,
    options: Mapping[str, Any] | None = None,
) -> Settings:
    """Read every option: worker options (by name, None when not given) first, then the
    environment, then app.conf (anything with ``.get``).

    Raises ConfigError for the first value that does not parse.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in OPTIONS:
        raw: Any = (options or {}).get(option.name)
        source = "option"
        if raw is None:
            raw, source = env.get(option.variable), "env"
        if raw is None:
            raw = conf.get(option.setting)
            source = "config"
        if raw is None:
            raw, source = option.default, "default"
        text = _as_text(raw)
        try:
            values[option.name] = option.parse(text)
        except ValueError:
            flag = option.flag if source == "option" else ""
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
    return Settings(**values, sources=sources)
