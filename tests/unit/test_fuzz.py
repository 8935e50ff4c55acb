"""Property-based tests (hypothesis) for every parser in celery_guard.

The parsers read what kernels, other programs and people wrote. Whatever they get, only
the documented failure may come out: the cgroup readers answer None with a reason, the
size parsers raise ValueError, load_settings raises ConfigError naming a real variable,
and the log readers skip the line. Where a value is written and read back, the round trip
must hold: sizes, fractions, logfmt lines, mountinfo escapes, ``kB`` fields, histograms.

The bugs these properties found (overflows escaping as OverflowError, float rounding of
large sizes, int() refusing 4300+ digits, line breaks other than newline in /proc) are
fixed; each keeps its smallest failing input as a regression test at the end of the file.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from enum import Enum
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from celery_guard import cli
from celery_guard.cgroups import (
    V1_UNLIMITED,
    Cgroup,
    Found,
    Limit,
    Usage,
    _parse_mountinfo,
    _unescape,
    find_memory_cgroup,
    physical_memory,
    read_limit,
    read_oom_group,
    read_oom_kills,
    read_usage,
)
from celery_guard.config import OPTIONS, ConfigError, Option, Settings, load_settings
from celery_guard.footprint import (
    Allocators,
    Footprint,
    estimate_child,
    measure,
    parse_kib_fields,
    parse_pymalloc_stats,
)
from celery_guard.logline import PREFIX, _logfmt_value, format_event, parse_line
from celery_guard.logreader import (
    COUNT_KEYS,
    MAIN_PROCESS_EVENTS,
    MAX_NAME,
    NAME_KEYS,
    TEXT_KEYS,
    build_report,
    number,
    parse_record,
    peak_histogram,
    read_records,
)
from celery_guard.sizes import MAX_SIZE, MIB, mib, parse_fraction, parse_size
from celery_guard.stats import ExpHistogram, Recommendation, recommend

#: Plain properties; no example database, so nothing is written into the repository.
QUICK = settings(max_examples=250, deadline=None, database=None)
#: Properties that build a file tree per example: fewer examples, and the tree is slow.
FILES = settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

HUGE = 1 << 62  # cgroups: anything this large is a sentinel, never a limit
UNITS = ["", "K", "M", "G", "T"]


# ---------------------------------------------------------------------------------------
# file trees


class Odd(Enum):
    """A file that is not a regular file with contents."""

    MISSING = "missing"
    DIRECTORY = "a directory"
    LOOP = "a symlink to itself"


def _put(path: Path, content: bytes | Odd) -> None:
    if content is Odd.MISSING:
        return
    if content is Odd.DIRECTORY:
        path.mkdir()
    elif content is Odd.LOOP:
        path.symlink_to(path.name)
    else:
        assert isinstance(content, bytes)
        path.write_bytes(content)


#: What a kernel file holding one number might hold instead.
NUMBER_TEXT = st.one_of(
    st.integers(0, 2**64).map(str),
    st.sampled_from(
        [
            "max",
            "-1",
            "+5",
            "1_000",
            " 7 ",
            "0x10",
            "1e3",
            "",
            "\u0661\u0662",  # Arabic-Indic digits: isdigit() but not ASCII
            "\u00b2",  # superscript two: isdigit(), and int() refuses it
            str(min(V1_UNLIMITED)),
            str(HUGE),
        ]
    ),
    st.text(max_size=12),
)
STAT_KEYS = [
    "inactive_file",
    "total_inactive_file",
    "hierarchical_memory_limit",
    "oom_kill",
    "oom_kill_disable",
    "under_oom",
    "oom",
    "max",
]
#: memory.stat, memory.events, memory.oom_control: ``key N`` lines, more or less.
KEY_VALUE_TEXT = st.lists(
    st.tuples(
        st.one_of(st.sampled_from(STAT_KEYS), st.text(max_size=8)),
        st.sampled_from([" ", "  ", "\t", ""]),
        NUMBER_TEXT,
    ),
    max_size=6,
).map(lambda rows: "".join(f"{key}{sep}{value}\n" for key, sep, value in rows))
FILE = st.one_of(
    st.sampled_from(Odd),
    st.binary(max_size=48),
    NUMBER_TEXT.map(lambda text: (text + "\n").encode()),
    KEY_VALUE_TEXT.map(str.encode),
)
CGROUP_FILES = [
    "memory.max",
    "memory.high",
    "memory.current",
    "memory.stat",
    "memory.events",
    "memory.oom.group",
    "memory.limit_in_bytes",
    "memory.usage_in_bytes",
    "memory.oom_control",
]
#: A cgroup directory per level, mount point first, each with some of the files.
LEVELS = st.lists(
    st.dictionaries(st.sampled_from(CGROUP_FILES), FILE, max_size=len(CGROUP_FILES)),
    min_size=1,
    max_size=4,
)


def _levels(root: Path, levels: list[Mapping[str, bytes | Odd]]) -> list[Path]:
    """Make root/cg/l1/l2... with each level's files; the directories, mount first."""
    directory, made = root / "cg", []
    for depth, files in enumerate(levels):
        if depth:
            directory = directory / f"l{depth}"
        directory.mkdir()
        for name, content in files.items():
            _put(directory / name, content)
        made.append(directory)
    return made


def _within(path: str, cgroup: Cgroup) -> bool:
    """Whether path is the cgroup's directory or one of its ancestors up to the mount."""
    p, leaf, mount = (os.path.normpath(x) for x in (path, cgroup.path, cgroup.mount))
    return (leaf == p or leaf.startswith(p + os.sep)) and (
        p == mount or p.startswith(mount + os.sep)
    )


def _check_readers(cgroup: Cgroup, physical: int | None) -> None:
    """Every reader answers, and what it answers is consistent with itself."""
    limit = read_limit(cgroup, physical)
    assert isinstance(limit, Limit)
    assert isinstance(limit.reason, str) and limit.reason
    assert limit.source == ("cgroup-v2" if cgroup.version == 2 else "cgroup-v1")
    if limit.bytes is None:
        assert limit.path == ""
    else:
        assert type(limit.bytes) is int
        assert 0 <= limit.bytes < HUGE and limit.bytes not in V1_UNLIMITED
        assert physical is None or limit.bytes < physical
        assert _within(limit.path, cgroup), (limit, cgroup)

    usage = read_usage(cgroup)
    assert isinstance(usage, Usage)
    if usage.usage is None:
        assert usage.working_set is None and usage.reason
    elif usage.working_set is None:
        assert usage.usage >= 0 and usage.reason
    else:
        assert 0 <= usage.working_set <= usage.usage and usage.reason == ""

    kills, why = read_oom_kills(cgroup)
    if kills is None:
        assert why
    else:
        assert type(kills) is int and kills >= 0 and why == ""

    group = read_oom_group(cgroup)
    assert group in (True, False, None)
    if cgroup.version == 1:
        assert group is None


# ---------------------------------------------------------------------------------------
# cgroups: the readers


