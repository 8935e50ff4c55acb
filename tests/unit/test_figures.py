"""Every measured figure in README.md and docs/*.md says where it comes from (issue 15).

A figure is a number with a unit of size or time (``98 MiB``, ``1.7 GB``, ``40 us``,
``1.5 ms``, ``400 MiB/s``, ``100 s``), a ratio written with ``x`` or ``times`` (``0.85x``,
``3 times``), a percentage (``97%``), or a count of tasks, children, kills or recycles
(``19 recycles``, ``12,000 tasks``, ``2 OOM-kills``). Fenced code blocks and inline code
are not read: they hold commands, example log lines and formulas. In the prose each
figure is one of:

- quoted from a committed file that a script or a test writes, said by a marker in its
  paragraph (a list item and a table row are paragraphs of their own), invisible in the
  rendered page::

      ... settled at 0.82x of vanilla's largest. <!-- figures: BENCHMARKS.md -->

  Then every figure of that paragraph, and every decimal number in it, must appear
  verbatim in that file: a figure changed in the docs, or in a new BENCHMARKS.md, fails.
- illustrative, a worked example, said by ``<!-- figures: example -->`` in its paragraph;
- a setting, a limit given to a run, a workload's parameter or a constant of the code:
  one of ``NOT_MEASURED`` below, each with where it is set.

Anything else fails: either say where the figure comes from, or point at the table that
has it ("the overhead table of BENCHMARKS.md") without repeating it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FIGURE = re.compile(
    r"(?<![\w.,+-])(?:"
    r"\d[\d,]*(?:\.\d+)?\s?(?:MiB/s|GiB|GB|MiB|MB|KiB|kB|µs|us|ms|s)(?![\w/])"  # sizes, times
    r"|\d+(?:\.\d+)?x(?!\w)"  # ratios: 0.85x
    r"|\d+(?:\.\d+)?\s+times\b"  # ratios: 3 times
    r"|\d+(?:\.\d+)?\s?%"  # percentages
    r"|\d[\d,]*\s+(?:OOM[- ]kills?|memory kills?|kills|recycles|children|tasks)\b"  # counts
    r")"
)
DECIMAL = re.compile(r"(?<![\w.])\d+\.\d+(?!\.?\w)")
MARKER = re.compile(r"<!--\s*figures:\s*(\S+)\s*-->")
EXAMPLE = "example"

#: Figures that are not measurements, and where each is set. Allowed wherever they appear.
NOT_MEASURED = {
    "10.4 MiB": "footprint.CHILD_BASES for CPython 3.11 (bench/estimate.py's baseline row)",
    "9.3 MiB": "footprint.CHILD_BASES for CPython 3.13 (bench/estimate.py's baseline row)",
    "0.05 s": "the safety net's interval above the low-water mark (policy.Safety.FAST)",
    "0.25 s": "CELERY_GUARD_BRAKE_INTERVAL's default",
    "5 s": "billiard's pool maintenance interval (AsynPool.timers; ledger.BILLIARD_MAINTENANCE)",
    "0.5 s": "the safety net's horizon (policy LOOKAHEAD); the watchdog's longest wait",
    "20 ms": "how long a working-set reading serves the hand-over gate (governor.FRESH)",
    "1 GiB": "the limit the demo, the integration tests and bisect_fit.py give",
    "1024 MiB": "bench/run.py's limits (768 and 1024 MiB)",
    "24 MiB": "bench/runtime.py's LEAK_MIB, kept by each leaky task",
    "60 MiB": "bench/runtime.py's transient workload: hog(60, 0.3)",
    "0.3 s": "bench/runtime.py's transient workload: hog(60, 0.3)",
    "48 MiB": "examples/heavy_app.py's buffer by default (HEAVY_APP_BUFFER_MIB)",
    "256 MiB": "bench/run.py's import-heavy buffer; a metrics histogram bucket",
    "64 KiB": "the largest state file read (history.MAX_BYTES)",
    "16 MiB": "the least physical memory believed (cgroups._MIN_PHYSICAL)",
    "2 MiB": "heap.TRIM_STEP: a task that leaves its child's RSS this much higher",
    "64 MiB": "tests/integration/test_malloc_trim.py's CHURN_MIB",
    "200 children": "tests/integration/test_faults.py starts that many",
    "3600 s": "kombu's Redis visibility_timeout default (brokers.REDIS_VISIBILITY_TIMEOUT)",
    "8 MiB": "the census' memory bound test_census.py asserts on a huge deque and array",
    "10%": "CELERY_GUARD_HEADROOM's default; the plan's HYSTERESIS (policy.py)",
    "85%": "CELERY_GUARD_LOW_WATER's default",
    "95%": "CELERY_GUARD_HIGH_WATER's default",
    "98%": "CELERY_GUARD_HARD_WATER's default",
    "0%": "CELERY_GUARD_HEADROOM's range (config.HEADROOM_RANGE)",
    "50%": "the ranges of CELERY_GUARD_HEADROOM and the water marks (config.py)",
    "99.5%": "the water marks' range (config.WATER_RANGE)",
    "1%": "the plan's TIE: pairs this close go to the smaller pool (policy.py)",
    "90%": "the share of the broker's timer a task may be held (brokers.HOLD_SHARE)",
    "5%": "the width of the histograms' buckets (stats.py)",
    "80%": "test_startup.py's lower bound on the guarded pool, of REALLY_FIT_IN_1G",
    "100%": "test_startup.py's upper bound on the guarded pool, of REALLY_FIT_IN_1G",
    "1.05 times": "test_commands.py's bound on the check's parent RSS, of the worker's",
    "3 times": "CELERY_GUARD_MAX_MEMORY_KILLS' default: the runs of a task that cannot fit",
    "5,000 tasks": "tests/integration/test_soak.py's TASKS",
}


def paragraphs(text: str) -> list[str]:
    """The prose of a page in paragraphs: blocks between blank lines, where a list item
    or a table row starts a new one; fenced code blocks and inline code removed."""
    text = re.sub(r"^ *(```|~~~).*?^ *\1[^\n]*$", "", text, flags=re.S | re.M)
    blocks: list[list[str]] = [[]]
    for line in text.splitlines():
        if not line.strip() or re.match(r" {0,3}([-*+]|\d+\.|\|) ", line):
            blocks.append([])
        if line.strip():
            blocks[-1].append(line)
    return [re.sub(r"(`+).*?\1", "``", "\n".join(block), flags=re.S) for block in blocks if block]


def problems(pages: list[Path], root: Path = ROOT) -> list[str]:
    """What is wrong with the figures of these pages, one line each."""
    found: list[str] = []
    for page in pages:
        name = page.relative_to(root)
        for paragraph in paragraphs(page.read_text()):
            sources = MARKER.findall(paragraph)
            prose = MARKER.sub("", paragraph)
            figures = [" ".join(m.group().split()) for m in FIGURE.finditer(prose)]
            where = " ".join(prose.split())[:100]
            if EXAMPLE in sources:
                continue
            if not sources:
                found += [
                    f"{name}: {figure!r} has no source ({where})"
                    for figure in figures
                    if figure not in NOT_MEASURED
                ]
                continue
            texts = []
            for source in sources:
                path = root / source
                if not path.is_file():
                    found.append(f"{name}: marker names {source}, not a file ({where})")
                    continue
                texts.append(path.read_text())
            quoted = [f for f in figures if f not in NOT_MEASURED] + DECIMAL.findall(prose)
            found += [
                f"{name}: {figure!r} is not in {', '.join(sources)} ({where})"
                for figure in quoted
                if texts and not any(figure in text for text in texts)
            ]
    return found


def test_every_figure_says_where_it_comes_from() -> None:
    assert problems(PAGES) == []


def test_every_figure_not_measured_is_still_used() -> None:
    """No stale entry: the list stays as short as the docs need."""
    prose = " ".join(" ".join(p.split()) for page in PAGES for p in paragraphs(page.read_text()))
    assert [f for f in NOT_MEASURED if f not in prose] == []


# The check itself, on pages made here.


@pytest.fixture
def check(tmp_path: Path) -> Callable[[str], list[str]]:
    """The problems of a page with this text, next to a results file."""
    (tmp_path / "RESULTS.md").write_text("| import-heavy | 1024 MiB | 0.82x | 19 recycles |\n")

    def check(text: str) -> list[str]:
        page = tmp_path / "page.md"
        page.write_text(text)
        return problems([page], tmp_path)

    return check


@pytest.mark.parametrize(
    "text",
    [
        "Each check of the cgroup takes about 40 us.",
        "The worker started with 98 MiB, and 19 recycles later 1.5 ms per task.",
        "- a list item: 0.85x of vanilla\n",
        "| a table row | 400 MiB/s |\n",
        "Settled at 0.82x (RESULTS.md).",  # a file named in words is not a marker
        "Settled at 0.82x. <!-- figures: RESULTS.md -->\n\nAnd 0.9x next to it.",
        "It kept 97% of the limit.",
        "It was 4 times faster.",
        "It ran 12,000 tasks.",
        "No more than 2 OOM-kills.",
        "A worker of 1.7 GB.",
    ],
)
def test_a_figure_without_a_source_fails(check: Callable[[str], list[str]], text: str) -> None:
    assert check(text)


@pytest.mark.parametrize(
    "text",
    [
        "Settled at 0.83x of vanilla's largest. <!-- figures: RESULTS.md -->",
        "Settled at 0.82x, ratio 0.84. <!-- figures: RESULTS.md -->",
        "It recycled 19 children. <!-- figures: NOWHERE.md -->",
    ],
)
def test_a_figure_its_source_does_not_have_fails(
    check: Callable[[str], list[str]], text: str
) -> None:
    assert check(text)


@pytest.mark.parametrize(
    "text",
    [
        "Settled at 0.82x, with 19 recycles. <!-- figures: RESULTS.md -->",
        "- at 1024 MiB: 0.82x <!-- figures: RESULTS.md -->\n- at 1 GiB, checked every 0.05 s",
        "For example, 160 MiB less 96 MiB leaves 64 MiB. <!-- figures: example -->",
        "An example line:\n\n```\nevent=startup parent_rss_mib=180.1 took 3 ms\n```\n",
        "The option `--max-memory-per-child=206433` and `98 MiB` in code.",
        "Memory limits of 512M and a ratio of 1.02 are not figures here.",
        "The low mark at 85% by default and a task run 3 times are settings.",
    ],
)
def test_sourced_examples_settings_and_code_pass(
    check: Callable[[str], list[str]], text: str
) -> None:
    assert check(text) == []
