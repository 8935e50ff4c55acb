"""Tests for celery_guard.footprint: reading a process's memory and estimating one child.

The fixture directories under tests/testdata/proc/ are /proc/<pid> directories shaped
like real Linux ones (status, smaps_rollup); tests/testdata/pymalloc/ holds the output of
``sys._debugmallocstats()`` captured from a real CPython 3.11. The expected figures are
written in the tables. The live tests measure this very process to check that the
"objects" estimate follows what a child really copies: small and medium objects count,
the payload of large buffers does not.
"""

from __future__ import annotations

import gc
import mmap
import os
import re
import sys
from array import array
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import needs
import pytest

from celery_guard.footprint import (
    PAGEMAP_RUN,
    Allocators,
    CollectorPages,
    Estimate,
    Footprint,
    estimate_child,
    measure,
    parse_pymalloc_stats,
    pymalloc_live_bytes,
    read_allocators,
)
from celery_guard.procfs import kib_fields, parse_kib_fields

TESTDATA = Path(__file__).resolve().parent.parent / "testdata"
DATA = TESTDATA / "proc"
PYMALLOC = TESTDATA / "pymalloc"
KIB = 1 << 10
MIB = 1 << 20
PAGE = mmap.PAGESIZE

# id, text, expected fields in bytes
KIB_FIELDS = [
    ("status-line", "VmRSS:\t    1764 kB", {"VmRSS": 1764 * KIB}),
    ("rollup-line", "Anonymous:           112 kB", {"Anonymous": 112 * KIB}),
    ("zero", "VmSwap:\t       0 kB", {"VmSwap": 0}),
    ("no-space-after-colon", "Rss:5 kB", {"Rss": 5 * KIB}),
    ("leading-blanks", "  Rss:   5 kB", {"Rss": 5 * KIB}),
    (
        "several-lines",
        "Name:\tcat\nVmRSS:\t    1764 kB\nRssAnon:\t     112 kB\nVmPTE:\t      48 kB\n",
        {"VmRSS": 1764 * KIB, "RssAnon": 112 * KIB, "VmPTE": 48 * KIB},
    ),
    (
        "rollup-header-skipped",
        "557501ebc000-7ffed6cbf000 ---p 00000000 00:00 0    [rollup]\nRss:  1764 kB\n",
        {"Rss": 1764 * KIB},
    ),
    ("text-value", "Name:\tcat", {}),
    ("several-numbers", "Uid:\t0\t0\t0\t0", {}),
    ("number-without-unit", "Threads:\t1", {}),
    ("other-unit", "VmRSS:\t 12 MB", {}),
    ("unit-case", "VmRSS:\t 12 KB", {}),
    ("negative", "VmRSS:\t -12 kB", {}),
    ("fraction", "VmRSS:\t 1.5 kB", {}),
    ("trailing-junk", "VmRSS:\t 12 kB extra", {}),
    ("no-colon", "VmRSS 12 kB", {}),
    ("no-value", "VmSwap:", {}),
    ("slash", "SigQ:\t0/96365", {}),
    ("replacement-char", "VmRSS:\t 12\ufffd kB", {}),
    ("empty", "", {}),
]

# Digits the kernel never writes: the line is skipped, not misread or raised on.
KIB_FIELDS_ODD_DIGITS = [
    pytest.param(
        "VmRSS:\t \u00b2 kB",
        {},
        id="superscript-digit",
    ),
    pytest.param(
        "VmRSS:\t \u0665\u0661\u0662 kB",
        {},
        id="non-ascii-digits",
    ),
]


@pytest.mark.parametrize(
    "text,expected",
    [pytest.param(*k[1:], id=k[0]) for k in KIB_FIELDS] + KIB_FIELDS_ODD_DIGITS,
)
def test_parse_kib_fields(text: str, expected: dict[str, int]) -> None:
    """Only ``Name: <digits> kB`` lines count; anything else is skipped, never an error."""
    assert parse_kib_fields(text) == expected


