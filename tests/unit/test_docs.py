"""The README, the documentation pages and the examples name only settings and options that
exist (a renamed variable must not leave a recipe that silently does nothing); the
configuration page has a row for every setting. The log reference's sections and keys,
against every line the code emits, are test_log_keys.py's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from celery_guard.config import OPTIONS

ROOT = Path(__file__).resolve().parent.parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCS = [
    ROOT / "README.md",
    *PAGES,
    *sorted(path for path in (ROOT / "examples").glob("*[!~]") if path.is_file()),
]
VARIABLES = {option.variable for option in OPTIONS}
FLAGS = {option.flag for option in OPTIONS}


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_every_variable_and_option_named_exists(path: Path) -> None:
    text = path.read_text()
    named = set(re.findall(r"CELERY_GUARD_[A-Z_]*[A-Z]", text))
    named.discard("CELERY_GUARD_PROBE_PATH")  # internal: the imports probe's own
    assert named <= VARIABLES, sorted(named - VARIABLES)
    flags = set(re.findall(r"--guard-[a-z-]*[a-z]", text))
    assert flags <= FLAGS, sorted(flags - FLAGS)


def test_the_pages_are_there() -> None:
    names = {page.stem for page in PAGES}
    assert {"index", "configuration", "logs", "architecture"} <= names, sorted(names)


def test_the_configuration_page_documents_every_setting() -> None:
    """Every variable, its app.conf key and its worker option in one row of the table."""
    rows = (ROOT / "docs" / "configuration.md").read_text().splitlines()
    for option in OPTIONS:
        row = next((line for line in rows if line.startswith(f"| `{option.variable}` |")), "")
        assert row, f"no row for {option.variable}"
        assert f"| `{option.setting}` |" in row, (option.variable, option.setting)
        assert f"| `{option.flag}` |" in row, (option.variable, option.flag)


def test_the_readme_reads_the_same_on_a_package_index() -> None:
    """The README is the package's long description: on a package index a relative link
    points nowhere, so every link is absolute (or an anchor on the page); no placeholder
    stands in for the project's address; and each absolute link into this repository
    names a file that exists."""
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert targets
    relative = [t for t in targets if not t.startswith(("https://", "http://", "#"))]
    assert relative == []
    assert "<owner>" not in text
    repository = "https://github.com/celery-guard/celery-guard/blob/main/"
    ours = [t[len(repository) :].partition("#")[0] for t in targets if t.startswith(repository)]
    assert ours
    assert [path for path in ours if not (ROOT / path).exists()] == []


def test_the_sdist_carries_what_its_tests_need() -> None:
    """MANIFEST.in: the tests, the harness and example apps they start, the docs and the
    records go into the sdist, so its tests run from the unpacked tree."""
    manifest = (ROOT / "MANIFEST.in").read_text().split()
    for tree in ("tests", "harness", "examples", "docs"):
        assert tree in manifest and (ROOT / tree).is_dir(), tree
    for record in ("CHANGELOG.md", "LICENSE", "README.md"):
        assert record in manifest, record


def test_the_readmes_startup_line_has_the_keys_the_worker_prints() -> None:
    """The README shows a startup line: its keys, in their order, are the ones a worker
    prints (``worker`` first, then ``startup.Measured.fields``), so the example cannot
    drift from the code."""
    from celery_guard import startup
    from celery_guard.config import load_settings
    from celery_guard.logline import parse_line

    (shown,) = re.findall(r"celery-guard event=startup .*", (ROOT / "README.md").read_text())
    settings = load_settings({"CELERY_GUARD_CHILD_MEMORY": "100M"}, {})
    fields = startup.measure(settings, "prefork", 1, forked=False).fields()
    assert list(parse_line(shown)) == ["event", "worker", *fields]
