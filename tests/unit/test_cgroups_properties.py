"""Property tests (hypothesis) of celery_guard.cgroups: whatever the cgroup files,
/proc/self/cgroup and /proc/self/mountinfo hold, the readers answer None with a reason
and never raise; limits, working sets and mountinfo escapes come back as written.
The file trees are built with tests/unit/strategies.py."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from strategies import FILE, FILES, HUGE, LEVELS, NUMBER_TEXT, QUICK, Odd, _levels, _put

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
from celery_guard.sizes import MIB


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
# the readers


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


def _is_a_limit(figure: int, physical: int | None) -> bool:
    """A figure someone set, not a sentinel (V1_UNLIMITED, 2**62 and up) nor memory the
    machine does not have (at or above physical memory)."""
    return figure not in V1_UNLIMITED and figure < HUGE and (physical is None or figure < physical)


@FILES
@given(
    levels=st.lists(st.tuples(LIMIT_FIGURE, LIMIT_FIGURE), min_size=1, max_size=4),
    physical=st.one_of(st.none(), st.integers(1, 2**41)),
)
def test_v2_limit_is_the_smallest_figure_from_the_leaf_up_to_the_mount(
    levels: list[tuple[int | str | None, int | str | None]], physical: int | None
) -> None:
    """No memory.max or memory.high from the leaf up to the mount is below the limit, and
    the limit is one of them, charged to the nearest level that sets it (memory.max
    before memory.high there); no figure that is a limit, no limit. The levels in the
    opposite order give the same figure."""
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
        (Path(tmp) / "reversed").mkdir()
        flipped = _levels(Path(tmp) / "reversed", files[::-1])
        reversed_limit = read_limit(Cgroup(2, str(flipped[-1]), str(flipped[0])), physical)
    assert limit.reason
    assert reversed_limit.bytes == limit.bytes  # order independence
    figures = [value for pair in levels for value in pair if isinstance(value, int)]
    if not any(_is_a_limit(figure, physical) for figure in figures):
        assert (limit.bytes, limit.path) == (None, ""), limit
        return
    assert limit.bytes in figures and all(limit.bytes <= figure for figure in figures), limit
    level = dirs.index(Path(limit.path))
    assert limit.bytes in levels[level]  # set there ...
    assert not any(limit.bytes in pair for pair in levels[level + 1 :])  # ... nearest the leaf
    assert limit.reason.startswith("memory.high") == (levels[level][0] != limit.bytes), limit


def _says(directory: Path, figure: int) -> bool:
    """Whether the level's own memory.limit_in_bytes is that figure."""
    own = directory / "memory.limit_in_bytes"
    return own.is_file() and own.read_text().strip() == str(figure)


#: Two figures drawn often, so that levels tie: the same limit set at two levels.
TIES = st.sampled_from([256 * MIB, 512 * MIB])


@FILES
@given(
    own=st.one_of(st.none(), TIES, st.integers(0, 2**40), st.sampled_from(sorted(V1_UNLIMITED))),
    hierarchical=st.one_of(
        st.none(), TIES, st.integers(0, 2**40), st.sampled_from(sorted(V1_UNLIMITED))
    ),
    ancestors=st.lists(st.one_of(st.none(), TIES, st.integers(0, 2**40)), max_size=3),
    setters=st.sets(st.integers(0, 3), max_size=3),
    physical=st.one_of(st.none(), st.integers(1, 2**41)),
)
# two ancestors say the hierarchical figure (rare at random): the nearer one is charged
@example(own=512 * MIB, hierarchical=256 * MIB, ancestors=[7, 9], setters={0, 1}, physical=None)
def test_v1_limit_is_the_smaller_figure_charged_where_it_was_set(
    own: int | None,
    hierarchical: int | None,
    ancestors: list[int | None],
    setters: set[int],
    physical: int | None,
) -> None:
    """memory.limit_in_bytes of the leaf vs hierarchical_memory_limit in its memory.stat;
    the latter is charged to the nearest level whose own limit file says that figure.

    Read back from the tree: neither figure is below the limit, which is one of them; the
    level it is charged to says it in its own file and no level nearer the leaf does (the
    leaf when none does); the leaf's own file, when it says the figure, is the one the
    reason names. No figure that is a limit, no limit."""
    above = list(ancestors)
    for setter in setters:
        if hierarchical is not None and setter < len(above):
            above[setter] = hierarchical  # an ancestor that set it (none, one or several)
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
        assert limit.reason
        given_figures = [figure for figure in (own, hierarchical) if figure is not None]
        if not any(_is_a_limit(figure, physical) for figure in given_figures):
            assert (limit.bytes, limit.path) == (None, ""), limit
            return
        assert limit.bytes in given_figures, limit
        assert all(limit.bytes <= figure for figure in given_figures), limit
        level = dirs.index(Path(limit.path))
        assert not any(_says(directory, limit.bytes) for directory in dirs[level + 1 :])
        assert _says(dirs[level], limit.bytes) or (
            level == len(dirs) - 1 and not any(_says(directory, limit.bytes) for directory in dirs)
        ), limit
        name = "memory.limit_in_bytes" if own == limit.bytes else "hierarchical_memory_limit"
        assert limit.reason.startswith(f"{name} in "), limit