def test_parse_kib_fields_real_status() -> None:
    """This machine's own status file has VmRSS, RssAnon and VmPTE in bytes."""
    fields = parse_kib_fields(Path("/proc/self/status").read_text())
    assert {"VmRSS", "RssAnon", "VmPTE"} <= set(fields)
    assert fields["VmRSS"] % KIB == 0
    assert 0 < fields["RssAnon"] <= fields["VmRSS"]


# Allocator figures handed to measure() and estimate_child(); measure() only carries them.
# (small_objects, malloc_growth, large_buffers, large_chunks)
GLIBC = Allocators(30 * MIB, 10 * MIB, 64 * MIB, 2)
NO_PYMALLOC = Allocators(None, 10 * MIB, 40 * MIB, 3)

# id, fixture directory, allocators, expected Footprint
MEASURE = [
    (
        "rollup-preferred",
        "with_rollup",
        None,
        Footprint(151808 * KIB, 120832 * KIB, 664 * KIB, None),
    ),
    (
        "rollup-with-allocators",
        "with_rollup",
        GLIBC,
        Footprint(151808 * KIB, 120832 * KIB, 664 * KIB, GLIBC),
    ),
    (
        "large-buffers-above-anonymous-kept-as-given",
        "with_rollup",
        Allocators(None, None, 200 * MIB, 5),
        Footprint(151808 * KIB, 120832 * KIB, 664 * KIB, Allocators(None, None, 200 * MIB, 5)),
    ),
    (
        "no-rollup-status-fallback",
        "status_only",
        None,
        Footprint(98304 * KIB, 65536 * KIB, 320 * KIB, None),
    ),
    (
        "empty-rollup-status-fallback",
        "empty_rollup",
        NO_PYMALLOC,
        Footprint(98304 * KIB, 65536 * KIB, 320 * KIB, NO_PYMALLOC),
    ),
    (
        "no-rssanon-anonymous-is-rss",
        "status_no_rssanon",
        None,
        Footprint(51200 * KIB, 51200 * KIB, 200 * KIB, None),
    ),
    (
        "garbage-lines-skipped",
        "garbage",
        None,
        # rollup Rss is garbage: VmRSS from status; Anonymous from rollup; VmPTE kept
        Footprint(8192 * KIB, 2048 * KIB, 96 * KIB, None),
    ),
    (
        # The kernel cuts comm at 15 bytes, here inside a UTF-8 sequence.
        "non-utf8-process-name",
        "non_utf8_name",
        None,
        Footprint(98304 * KIB, 65536 * KIB, 320 * KIB, None),
    ),
    (
        "missing-dir",
        "no_such_process",
        None,
        Footprint(0, 0, 0, None),
    ),
    (
        "missing-dir-with-allocators",
        "no_such_process",
        GLIBC,
        Footprint(0, 0, 0, GLIBC),
    ),
]


@pytest.mark.parametrize(
    "case,allocators,expected", [m[1:] for m in MEASURE], ids=[m[0] for m in MEASURE]
)
def test_measure(case: str, allocators: Allocators | None, expected: Footprint) -> None:
    """smaps_rollup first, then status (RssAnon, VmRSS); a missing directory gives zeros."""
    assert measure(case, str(DATA), allocators=allocators) == expected


def test_measure_allocators_default_none() -> None:
    """Without allocator figures the footprint says so, and the estimate cannot use objects."""
    footprint = measure("with_rollup", str(DATA))
    assert footprint.allocators is None
    assert estimate_child(footprint).method == "anonymous"


def test_every_fixture_is_in_a_table() -> None:
    """A fixture directory nobody measures is a test that was meant and never written."""
    used = {m[1] for m in MEASURE}
    present = {p.name for p in DATA.iterdir() if p.is_dir()}
    assert present == used - {"no_such_process"}
    assert not (DATA / "no_such_process").exists()


def test_non_utf8_fixture_really_is_not_utf8() -> None:
    """The non-UTF-8 case only proves something if its Name line cannot be decoded."""
    raw = (DATA / "non_utf8_name" / "status").read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    assert raw.startswith(b"Name:\tcelery\xc3\xa9")


