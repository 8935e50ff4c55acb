"""The one boundary to /proc: reads over a fixture root, and the reason a read found no
figure (gone, denied, odd), which callers act on (see test_adversarial_pipe for the pool
control that keeps a child whose start time it may not read)."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import pytest

from celery_guard import procfs
from celery_guard.procfs import Unread

STAT = "4242 (celery: a (weird) name) S " + " ".join(["0"] * 18) + " 777 0 0"
ROLLUP = "Rss:  300 kB\nPrivate_Clean:  10 kB\nPrivate_Dirty:  90 kB\n"


@pytest.mark.parametrize(
    "number,expected",
    [
        (errno.ENOENT, Unread.GONE),
        (errno.ESRCH, Unread.GONE),
        (errno.EACCES, Unread.DENIED),
        (errno.EPERM, Unread.DENIED),
        (errno.EIO, Unread.ODD),
    ],
)
def test_a_failed_read_says_why(number: int, expected: Unread) -> None:
    assert procfs.why(OSError(number, os.strerror(number))) is expected


# file, its text (None: absent), the reader, what it reads
READS = [
    ("stat", STAT, procfs.start_time, 777),
    ("stat", "4242 (x) S 1 2", procfs.start_time, Unread.ODD),
    ("stat", None, procfs.start_time, Unread.GONE),
    ("statm", "900 300 100 1 0 50 0", procfs.rss, 300 * mmap.PAGESIZE),
    ("statm", "garbage", procfs.rss, Unread.ODD),
    ("statm", None, procfs.rss, Unread.GONE),
    ("smaps_rollup", ROLLUP, procfs.private, 100 * 1024),
    ("smaps_rollup", "Rss:  300 kB\n", procfs.private, Unread.ODD),
    ("smaps_rollup", None, procfs.private, Unread.GONE),
]


@pytest.mark.parametrize("name,text,reader,expected", READS, ids=[f"{r[0]}-{r[3]}" for r in READS])
def test_reads_over_a_fixture_root(
    tmp_path: Path, name: str, text: str | None, reader: object, expected: object
) -> None:
    (tmp_path / "4242").mkdir()
    if text is not None:
        (tmp_path / "4242" / name).write_text(text)
    assert reader(4242, str(tmp_path)) == expected  # type: ignore[operator]


def test_a_directory_where_a_file_should_be_is_odd_not_gone(tmp_path: Path) -> None:
    (tmp_path / "4242" / "statm").mkdir(parents=True)
    assert procfs.rss(4242, str(tmp_path)) is Unread.ODD


def test_known_turns_every_reason_into_none() -> None:
    assert [procfs.known(x) for x in (5, Unread.GONE, Unread.DENIED, Unread.ODD)] == [
        5,
        None,
        None,
        None,
    ]


def test_the_kept_files_read_this_process() -> None:
    rss, anon, wait = procfs.StatmRss(), procfs.StatmAnon(), procfs.SchedWait()
    assert 0 < anon() <= rss()
    assert wait() >= -1
    assert procfs.SchedWait(proc="/nonexistent")() == -1  # no schedstat: unknown


def test_a_system_without_proc_is_unsupported_and_says_why(tmp_path: Path) -> None:
    """The guard measures through /proc: another system, or a Linux whose /proc is not
    mounted, has nothing to start from, and the reason names which."""
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "stat").write_text("1 (python) S 0\n")
    assert procfs.unsupported(str(tmp_path), platform="linux") is None
    assert procfs.unsupported(str(tmp_path), platform="darwin") == (
        "darwin is not Linux: celery-guard reads /proc and memory cgroups"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    why = procfs.unsupported(str(empty), platform="linux")
    assert why == f"cannot read {empty}/self/stat: No such file or directory (is /proc mounted?)"