V1_SENTINEL = 9223372036854771712  # what an unlimited v1 cgroup's files say (64-bit, 4 KiB pages)


#: (id, memory.limit_in_bytes of mount, l1, leaf l2 (None: no file), hierarchical_memory_limit,
#:  physical, expected (bytes, level charged: 0 mount .. 2 leaf, reason)), each by hand:
V1_CASES = [
    # min(512M, 256M) = 256M from memory.stat; /l1 is the nearest level saying 256M
    ("an-ancestor-set-it", [None, 256 * MIB, 512 * MIB], 256 * MIB, None,
     (256 * MIB, 1, "hierarchical_memory_limit in /l1")),
    # both figures 256M: the leaf's own file, the first read, names it
    ("a-tie-is-the-leafs-own", [None, None, 256 * MIB], 256 * MIB, None,
     (256 * MIB, 2, "memory.limit_in_bytes in /l1/l2")),
    # mount and /l1 both say 256M: /l1 is nearer the leaf
    ("the-nearest-of-two", [256 * MIB, 256 * MIB, 512 * MIB], 256 * MIB, None,
     (256 * MIB, 1, "hierarchical_memory_limit in /l1")),
    # no level says 128M (set above the mount, out of this tree's sight): the leaf
    ("no-level-says-it", [None, None, 512 * MIB], 128 * MIB, None,
     (128 * MIB, 2, "hierarchical_memory_limit in /l1/l2")),
    # 2**63 - 4096 in both: unlimited
    ("sentinels", [None, None, V1_SENTINEL], V1_SENTINEL, None,
     (None, None, f"unlimited ({V1_SENTINEL} in memory.limit_in_bytes in /l1/l2)")),
    # 1024M with 1024M of physical memory: not a limit (1024M - 1 is, below)
    ("at-physical-memory", [None, None, 1024 * MIB], V1_SENTINEL, 1024 * MIB,
     (None, None, f"no limit: {1024 * MIB} >= physical memory {1024 * MIB}"
      " (memory.limit_in_bytes in /l1/l2)")),
    ("a-byte-below-physical-memory", [None, None, 1024 * MIB - 1], V1_SENTINEL, 1024 * MIB,
     (1024 * MIB - 1, 2, "memory.limit_in_bytes in /l1/l2")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("own", "hierarchical", "physical", "expected"),
    [case[1:] for case in V1_CASES],
    ids=[case[0] for case in V1_CASES],
)
def test_v1_limit_table(
    own: list[int | None],
    hierarchical: int,
    physical: int | None,
    expected: tuple[int | None, int | None, str],
) -> None:
    files: list[dict[str, bytes | Odd]] = [
        {} if value is None else {"memory.limit_in_bytes": f"{value}\n".encode()} for value in own
    ]
    files[-1]["memory.stat"] = f"cache 0\nhierarchical_memory_limit {hierarchical}\n".encode()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = _levels(Path(tmp), files)
        limit = read_limit(Cgroup(1, str(dirs[-1]), str(dirs[0])), physical)
    figure, level, reason = expected
    path = "" if level is None else str(dirs[level])
    assert (limit.bytes, limit.path, limit.reason) == (figure, path, reason)


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
# /proc/self/cgroup and /proc/self/mountinfo

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
# regressions: the smallest inputs of the bugs the properties above found, now fixed;
# each docstring says what the code did before


@pytest.mark.parametrize("char", ["\r", "\x0b", "\x85", "\u2028"])
def test_mountinfo_line_breaks_other_than_newline(char: str) -> None:
    """cgroups.py _parse_mountinfo (and find_memory_cgroup on /proc/self/cgroup) split
    with str.splitlines(), which also breaks at \\r, \\v, \\f, \\x1c-\\x1e, \\x85, U+2028
    and U+2029. The kernel escapes only space, tab, newline and backslash, so a mount
    point or cgroup named with one of them is lost or cut."""
    line = _mount_line("/", f"/sys/fs/cgroup/a{char}b", [], "cgroup2", "rw")
    assert _parse_mountinfo(line) == [("/", f"/sys/fs/cgroup/a{char}b", "cgroup2", "rw")]
