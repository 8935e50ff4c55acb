"""Find the calling process's memory cgroup and read its limit, usage and OOM kills.

Every function takes a root directory (default "/") or a `Cgroup` built from one, so
tests point them at fixture trees. Nothing here raises over a missing, unreadable, empty
or malformed file: the answer is "unknown" (None) with a human reason, because a guard
that crashes the worker over an odd cgroup file does more harm than one without a figure.
The readers run on a timer, about once a second: plain open/read and string splitting.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "Cgroup",
    "Found",
    "Limit",
    "Usage",
    "find_memory_cgroup",
    "parse_proc_cgroup",
    "physical_memory",
    "read_limit",
    "read_oom_group",
    "read_oom_kills",
    "read_usage",
]

#: cgroup v1 "unlimited": LONG_MAX rounded down to 4 KiB and to 64 KiB pages.
V1_UNLIMITED = frozenset({9223372036854771712, 9223372036854710272})
#: Anything this large is a sentinel, not a limit someone wrote (no machine has 4 EiB).
_HUGE = 1 << 62

# mountinfo octal escapes (\040 space, \011 tab, \012 newline, \134 backslash): one byte.
_OCTAL = re.compile(r"\\([0-3][0-7]{2})")
#: Where a record of /proc/<pid>/cgroup starts: ``hierarchy-ID:controllers:``, at the start
#: of the file or of a line. The path after it is not escaped (a newline in a directory
#: name is a newline in the file), so a record ends only where the next one starts.
_CGROUP_RECORD = re.compile(r"(?:\A|\n)([0-9]+):([A-Za-z0-9_.,=-]*):")
#: Digits in a figure: 2**64 has 20; more is garbage (and int() refuses 4300+).
_MAX_DIGITS = 20
#: MemTotal below this is garbage: no machine runs a Celery worker in less.
_MIN_PHYSICAL = 16 * 1024 * 1024


@dataclass(frozen=True)
class Cgroup:
    """A memory cgroup directory and the mount it was found under."""

    version: int  # 1 or 2
    path: str  # directory of the memory cgroup, joined under root
    mount: str  # mount point directory under root; the upward walk stops here (inclusive)


@dataclass(frozen=True)
class Found:
    """Result of locating the cgroup: the cgroup, or None and why not."""

    cgroup: Cgroup | None
    reason: str


@dataclass(frozen=True)
class Limit:
    """The effective memory limit; bytes is None when there is none (reason says why)."""

    bytes: int | None
    source: str  # "cgroup-v2" | "cgroup-v1" | "" (no cgroup)
    reason: str
    path: str = ""  # the cgroup directory whose file gave the figure


@dataclass(frozen=True)
class Usage:
    """Bytes charged to the cgroup, the working set (usage minus inactive file: what
    kubelet watches) and what the kernel cannot reclaim before it kills (usage minus all
    page cache: anonymous, unevictable and kernel memory)."""

    usage: int | None
    working_set: int | None
    reason: str  # "" when both known, else why not
    unreclaimable: int | None = None  # None where memory.stat has no active_file


class _Mount(NamedTuple):
    root: str
    mountpoint: str
    fstype: str
    superoptions: str


def _under(root: str, abspath: str) -> str:
    """Join an absolute path under root (os.path.join would throw root away)."""
    rel = abspath.lstrip("/")
    if not rel:
        return root.rstrip("/") or "/"
    return os.path.join(root, rel)


def _oserror(exc: BaseException) -> str:
    """Describe an error without repeating the (long, fixture-rooted) file name."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"[Errno {exc.errno}] {exc.strerror}"
    return f"{type(exc).__name__}: {exc}"


class Missing(str):
    """The reason a file was not read when it is not there at all (a level that does not
    set it), as against one there and unreadable."""


