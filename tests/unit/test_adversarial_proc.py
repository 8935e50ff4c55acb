"""Adversarial tests for the /proc and cgroup boundary (celery_guard.cgroups).

What the kernel writes is not always what a parser expects: directory names may hold
newlines (raw in /proc/self/cgroup, ``\\012`` in mountinfo), tabs, backslashes and bytes
that are not UTF-8; a file may be empty, cut short, full of NULs, or hold a number of
thousands of digits (a fuzzed or hostile container runtime). The readers answer with the
real figure or None and a one-line reason: they never raise, and a name never hides the
real limit.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_guard.cgroups import (
    Cgroup,
    _parse_mountinfo,
    find_memory_cgroup,
    parse_proc_cgroup,
    physical_memory,
    read_limit,
    read_oom_kills,
    read_usage,
)
from celery_guard.footprint import parse_pymalloc_stats
from celery_guard.procfs import parse_kib_fields

FILES = settings(max_examples=150, deadline=None, database=None)
MIB = 1 << 20
GIB = 1 << 30
MOUNT = "30 24 0:26 {root} {point} rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw\n"
V1_MOUNT = "32 31 0:29 {root} {point} rw,relatime - cgroup cgroup rw,memory\n"


def _escape(path: str) -> str:
    """As the kernel writes a path in mountinfo: space, tab, newline, backslash in octal."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


def _tree(root: Path, cgroup_path: str, files: dict[str, str], version: int = 2) -> Path:
    """A fake root whose process sits in ``cgroup_path`` (v2 at /sys/fs/cgroup, or v1
    memory at /sys/fs/cgroup/memory), with ``files`` in that cgroup's directory."""
    proc = root / "proc" / "self"
    proc.mkdir(parents=True)
    (root / "proc" / "meminfo").write_text("MemTotal:       16777216 kB\n")
    if version == 2:
        (proc / "cgroup").write_bytes(f"0::{cgroup_path}\n".encode(errors="surrogateescape"))
        mount = MOUNT.format(root="/", point="/sys/fs/cgroup")
        base = root / "sys" / "fs" / "cgroup"
    else:
        text = f"4:memory:{cgroup_path}\n1:name=systemd:{cgroup_path}\n0::{cgroup_path}\n"
        (proc / "cgroup").write_bytes(text.encode(errors="surrogateescape"))
        mount = V1_MOUNT.format(root="/", point="/sys/fs/cgroup/memory")
        base = root / "sys" / "fs" / "cgroup" / "memory"
    (proc / "mountinfo").write_text(mount)
    leaf = Path(os.fsdecode(os.path.join(os.fsencode(base), *_parts(cgroup_path))))
    leaf.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (leaf / name).write_bytes(content.encode(errors="surrogateescape"))
    return leaf


def _parts(path: str) -> list[bytes]:
    return [os.fsencode(p) for p in path.split("/") if p]


# --- regressions: issue 13, finding 14 ------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(
    "name",
    ["odd\nname", "trailing\n", "\nleading", "two\n\nlines", "0::/x\nnot a record", "cr\rlf\r\n"],
    ids=["middle", "trailing", "leading", "blank-line", "looks-like-v2", "carriage-return"],
)
def test_a_newline_in_a_cgroup_name_keeps_the_real_limit(
    tmp_path: Path, name: str, version: int
) -> None:
    """/proc/self/cgroup was split at every newline: the path was cut at the newline, the
    directory not found, and an ancestor's figure (or none) used instead. (A carriage
    return was read as a newline: text mode translated it.)"""
    limit_file = "memory.max" if version == 2 else "memory.limit_in_bytes"
    leaf = _tree(tmp_path, f"/app/{name}", {limit_file: f"{300 * MIB}\n"}, version)
    found = find_memory_cgroup(str(tmp_path))
    assert found.cgroup is not None and found.cgroup.path == str(leaf), found
    assert read_limit(found.cgroup, 16 * GIB).bytes == 300 * MIB


def test_a_newline_in_the_mount_root_and_point_is_unescaped(tmp_path: Path) -> None:
    """mountinfo escapes the newline as \\012; /proc/self/cgroup shows it raw. Both must
    name the same directory for the path below the mount to be found."""
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "proc" / "meminfo").write_text("MemTotal:       16777216 kB\n")
    (tmp_path / "proc" / "self" / "cgroup").write_text("0::/pod\nA/ctr\n")
    mount = MOUNT.format(root=_escape("/pod\nA"), point=_escape("/sys/fs/c group\n"))
    (tmp_path / "proc" / "self" / "mountinfo").write_text(mount)
    leaf = tmp_path / "sys" / "fs" / "c group\n" / "ctr"
    leaf.mkdir(parents=True)
    (leaf / "memory.max").write_text(f"{128 * MIB}\n")
    found = find_memory_cgroup(str(tmp_path))
    assert found.cgroup == Cgroup(2, str(leaf), str(tmp_path / "sys/fs/c group\n")), found
    assert read_limit(found.cgroup, None).bytes == 128 * MIB


