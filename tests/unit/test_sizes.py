"""Tests for celery_guard.sizes: the size and fraction forms the contract accepts.

A budget that is silently misread is worse than none, so the tables pin both what is
accepted (with the exact byte count) and what must be rejected.
"""

from __future__ import annotations

import pytest

from celery_guard.sizes import MIB, mib, parse_fraction, parse_size

KIB = 1 << 10
GIB = 1 << 30
TIB = 1 << 40

# text, bytes, why the case matters
SIZES = [
    ("536870912", 536870912, "a plain integer is bytes"),
    ("1", 1, "the smallest positive size"),
    ("512K", 512 * KIB, "K is binary"),
    ("512k", 512 * KIB, "units are case-insensitive"),
    ("512KB", 512 * KIB, "KB is binary too, not 1000"),
    ("512kb", 512 * KIB, "KB in lower case"),
    ("512KiB", 512 * KIB, "KiB"),
    ("512kib", 512 * KIB, "KiB in lower case"),
    ("512M", 536870912, "the contract's example: 512M"),
    ("512MB", 536870912, "MB is binary"),
    ("512MiB", 536870912, "the contract's example: 512MiB"),
    ("512mib", 536870912, "MiB in lower case"),
    ("512MIB", 536870912, "MiB in upper case"),
    ("512mB", 536870912, "mixed case"),
    ("2G", 2 * GIB, "G"),
    ("2g", 2 * GIB, "g"),
    ("2GB", 2 * GIB, "GB"),
    ("2GiB", 2 * GIB, "GiB"),
    ("2gib", 2 * GIB, "GiB in lower case"),
    ("1T", TIB, "T"),
    ("1tb", TIB, "TB in lower case"),
    ("1TB", TIB, "TB"),
    ("1TiB", TIB, "TiB"),
    ("1.5G", 1610612736, "the contract's fraction example"),
    ("1.5GiB", 1610612736, "a fraction with a long unit"),
    ("0.5M", 512 * KIB, "a fraction below one with a unit"),
    (".5G", 512 * 1024 * KIB, "a fraction without its leading zero"),
    ("1.5K", 1536, "a fraction of a KiB that is whole bytes"),
    ("  512M  ", 536870912, "surrounding whitespace is ignored"),
    ("512 M", 536870912, "one space between number and unit"),
    ("0512M", 536870912, "a leading zero"),
]


@pytest.mark.parametrize("text,expected,why", SIZES, ids=[s[0].strip() or "blank" for s in SIZES])
def test_parse_size_accepts(text: str, expected: int, why: str) -> None:
    """Every documented form gives the exact byte count (units are binary)."""
    assert parse_size(text) == expected, why


def test_512m_forms_are_equal() -> None:
    """The contract says 512M = 512MiB = 536870912 bytes."""
    assert parse_size("512M") == parse_size("512MiB") == parse_size("536870912") == 536870912


# text, why it must be rejected
BAD_SIZES = [
    ("", "empty"),
    ("   ", "only whitespace"),
    ("0", "zero is no budget"),
    ("0M", "zero with a unit"),
    ("0.0001K", "a fraction that rounds down to zero bytes"),
    ("-1", "negative"),
    ("-512M", "negative with a unit"),
    ("1.5", "a bare fraction: bytes are whole"),
    ("512B", "a bare B is not a documented unit"),
    ("512b", "a bare b"),
    ("512iB", "iB without a prefix"),
    ("512P", "unknown unit P"),
    ("512PiB", "unknown unit PiB"),
    ("512X", "unknown unit X"),
    ("512MM", "unit repeated"),
    ("512Mi", "Mi without B"),
    ("512KiBB", "trailing B after KiB"),
    ("1e9", "scientific notation is not a documented form"),
    ("abc", "garbage"),
    ("M", "unit without number"),
    ("512M foo", "trailing junk"),
    ("512Mx", "trailing junk glued to the unit"),
    ("5 12M", "space inside the number"),
    ("512  M", "two spaces before the unit"),
    ("1,5G", "decimal comma"),
    ("1.G", "a point without decimals"),
    ("0x200", "hexadecimal"),
    ("+512M", "explicit plus sign"),
    ("auto", "auto is a config word, not a size"),
]


@pytest.mark.parametrize("text,why", BAD_SIZES, ids=[b[0] or "empty" for b in BAD_SIZES])
def test_parse_size_rejects(text: str, why: str) -> None:
    """Anything that is not a documented form raises ValueError instead of being guessed."""
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_parse_size_rejects_non_ascii_digits() -> None:
    """Arabic-Indic digits are not a documented form; a strict parser should refuse them."""
    with pytest.raises(ValueError):
        parse_size("\u0665\u0661\u0662")


# text, fraction, why the case matters
FRACTIONS = [
    ("10%", 0.1, "the default, as a percentage"),
    ("0.1", 0.1, "the same as a fraction"),
    (".1", 0.1, "a fraction without its leading zero"),
    ("0", 0.0, "no headroom is allowed"),
    ("0%", 0.0, "no headroom as a percentage"),
    ("0.0", 0.0, "zero with a decimal"),
    ("12.5%", 0.125, "a fractional percentage"),
    ("99%", 0.99, "just below the whole limit"),
    ("0.95", 0.95, "a large fraction"),
    (" 20% ", 0.2, "surrounding whitespace is ignored"),
]


@pytest.mark.parametrize("text,expected,why", FRACTIONS, ids=[f[0].strip() for f in FRACTIONS])
def test_parse_fraction_accepts(text: str, expected: float, why: str) -> None:
    """Both documented forms (10% and 0.1) give the fraction of the limit."""
    assert parse_fraction(text) == pytest.approx(expected, abs=1e-12), why


BAD_FRACTIONS = [
    ("100%", "the whole limit kept free leaves nothing"),
    ("150%", "more than the limit"),
    ("1", "a fraction of 1 is the whole limit"),
    ("1.0", "1 with a decimal"),
    ("2", "above 1"),
    ("-5%", "negative percentage"),
    ("-0.1", "negative fraction"),
    ("x", "garbage"),
    ("", "empty"),
    ("%", "percent sign alone"),
    ("10 %", "space before the percent sign"),
    ("10%%", "percent sign twice"),
    ("1e-1", "scientific notation"),
    ("10M", "a size is not a fraction"),
]


@pytest.mark.parametrize("text,why", BAD_FRACTIONS, ids=[b[0] or "empty" for b in BAD_FRACTIONS])
def test_parse_fraction_rejects(text: str, why: str) -> None:
    """Out of [0, 1) or not one of the two forms raises ValueError."""
    with pytest.raises(ValueError, match="fraction"):
        parse_fraction(text)


# bytes, MiB with one decimal
MIBS = [
    (0, 0.0),
    (MIB, 1.0),
    (512 * KIB, 0.5),
    (148 * MIB, 148.0),
    (600 * MIB, 600.0),
    (148 * MIB + 52429, 148.1),  # 0.05000019 MiB rounds up
    (148 * MIB + 52428, 148.0),  # 0.04999924 MiB rounds down
    (int(43.26 * MIB), 43.3),
    (int(43.24 * MIB), 43.2),
    (MIB - 1, 1.0),
    (1, 0.0),
    (GIB, 1024.0),
    (1610612736.0, 1536.0),  # a float size works too
]


@pytest.mark.parametrize("size,expected", MIBS, ids=[f"{m[0]}B" for m in MIBS])
def test_mib(size: float, expected: float) -> None:
    """Log lines print MiB with at most one decimal; the rounding is to the nearest tenth."""
    assert mib(size) == expected