SAMPLE = PYMALLOC / "cpython311.txt"
LINE = b"# bytes in allocated blocks        =  "

# id, output of sys._debugmallocstats(), expected live small-object bytes
PYMALLOC_STATS = [
    ("cpython311-sample", SAMPLE.read_bytes(), 2_178_640),
    ("commas", LINE + b"2,178,640\n", 2_178_640),
    ("billions", LINE + b"1,234,567,890\n", 1_234_567_890),
    ("no-commas", LINE + b"512\n", 512),
    ("zero", LINE + b"0\n", 0),
    ("no-spaces", b"# bytes in allocated blocks=7\n", 7),
    ("crlf", LINE + b"1,024\r\n", 1024),
    ("no-final-newline", LINE + b"1,024", 1024),
    (
        "available-blocks-not-taken",
        b"# bytes in available blocks        =  277,712\n" + LINE + b"4,096\n",
        4096,
    ),
    ("missing-line", b"# bytes in available blocks        =  277,712\n", None),
    ("empty", b"", None),
    ("header-only", b"Small block threshold = 512, in 32 size classes.\n", None),
    ("word", LINE + b"lots\n", None),
    ("negative", LINE + b"-5\n", None),
    ("fraction", LINE + b"1.5\n", None),
    ("hexadecimal", LINE + b"0x10\n", None),
    ("trailing-junk", LINE + b"12 bytes\n", None),
    ("no-value", LINE + b"\n", None),
    ("non-ascii-digits", LINE + "\u0665\u0661\u0662\n".encode(), None),
    ("not-utf8", LINE + b"\xff\xfe\n", None),
]

PYMALLOC_STATS_NO_DIGITS = [
    pytest.param(
        LINE + value + b"\n",
        None,
        id=ident,
    )
    for ident, value in [("comma-only", b","), ("commas-only", b",,,")]
]


@pytest.mark.parametrize(
    "text,expected",
    [pytest.param(*p[1:], id=p[0]) for p in PYMALLOC_STATS] + PYMALLOC_STATS_NO_DIGITS,
)
def test_parse_pymalloc_stats(text: bytes, expected: int | None) -> None:
    """Only the "bytes in allocated blocks" figure counts; anything else gives None, no error."""
    assert parse_pymalloc_stats(text) == expected


def test_pymalloc_sample_agrees_with_its_class_table() -> None:
    """The figure taken is the one the size-class table adds up to (size * blocks in use)."""
    text = SAMPLE.read_text()
    rows = re.findall(r"^\s+\d+\s+(\d+)\s+\d+\s+(\d+)\s+\d+$", text, re.MULTILINE)
    assert len(rows) == 32
    assert sum(int(size) * int(used) for size, used in rows) == parse_pymalloc_stats(
        SAMPLE.read_bytes()
    )


