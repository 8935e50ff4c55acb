"""Parsing and printing of memory sizes and fractions, strictly.

A budget that is silently misread is worse than none, so anything that is not one of
the documented forms is rejected rather than guessed at.
"""

from __future__ import annotations

import re
from decimal import Decimal

MIB = 1024 * 1024
#: Larger than any memory a machine has (8 EiB): beyond it a figure is a typo.
MAX_SIZE = 2**63 - 1
#: The smallest size a memory figure or limit can mean: one page.
PAGE = 4096

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?|\.[0-9]+) ?([kmgt]?)(?:i?b)?", re.IGNORECASE)
_FRACTION = re.compile(r"([0-9]+(?:\.[0-9]+)?|\.[0-9]+)(%?)")

SIZE_FORMS = "bytes (536870912), or a number with K, M, G, T, KB, MiB, GiB... (512M, 1.5GiB)"


def parse_size(text: str) -> int:
    """Return the size in bytes; units are binary (``512M`` = ``512MiB`` = 536870912).
    ValueError for anything else, including zero, negatives and a bare ``B``."""
    match = _SIZE.fullmatch(text.strip())
    if not match or (text.strip()[-1:] in "bB" and not match.group(2)):
        raise ValueError(f"not a size: {text!r}")
    number, unit = match.groups()
    if not unit and "." in number:
        raise ValueError(f"a size without a unit is whole bytes: {text!r}")
    if len(number) > 40:
        raise ValueError(f"not a size a machine has: {text!r}")
    size = int(Decimal(number) * _UNITS[unit.lower()])  # exact: floats round large sizes
    if size <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    if size > MAX_SIZE:
        raise ValueError(f"not a size a machine has: {text!r}")
    return size


def parse_fraction(text: str) -> float:
    """Return a fraction in [0, 1) from ``10%`` or ``0.1``."""
    match = _FRACTION.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a fraction: {text!r}")
    value = float(match.group(1)) / (100 if match.group(2) else 1)
    if not 0 <= value < 1:
        raise ValueError(f"fraction must be at least 0 and below 1: {text!r}")
    return value


def mib(size: float) -> float:
    """Bytes to MiB with one decimal, as every log line prints them."""
    return round(size / MIB, 1)
