"""What the main process holds, and what one forked child will add to the cgroup.

After fork a child shares every page with the parent; the cgroup is charged again only
for the pages the child writes. Reading a Python object writes its reference count and
the garbage collector writes the header of every container it scans, so a child that
runs tasks copies the pages that hold the objects it uses. Code and other file-backed
pages, the payload of large buffers (glibc serves each from an mmap chunk of its own)
and the tables the interpreter and Celery built at import stay shared.

So ``estimate_child`` counts what a child's tasks will write: the census of the app's
data (:mod:`celery_guard.census`, method ``census``), plus what any child costs
(``CHILD_BASE``) and the parent's page tables (VmPTE: the child gets its own copy).
Without ``gc.freeze()`` before the fork, the first full collection in a child writes
every tracked container's header: the larger of the census and pymalloc's live small
objects counts (``census-gc``).

Where no census was taken, the parent's own allocators give the bound (``objects``)::

    live small objects              (pymalloc: "bytes in allocated blocks")
    + malloc heap grown since celery_guard was imported
    + one page per large malloc chunk (its object header is written)
    + the page tables

and where they cannot be asked (another allocator, PYTHONMALLOC=malloc, musl), the
memory map alone (``anonymous``): anonymous memory minus large malloc chunks, which also
counts framework state that children never write. A spawned child shares nothing: about
the parent's anonymous memory (``spawn``). Checked against real children in real cgroups by
tests/integration/test_startup.py and, on the corpus of real apps, by bench/probe.py.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import mmap
import os
import re
import sys
import tempfile
import time
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from . import procfs


@dataclass(frozen=True)
class Allocators:
    """What the process's own allocators report; only the process itself can ask."""

    small_objects: int | None  # pymalloc live bytes
    malloc_growth: int | None  # glibc heap bytes in use (all arenas), minus those at import
    large_buffers: int  # bytes in glibc's mmapped chunks
    large_chunks: int  # how many such chunks


@dataclass(frozen=True)
class Footprint:
    rss: int
    anonymous: int
    page_tables: int
    allocators: Allocators | None = None
    app_objects: int | None = None  # bytes a task writes of the app's data (census)


@dataclass(frozen=True)
class Estimate:
    bytes: int
    method: str  # census | census-gc | objects | anonymous | spawn


#: What a prefork child costs before it reads any of the app's data, by CPython minor
#: version: the pages its worker loop and tracer write, its own heap, the private pages of
#: shared libraries, its kernel structures (page tables apart). ``bench/estimate.py``'s
#: ``baseline`` row (an app with no data), Celery 5.7: 10.6 to 10.7 MiB on CPython 3.11
#: (pyenv's 3.11.7; Debian's 3.11.2 10.3 to 10.5), 9.5 to 9.6 MiB on Debian 13's 3.13.5
#: (``.ci/python313``), 0.2 MiB of it page tables.
CHILD_BASES = {(3, 11): 10 * 1024 * 1024 + 400 * 1024, (3, 13): 9 * 1024 * 1024 + 300 * 1024}
#: A version not measured takes the largest: an estimate too high starts fewer children,
#: which run time corrects; one too low risks an OOM kill before the first measurement.
CHILD_BASE = CHILD_BASES.get(sys.version_info[:2], max(CHILD_BASES.values()))


#: at most 27 digits and commas: a figure no machine has is garbage, and int() refuses 4300+
_ALLOCATED = re.compile(
    rb"^# bytes in allocated blocks\s*=\s*([0-9][0-9,]{0,26})\s*$", re.MULTILINE
)


def parse_pymalloc_stats(text: bytes) -> int | None:
    """Live small-object bytes from the output of ``sys._debugmallocstats()``."""
    match = _ALLOCATED.search(text)
    return int(match.group(1).replace(b",", b"")) if match else None


def pymalloc_live_bytes() -> int | None:
    """Ask pymalloc how many bytes its live objects hold, or None. It writes to the
    C-level stderr: fd 2 is pointed at a temporary file for the millisecond it takes."""
    debug = getattr(sys, "_debugmallocstats", None)
    if debug is None:
        return None
    try:
        sys.stderr.flush()
        with tempfile.TemporaryFile() as sink:
            saved = os.dup(2)
            try:
                os.dup2(sink.fileno(), 2)
                debug()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            sink.seek(0)
            return parse_pymalloc_stats(sink.read())
    except (OSError, ValueError):
        return None


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _mallinfo2() -> _MallInfo2 | None:
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c") or None).mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2
    return function()


_at_import = _mallinfo2()
#: glibc heap in use when celery_guard was imported: the interpreter's and Celery's
#: tables and code, which children read but do not write.
MALLOC_AT_IMPORT: int | None = int(_at_import.uordblks) if _at_import is not None else None


#: Bytes of the collector's header in front of each object it tracks (PyGC_Head: two
#: pointers, CPython 3.8 to 3.14); a full collection writes it.
GC_HEADER = 16
#: /proc/PID/pagemap: one 64-bit entry a page; bit 63 the page is present, bit 56 it is
#: mapped by this process alone (Linux 4.2+, readable without privileges).
PRESENT, EXCLUSIVE = 1 << 63, 1 << 56
#: Pages read from a pagemap at once (4 KiB of entries).
PAGEMAP_RUN = 512