# id, footprint, forked, expected Estimate for one child
ESTIMATES = [
    (
        "objects-sum",
        Footprint(150 * MIB, 100 * MIB, 1 * MIB, GLIBC),
        True,
        Estimate(30 * MIB + 10 * MIB + 2 * PAGE + 1 * MIB, "objects"),
    ),
    (
        "objects-large-buffer-payload-not-counted",
        Footprint(150 * MIB, 100 * MIB, 0, Allocators(5 * MIB, 0, 900 * MIB, 1)),
        True,
        Estimate(5 * MIB + PAGE, "objects"),
    ),
    (
        "objects-not-capped-at-anonymous",
        Footprint(10 * MIB, 8 * MIB, 64 * KIB, Allocators(6 * MIB, 4 * MIB, 0, 0)),
        True,
        Estimate(10 * MIB + 64 * KIB, "objects"),
    ),
    (
        "objects-zeros",
        Footprint(150 * MIB, 100 * MIB, 0, Allocators(0, 0, 0, 0)),
        True,
        Estimate(0, "objects"),
    ),
    (
        "no-pymalloc-falls-back-to-anonymous",
        Footprint(150 * MIB, 100 * MIB, 1 * MIB, NO_PYMALLOC),
        True,
        Estimate(100 * MIB - 40 * MIB + 3 * PAGE + 1 * MIB, "anonymous"),
    ),
    (
        "no-malloc-growth-falls-back-to-anonymous",
        Footprint(150 * MIB, 100 * MIB, 1 * MIB, Allocators(30 * MIB, None, 40 * MIB, 3)),
        True,
        Estimate(100 * MIB - 40 * MIB + 3 * PAGE + 1 * MIB, "anonymous"),
    ),
    (
        "neither-falls-back-to-anonymous",
        Footprint(150 * MIB, 100 * MIB, 0, Allocators(None, None, 0, 0)),
        True,
        Estimate(100 * MIB, "anonymous"),
    ),
    (
        "fallback-all-anonymous-is-large",
        Footprint(150 * MIB, 100 * MIB, 0, Allocators(None, None, 100 * MIB, 1)),
        True,
        Estimate(PAGE, "anonymous"),
    ),
    (
        "fallback-large-above-anonymous-never-negative",
        Footprint(10 * MIB, 10 * MIB, 64 * KIB, Allocators(None, None, 50 * MIB, 2)),
        True,
        Estimate(2 * PAGE + 64 * KIB, "anonymous"),
    ),
    (
        "no-allocators-anonymous-plus-page-tables",
        Footprint(150 * MIB, 100 * MIB, 1 * MIB, None),
        True,
        Estimate(101 * MIB, "anonymous"),
    ),
    (
        "no-allocators-rss-not-counted",
        Footprint(500 * MIB, 20 * MIB, 0, None),
        True,
        Estimate(20 * MIB, "anonymous"),
    ),
    (
        "no-allocators-zeros",
        Footprint(0, 0, 0, None),
        True,
        Estimate(0, "anonymous"),
    ),
    (
        "spawn-ignores-objects",
        Footprint(150 * MIB, 100 * MIB, 1 * MIB, GLIBC),
        False,
        Estimate(101 * MIB, "spawn"),
    ),
    (
        "spawn-ignores-large-buffers",
        Footprint(150 * MIB, 100 * MIB, 1 * MIB, NO_PYMALLOC),
        False,
        Estimate(101 * MIB, "spawn"),
    ),
    (
        "spawn-without-allocators",
        Footprint(150 * MIB, 100 * MIB, 1 * MIB, None),
        False,
        Estimate(101 * MIB, "spawn"),
    ),
    (
        "spawn-zeros",
        Footprint(0, 0, 0, None),
        False,
        Estimate(0, "spawn"),
    ),
]


@pytest.mark.parametrize(
    "footprint,forked,expected", [e[1:] for e in ESTIMATES], ids=[e[0] for e in ESTIMATES]
)
def test_estimate_child(footprint: Footprint, forked: bool, expected: Estimate) -> None:
    """objects when both allocators answer, else anonymous minus large buffers; spawn copies all."""
    assert estimate_child(footprint, forked=forked) == expected


def test_estimate_child_default_is_forked() -> None:
    """Pools fork by default: the objects method is used without asking."""
    footprint = Footprint(150 * MIB, 100 * MIB, 0, GLIBC)
    assert estimate_child(footprint) == Estimate(40 * MIB + 2 * PAGE, "objects")


def test_estimate_from_fixture() -> None:
    """measure() and estimate_child() together on the main-process fixture."""
    footprint = measure("with_rollup", str(DATA), allocators=NO_PYMALLOC)
    assert estimate_child(footprint) == Estimate(
        120832 * KIB - 40 * MIB + 3 * PAGE + 664 * KIB, "anonymous"
    )


def test_pymalloc_live_bytes_without_debugmallocstats(monkeypatch: pytest.MonkeyPatch) -> None:
    """An interpreter without sys._debugmallocstats (PyPy) gives None, not an error."""
    monkeypatch.delattr(sys, "_debugmallocstats")
    assert pymalloc_live_bytes() is None


_ALLOCATORS = read_allocators()


