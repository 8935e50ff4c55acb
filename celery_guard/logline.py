"""One line per event: ``celery-guard key=value ...`` (logfmt) or one JSON object.

Log pipelines parse these lines, so the format is the contract: keys keep their meaning,
numbers stay numbers, and a value with spaces or quotes is quoted. The message's format
is chosen once per process (``use_format``, from ``CELERY_GUARD_LOG_FORMAT``), and every
record also carries its fields as one attribute, ``record.celery_guard`` (``event``
first): a JSON formatter (python-json-logger, structlog's stdlib bridge, a shipper's)
emits them as fields of their own, whatever the message's format.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger("celery_guard")

#: The LogRecord attribute that holds a guard line's fields, ``event`` first.
RECORD_ATTRIBUTE = "celery_guard"


class JsonMessages(logging.Filter):
    """On the guard's logger when the format is ``json``: each guard line's message
    becomes its fields, one JSON object. The choice lives with the logger, as its level
    does, and the children the pool forks inherit it."""

    def filter(self, record: logging.LogRecord) -> bool:
        data = getattr(record, RECORD_ATTRIBUTE, None)
        if data is not None:
            record.msg, record.args = json.dumps(data, separators=(",", ":")), ()
        return True


def use_format(log_format: str) -> None:
    """Choose the message format once, for the process and the children it forks."""
    for chosen in [f for f in logger.filters if isinstance(f, JsonMessages)]:
        logger.removeFilter(chosen)
    if log_format == "json":
        logger.addFilter(JsonMessages())


def format_from_env(env: Mapping[str, str]) -> str:
    """The format to use before the settings are parsed (to report that they do not)."""
    value = env.get("CELERY_GUARD_LOG_FORMAT", "text").strip().lower()
    return value if value in ("text", "json") else "text"


PREFIX = "celery-guard "
_DECODER = json.JSONDecoder()


def _logfmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    text = str(value)
    if text == "" or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text)
    return text


def format_event(event: str, fields: Mapping[str, Any], log_format: str = "text") -> str:
    """Render ``event=...`` followed by the fields, in insertion order."""
    record = {"event": event, **fields}
    if log_format == "json":
        return json.dumps(record, separators=(",", ":"))
    return PREFIX + " ".join(f"{key}={_logfmt_value(value)}" for key, value in record.items())


def parse_line(line: str) -> dict[str, str]:
    """Read the fields back from a text line (for tests and the log reader)."""
    start = line.find(PREFIX)
    if start < 0:
        return {}
    text, fields, i = line[start + len(PREFIX) :].rstrip("\r\n"), {}, 0
    while i < len(text):
        while i < len(text) and text[i] == " ":
            i += 1
        eq = text.find("=", i)
        if eq < 0:
            break
        key = text[i:eq]
        i = eq + 1
        if text[i : i + 1] == '"':
            try:
                fields[key], i = _DECODER.raw_decode(text, i)
            except ValueError:  # a line cut short inside a quoted value
                fields[key], i = text[i + 1 :], len(text)
        else:
            end = text.find(" ", i)
            end = len(text) if end < 0 else end
            fields[key], i = text[i:end], end
    return fields


def emit(level: int, event: str, fields: Mapping[str, Any]) -> None:
    """Log one guard line: the message in this process's format (``use_format``), the
    fields as data."""
    data = {"event": event, **fields}
    logger.log(level, format_event(event, fields), extra={RECORD_ATTRIBUTE: data})
