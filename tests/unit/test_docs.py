"""The README and the examples name only settings, options, events and advice topics that
exist: a renamed variable must not leave a recipe that silently does nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from celery_guard.config import OPTIONS

ROOT = Path(__file__).resolve().parent.parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "examples").glob("*[!~]"))]
VARIABLES = {option.variable for option in OPTIONS}
FLAGS = {option.flag for option in OPTIONS}


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_every_variable_and_option_named_exists(path: Path) -> None:
    text = path.read_text()
    named = set(re.findall(r"CELERY_GUARD_[A-Z_]*[A-Z]", text))
    named.discard("CELERY_GUARD_PROBE_PATH")  # internal: the imports probe's own
    assert named <= VARIABLES, sorted(named - VARIABLES)
    flags = set(re.findall(r"--guard-[a-z-]*[a-z]", text))
    assert flags <= FLAGS, sorted(flags - FLAGS)


def test_the_readme_documents_every_setting() -> None:
    """Every variable, its app.conf key and its worker option in the reference table."""
    readme = (ROOT / "README.md").read_text()
    for option in OPTIONS:
        rows = readme.splitlines()
        row = next((line for line in rows if line.startswith(f"| `{option.variable}`")), "")
        assert f"`{option.setting}`" in row and f"`{option.flag}`" in row, option.name