def _read(path: str, display: str) -> tuple[str | None, str]:
    """Read a whole text file; (None, reason) instead of raising. No newline translation:
    a carriage return in a cgroup's name is part of the name, not a line end."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            return f.read(), ""
    except FileNotFoundError:
        return None, Missing(f"missing {display}")
    except (OSError, ValueError) as exc:
        return None, f"unreadable {display}: {_oserror(exc)}"


def _parse_int(text: str, display: str) -> tuple[int | None, str]:
    """Parse a non-negative decimal; int() alone would accept '1_000' and ' +5'."""
    s = text.strip()
    if not s:
        return None, f"empty {display}"
    if s.isascii() and s.isdigit() and len(s) <= _MAX_DIGITS:
        return int(s), ""
    return None, f"garbage in {display}: {s[:40]!r}"


def _field(text: str, key: str, display: str) -> tuple[int | None, str]:
    """Value of a `key N` line (memory.stat, memory.events, memory.oom_control)."""
    prefix = key + " "
    for line in text.split("\n"):
        if line.startswith(prefix):
            return _parse_int(line[len(prefix) :], f"{key} in {display}")
    return None, f"no {key} field in {display}"


def _level(cgroup: Cgroup, directory: str) -> str:
    """Name a cgroup directory as the kernel would, relative to its mount ("/" for the mount)."""
    mount = cgroup.mount.rstrip("/")
    if directory == cgroup.mount or directory == mount:
        return "/"
    if directory.startswith(mount + "/"):
        return directory[len(mount) :]
    return directory


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (``_OCTAL``)."""
    if "\\" not in field:
        return field
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_proc_cgroup(text: str) -> list[tuple[str, str, str]]:
    """(hierarchy ID, controllers, path) for each record of /proc/<pid>/cgroup: split
    where ``N:controllers:`` starts a line (see ``_CGROUP_RECORD``), and only the file's
    own last newline dropped. A name holding a newline and then such a text reads as a
    new record."""
    if text.endswith("\n"):
        text = text[:-1]
    starts = list(_CGROUP_RECORD.finditer(text))
    records = []
    for i, match in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
        records.append((match.group(1), match.group(2), text[match.end() : end]))
    return records


def _parse_mountinfo(text: str) -> list[_Mount]:
    """Parse proc(5) mountinfo lines; the optional fields before ' - ' vary in number."""
    mounts = []
    for line in text.split("\n"):
        fields = line.split(" ")
        if len(fields) < 10:
            continue
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 4:
            continue
        mounts.append(
            _Mount(_unescape(fields[3]), _unescape(fields[4]), fields[sep + 1], fields[sep + 3])
        )
    return mounts


def _contains(mount_root: str, path: str) -> bool:
    """Whether the cgroup path lies at or under the mount's root."""
    if mount_root == "/":
        return True
    mount_root = mount_root.rstrip("/")
    return path == mount_root or path.startswith(mount_root + "/")


def _pick_mount(candidates: list[_Mount], path: str) -> _Mount:
    """Prefer a mount whose root contains the path, the shortest such root (more ancestors
    visible for the v2 walk); among equals the first mounted, the system's: a later one
    elsewhere is a bind mount (a chroot's, a container runtime's) that may go away under
    a running worker. A later mount at the same mount point hides the earlier one there."""
    visible: dict[str, _Mount] = {}  # by mount point, in the order first mounted
    for m in candidates:
        visible[m.mountpoint] = m
    best: _Mount | None = None
    for m in visible.values():
        if _contains(m.root, path) and (best is None or len(m.root) < len(best.root)):
            best = m
    return best if best is not None else next(iter(visible.values()))


def _relative(path: str, mount_root: str) -> list[str]:
    """The cgroup path's components below the mount root ([]: the mount point itself), as
    uber-go/automaxprocs and automemlimit strip it (a private cgroup namespace shows "/"
    for both). A path outside the mount root, or climbing out with "..", cannot be reached
    through this mount: the mount point is the closest cgroup this process can see."""
    if not path.startswith("/") or not _contains(mount_root, path):
        return []
    rel = path if mount_root == "/" else path[len(mount_root.rstrip("/")) :]
    parts = [p for p in rel.split("/") if p and p != "."]
    if ".." in parts:
        return []
    return parts