@pytest.fixture
def live() -> None:
    """The objects estimate is measured against this process's own allocations."""
    if _ALLOCATORS is None or _ALLOCATORS.small_objects is None:
        needs.unavailable(
            "no glibc mallinfo2 or no pymalloc figures here (musl, another allocator, "
            "glibc < 2.33, PYTHONMALLOC=malloc): the objects estimate cannot be measured"
        )


def _live() -> tuple[Footprint, Estimate]:
    gc.collect()  # as the bootstep does before measuring: no garbage in either reading
    footprint = measure(allocators=read_allocators())
    return footprint, estimate_child(footprint)


def _without_pymalloc(footprint: Footprint) -> Footprint:
    assert footprint.allocators is not None
    return replace(footprint, allocators=replace(footprint.allocators, small_objects=None))


@pytest.mark.usefixtures("live")
def test_live_large_buffer_stays_shared() -> None:
    """A 64 MiB byte string is a large malloc chunk: counted in large_buffers, not the estimate."""
    before, estimate_before = _live()
    payload = b"x" * (64 << 20)
    after, estimate_after = _live()
    assert len(payload) == 64 << 20
    assert before.allocators is not None and after.allocators is not None
    assert after.allocators.large_buffers - before.allocators.large_buffers >= 60 * MIB
    assert after.allocators.large_chunks >= before.allocators.large_chunks + 1
    assert after.anonymous - before.anonymous >= 60 * MIB
    assert estimate_before.method == estimate_after.method == "objects"
    assert estimate_after.bytes - estimate_before.bytes < 4 * MIB
    # The map-only fallback subtracts the same buffer from anonymous memory.
    fallback_before = estimate_child(_without_pymalloc(before))
    fallback_after = estimate_child(_without_pymalloc(after))
    assert fallback_before.method == fallback_after.method == "anonymous"
    assert abs(fallback_after.bytes - fallback_before.bytes) < 4 * MIB
    del payload


@pytest.mark.usefixtures("live")
def test_live_small_objects_count() -> None:
    """300k small tuples hold object headers a child writes: the estimate grows with them."""
    _, estimate_before = _live()
    tuples = [(i, str(i)) for i in range(300_000)]
    _, estimate_after = _live()
    size = sum(sys.getsizeof(t) + sys.getsizeof(t[1]) for t in tuples)
    assert len(tuples) == 300_000
    assert estimate_before.method == estimate_after.method == "objects"
    assert estimate_after.bytes - estimate_before.bytes >= 0.8 * size
    del tuples


@pytest.mark.usefixtures("live")
def test_live_medium_objects_count() -> None:
    """Strings over pymalloc's 512 bytes live in malloc's heap; children copy them too."""
    _, estimate_before = _live()
    strings = [f"x{i}" * 300 for i in range(20_000)]
    _, estimate_after = _live()
    sizes = [sys.getsizeof(s) for s in strings]
    assert min(sizes) > 512 and max(sizes) < 2 * KIB
    assert estimate_before.method == estimate_after.method == "objects"
    assert estimate_after.bytes - estimate_before.bytes >= 0.8 * sum(sizes)
    del strings


@pytest.mark.usefixtures("live")
def test_live_pymalloc_stats_leave_stderr_alone(capfd: pytest.CaptureFixture[str]) -> None:
    """The stats go to a temporary fd 2 and back: stderr still writes where it did, no fd leaks."""
    fds_before = sorted(os.listdir("/proc/self/fd"))
    live_bytes = pymalloc_live_bytes()
    fds_after = sorted(os.listdir("/proc/self/fd"))
    assert isinstance(live_bytes, int) and live_bytes > 0
    assert os.write(2, b"") == 0
    fresh = os.dup(2)
    try:
        os.write(fresh, b"through-a-dup-of-fd-2\n")
    finally:
        os.close(fresh)
    print("through-sys-stderr", file=sys.stderr, flush=True)
    err = capfd.readouterr().err
    assert "through-a-dup-of-fd-2" in err
    assert "through-sys-stderr" in err
    assert "allocated blocks" not in err
    assert fds_after == fds_before