@pytest.mark.parametrize(
    "file,key",
    [
        ("memory.max", ""),
        ("memory.current", ""),
        ("memory.stat", "inactive_file "),
        ("memory.events", "oom_kill "),
    ],
)
def test_a_number_of_thousands_of_digits_is_garbage_not_a_crash(
    tmp_path: Path, file: str, key: str
) -> None:
    """int() refuses 4300+ digits with ValueError, which escaped every reader."""
    base = {"memory.max": "max\n", "memory.current": "1000\n", "memory.stat": "inactive_file 1\n"}
    leaf = _tree(tmp_path, "/app", {**base, file: key + "9" * 5000 + "\n"})
    group = Cgroup(2, str(leaf), str(tmp_path / "sys/fs/cgroup"))
    limit, usage, kills = read_limit(group, None), read_usage(group), read_oom_kills(group)
    reasons = [limit.reason, usage.reason, kills[1]]
    assert any("garbage" in reason for reason in reasons), reasons
    assert all("\n" not in reason for reason in reasons)


@pytest.mark.parametrize("kib", ["0", "1", "15000", "9" * 5000])
def test_an_implausible_memtotal_is_unknown(tmp_path: Path, kib: str) -> None:
    """MemTotal: 0 kB made every cgroup limit 'at or above physical memory', so none was
    used; 5000 digits raised ValueError."""
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "meminfo").write_text(f"MemTotal:       {kib} kB\n")
    total, why = physical_memory(str(tmp_path))
    assert total is None and why


# --- /proc/self/cgroup as the kernel writes it --------------------------------------------

#: Path text: anything but the one sequence that would start a record after a newline.
PATH = st.text(
    alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=30
).map(lambda p: "/" + p)
CONTROLLERS = st.sampled_from(["", "memory", "cpu,cpuacct", "name=systemd", "net_cls,net_prio"])


def _ambiguous(path: str) -> bool:
    return re.search(r"\n[0-9]+:[A-Za-z0-9_.,=-]*:", path) is not None


@FILES
@given(records=st.lists(st.tuples(st.integers(0, 20), CONTROLLERS, PATH), min_size=1, max_size=6))
def test_proc_cgroup_round_trips(records: list[tuple[int, str, str]]) -> None:
    """Round trip: records written as the kernel writes them (paths raw) read back as
    written, unless a path holds a newline followed by what looks like a record."""
    text = "".join(f"{n}:{c}:{p}\n" for n, c, p in records)
    expected = [(str(n), c, p) for n, c, p in records]
    if any(_ambiguous(p) for _, _, p in records):
        return
    assert parse_proc_cgroup(text) == expected


@FILES
@given(text=st.text(max_size=300))
def test_proc_cgroup_never_raises(text: str) -> None:
    for hierarchy, controllers, path in parse_proc_cgroup(text):
        assert hierarchy.isdigit() and ":" not in controllers and "\n" not in controllers
        assert isinstance(path, str)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("", []),
        ("\n", []),
        ("0::", [("0", "", "")]),
        ("0::/", [("0", "", "/")]),
        ("0::/a\n", [("0", "", "/a")]),
        ("0::/a\n\n", [("0", "", "/a\n")]),
        ("junk\n0::/a\n", [("0", "", "/a")]),
        ("12:memory", []),  # cut before the path
        ("12:memory:/a\n0::/b", [("12", "memory", "/a"), ("0", "", "/b")]),
        ("\x00\x00\n0::/a", [("0", "", "/a")]),
    ],
)
def test_proc_cgroup_odd_files(text: str, expected: list[tuple[str, str, str]]) -> None:
    assert parse_proc_cgroup(text) == expected


# --- whole trees with odd names -------------------------------------------------------------

NAME = st.text(
    alphabet=st.characters(
        exclude_categories=("Cs",), exclude_characters="/\x00", max_codepoint=0x2FF
    ),
    min_size=1,
    max_size=12,
).filter(lambda s: s not in (".", "..") and not _ambiguous("/" + s))


@FILES
@given(names=st.lists(NAME, min_size=1, max_size=3), version=st.sampled_from([1, 2]))
def test_any_directory_names_find_the_leaf(
    tmp_path_factory: pytest.TempPathFactory, names: list[str], version: int
) -> None:
    """Whatever characters the names hold (newlines, tabs, spaces, backslashes, colons),
    the cgroup found is the process's own directory, and its limit is read."""
    root = tmp_path_factory.mktemp("root")
    limit_file = "memory.max" if version == 2 else "memory.limit_in_bytes"
    leaf = _tree(root, "/" + "/".join(names), {limit_file: f"{200 * MIB}\n"}, version)
    found = find_memory_cgroup(str(root))
    assert found.cgroup is not None and found.cgroup.path == str(leaf), found
    assert read_limit(found.cgroup, 16 * GIB).bytes == 200 * MIB


@FILES
@given(point=st.lists(NAME, min_size=1, max_size=3), mount_root=st.lists(NAME, max_size=2))
def test_mountinfo_paths_round_trip(point: list[str], mount_root: list[str]) -> None:
    """Round trip: any mount root and point escaped as the kernel does read back as is."""
    mountpoint, root = "/" + "/".join(point), "/" + "/".join(mount_root)
    (mount,) = _parse_mountinfo(MOUNT.format(root=_escape(root), point=_escape(mountpoint)))
    assert (mount.root, mount.mountpoint, mount.fstype) == (root, mountpoint, "cgroup2")