def find_memory_cgroup(root: str = "/", pid: str = "self") -> Found:
    """Locate the memory cgroup of `pid` from <root>/proc/<pid>/{cgroup,mountinfo}. A v1
    memory line wins over the v2 `0::` line (on hybrid hosts the cgroup2 mount has no
    memory controller). A leaf directory that does not exist is replaced by its nearest
    existing ancestor within the mount, else the mount point."""
    proc = f"/proc/{pid}"
    cg_name = f"{proc}/cgroup"
    text, why = _read(_under(root, cg_name), cg_name)
    if text is None:
        return Found(None, why)

    v1_path: str | None = None
    v2_path: str | None = None
    for hierarchy, controllers, path in parse_proc_cgroup(text):
        if hierarchy == "0" and controllers == "":
            v2_path = path
        elif v1_path is None and "memory" in controllers.split(","):
            v1_path = path
    if v1_path is None and v2_path is None:
        return Found(None, f"no memory controller in {cg_name}")

    mi_name = f"{proc}/mountinfo"
    text, why = _read(_under(root, mi_name), mi_name)
    if text is None:
        return Found(None, why)
    mounts = _parse_mountinfo(text)

    if v1_path is not None:
        version, path = 1, v1_path
        candidates = [
            m for m in mounts if m.fstype == "cgroup" and "memory" in m.superoptions.split(",")
        ]
        if not candidates:
            return Found(
                None, f"memory controller in {cg_name} but no cgroup v1 memory mount in {mi_name}"
            )
    else:
        version, path = 2, v2_path or "/"
        candidates = [m for m in mounts if m.fstype == "cgroup2"]
        if not candidates:
            return Found(
                None, f"no memory controller in {cg_name} and no cgroup2 mount in {mi_name}"
            )

    mount = _pick_mount(candidates, path)
    mount_dir = _under(root, mount.mountpoint)
    parts = _relative(path, mount.root)
    leaf = mount_dir
    for i in range(len(parts), 0, -1):
        candidate = os.path.join(mount_dir, *parts[:i])
        if os.path.isdir(candidate):
            leaf = candidate
            break
    where = f"cgroup v{version} {path} at {mount.mountpoint}"
    return Found(Cgroup(version=version, path=leaf, mount=mount_dir), where)


def physical_memory(root: str = "/") -> tuple[int | None, str]:
    """MemTotal from <root>/proc/meminfo in bytes: limits at or above it are no limits."""
    name = "/proc/meminfo"
    text, why = _read(_under(root, name), name)
    if text is None:
        return None, why
    for line in text.split("\n"):
        if line.startswith("MemTotal:"):
            value = line[len("MemTotal:") :].strip()
            if value.endswith(" kB"):
                kib, why = _parse_int(value[:-3], f"MemTotal in {name}")
                if kib is not None and kib * 1024 < _MIN_PHYSICAL:
                    return None, f"implausible MemTotal in {name}: {kib} kB"
                if kib is not None:
                    return kib * 1024, ""
                return None, why
            return None, f"garbage MemTotal in {name}: {value[:40]!r}"
    return None, f"no MemTotal in {name}"


def _no_limit_reason(value: int, physical: int | None, what: str) -> str:
    """Why a figure is not a real limit, or "" when it is one."""
    if value in V1_UNLIMITED or value >= _HUGE:
        return f"unlimited ({value} in {what})"
    if physical is not None and value >= physical:
        return f"no limit: {value} >= physical memory {physical} ({what})"
    return ""


def _v1_setter(cgroup: Cgroup, value: int) -> str:
    """The level whose own memory.limit_in_bytes is the hierarchical limit: its usage,
    not the leaf's, is what the limit is compared with (siblings count too)."""
    for directory in _up_to_mount(cgroup):
        text, _ = _read(os.path.join(directory, "memory.limit_in_bytes"), "")
        if text is not None and text.strip() == str(value):
            return directory
    return cgroup.path


def _up_to_mount(cgroup: Cgroup) -> Iterator[str]:
    """The cgroup's directory, then each parent up to the mount point (v2 shows each
    level's own settings only: a reader walks them all)."""
    directory, mount = cgroup.path, cgroup.mount.rstrip("/") or "/"
    while True:
        yield directory
        parent = os.path.dirname(directory)
        at_top = directory.rstrip("/") == mount or len(directory) <= len(mount)
        if at_top or parent == directory:
            return
        directory = parent