@pytest.mark.parametrize(
    ("numbers", "expected"),
    [
        ([], []),
        ([7], [(7, 1)]),
        ([1, 2, 3, 9, 10, 20], [(1, 3), (9, 2), (20, 1)]),
        (list(range(1000)), [(0, PAGEMAP_RUN), (PAGEMAP_RUN, 1000 - PAGEMAP_RUN)]),  # bounded
        ([1 << 35, (1 << 35) + 1], [(1 << 35, 2)]),  # high addresses
    ],
)
def test_collector_pages_are_read_in_runs(numbers: list[int], expected: list[tuple]) -> None:
    assert list(CollectorPages(array("Q", numbers)).runs()) == expected


def test_collector_pages_count_the_page_of_each_header() -> None:
    """One page however many objects are on it; the header sits GC_HEADER bytes before
    the object, so an object at the start of a page has its header on the page before."""
    objects: list[list[int]] = [[] for _ in range(1000)]
    pages = {(id(o) - 16) // mmap.PAGESIZE for o in objects}
    counted = CollectorPages.of(objects)
    assert list(counted.numbers) == sorted(pages)
    assert counted.bytes == len(pages) * mmap.PAGESIZE < 1000 * mmap.PAGESIZE
    assert CollectorPages.of([]).bytes == 0


class _Forked:
    """A forked child that waits for a word: ``collect`` (a full collection, then its
    private bytes before and after) or ``exit``."""

    def __init__(self) -> None:
        self.orders_r, self.orders_w = os.pipe()
        self.replies_r, self.replies_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child
            try:
                while os.read(self.orders_r, 16) == b"collect":
                    before = _private()
                    gc.collect()
                    after = _private()
                    os.write(self.replies_w, f"{before} {after}".encode())
            finally:
                os._exit(0)

    def collect(self) -> tuple[int, int]:
        os.write(self.orders_w, b"collect")
        before, after = map(int, os.read(self.replies_r, 64).split())
        return before, after

    def close(self) -> None:
        os.write(self.orders_w, b"exit")
        os.waitpid(self.pid, 0)
        for fd in (self.orders_r, self.orders_w, self.replies_r, self.replies_w):
            os.close(fd)


def _private() -> int:
    fields = kib_fields("self", "smaps_rollup")
    assert isinstance(fields, dict)
    return fields.get("Private_Dirty", 0) + fields.get("Private_Clean", 0)


@pytest.fixture
def records() -> Iterator[list[dict]]:
    """200k tracked objects: the pages a full collection writes are tens of MiB."""
    made = [{"id": i, "tags": [i]} for i in range(100_000)]
    gc.collect()
    yield made


def test_collector_pages_are_what_a_forked_childs_full_collection_copies(
    records: list[dict],
) -> None:
    """What a vanilla worker's child copies more: counted in the parent, it is what a real
    forked child's ``gc.collect()`` copies; and read from the child's pagemap, it is
    shared before that collection and no longer after."""
    counted = CollectorPages.of()
    child = _Forked()
    try:
        pagemap = f"/proc/{child.pid}/pagemap"
        shared_before = counted.shared(pagemap)
        before, after = child.collect()
        shared_after = counted.shared(pagemap)
    finally:
        child.close()
    assert len(records) == 100_000 and counted.bytes >= 20 * MIB
    assert abs((after - before) - counted.bytes) <= 0.1 * counted.bytes
    assert shared_before is not None and shared_before >= 0.9 * counted.bytes
    assert shared_after is not None and shared_after <= 0.05 * counted.bytes


def test_collector_pages_shared_by_no_process_read_none(tmp_path: Path) -> None:
    counted = CollectorPages(array("Q", [1, 2]))
    assert counted.shared(str(tmp_path / "gone" / "pagemap")) is None
    (tmp_path / "short").write_bytes(b"\0" * 12)  # not whole entries: not a pagemap
    assert counted.shared(str(tmp_path / "short")) is None
