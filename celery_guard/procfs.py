"""The guard's one boundary to ``/proc``: every read of a process's files goes through
here, over one root (the proc mount; tests give a fixture tree), and when it finds no
figure it says why: the process is gone, the guard may not read it (``hidepid``,
another user's process), or the file did not hold what it should. psutil draws the
same lines; here the per-task reads stay one system call with no object made. (The
cgroup's files and the mount table are ``cgroups``'s.)
"""

from __future__ import annotations

import enum
import errno
import mmap
import os
import sys

#: Where the proc file system is mounted.
ROOT = "/proc"


class Unread(enum.Enum):
    """Why a figure could not be read."""

    GONE = "gone"  # no such process (it exited) or no such file
    DENIED = "denied"  # not this process's to read
    ODD = "odd"  # read, but not what the kernel writes there; or another error


def why(error: OSError) -> Unread:
    if error.errno in (errno.ENOENT, errno.ESRCH):
        return Unread.GONE
    if error.errno in (errno.EACCES, errno.EPERM):
        return Unread.DENIED
    return Unread.ODD


def path(pid: int | str, name: str, proc: str = ROOT) -> str:
    """The file ``name`` of process ``pid`` (or ``"self"``)."""
    return f"{proc}/{pid}/{name}"


def read(pid: int | str, name: str, proc: str = ROOT, size: int = -1) -> bytes | Unread:
    try:
        with open(path(pid, name, proc), "rb") as file:
            return file.read(size)
    except OSError as error:
        return why(error)


def unsupported(proc: str = ROOT, platform: str | None = None) -> str | None:
    """Why nothing can be measured here (not Linux, or no ``/proc`` mounted), or None."""
    platform = platform or sys.platform
    if not platform.startswith("linux"):
        return f"{platform} is not Linux: celery-guard reads /proc and memory cgroups"
    try:
        with open(f"{proc}/self/stat", "rb") as file:
            file.read(1)
    except OSError as error:
        return f"cannot read {proc}/self/stat: {error.strerror or error} (is /proc mounted?)"
    return None


def parse_kib_fields(text: str) -> dict[str, int]:
    """``Name:   1234 kB`` lines (smaps_rollup, status) to bytes; other lines are skipped."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        digits = parts[0] if len(parts) == 2 and parts[1] == "kB" else ""
        # at most 20 digits: a figure no machine has is garbage, and int() refuses 4300+
        if digits.isascii() and digits.isdigit() and len(digits) <= 20:
            fields[name.strip()] = int(digits) * 1024
    return fields


def kib_fields(pid: int | str, name: str, proc: str = ROOT) -> dict[str, int] | Unread:
    data = read(pid, name, proc)
    if isinstance(data, Unread):
        return data
    return parse_kib_fields(data.decode("utf-8", "replace"))


def start_time(pid: int, proc: str = ROOT) -> int | Unread:
    """A process's start time in clock ticks since boot (field 22 of ``stat``): with the
    pid, it names one process for good, whatever reuses the pid later."""
    data = read(pid, "stat", proc, 4096)
    if isinstance(data, Unread):
        return data
    end = data.rfind(b")")  # the name may hold spaces and parentheses
    fields = data[end + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return Unread.ODD


def rss(pid: int, proc: str = ROOT) -> int | Unread:
    """A process's RSS in bytes from ``statm`` (about 10 us)."""
    data = read(pid, "statm", proc, 200)
    if isinstance(data, Unread):
        return data
    try:
        return int(data.split()[1]) * mmap.PAGESIZE
    except (IndexError, ValueError):
        return Unread.ODD


def private_bytes(fields: dict[str, int]) -> int | None:
    """A process's private memory (USS) from its smaps_rollup fields."""
    if "Private_Dirty" not in fields:
        return None
    return fields["Private_Dirty"] + fields.get("Private_Clean", 0)


def private(pid: int | str = "self", proc: str = ROOT) -> int | Unread:
    """A process's private memory now (0.1-5 ms: the kernel walks its page tables)."""
    fields = kib_fields(pid, "smaps_rollup", proc)
    if isinstance(fields, Unread):
        return fields
    found = private_bytes(fields)
    return Unread.ODD if found is None else found


def known(figure: int | Unread) -> int | None:
    """The figure, or None for a caller to whom every reason means "not known"."""
    return None if isinstance(figure, Unread) else figure


class Kept:
    """A file of this process read through a descriptor kept open: one ``pread`` a read
    (about 1.4 us for ``statm``), cheap enough for every task."""

    def __init__(self, name: str, proc: str = ROOT) -> None:
        self.fd = os.open(path("self", name, proc), os.O_RDONLY | os.O_CLOEXEC)

    def fields(self, size: int = 128) -> list[bytes]:
        return os.pread(self.fd, size, 0).split()


class StatmRss(Kept):
    """This process's RSS in bytes."""

    def __init__(self, proc: str = ROOT) -> None:
        super().__init__("statm", proc)

    def __call__(self) -> int:  # on the per-task path: one call, no helper
        return int(os.pread(self.fd, 64, 0).split()[1]) * mmap.PAGESIZE


class StatmAnon(Kept):
    """This process's anonymous resident memory (``statm``'s resident less shared)."""

    def __init__(self, proc: str = ROOT) -> None:
        super().__init__("statm", proc)

    def __call__(self) -> int:
        fields = self.fields()
        return (int(fields[1]) - int(fields[2])) * mmap.PAGESIZE


class SchedWait:
    """Microseconds this process has waited for a CPU (``schedstat``'s second field,
    nanoseconds): what tells a task slowed by too many children for the CPUs from one
    that sleeps or waits on I/O. -1 where the kernel keeps no schedstat."""

    def __init__(self, proc: str = ROOT) -> None:
        try:
            self.file: Kept | None = Kept("schedstat", proc)
        except OSError:
            self.file = None

    def __call__(self) -> int:
        if self.file is None:
            return -1
        try:
            return int(self.file.fields()[1]) // 1000
        except (OSError, IndexError, ValueError):
            return -1


__all__ = [
    "ROOT",
    "Kept",
    "SchedWait",
    "StatmAnon",
    "StatmRss",
    "Unread",
    "kib_fields",
    "known",
    "parse_kib_fields",
    "path",
    "private",
    "private_bytes",
    "read",
    "rss",
    "start_time",
    "why",
]