def read_limit(cgroup: Cgroup, physical: int | None) -> Limit:
    """The effective memory limit of the cgroup, or bytes=None with the reason. v2: each
    level's memory.max/memory.high shows only that level: the minimum from the leaf up to
    the mount point. v1: the leaf's memory.limit_in_bytes and memory.stat's
    hierarchical_memory_limit (where an ancestor's limit shows). Sentinels and figures at
    or above physical memory mean no limit."""
    source = "cgroup-v2" if cgroup.version == 2 else "cgroup-v1"
    found: list[tuple[int, str, str]] = []  # (bytes, file, directory)
    problems: list[str] = []
    if cgroup.version == 2:
        files_seen = 0
        for directory in _up_to_mount(cgroup):
            level = _level(cgroup, directory)
            for name in ("memory.max", "memory.high"):
                display = f"{name} in {level}"
                text, why = _read(os.path.join(directory, name), display)
                if text is None:
                    if not isinstance(why, Missing):
                        problems.append(why)
                    continue
                files_seen += name == "memory.max"
                if text.strip() == "max":
                    continue
                value, why = _parse_int(text, display)
                if value is None:
                    problems.append(why)
                else:
                    found.append((value, name, directory))
        if not found:
            if problems:
                return Limit(None, source, "no limit found: " + "; ".join(problems))
            if files_seen:
                return Limit(None, source, "no limit set (max at every level)")
            return Limit(
                None, source, f"no memory.max file from {_level(cgroup, cgroup.path)} up to /"
            )
    else:
        level = _level(cgroup, cgroup.path)
        display = f"memory.limit_in_bytes in {level}"
        text, why = _read(os.path.join(cgroup.path, "memory.limit_in_bytes"), display)
        if text is not None:
            value, why = _parse_int(text, display)
            if value is not None:
                found.append((value, "memory.limit_in_bytes", cgroup.path))
        if why:
            problems.append(why)
        display = f"memory.stat in {level}"
        text, why = _read(os.path.join(cgroup.path, "memory.stat"), display)
        if text is not None:
            value, why = _field(text, "hierarchical_memory_limit", display)
            if value is not None:
                found.append((value, "hierarchical_memory_limit", _v1_setter(cgroup, value)))
        if why:
            problems.append(why)
        if not found:
            return Limit(None, source, "no limit found: " + "; ".join(problems))

    value, name, directory = min(found, key=lambda item: item[0])
    level = _level(cgroup, directory)
    what = f"{name} in {level}"
    no_limit = _no_limit_reason(value, physical, what)
    if no_limit:
        return Limit(None, source, no_limit)
    if name == "memory.high":
        if any(n == "memory.max" for _, n, _ in found):
            reason = f"memory.high below memory.max in {level}"
        else:
            reason = f"memory.high in {level} (memory.max is max)"
    else:
        reason = what
    if problems:
        reason += "; skipped: " + "; ".join(problems)
    return Limit(value, source, reason, directory)


def read_usage(cgroup: Cgroup) -> Usage:
    """The cgroup's ``Usage`` now."""
    prefix = "" if cgroup.version == 2 else "total_"
    usage_name = "memory.current" if cgroup.version == 2 else "memory.usage_in_bytes"
    level = _level(cgroup, cgroup.path)
    display = f"{usage_name} in {level}"
    text, why = _read(os.path.join(cgroup.path, usage_name), display)
    usage: int | None = None
    if text is not None:
        usage, why = _parse_int(text, display)
    if usage is None:
        return Usage(None, None, why)
    display = f"memory.stat in {level}"
    text, why = _read(os.path.join(cgroup.path, "memory.stat"), display)
    inactive: int | None = None
    if text is not None:
        inactive, why = _field(text, prefix + "inactive_file", display)
    if text is None or inactive is None:
        return Usage(usage, None, why)
    active, _ = _field(text, prefix + "active_file", display)
    # File pages can exceed usage (page cache charged elsewhere); clamp at zero.
    unreclaimable = None if active is None else max(0, usage - inactive - active)
    return Usage(usage, max(0, usage - inactive), "", unreclaimable)


def read_oom_kills(cgroup: Cgroup) -> tuple[int | None, str]:
    """The cgroup's OOM-kill counter; older kernels have no oom_kill field."""
    name = "memory.events" if cgroup.version == 2 else "memory.oom_control"
    display = f"{name} in {_level(cgroup, cgroup.path)}"
    text, why = _read(os.path.join(cgroup.path, name), display)
    if text is None:
        return None, why
    return _field(text, "oom_kill", display)


def read_oom_group(cgroup: Cgroup) -> bool | None:
    """v2 memory.oom.group: when 1, one OOM kill takes every process in the cgroup. The
    kernel kills the group of the highest ancestor that has it set, so it is on for the
    worker when any level from its cgroup up to the mount has 1; None when its own
    cgroup's file cannot be read and no level above says 1."""
    if cgroup.version != 2:
        return None
    own: bool | None = None
    for directory in _up_to_mount(cgroup):
        text, _ = _read(os.path.join(directory, "memory.oom.group"), "memory.oom.group")
        value = text.strip() if text is not None else None
        if value == "1":
            return True
        if directory == cgroup.path:
            own = False if value == "0" else None
    return own
