"""Property tests (hypothesis) of celery_guard.logline: logfmt and JSON lines read back
as written, a line cut short keeps its whole fields, and parse_line never raises."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from strategies import QUICK

from celery_guard.logline import PREFIX, _logfmt_value, format_event, parse_line

#: logfmt keys: no space, no "=", no quote (the format does not quote keys).
KEY = st.text(
    alphabet=st.characters(exclude_categories=("Cs",), exclude_characters=' ="'),
    min_size=1,
    max_size=12,
).filter(lambda key: key != "event")
VALUE = st.one_of(
    st.text(),
    st.text(alphabet=' "=\\\t\nab'),
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
)


def _as_logged(value: Any) -> str:
    """What parse_line gives back for a logged value: logfmt carries text only."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@QUICK
@given(name=st.text(), fields=st.dictionaries(KEY, VALUE, max_size=6))
def test_logfmt_round_trip(name: str, fields: dict[str, Any]) -> None:
    line = format_event(name, fields)
    assert line.startswith(PREFIX)
    # values are escaped (keys are the code's own: not escaped, and not checked here)
    assert line.count("\n") == sum(key.count("\n") for key in fields)
    expected = {"event": name, **{key: _as_logged(value) for key, value in fields.items()}}
    assert parse_line(line) == expected
    assert parse_line("[2026-11-21 06:04:14,279: WARNING/MainProcess] " + line + "\r\n") == expected


@QUICK
@given(name=st.text(), fields=st.dictionaries(KEY, VALUE, max_size=6), cut=st.integers(0))
def test_logfmt_line_cut_short_keeps_the_whole_fields(
    name: str, fields: dict[str, Any], cut: int
) -> None:
    """A log cut by an OOM kill ends mid-line: the fields before the cut survive."""
    line = format_event(name, fields)
    cut = len(PREFIX) + cut % (len(line) - len(PREFIX) + 1)
    parsed = parse_line(line[:cut])
    end = len(PREFIX)
    for key, value in {"event": name, **fields}.items():
        end += len(f"{key}={_logfmt_value(value)}")
        if end > cut:
            break
        assert parsed[key] == _as_logged(value)
        end += 1


JSON_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
)


@QUICK
@given(name=st.text(), fields=st.dictionaries(st.text(), JSON_VALUE, max_size=6))
def test_json_lines_carry_the_values(name: str, fields: dict[str, Any]) -> None:
    fields.pop("event", None)
    line = format_event(name, fields, "json")
    assert "\n" not in line
    assert json.loads(line) == {"event": name, **fields}


@QUICK
@given(text=st.one_of(st.text(max_size=200), st.text(max_size=200).map(lambda s: PREFIX + s)))
def test_parse_line_never_raises(text: str) -> None:
    fields = parse_line(text)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items())
    if PREFIX not in text:
        assert fields == {}