# --- odd contents of the figure files ----------------------------------------------------

ODD_NUMBERS = [
    "",
    "\n",
    "\x00" * 64,
    "\xff\xfe",  # not UTF-8 (read with surrogateescape)
    "-1",
    "+5",
    "1_000",
    "0x10",
    "1e9",
    "\u0661\u0662",
    "12 34",
    "9" * 21,
    "9" * 5000,
    "max max",
    "MAX",
    "42" + "\x00",
]


@pytest.mark.parametrize("content", ODD_NUMBERS, ids=repr)
@pytest.mark.parametrize("file", ["memory.max", "memory.high", "memory.current"])
def test_odd_figures_are_reasons(tmp_path: Path, file: str, content: str) -> None:
    base = {"memory.max": "max\n", "memory.high": "max\n", "memory.current": "1000\n"}
    leaf = _tree(tmp_path, "/app", {**base, "memory.stat": "inactive_file 0\n", file: content})
    group = Cgroup(2, str(leaf), str(tmp_path / "sys/fs/cgroup"))
    limit, usage = read_limit(group, 16 * GIB), read_usage(group)
    if file == "memory.current":
        assert usage.usage is None and usage.reason and "\n" not in usage.reason
    else:
        assert limit.bytes is None and limit.reason and "\n" not in limit.reason


@FILES
@given(
    content=st.binary(max_size=200),
    file=st.sampled_from(["memory.max", "memory.high", "memory.current", "memory.stat"]),
    physical=st.one_of(st.none(), st.integers(16 * MIB, 2**50)),
)
def test_any_bytes_in_a_figure_file_never_raise(
    tmp_path_factory: pytest.TempPathFactory, content: bytes, file: str, physical: int | None
) -> None:
    """Never-raises and bounds: a limit read is a whole number below physical memory."""
    root = tmp_path_factory.mktemp("root")
    leaf = _tree(root, "/app", {"memory.max": "max\n"})
    (leaf / file).write_bytes(content)
    group = Cgroup(2, str(leaf), str(root / "sys/fs/cgroup"))
    limit = read_limit(group, physical)
    assert limit.reason
    if limit.bytes is not None:
        assert type(limit.bytes) is int and 0 <= limit.bytes < 1 << 62
        assert physical is None or limit.bytes < physical
    usage = read_usage(group)
    assert usage.usage is None or (type(usage.usage) is int and usage.usage >= 0)


@FILES
@given(content=st.binary(max_size=300))
def test_any_meminfo_never_raises(tmp_path_factory: pytest.TempPathFactory, content: bytes) -> None:
    root = tmp_path_factory.mktemp("root")
    (root / "proc").mkdir()
    (root / "proc" / "meminfo").write_bytes(content)
    total, why = physical_memory(str(root))
    assert (total is None and why) or (type(total) is int and total >= 16 * MIB and why == "")


def test_a_large_proc_cgroup_is_read(tmp_path: Path) -> None:
    """A thousand named hierarchies (and a long path) still parse, and quickly."""
    lines = "".join(f"{i}:name=h{i}:/x\n" for i in range(1000, 1, -1))
    records = parse_proc_cgroup(lines + "0::/" + "a/" * 2000 + "\n")
    assert len(records) == 1000 and records[-1][2].count("a/") == 2000


def test_a_truncated_mountinfo_line_is_skipped() -> None:
    text = MOUNT.format(root="/", point="/sys/fs/cgroup") + "31 24 0:27 / /sys/fs/bp"
    assert [m.mountpoint for m in _parse_mountinfo(text)] == ["/sys/fs/cgroup"]


# --- the process's own /proc files and pymalloc's statistics (footprint) --------------------
@pytest.mark.parametrize(
    "text",
    [
        "Rss: " + "9" * 5000 + " kB\nPss: 12 kB\n",  # int() refuses 4300+ digits
        "Rss: \u0661\u0662 kB\nPss: 12 kB\n",  # digits, but not ASCII ones
        "Rss: 12 MB\nPss: 12 kB\n",  # not the unit the kernel writes
        "Rss:\nPss: 12 kB\n",
    ],
)
def test_kib_fields_skip_a_figure_no_machine_has(text: str) -> None:
    """The sibling of the cgroup files' fix: a field that cannot be a figure is skipped
    (as if absent), never a ValueError out of the startup measurement."""
    assert parse_kib_fields(text) == {"Pss": 12 * 1024}


def test_pymalloc_statistics_of_thousands_of_digits_are_unknown() -> None:
    assert parse_pymalloc_stats(b"# bytes in allocated blocks = " + b"9" * 5000) is None
    assert parse_pymalloc_stats(b"# bytes in allocated blocks = 1,234") == 1234


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(max_size=300))
def test_kib_fields_never_raise(text: str) -> None:
    for value in parse_kib_fields(text).values():
        assert 0 <= value < 10**24
