"""Every environment skip goes through ``tests/needs.py``, so strict mode (CI) turns
each into a failure: a ``pytest.skip``, ``skipif`` or ``importorskip`` anywhere else
would pass CI without running."""

from __future__ import annotations

import re
from pathlib import Path

import needs
import pytest

TESTS = Path(__file__).resolve().parent.parent
SKIPS = re.compile(r"pytest\.(skip\b|importorskip\b|mark\.skip)")


def test_no_test_skips_but_through_needs() -> None:
    found = [
        f"{path.relative_to(TESTS)}:{number}: {line.strip()}"
        for path in sorted(TESTS.rglob("*.py"))
        if path.name not in ("needs.py", "test_needs.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if SKIPS.search(line)
    ]
    assert found == []


def test_strict_mode_turns_a_missing_part_into_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(needs, "STRICT", True)
    with pytest.raises(pytest.fail.Exception, match="GUARD_TESTS_STRICT=1"):
        needs.unavailable("no such part")
    with pytest.raises(pytest.fail.Exception, match="no_such_package_here is not installed"):
        needs.module("no_such_package_here")
    monkeypatch.setattr(needs, "STRICT", False)
    with pytest.raises(pytest.skip.Exception, match="no such part"):
        needs.unavailable("no such part")
