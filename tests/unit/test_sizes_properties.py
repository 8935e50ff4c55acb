"""Property tests (hypothesis) of celery_guard.sizes: a size is a positive int or a
ValueError, fractions lie in [0, 1), and whole sizes and percentages round-trip."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import QUICK

from celery_guard.sizes import MAX_SIZE, MIB, mib, parse_fraction, parse_size

UNITS = ["", "K", "M", "G", "T"]


@QUICK
@given(
    text=st.one_of(
        st.text(max_size=40),
        st.from_regex(r"\s?[0-9. ]{0,8}[kKmMgGtTiIbB ]{0,4}\s?", fullmatch=True),
    )
)
def test_parse_size_is_a_positive_int_or_a_value_error(text: str) -> None:
    # max_size 40 keeps clear of test_parse_size_overflows (300 digits and more)
    try:
        size = parse_size(text)
    except ValueError:
        return
    assert type(size) is int and size > 0


SPELLINGS = [
    "{}",
    "{}B",
    "{}b",
    "{}iB",
    "{}ib",
    "{} ",  # one space before the unit
]


@QUICK
@given(
    n=st.integers(1, 2**53),
    k=st.integers(0, 4),
    spelling=st.sampled_from(SPELLINGS),
    space=st.booleans(),
    lower=st.booleans(),
)
def test_parse_size_round_trips_whole_numbers(
    n: int, k: int, spelling: str, space: bool, lower: bool
) -> None:
    unit = UNITS[k].lower() if lower else UNITS[k]
    text = f"{n}{' ' if space else ''}{spelling.format(unit)}"
    if k == 0 and text.strip() != str(n):  # "512B", "512iB": a bare B is refused
        with pytest.raises(ValueError):
            parse_size(text)
        return
    if n * 1024**k > MAX_SIZE:  # beyond any machine: refused, never an overflow
        with pytest.raises(ValueError):
            parse_size(text)
        return
    assert parse_size(text) == n * 1024**k, text


@QUICK
@given(
    whole=st.integers(0, 9999),
    decimals=st.text(alphabet="0123456789", min_size=1, max_size=3),
    k=st.integers(0, 4),
)
def test_parse_size_rounds_fractions_down(whole: int, decimals: str, k: int) -> None:
    text = f"{whole}.{decimals}{UNITS[k]}"
    exact = Fraction(f"{whole}.{decimals}") * 1024**k
    if k == 0 or exact < 1:  # fractional bytes, or nothing left after rounding
        with pytest.raises(ValueError):
            parse_size(text)
    elif exact < 2**44:
        assert parse_size(text) == math.floor(exact), text
    else:  # a float carries 53 bits: 4096.1T is 4503709578533274, one byte over
        assert abs(parse_size(text) - exact) < 1, text


@QUICK
@given(text=st.one_of(st.text(max_size=40), st.from_regex(r"\s?[0-9.%]{0,8}\s?", fullmatch=True)))
def test_parse_fraction_is_in_zero_one_or_a_value_error(text: str) -> None:
    try:
        value = parse_fraction(text)
    except ValueError:
        return
    assert type(value) is float and 0 <= value < 1


@QUICK
@given(whole=st.integers(0, 200), decimals=st.text(alphabet="0123456789", max_size=3))
def test_parse_fraction_round_trips_percentages(whole: int, decimals: str) -> None:
    number = f"{whole}.{decimals}" if decimals else str(whole)
    if Fraction(number) >= 100:
        with pytest.raises(ValueError):
            parse_fraction(number + "%")
    else:
        assert parse_fraction(number + "%") == float(number) / 100
    fraction = f"0.{decimals}" if decimals else f"{whole}"
    if Fraction(fraction) >= 1:
        with pytest.raises(ValueError):
            parse_fraction(fraction)
    else:
        assert parse_fraction(fraction) == float(fraction)


@QUICK
@given(n=st.integers(0, 2**40), extra=st.integers(0, MIB - 1))
def test_mib_prints_one_decimal(n: int, extra: int) -> None:
    assert mib(n * MIB) == n
    exact = (n * MIB + extra) / MIB
    assert abs(mib(n * MIB + extra) - exact) <= 0.05 + 2 * math.ulp(exact)


# ---------------------------------------------------------------------------------------
# regressions: the smallest inputs of the bugs the properties above found, now fixed;
# each docstring says what the code did before


@pytest.mark.parametrize("text", ["2" + "0" * 308, "2" + "0" * 296 + "T"])
def test_parse_size_overflows(text: str) -> None:
    """sizes.py parse_size: ``int(float(number) * unit)`` is int(inf) past 1.8e308 bytes."""
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(("text", "size"), [("9007199254740993", 2**53 + 1)])
def test_parse_size_keeps_every_digit(text: str, size: int) -> None:
    """sizes.py parse_size goes through float: whole byte counts above 2**53 lose digits."""
    assert parse_size(text) == size