@FILES
@given(
    version=st.sampled_from([1, 2]),
    levels=LEVELS,
    physical=st.one_of(st.none(), st.integers(1, 2**64)),
    slash=st.booleans(),
)
def test_cgroup_readers_answer_garbage_with_a_reason(
    version: int, levels: list[dict[str, bytes | Odd]], physical: int | None, slash: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        dirs = _levels(Path(tmp), levels)
        cgroup = Cgroup(version, str(dirs[-1]), str(dirs[0]) + ("/" if slash else ""))
        _check_readers(cgroup, physical)


#: One memory.max / memory.high figure: missing, "max", or a number (some sentinels).
LIMIT_FIGURE = st.one_of(
    st.none(),
    st.just("max"),
    st.integers(0, 2**40),
    st.integers(0, 2**63 - 1),
    st.sampled_from(sorted(V1_UNLIMITED)),
)


def _expected_limit(found: list[tuple[int, Path]], physical: int | None) -> tuple[int | None, str]:
    """The smallest figure, first found among equals, unless it is no limit at all."""
    if not found:
        return None, ""
    value, directory = min(found, key=lambda item: item[0])
    if value in V1_UNLIMITED or value >= HUGE or (physical is not None and value >= physical):
        return None, ""
    return value, str(directory)


@FILES
@given(
    levels=st.lists(st.tuples(LIMIT_FIGURE, LIMIT_FIGURE), min_size=1, max_size=4),
    physical=st.one_of(st.none(), st.integers(1, 2**41)),
)
def test_v2_limit_is_the_smallest_figure_from_the_leaf_up_to_the_mount(
    levels: list[tuple[int | str | None, int | str | None]], physical: int | None
) -> None:
    files = [
        {
            name: str(value).encode() + b"\n"
            for name, value in (("memory.max", top), ("memory.high", high))
            if value is not None
        }
        for top, high in levels
    ]
    with tempfile.TemporaryDirectory() as tmp:
        dirs = _levels(Path(tmp), files)
        limit = read_limit(Cgroup(2, str(dirs[-1]), str(dirs[0])), physical)
    found = [
        (value, directory)
        for directory, pair in zip(reversed(dirs), reversed(levels), strict=True)
        for value in pair
        if isinstance(value, int)
    ]
    assert (limit.bytes, limit.path) == _expected_limit(found, physical), limit
    assert limit.reason


@FILES
@given(
    own=st.one_of(st.none(), st.integers(0, 2**40), st.sampled_from(sorted(V1_UNLIMITED))),
    hierarchical=st.one_of(st.none(), st.integers(0, 2**40), st.sampled_from(sorted(V1_UNLIMITED))),
    ancestors=st.lists(st.one_of(st.none(), st.integers(0, 2**40)), max_size=3),
    setter=st.integers(-1, 3),
    physical=st.one_of(st.none(), st.integers(1, 2**41)),
)
def test_v1_limit_is_the_smaller_figure_charged_where_it_was_set(
    own: int | None,
    hierarchical: int | None,
    ancestors: list[int | None],
    setter: int,
    physical: int | None,
) -> None:
    """memory.limit_in_bytes of the leaf vs hierarchical_memory_limit in its memory.stat;
    the latter is charged to the nearest level whose own limit file says that figure."""
    above = list(ancestors)
    if hierarchical is not None and 0 <= setter < len(above):
        above[setter] = hierarchical  # the ancestor that set it
    figures = [*above, own]  # mount first
    files: list[dict[str, bytes | Odd]] = [
        {} if value is None else {"memory.limit_in_bytes": f"{value}\n".encode()}
        for value in figures
    ]
    if hierarchical is not None:
        files[-1]["memory.stat"] = f"cache 0\nhierarchical_memory_limit {hierarchical}\n".encode()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = _levels(Path(tmp), files)
        limit = read_limit(Cgroup(1, str(dirs[-1]), str(dirs[0])), physical)
    found: list[tuple[int, Path]] = []
    if own is not None:
        found.append((own, dirs[-1]))
    if hierarchical is not None:
        where = next(
            (
                d
                for d, v in zip(reversed(dirs), reversed(figures), strict=True)
                if v == hierarchical
            ),
            dirs[-1],
        )
        found.append((hierarchical, where))
    assert (limit.bytes, limit.path) == _expected_limit(found, physical), limit
    assert limit.reason


@FILES
@given(
    version=st.sampled_from([1, 2]),
    usage=st.integers(0, 2**63),
    inactive=st.one_of(st.none(), st.integers(0, 2**63)),
    noise=st.lists(st.sampled_from(["cache 5", "anon 7", "active_file 9", "x"]), max_size=3),
)
def test_working_set_is_usage_minus_inactive_file(
    version: int, usage: int, inactive: int | None, noise: list[str]
) -> None:
    usage_file = "memory.current" if version == 2 else "memory.usage_in_bytes"
    key = "inactive_file" if version == 2 else "total_inactive_file"
    stat = [*noise, *([] if inactive is None else [f"{key} {inactive}"])]
    files: dict[str, bytes | Odd] = {
        usage_file: f"{usage}\n".encode(),
        "memory.stat": "\n".join(stat).encode(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        (leaf,) = _levels(Path(tmp), [files])
        got = read_usage(Cgroup(version, str(leaf), str(leaf)))
    assert got.usage == usage
    if inactive is None:
        assert got.working_set is None and got.reason
    else:
        assert (got.working_set, got.reason) == (max(0, usage - inactive), "")


@FILES
@given(version=st.sampled_from([1, 2]), text=NUMBER_TEXT, newline=st.booleans())
def test_a_figure_is_a_plain_decimal_or_unknown(version: int, text: str, newline: bool) -> None:
    """int() alone would take "+5", " 1_000" and Arabic-Indic digits: the readers do not."""
    usage_file = "memory.current" if version == 2 else "memory.usage_in_bytes"
    files: dict[str, bytes | Odd] = {usage_file: (text + "\n" * newline).encode()}
    with tempfile.TemporaryDirectory() as tmp:
        (leaf,) = _levels(Path(tmp), [files])
        got = read_usage(Cgroup(version, str(leaf), str(leaf)))
    figure = text.strip()
    expected = int(figure) if figure.isascii() and figure.isdigit() else None
    assert got.usage == expected
    assert (got.reason == "") == (expected is not None and got.working_set is not None)


@FILES
@given(
    content=st.one_of(
        st.sampled_from([b"0\n", b"1\n", b" 1 ", b"0", b"2\n", b"", b"1 0", b"true", b"01"]),
        FILE,
    ),
    version=st.sampled_from([1, 2]),
)
def test_oom_group_is_one_or_zero(content: bytes | Odd, version: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (leaf,) = _levels(Path(tmp), [{"memory.oom.group": content}])
        group = read_oom_group(Cgroup(version, str(leaf), str(leaf)))
    expected: bool | None = None
    if version == 2 and isinstance(content, bytes):
        text = content.decode("utf-8", "surrogateescape").strip()
        expected = {"1": True, "0": False}.get(text)
    assert group is expected


MEMINFO_LINE = st.one_of(
    st.builds(
        "MemTotal:{}{}{}".format,
        st.sampled_from([" ", "       ", "\t", ""]),
        NUMBER_TEXT,
        st.sampled_from([" kB", "kB", " KB", ""]),
    ),
    st.text(max_size=30),
)


@FILES
@given(content=st.one_of(FILE, st.lists(MEMINFO_LINE, max_size=5).map("\n".join).map(str.encode)))
def test_physical_memory_is_whole_kib_or_a_reason(content: bytes | Odd) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "proc").mkdir()
        _put(Path(tmp) / "proc" / "meminfo", content)
        total, why = physical_memory(tmp)
    if total is None:
        assert why
    else:
        assert type(total) is int and total >= 0 and total % 1024 == 0 and why == ""


@FILES
@given(
    kib=st.integers(16 * 1024, 2**50),  # below 16 MiB: implausible, see test_adversarial_proc
    before=st.lists(st.text(max_size=20).filter(lambda s: "MemTotal:" not in s), max_size=3),
)
def test_physical_memory_reads_memtotal(kib: int, before: list[str]) -> None:
    text = "\n".join([*before, f"MemTotal:       {kib} kB", "MemFree:  1 kB"])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "proc").mkdir()
        (Path(tmp) / "proc" / "meminfo").write_text(text)
        assert physical_memory(tmp) == (kib * 1024, "")


# ---------------------------------------------------------------------------------------
# cgroups: /proc/self/cgroup and /proc/self/mountinfo

#: str.splitlines() breaks lines at these as well as at "\n"; mountinfo escapes only
#: space, tab, newline and backslash (see test_mountinfo_line_breaks_other_than_newline).
LINE_BREAKS = "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def _escape(field: str) -> str:
    """What the kernel writes for a path in mountinfo (seq_path's " \\t\\n\\\\")."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in field)


def _mount_line(
    root: str, mountpoint: str, optional: list[str], fstype: str, superoptions: str
) -> str:
    fields = ["36", "25", "0:30", _escape(root), _escape(mountpoint), "rw,nosuid", *optional]
    return " ".join([*fields, "-", fstype, "cgroup", superoptions])


PATH_TEXT = st.text(
    alphabet=st.characters(exclude_categories=("Cs",), exclude_characters=LINE_BREAKS),
    max_size=20,
)
OPTIONAL_FIELDS = st.lists(
    st.sampled_from(["shared:1", "master:7", "propagate_from:2", "unbindable"]), max_size=3
)
WORD = st.text(
    alphabet=st.characters(exclude_categories=("Cs", "Zs", "Cc", "Zl", "Zp")),
    min_size=1,
    max_size=10,
).filter(lambda s: s != "-")


@QUICK
@given(text=PATH_TEXT)
def test_mountinfo_unescape_undoes_the_kernels_escape(text: str) -> None:
    assert _unescape(_escape(text)) == text


@QUICK
@given(
    root=PATH_TEXT,
    mountpoint=PATH_TEXT,
    optional=OPTIONAL_FIELDS,
    fstype=WORD,
    superoptions=WORD,
    noise=st.lists(st.text(max_size=30).map(lambda s: s.replace(" ", "")), max_size=3),
)
def test_mountinfo_fields_round_trip(
    root: str,
    mountpoint: str,
    optional: list[str],
    fstype: str,
    superoptions: str,
    noise: list[str],
) -> None:
    """Whatever a path holds, its mount line gives it back; lines of fewer than ten fields
    are skipped."""
    text = "\n".join([*noise, _mount_line(root, mountpoint, optional, fstype, superoptions)])
    assert _parse_mountinfo(text) == [(root, mountpoint, fstype, superoptions)]


@QUICK
@given(text=st.text(max_size=300))
def test_mountinfo_never_raises(text: str) -> None:
    for mount in _parse_mountinfo(text):
        assert all(isinstance(field, str) for field in mount)


SEGMENT = st.sampled_from(["sys", "fs", "cgroup", "memory", "a", "b", "kubepods", "x y"])
ABSOLUTE = st.lists(st.one_of(SEGMENT, st.just(".")), max_size=4).map(lambda p: "/" + "/".join(p))
CGROUP_PATH = st.one_of(
    ABSOLUTE,
    st.lists(st.sampled_from(["a", "..", ".", ""]), max_size=4).map("/".join),
    st.text(max_size=10),
)
CGROUP_LINE = st.one_of(
    CGROUP_PATH.map(lambda p: "0::" + p),
    st.builds(
        "{}:{}:{}".format,
        st.integers(0, 12),
        st.sampled_from(["memory", "cpu,memory", "cpu,cpuacct", "", "name=systemd", "memory,"]),
        CGROUP_PATH,
    ),
    st.text(max_size=30),
)
MOUNT_LINE = st.one_of(
    st.builds(
        _mount_line,
        root=CGROUP_PATH,
        mountpoint=st.lists(SEGMENT, max_size=4).map(lambda p: "/" + "/".join(p)),
        optional=st.lists(st.sampled_from(["shared:1", "master:2", "-"]), max_size=2),
        fstype=st.sampled_from(["cgroup", "cgroup2", "tmpfs", "-"]),
        superoptions=st.sampled_from(["rw", "rw,memory", "rw,cpu,memory", "memory", ""]),
    ),
    st.text(max_size=60),
)


def _proc_file(line: st.SearchStrategy[str]) -> st.SearchStrategy[bytes | Odd]:
    return st.one_of(
        st.sampled_from(Odd),
        st.binary(max_size=60),
        st.lists(line, max_size=6).map("\n".join).map(str.encode),
    )


@FILES
@given(
    cgroup=_proc_file(CGROUP_LINE),
    mountinfo=_proc_file(MOUNT_LINE),
    made=st.lists(st.lists(SEGMENT, min_size=1, max_size=5), max_size=6),
    physical=st.one_of(st.none(), st.integers(1, 2**40)),
)
def test_find_memory_cgroup_answers_garbage_with_a_reason(
    cgroup: bytes | Odd, mountinfo: bytes | Odd, made: list[list[str]], physical: int | None
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        proc = root / "proc" / "self"
        proc.mkdir(parents=True)
        _put(proc / "cgroup", cgroup)
        _put(proc / "mountinfo", mountinfo)
        for parts in made:
            root.joinpath(*parts).mkdir(parents=True, exist_ok=True)
        found = find_memory_cgroup(tmp)
        assert isinstance(found, Found) and isinstance(found.reason, str) and found.reason
        if found.cgroup is None:
            return
        group = found.cgroup
        assert group.version in (1, 2)
        assert group.mount.startswith(tmp)
        assert _within(group.path, group), group  # the mount or below it
        assert group.path == group.mount or os.path.isdir(group.path)
        _check_readers(group, physical)


NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=8).filter(
    lambda s: s not in (".", "..")
)


@FILES
@given(
    parts=st.lists(NAME, max_size=4),
    exists=st.integers(0, 4),
    version=st.sampled_from([1, 2]),
    noise=st.lists(st.text(max_size=20).map(lambda s: s.replace(":", "").replace(" ", ""))),
)
def test_find_memory_cgroup_takes_the_nearest_existing_directory(
    parts: list[str], exists: int, version: int, noise: list[str]
) -> None:
    path = "/" + "/".join(parts)
    # noise only before the first record: after one, a line that does not start a record
    # is the rest of its path (a newline in a directory name; test_adversarial_proc.py)
    if version == 1:  # hybrid host: the v1 memory line wins over 0::
        lines = [*noise, f"7:cpu,memory:{path}", "0::/elsewhere"]
        mount = _mount_line("/", "/sys/fs/cgroup/memory", [], "cgroup", "rw,memory")
    else:
        lines = [*noise, f"0::{path}"]
        mount = _mount_line("/", "/sys/fs/cgroup", ["shared:4"], "cgroup2", "rw")
    with tempfile.TemporaryDirectory() as tmp:
        proc = Path(tmp) / "proc" / "self"
        proc.mkdir(parents=True)
        (proc / "cgroup").write_text("\n".join(lines) + "\n")
        (proc / "mountinfo").write_text("\n".join([*noise, mount]) + "\n")
        mount_dir = Path(tmp, "sys/fs/cgroup", *(["memory"] if version == 1 else []))
        leaf = mount_dir.joinpath(*parts[:exists])
        leaf.mkdir(parents=True)
        found = find_memory_cgroup(tmp)
    assert found.cgroup == Cgroup(version, str(leaf), str(mount_dir)), found


# ---------------------------------------------------------------------------------------
# sizes


@QUICK
@given(
    text=st.one_of(
        st.text(max_size=40),
        st.from_regex(r"\s?[0-9. ]{0,8}[kKmMgGtTiIbB ]{0,4}\s?", fullmatch=True),
    )
)
def test_parse_size_is_a_positive_int_or_a_value_error(text: str) -> None:
    # max_size 40 keeps clear of test_parse_size_overflows (300 digits and more)
    try:
        size = parse_size(text)
    except ValueError:
        return
    assert type(size) is int and size > 0


SPELLINGS = [
    "{}",
    "{}B",
    "{}b",
    "{}iB",
    "{}ib",
    "{} ",  # one space before the unit
]


@QUICK
@given(
    n=st.integers(1, 2**53),
    k=st.integers(0, 4),
    spelling=st.sampled_from(SPELLINGS),
    space=st.booleans(),
    lower=st.booleans(),
)
def test_parse_size_round_trips_whole_numbers(
    n: int, k: int, spelling: str, space: bool, lower: bool
) -> None:
    unit = UNITS[k].lower() if lower else UNITS[k]
    text = f"{n}{' ' if space else ''}{spelling.format(unit)}"
    if k == 0 and text.strip() != str(n):  # "512B", "512iB": a bare B is refused
        with pytest.raises(ValueError):
            parse_size(text)
        return
    if n * 1024**k > MAX_SIZE:  # beyond any machine: refused, never an overflow
        with pytest.raises(ValueError):
            parse_size(text)
        return
    assert parse_size(text) == n * 1024**k, text


@QUICK
@given(
    whole=st.integers(0, 9999),
    decimals=st.text(alphabet="0123456789", min_size=1, max_size=3),
    k=st.integers(0, 4),
)
def test_parse_size_rounds_fractions_down(whole: int, decimals: str, k: int) -> None:
    text = f"{whole}.{decimals}{UNITS[k]}"
    exact = Fraction(f"{whole}.{decimals}") * 1024**k
    if k == 0 or exact < 1:  # fractional bytes, or nothing left after rounding
        with pytest.raises(ValueError):
            parse_size(text)
    elif exact < 2**44:
        assert parse_size(text) == math.floor(exact), text
    else:  # a float carries 53 bits: 4096.1T is 4503709578533274, one byte over
        assert abs(parse_size(text) - exact) < 1, text


@QUICK
@given(text=st.one_of(st.text(max_size=40), st.from_regex(r"\s?[0-9.%]{0,8}\s?", fullmatch=True)))
def test_parse_fraction_is_in_zero_one_or_a_value_error(text: str) -> None:
    try:
        value = parse_fraction(text)
    except ValueError:
        return
    assert type(value) is float and 0 <= value < 1


@QUICK
@given(whole=st.integers(0, 200), decimals=st.text(alphabet="0123456789", max_size=3))
def test_parse_fraction_round_trips_percentages(whole: int, decimals: str) -> None:
    number = f"{whole}.{decimals}" if decimals else str(whole)
    if Fraction(number) >= 100:
        with pytest.raises(ValueError):
            parse_fraction(number + "%")
    else:
        assert parse_fraction(number + "%") == float(number) / 100
    fraction = f"0.{decimals}" if decimals else f"{whole}"
    if Fraction(fraction) >= 1:
        with pytest.raises(ValueError):
            parse_fraction(fraction)
    else:
        assert parse_fraction(fraction) == float(fraction)


@QUICK
@given(n=st.integers(0, 2**40), extra=st.integers(0, MIB - 1))
def test_mib_prints_one_decimal(n: int, extra: int) -> None:
    assert mib(n * MIB) == n
    exact = (n * MIB + extra) / MIB
    assert abs(mib(n * MIB + extra) - exact) <= 0.05 + 2 * math.ulp(exact)


# ---------------------------------------------------------------------------------------
# config

#: Values each option accepts, to reach the later options and the water-mark check.
GOOD: dict[str, list[str]] = {
    "mode": ["scale", "refuse", "warn", "off", " WARN "],
    "memory_limit": ["auto", "512M", "1GiB", "536870912", "1.5G"],
    "headroom": ["10%", "0.1", "0", "0%", "50%"],
    "child_memory": ["auto", "100M", "64MiB"],
    "min_concurrency": ["1", "4", "16"],
    "log_format": ["text", "json", "JSON"],
    "child_log": ["growth", "all", "off"],
    "child_log_step": ["16M", "1M", "4096"],
    "sample_interval": ["10", "2.5", "10s"],
    "summary_interval": ["300", "60s"],
    "state_file": ["", "/tmp/state.json"],
    "child_oom_score_adj": ["off", "500", "-1000", "+1000", "0"],
    "gc_freeze": ["1", "0", "true", "no", "ON"],
    "max_worker_memory": ["", "2G"],
    "brake": ["1", "0", "yes", "off"],
    "governor": ["on", "observe", "off", " Observe "],
    "recycle": ["1", "0", "no"],
    "min_tasks_per_child": ["1", "4", "10"],
    "max_memory_kills": ["1", "3"],
    "task_memory_limit": ["", "512M"],
    "task_soft_memory_limit": ["", "256M"],
    "brake_interval": ["0.25", "1", "2s"],
    "low_water": ["70%", "80%", "0.85", "90%"],
    "high_water": ["80%", "90%", "0.95", "85%"],
    "hard_water": ["90%", "97%", "0.99", "95%"],
    "metrics_port": ["", "0", "9100", "65535"],
    "metrics_address": ["127.0.0.1", "::", "0.0.0.0"],
}
#: Text any option might be given (max 40 characters: see test_size_overflow_in_settings).
ANY_TEXT = st.one_of(
    st.sampled_from(sorted({v for values in GOOD.values() for v in values})),
    st.sampled_from(["-1", "1001", "65536", "100%", "1", "a b", "0s", "auto", "\u0663", "1_0"]),
    st.text(max_size=40),
)
WATER_ORDER = "CELERY_GUARD_LOW_WATER < CELERY_GUARD_HIGH_WATER < CELERY_GUARD_HARD_WATER"
BY_VARIABLE = {option.variable: option for option in OPTIONS}


def _mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` nineteen times in twenty: a garbled value stops load_settings, so the later
    options and the water-mark check are only reached when most values parse."""
    return st.tuples(st.integers(0, 19), good, bad).map(lambda t: t[2] if t[0] == 0 else t[1])


def _value(option: Option) -> st.SearchStrategy[str]:
    """Mostly accepted values, sometimes anything."""
    return _mostly(st.sampled_from([option.default, *GOOD[option.name]]), ANY_TEXT)


def _given(
    option: Option, env: Mapping[str, str], conf: Mapping[str, Any], options: Mapping[str, Any]
) -> tuple[Any, str]:
    """The value load_settings must use, and where it comes from."""
    for raw, source in (
        (options.get(option.name), "option"),
        (env.get(option.variable), "env"),
        (conf.get(option.setting), "config"),
    ):
        if raw is not None:
            return raw, source
    return option.default, "default"


def test_every_option_has_good_values() -> None:
    assert set(GOOD) == {option.name for option in OPTIONS}


def _examples(accepted: str) -> list[str]:
    """The values an ``accepted`` text shows: "a | b" choices, and "(x, y, z)" examples."""
    if " | " in accepted:
        return accepted.split(" | ")
    found = re.findall(r"\(([^)]*)\)", accepted)
    return [word for group in found for part in group.split(", ") for word in part.split("/")]


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.name)
def test_the_examples_an_error_shows_are_accepted(option: Option) -> None:
    """A ConfigError prints ``accepted``: every example it shows must parse."""
    for example in _examples(option.accepted):
        option.parse(example)


@QUICK
@given(
    option=st.sampled_from(OPTIONS),
    text=ANY_TEXT,
    source=st.sampled_from(["option", "env", "config"]),
)
def test_one_value_names_its_own_variable(option: Option, text: str, source: str) -> None:
    """Everything else left to its default: the value parses, or the ConfigError names
    its variable (a water mark may also break the order, which names the high mark)."""
    given_as = {"option": option.name, "env": option.variable, "config": option.setting}
    where = {name: {} for name in given_as}
    where[source] = {given_as[source]: text}
    refused = object()
    try:
        parsed = option.parse(text)
    except ValueError:
        parsed = refused
    try:
        result = load_settings(where["env"], where["config"], where["option"])
    except ConfigError as error:
        if error.accepted == WATER_ORDER:
            assert option.name.endswith("_water") and parsed is not refused
            assert error.variable == "CELERY_GUARD_HIGH_WATER"
        else:
            assert parsed is refused
            assert (error.variable, error.accepted) == (option.variable, option.accepted)
            assert (error.value, error.source) == (text, source)
            assert error.flag == (option.flag if source == "option" else "")
        return
    assert getattr(result, option.name) == parsed
    assert result.source(option.name) == source


#: The water marks alone, each from one source or none: the combination check.
MARK = st.sampled_from(["55%", "50%", "70%", "80%", "0.8", "85%", "90%", "0.9", "97%", "99.5%"])


@QUICK
@given(
    marks=st.fixed_dictionaries(
        {},
        optional={
            name: st.tuples(st.sampled_from(["option", "env", "config"]), MARK)
            for name in ("low_water", "high_water", "hard_water")
        },
    )
)
def test_water_marks_out_of_order_name_the_high_water_mark(
    marks: dict[str, tuple[str, str]],
) -> None:
    by_name = {option.name: option for option in OPTIONS}
    options = {name: text for name, (where, text) in marks.items() if where == "option"}
    env = {by_name[n].variable: text for n, (where, text) in marks.items() if where == "env"}
    conf = {by_name[n].setting: text for n, (where, text) in marks.items() if where == "config"}
    low, high, hard = (
        parse_fraction(marks.get(name, ("default", by_name[name].default))[1])
        for name in ("low_water", "high_water", "hard_water")
    )
    if low < high < hard:
        assert load_settings(env, conf, options).high_water == high
        return
    with pytest.raises(ConfigError) as raised:
        load_settings(env, conf, options)
    error = raised.value
    assert (error.variable, error.setting) == ("CELERY_GUARD_HIGH_WATER", "guard_high_water")
    assert error.accepted == WATER_ORDER
    assert error.value == f"{low}/{high}/{hard}"
    assert error.source == marks.get("high_water", ("default", ""))[0]


@QUICK
@given(
    env=st.fixed_dictionaries(
        {"CELERY_GUARD_UNKNOWN": ANY_TEXT},
        optional={option.variable: _value(option) for option in OPTIONS},
    ),
    conf=st.fixed_dictionaries(
        {},
        optional={
            option.setting: _mostly(
                _value(option),
                st.one_of(
                    st.none(),
                    st.booleans(),
                    st.integers(-2000, 2**40),
                    st.floats(allow_nan=True, allow_infinity=True),
                ),
            )
            for option in OPTIONS
        },
    ),
    options=st.fixed_dictionaries(
        {}, optional={option.name: st.one_of(st.none(), _value(option)) for option in OPTIONS}
    ),
)
def test_load_settings_raises_only_config_errors_that_name_the_variable(
    env: dict[str, str], conf: dict[str, Any], options: dict[str, Any]
) -> None:
    try:
        result = load_settings(env, conf, options)
    except ConfigError as error:
        event(f"ConfigError {error.variable}")
        assert error.variable in BY_VARIABLE, error.variable
        option = BY_VARIABLE[error.variable]
        assert error.setting == option.setting
        assert error.variable in str(error)
        if error.accepted == WATER_ORDER:
            assert error.variable == "CELERY_GUARD_HIGH_WATER"
            return
        assert error.accepted == option.accepted
        raw, source = _given(option, env, conf, options)
        assert error.source == source
        assert error.flag == (option.flag if source == "option" else "")
        if isinstance(raw, str):
            assert error.value == raw
        with pytest.raises(ValueError):
            option.parse(error.value)
        # ... and it is the first option that does not parse
        for before in OPTIONS[: OPTIONS.index(option)]:
            raw, _ = _given(before, env, conf, options)
            if isinstance(raw, str):
                before.parse(raw)
        return
    event("settings")
    assert isinstance(result, Settings)
    assert result.low_water < result.high_water < result.hard_water
    for option in OPTIONS:
        raw, source = _given(option, env, conf, options)
        assert result.source(option.name) == source
        if isinstance(raw, str):
            assert getattr(result, option.name) == option.parse(raw)


# ---------------------------------------------------------------------------------------
# logline

#: logfmt keys: no space, no "=", no quote (the format does not quote keys).
KEY = st.text(
    alphabet=st.characters(exclude_categories=("Cs",), exclude_characters=' ="'),
    min_size=1,
    max_size=12,
).filter(lambda key: key != "event")
VALUE = st.one_of(
    st.text(),
    st.text(alphabet=' "=\\\t\nab'),
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
)


def _as_logged(value: Any) -> str:
    """What parse_line gives back for a logged value: logfmt carries text only."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@QUICK
@given(name=st.text(), fields=st.dictionaries(KEY, VALUE, max_size=6))
def test_logfmt_round_trip(name: str, fields: dict[str, Any]) -> None:
    line = format_event(name, fields)
    assert line.startswith(PREFIX)
    # values are escaped (keys are the code's own: not escaped, and not checked here)
    assert line.count("\n") == sum(key.count("\n") for key in fields)
    expected = {"event": name, **{key: _as_logged(value) for key, value in fields.items()}}
    assert parse_line(line) == expected
    assert parse_line("[2026-11-21 06:04:14,279: WARNING/MainProcess] " + line + "\r\n") == expected


@QUICK
@given(name=st.text(), fields=st.dictionaries(KEY, VALUE, max_size=6), cut=st.integers(0))
def test_logfmt_line_cut_short_keeps_the_whole_fields(
    name: str, fields: dict[str, Any], cut: int
) -> None:
    """A log cut by an OOM kill ends mid-line: the fields before the cut survive."""
    line = format_event(name, fields)
    cut = len(PREFIX) + cut % (len(line) - len(PREFIX) + 1)
    parsed = parse_line(line[:cut])
    end = len(PREFIX)
    for key, value in {"event": name, **fields}.items():
        end += len(f"{key}={_logfmt_value(value)}")
        if end > cut:
            break
        assert parsed[key] == _as_logged(value)
        end += 1


JSON_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
)


@QUICK
@given(name=st.text(), fields=st.dictionaries(st.text(), JSON_VALUE, max_size=6))
def test_json_lines_carry_the_values(name: str, fields: dict[str, Any]) -> None:
    fields.pop("event", None)
    line = format_event(name, fields, "json")
    assert "\n" not in line
    assert json.loads(line) == {"event": name, **fields}


@QUICK
@given(text=st.one_of(st.text(max_size=200), st.text(max_size=200).map(lambda s: PREFIX + s)))
def test_parse_line_never_raises(text: str) -> None:
    fields = parse_line(text)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items())
    if PREFIX not in text:
        assert fields == {}


# ---------------------------------------------------------------------------------------
# logreader

EVENT = st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True)
JSON_ANY = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8)
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
NUMBERISH = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["", "true", "false", "1.", ".5", "-", "1e3", "\u0663\u0664", "0.0"]),
    st.text(max_size=10),
)
#: Bytes read from a log as `celery-guard recommend` reads them.
DECODED = st.binary(max_size=200).map(lambda b: b.decode("utf-8", "replace"))
CHILD_LINE = st.builds(
    "celery-guard event={} task={} peak_rss_mib={} delta_mib={} worker={}".format,
    st.sampled_from(["child", "summary", "recycle", "startup", "x"]),
    st.sampled_from(["t1", '"a b"', "", "42"]),
    NUMBERISH,
    NUMBERISH,
    st.sampled_from(["w1", "w2", "", '"w 3"']),
)
LOG_LINE = st.one_of(
    st.text(max_size=200),
    st.text(max_size=200).map(lambda s: PREFIX + s),
    st.text(max_size=200).map(lambda s: "[2026-11-21 06:04:14,279: INFO/MainProcess] " + s),
    st.text(max_size=200).map(lambda s: "{" + s),
    st.text(max_size=200).map(lambda s: 'worker: {"event":' + s),
    st.builds(
        lambda name, rest: json.dumps({"event": name, **rest}),
        st.one_of(EVENT, JSON_ANY),
        st.dictionaries(st.text(max_size=8), JSON_ANY, max_size=4),
    ),
    JSON_ANY.map(json.dumps),
    CHILD_LINE,
    CHILD_LINE.map(lambda s: "\x1b[33m" + s + "\x1b[0m\n"),
)


@QUICK
@given(line=LOG_LINE)
def test_parse_record_never_raises(line: str) -> None:
    record = parse_record(line)
    if record is not None:
        assert isinstance(record, dict)
        assert re.fullmatch(r"[a-z][a-z0-9_]*", record["event"])
        assert "" not in record.values()


@QUICK
@given(data=st.one_of(st.binary(max_size=60), st.none(), st.integers(), st.lists(st.text())))
def test_parse_record_skips_what_is_not_text(data: Any) -> None:
    assert parse_record(data) is None


@QUICK
@given(lines=st.lists(st.one_of(LOG_LINE, DECODED), max_size=12))
def test_report_never_raises_and_counts_every_record(lines: list[str]) -> None:
    records = list(read_records(lines))
    report = build_report(records)
    assert report.records == len(records) == sum(report.events.values())
    children = [r for r in records if r["event"] == "child"]
    assert report.peaks.count == sum(number(r.get("peak_rss_mib")) is not None for r in children)
    rows = report.task_rows()
    assert all(row.events > 0 and row.total_mib > 0 and row.max_mib > 0 for row in rows)
    assert [(-r.total_mib, r.task) for r in rows] == sorted((-r.total_mib, r.task) for r in rows)
    # ... and the report renders
    assert cli.render(report)


def _not_a_number(text: str) -> bool:
    return not re.fullmatch(r"-?\d+(\.\d+)?", text) and text not in ("true", "false")


#: Keys as the worker writes them (keys are not escaped: see KEY for what parse_line takes),
#: other than the names and figures the reader checks (test_adversarial_log_reader.py).
IDENTIFIER = st.from_regex(r"[a-z_][a-z0-9_]{0,11}", fullmatch=True).filter(
    lambda key: key not in TEXT_KEYS and key not in COUNT_KEYS and not key.endswith("_mib")
)
TEXT_KEY = st.sampled_from(sorted(TEXT_KEYS - {"event"} - NAME_KEYS))
NAME = st.text(min_size=1, max_size=MAX_NAME).filter(str.isprintable)
#: Values a non-text key has in both forms: numbers printed as mib() prints them, flags,
#: nothing, and text that does not look like a number (logfmt cannot tell "42" from 42).
OTHER_VALUE = st.one_of(
    st.integers(-(2**63), 2**63),
    st.floats(-1e12, 1e12).map(lambda x: round(x, 1)),
    st.booleans(),
    st.none(),
    st.text().filter(_not_a_number),
)


@QUICK
@given(
    name=EVENT.filter(lambda name: name not in MAIN_PROCESS_EVENTS),
    text_fields=st.dictionaries(TEXT_KEY, st.one_of(st.text(), st.none()), max_size=4),
    name_fields=st.dictionaries(st.sampled_from(sorted(NAME_KEYS)), NAME, max_size=2),
    other_fields=st.dictionaries(IDENTIFIER, OTHER_VALUE, max_size=5),
    prefix=st.sampled_from(["", "[2026-11-21 06:04:14,279: INFO/ForkPoolWorker-1] "]),
)
def test_text_and_json_lines_read_back_alike(
    name: str,
    text_fields: dict[str, Any],
    name_fields: dict[str, str],
    other_fields: dict[str, Any],
    prefix: str,
) -> None:
    fields = {**text_fields, **name_fields, **other_fields}
    text = parse_record(prefix + format_event(name, fields) + "\n")
    from_json = parse_record(prefix + format_event(name, fields, "json") + "\n")
    assert text == from_json
    assert text == {"event": name, **{k: None if v == "" else v for k, v in fields.items()}}


# ---------------------------------------------------------------------------------------
# footprint

KIB_NAME = st.text(
    alphabet=st.characters(exclude_categories=("Cs", "Cc", "Zl", "Zp"), exclude_characters=":"),
    min_size=1,
    max_size=12,
).filter(str.strip)


@QUICK
@given(
    rows=st.lists(
        st.tuples(
            KIB_NAME,
            st.sampled_from([" ", "\t", "       "]),
            st.one_of(
                st.integers(0, 2**50).map(str),
                st.sampled_from(["\u0661\u0662", "\u00b2", "+5", "-1", "1_000", "0x10", "1.5"]),
            ),
        ),
        max_size=8,
    ),
    noise=st.lists(st.text(max_size=30).filter(lambda s: "kB" not in s), max_size=4),
)
def test_kib_fields_round_trip(rows: list[tuple[str, str, str]], noise: list[str]) -> None:
    """Plain decimals only (int() alone would take "+5" and Arabic-Indic digits)."""
    lines = [f"{name}:{pad}{n} kB" for name, pad, n in rows]
    expected = {name.strip(): int(n) * 1024 for name, _, n in rows if n.isascii() and n.isdigit()}
    assert parse_kib_fields("\n".join(noise + lines)) == expected


@QUICK
@given(text=st.one_of(st.text(max_size=200), DECODED))
def test_kib_fields_never_raise(text: str) -> None:
    fields = parse_kib_fields(text)
    assert all(type(v) is int and v >= 0 and v % 1024 == 0 for v in fields.values())


@QUICK
@given(
    n=st.integers(0, 2**63),
    commas=st.booleans(),
    pad=st.sampled_from([b" ", b"            ", b"\t"]),
    before=st.lists(st.binary(max_size=40).filter(lambda b: b"allocated" not in b), max_size=4),
    after=st.lists(st.binary(max_size=40), max_size=4),
)
def test_pymalloc_stats_round_trip(
    n: int, commas: bool, pad: bytes, before: list[bytes], after: list[bytes]
) -> None:
    figure = f"{n:,}" if commas else str(n)
    line = b"# bytes in allocated blocks" + pad + b"=" + pad + figure.encode()
    assert parse_pymalloc_stats(b"\n".join([*before, line, *after])) == n


@QUICK
@given(
    data=st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=100).map(lambda b: b"# bytes in allocated blocks = " + b),
    )
)
def test_pymalloc_stats_never_raise(data: bytes) -> None:
    live = parse_pymalloc_stats(data)
    assert live is None or (type(live) is int and live >= 0)


KIB_TEXT = st.lists(
    st.one_of(
        st.builds(
            "{}:\t{} kB".format,
            st.sampled_from(["Rss", "Anonymous", "VmRSS", "RssAnon", "VmPTE"]),
            NUMBER_TEXT,
        ),
        st.text(max_size=20),
    ),
    max_size=6,
).map(lambda lines: "\n".join(lines).encode())


@FILES
@given(
    status=st.one_of(FILE, KIB_TEXT),
    rollup=st.one_of(FILE, KIB_TEXT),
    allocators=st.one_of(
        st.none(),
        st.builds(
            Allocators,
            st.one_of(st.none(), st.integers(0, 2**40)),
            st.one_of(st.none(), st.integers(0, 2**40)),
            st.integers(0, 2**40),
            st.integers(0, 2**20),
        ),
    ),
    forked=st.booleans(),
)
def test_footprint_of_a_garbled_proc_directory(
    status: bytes | Odd, rollup: bytes | Odd, allocators: Allocators | None, forked: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _put(Path(tmp) / "status", status)
        _put(Path(tmp) / "smaps_rollup", rollup)
        footprint = measure(tmp, allocators)
    assert isinstance(footprint, Footprint)
    assert min(footprint.rss, footprint.anonymous, footprint.page_tables) >= 0
    estimate = estimate_child(footprint, forked)
    assert type(estimate.bytes) is int and estimate.bytes >= 0
    assert estimate.method in ("objects", "anonymous", "spawn")


# ---------------------------------------------------------------------------------------
# stats

LAYOUT = st.one_of(
    st.just((1.0, 1.01, 1200)),  # peak_histogram()
    st.just((1024.0 * 1024, 1.05, 600)),  # the default
    st.just((1.0, 2.0, 64)),  # every bound a power of two: samples land on them
    st.tuples(st.floats(0.5, 4096), st.floats(1.001, 3.0), st.integers(1, 600)),
)
SAMPLES = st.lists(  # no int past 1.8e308: see test_histogram_huge_ints
    st.one_of(st.integers(0, 2**40), st.integers(0, 40).map(lambda k: 2**k)),
    min_size=1,
    max_size=60,
)


def _histogram(layout: tuple[float, float, int], samples: list[int]) -> ExpHistogram:
    hist = ExpHistogram(*layout)
    for value in samples:
        hist.add(value)
    return hist


@QUICK
@given(layout=LAYOUT, samples=SAMPLES)
def test_every_sample_falls_inside_its_bucket(
    layout: tuple[float, float, int], samples: list[int]
) -> None:
    hist = ExpHistogram(*layout)
    indexes = [hist.bucket(value) for value in sorted(samples)]
    assert indexes == sorted(indexes)
    for value, index in zip(sorted(samples), indexes, strict=True):
        assert 0 <= index < hist.max_buckets
        assert hist.lower(index) <= value < hist.upper(index)


@QUICK
@given(layout=LAYOUT, samples=SAMPLES, ps=st.lists(st.integers(0, 100), min_size=1, max_size=5))
def test_percentiles_are_the_upper_bound_of_the_nearest_rank_bucket(
    layout: tuple[float, float, int], samples: list[int], ps: list[int]
) -> None:
    hist = _histogram(layout, samples)
    ordered = sorted(samples)
    assert (hist.count, hist.min, hist.max) == (len(samples), ordered[0], ordered[-1])
    for p in ps:
        rank = max(1, math.ceil(Fraction(len(samples) * p, 100)))
        nearest = ordered[rank - 1]
        expected = min(hist.upper(hist.bucket(nearest)), ordered[-1])
        assert hist.percentile(p) == expected, (p, nearest)
        assert nearest <= hist.percentile(p) <= ordered[-1]  # the safe side
    p50, p95, p100 = (hist.percentile(p) for p in (50, 95, 100))
    assert p50 is not None and p95 is not None
    assert ordered[0] <= p50 <= p95 <= p100 == ordered[-1]


@QUICK
@given(layout=LAYOUT, first=SAMPLES, second=SAMPLES)
def test_merge_is_adding_every_sample_and_json_round_trips(
    layout: tuple[float, float, int], first: list[int], second: list[int]
) -> None:
    merged = _histogram(layout, first)
    merged.merge(_histogram(layout, second))
    assert merged.to_dict() == _histogram(layout, first + second).to_dict()
    back = ExpHistogram.from_dict(json.loads(json.dumps(merged.to_dict())))
    assert back.to_dict() == merged.to_dict()


#: A summary figure, never so small that a budget divided by it passes 1.8e308.
FIGURE = st.one_of(st.just(0.0), st.floats(-1e12, -1e-6), st.floats(1e-6, 1e12))
FINITE = st.one_of(st.integers(-5, 2**40), st.floats(allow_nan=True, allow_infinity=True))


@QUICK
@given(
    data=st.one_of(
        JSON_ANY,
        st.fixed_dictionaries(
            {
                "first": _mostly(st.floats(0.5, 100), FINITE),
                # a whole ratio above 1 is test_histogram_huge_ints (and may never return)
                "ratio": _mostly(st.floats(1.01, 3.0), st.one_of(st.integers(-5, 1), st.floats())),
                "max_buckets": _mostly(st.integers(1, 60), JSON_ANY),
                "count": st.one_of(st.integers(0, 5), FINITE),
                "min": st.one_of(st.none(), st.integers(0, 100), FINITE),
                "max": st.one_of(st.none(), st.integers(0, 100), FINITE),
                "buckets": _mostly(
                    st.lists(
                        st.tuples(
                            _mostly(st.integers(0, 60), JSON_ANY),
                            _mostly(st.integers(1, 2), FINITE),
                        ).map(list),
                        max_size=4,
                    ),
                    st.one_of(
                        JSON_ANY,
                        st.lists(st.lists(st.integers(-1, 60), max_size=3), max_size=3),
                    ),
                ),
            }
        ),
    )
)
def test_from_dict_raises_only_value_error(data: Any) -> None:
    try:
        hist = ExpHistogram.from_dict(data)
    except ValueError:
        return
    assert ExpHistogram.from_dict(hist.to_dict()).to_dict() == hist.to_dict()


MIB_SAMPLES = st.lists(st.integers(0, 10**6), max_size=30)


@QUICK
@given(
    limit=st.floats(0, 1e6),
    headroom=st.floats(0, 1e5),
    parent=st.floats(0, 1e5),
    concurrency=st.integers(-2, 64),
    private=MIB_SAMPLES,
    peaks=MIB_SAMPLES,
    margin=st.floats(0, 1),
)
def test_recommend_from_histograms(
    limit: float,
    headroom: float,
    parent: float,
    concurrency: int,
    private: list[int],
    peaks: list[int],
    margin: float,
) -> None:
    private_hist = _histogram((1.0, 1.01, 1200), private)
    peak_hist = peak_histogram()
    for value in peaks:
        peak_hist.add(value)
    p50, p95 = private_hist.percentile(50), private_hist.percentile(95)
    peak50, peak95 = peak_hist.percentile(50), peak_hist.percentile(95)
    advice = recommend(
        limit_mib=limit,
        headroom_mib=headroom,
        parent_rss_mib=parent,
        concurrency=concurrency,
        private_p50_mib=p50,
        private_p95_mib=p95,
        peak_rss_p50_mib=peak50,
        peak_rss_p95_mib=peak95,
        margin=margin,
    )
    assert isinstance(advice, Recommendation) and isinstance(advice.note, str)
    budget = limit - headroom - parent
    if budget <= 0:
        assert (advice.max_memory_per_child_kib, advice.concurrency) == (None, 1)
        return
    if p95 is None or p95 <= 0:
        assert advice.concurrency is None
    else:
        assert advice.concurrency == max(1, math.floor(budget / p95))
    if p50 is None or peak50 is None or peak95 is None:
        assert advice.max_memory_per_child_kib is None and advice.note == ""
        return
    kib = advice.max_memory_per_child_kib
    healthy = math.floor(round(peak95 * (1 + margin) * 1024, 6))
    assert type(kib) is int and 0 <= kib <= healthy  # never above the healthy peaks
    if advice.note == "":
        assert kib == healthy


@QUICK
@given(
    figures=st.lists(st.floats(-1e12, 1e12), min_size=3, max_size=3),
    concurrency=st.integers(-(10**6), 10**6),
    percentiles=st.lists(st.one_of(st.none(), FIGURE), min_size=4, max_size=4),
    margin=st.floats(0, 10),
)
def test_recommend_never_raises(
    figures: list[float], concurrency: int, percentiles: list[float | None], margin: float
) -> None:
    # bounded, and no tiny percentile: both overflow, see test_recommend_overflows
    advice = recommend(
        limit_mib=figures[0],
        headroom_mib=figures[1],
        parent_rss_mib=figures[2],
        concurrency=concurrency,
        private_p50_mib=percentiles[0],
        private_p95_mib=percentiles[1],
        peak_rss_p50_mib=percentiles[2],
        peak_rss_p95_mib=percentiles[3],
        margin=margin,
    )
    assert advice.concurrency is None or advice.concurrency >= 1
    kib = advice.max_memory_per_child_kib
    assert kib is None or type(kib) is int


# ---------------------------------------------------------------------------------------
# regressions: the smallest inputs of the bugs the properties above found, now fixed;
# each docstring says what the code did before


@pytest.mark.parametrize("text", ["2" + "0" * 308, "2" + "0" * 296 + "T"])
def test_parse_size_overflows(text: str) -> None:
    """sizes.py parse_size: ``int(float(number) * unit)`` is int(inf) past 1.8e308 bytes."""
    with pytest.raises(ValueError):
        parse_size(text)


def test_size_overflow_in_settings() -> None:
    """config.py load_settings catches ValueError only: the worker dies with a traceback
    instead of the one-line ConfigError."""
    with pytest.raises(ConfigError):
        load_settings({"CELERY_GUARD_MEMORY_LIMIT": "2" + "0" * 308}, {})


@pytest.mark.parametrize(("text", "size"), [("9007199254740993", 2**53 + 1)])
def test_parse_size_keeps_every_digit(text: str, size: int) -> None:
    """sizes.py parse_size goes through float: whole byte counts above 2**53 lose digits."""
    assert parse_size(text) == size


def test_log_line_with_a_long_number() -> None:
    """logreader.py _convert: int() refuses more than 4300 digits (Python >= 3.11), and
    parse_record lets the ValueError out instead of skipping the line."""
    assert parse_record("celery-guard event=x n=" + "1" * 4301) is None


@pytest.mark.parametrize(
    "line",
    [
        "celery-guard event=child peak_rss_mib=" + "1" * 310,
        '{"event":"child","peak_rss_mib":' + "1" * 310 + "}",
    ],
)
def test_log_line_with_an_int_too_large_for_a_float(line: str) -> None:
    """logreader.py number(): math.isfinite(int) raises OverflowError past 1.8e308, so
    `celery-guard recommend` crashes on the line instead of skipping the figure."""
    build_report(read_records([line]))


SUMMARY = {
    "event": "summary",
    "worker": "w",
    "limit_mib": 1000.0,
    "headroom_mib": 0,
    "parent_rss_mib": 0,
    "concurrency": 1,
    "private_p50_mib": 1,
    "private_p95_mib": 1,
    "peak_rss_p50_mib": 1,
    "peak_rss_p95_mib": 1,
}


@pytest.mark.parametrize(
    "figures",
    [
        {"limit_mib": 1e308, "peak_rss_p95_mib": 1e306},  # _kib(healthy): 1e306 * 1024
        {"private_p95_mib": 1e-310},  # children: floor(budget / 1e-310)
    ],
)
def test_recommend_overflows(figures: dict[str, float]) -> None:
    """stats.py recommend: finite figures make math.floor(inf), in _kib when the KiB pass
    1.8e308 and in the children count when the private p95 is tiny; `celery-guard
    recommend` reaches both from one summary line."""
    line = json.dumps({**SUMMARY, **figures})
    status = cli.main(["recommend"], stdin=io.StringIO(line + "\n"), stdout=io.StringIO())
    # a limit of 1e308 MiB is beyond any machine: the reader now refuses the line itself
    assert status == (cli.NO_RECORDS if figures.get("limit_mib") == 1e308 else cli.OK)


EMPTY = {"count": 0, "min": None, "max": None, "buckets": []}


@pytest.mark.parametrize(
    "build",
    [
        lambda: ExpHistogram().add(10**309),  # _finite(value)
        lambda: ExpHistogram.from_dict({"first": 10**309, "ratio": 1.5, "max_buckets": 3, **EMPTY}),
        # whole first and ratio: first * ratio ** (max_buckets - 1) is exact int arithmetic
        lambda: ExpHistogram.from_dict({"first": 1, "ratio": 2, "max_buckets": 1025, **EMPTY}),
        lambda: ExpHistogram(1, 2, 2**40),  # the exact power never finished
    ],
    ids=["add", "from_dict-first", "from_dict-int-ratio", "int-ratio-huge-buckets"],
)
def test_histogram_huge_ints(build: Callable[[], object]) -> None:
    """stats.py: math.isfinite() of an int past 1.8e308 raises OverflowError, not the
    ValueError that add and from_dict promise for a number they cannot take (_finite, and
    ExpHistogram.__init__ on ``last``). With a whole ratio and a huge max_buckets
    (ratio 2, max_buckets 2**40) the exact integer power did not even finish."""
    with pytest.raises(ValueError):
        build()


@pytest.mark.parametrize("char", ["\r", "\x0b", "\x85", "\u2028"])
def test_mountinfo_line_breaks_other_than_newline(char: str) -> None:
    """cgroups.py _parse_mountinfo (and find_memory_cgroup on /proc/self/cgroup) split
    with str.splitlines(), which also breaks at \\r, \\v, \\f, \\x1c-\\x1e, \\x85, U+2028
    and U+2029. The kernel escapes only space, tab, newline and backslash, so a mount
    point or cgroup named with one of them is lost or cut."""
    line = _mount_line("/", f"/sys/fs/cgroup/a{char}b", [], "cgroup2", "rw")
    assert _parse_mountinfo(line) == [("/", f"/sys/fs/cgroup/a{char}b", "cgroup2", "rw")]