@dataclass(frozen=True)
class CollectorPages:
    """The pages a full collection writes (those holding the header of an object the
    collector tracks, frozen ones aside), as page numbers, sorted. Without ``gc.freeze``
    each child gets its own copy of the ones it still shares: Celery collects in the main
    process before every fork (AsynPool, issue #2927), and a child's own full collection
    does the same. ``test_footprint.py`` checks the count against a forked child's."""

    numbers: array[int]
    page: int = mmap.PAGESIZE

    @classmethod
    def of(
        cls, objects: Iterable[object] | None = None, page: int = mmap.PAGESIZE
    ) -> CollectorPages:
        tracked = gc.get_objects() if objects is None else objects
        numbers = sorted({(id(obj) - GC_HEADER) // page for obj in tracked})
        return cls(array("Q", numbers), page)

    @property
    def bytes(self) -> int:
        return len(self.numbers) * self.page

    def runs(self) -> Iterator[tuple[int, int]]:
        """(first page, count) of each run of consecutive pages, at most PAGEMAP_RUN."""
        numbers, i = self.numbers, 0
        while i < len(numbers):
            j = i
            while (
                j + 1 < len(numbers)
                and numbers[j + 1] == numbers[j] + 1
                and j - i + 1 < PAGEMAP_RUN
            ):
                j += 1
            yield numbers[i], j - i + 1
            i = j + 1

    def shared(self, pagemap: str) -> int | None:
        """Bytes of these pages the process whose ``pagemap`` this is still shares (present,
        not its own): what one full collection would copy in it; None if unreadable."""
        shared = 0
        try:
            fd = os.open(pagemap, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            for first, count in self.runs():
                entries = memoryview(os.pread(fd, 8 * count, 8 * first)).cast("Q")
                shared += sum(1 for e in entries if e & PRESENT and not e & EXCLUSIVE)
        except (OSError, TypeError, ValueError):
            return None
        finally:
            os.close(fd)
        return shared * self.page


def copy_on_write_seconds(pages: int = 256) -> float | None:
    """Seconds the calling process's thread takes to write one page it shares with a
    forked child (the kernel copies it first): measured on ``pages`` pages of its own,
    with a child forked for the purpose that only waits. None when it cannot fork."""
    size = pages * mmap.PAGESIZE
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buffer.write(b"\1" * size)  # every page present before the fork
        wait, release = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            os.close(wait)
            os.close(release)
            return None
        if pid == 0:  # the child: wait, and leave without running anything of the parent's
            try:
                os.read(wait, 1)
            finally:
                os._exit(0)
        try:
            began = time.thread_time()
            for offset in range(0, size, mmap.PAGESIZE):
                buffer[offset] = 2
            return (time.thread_time() - began) / pages
        finally:
            os.write(release, b"x")
            os.waitpid(pid, 0)
            os.close(wait)
            os.close(release)
    finally:
        buffer.close()


def read_allocators() -> Allocators | None:
    """The calling process's allocator figures, or None where glibc is not the allocator."""
    info = _mallinfo2()
    if info is None:
        return None
    at_import = MALLOC_AT_IMPORT
    growth = None if at_import is None else max(int(info.uordblks) - at_import, 0)
    return Allocators(pymalloc_live_bytes(), growth, int(info.hblkhd), int(info.hblks))


def measure(
    pid: int | str = "self",
    proc: str = procfs.ROOT,
    allocators: Allocators | None = None,
    app_objects: int | None = None,
) -> Footprint:
    """Read the footprint of process ``pid``; what cannot be read counts as nothing."""
    status = _fields(procfs.kib_fields(pid, "status", proc))
    rollup = _fields(procfs.kib_fields(pid, "smaps_rollup", proc))
    rss = rollup.get("Rss", status.get("VmRSS", 0))
    return Footprint(
        rss=rss,
        anonymous=rollup.get("Anonymous", status.get("RssAnon", rss)),
        page_tables=status.get("VmPTE", 0),
        allocators=allocators,
        app_objects=app_objects,
    )


def _fields(found: dict[str, int] | procfs.Unread) -> dict[str, int]:
    return {} if isinstance(found, procfs.Unread) else found


def estimate_child(footprint: Footprint, forked: bool = True, gc_freeze: bool = True) -> Estimate:
    """Bytes one pool child is expected to add to the cgroup once it has run tasks that
    read the app's data, by the method that applies (see the top of this module)."""
    own = footprint.page_tables
    if not forked:
        return Estimate(footprint.anonymous + own, "spawn")
    alloc = footprint.allocators
    if footprint.app_objects is not None:
        data = footprint.app_objects
        if gc_freeze:
            return Estimate(data + CHILD_BASE + own, "census")
        small = alloc.small_objects if alloc is not None else None
        if small is not None:
            return Estimate(max(data, small) + CHILD_BASE + own, "census-gc")
    if alloc is None:
        return Estimate(footprint.anonymous + own, "anonymous")
    headers = alloc.large_chunks * mmap.PAGESIZE
    if alloc.small_objects is not None and alloc.malloc_growth is not None:
        return Estimate(alloc.small_objects + alloc.malloc_growth + headers + own, "objects")
    shared = min(alloc.large_buffers, footprint.anonymous)
    return Estimate(footprint.anonymous - shared + headers + own, "anonymous")
