"""Tests for celery_guard.cgroups against fixture trees in tests/testdata/cgroups/.

Each fixture is a fake root holding proc/self/{cgroup,mountinfo}, proc/meminfo and the
cgroup files the case needs; the expected results are written in the tables below.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import needs
import pytest

from celery_guard.cgroups import (
    Cgroup,
    _parse_mountinfo,
    _unescape,
    find_memory_cgroup,
    physical_memory,
    read_limit,
    read_oom_group,
    read_oom_kills,
    read_usage,
)

DATA = Path(__file__).resolve().parent.parent / "testdata" / "cgroups"
MIB = 1 << 20
GIB = 1 << 30
PHYSICAL = 16 * GIB  # MemTotal of every fixture
PA = "process_api/e963ff479243150139317c619e607300"

# case, version, path suffix, limit bytes, source, limit reason substring,
# usage, working set, oom kills
CASES = [
    (
        "v2_private_ns",
        2,
        "sys/fs/cgroup",
        512 * MIB,
        "cgroup-v2",
        "memory.max in /",
        100 * MIB,
        80 * MIB,
        2,
    ),
    (
        "v2_nested",
        2,
        "sys/fs/cgroup/kubepods/burstable/pod1/ctr1",
        GIB,
        "cgroup-v2",
        "memory.max in /kubepods/burstable/pod1",
        300 * MIB,
        260 * MIB,
        0,
    ),
    (
        "v2_host_root",
        2,
        "sys/fs/cgroup/user.slice/user-1000.slice/session-2.scope",
        None,
        "cgroup-v2",
        "no limit set (max at every level)",
        64 * MIB,
        54 * MIB,
        0,
    ),
    (
        "v2_in_root_cgroup",
        2,
        "sys/fs/cgroup",
        None,
        "cgroup-v2",
        "no memory.max file",
        None,
        None,
        None,
    ),
    (
        "v2_systemd_service",
        2,
        "sys/fs/cgroup/system.slice/celery.service",
        2 * GIB,
        "cgroup-v2",
        "memory.max in /system.slice/celery.service",
        700 * MIB,
        650 * MIB,
        3,
    ),
    (
        "v2_memory_high",
        2,
        "sys/fs/cgroup/app",
        768 * MIB,
        "cgroup-v2",
        "memory.high below memory.max in /app",
        200 * MIB,
        170 * MIB,
        0,
    ),
    (
        "v2_limit_above_physical",
        2,
        "sys/fs/cgroup/big",
        None,
        "cgroup-v2",
        ">= physical memory",
        GIB,
        GIB - 100 * MIB,
        0,
    ),
    (
        "v2_path_dotdot",
        2,
        "sys/fs/cgroup",
        128 * MIB,
        "cgroup-v2",
        "memory.max in /",
        20 * MIB,
        19 * MIB,
        0,
    ),
    (
        "v2_missing_leaf",
        2,
        "sys/fs/cgroup/app",
        640 * MIB,
        "cgroup-v2",
        "memory.max in /app",
        64 * MIB,
        62 * MIB,
        0,
    ),
    (
        "v2_bad_files",
        2,
        "sys/fs/cgroup/bad",
        None,
        "cgroup-v2",
        "garbage in memory.max in /bad: 'lots'",
        5 * MIB,
        None,
        None,
    ),
    (
        "v2_partial_garbage",
        2,
        "sys/fs/cgroup/app",
        GIB,
        "cgroup-v2",
        "skipped: garbage in memory.high in /app",
        None,
        None,
        5,
    ),
    (
        "v2_inactive_above_usage",
        2,
        "sys/fs/cgroup/app",
        GIB,
        "cgroup-v2",
        "memory.max in /app",
        10 * MIB,
        0,
        0,
    ),
    (
        "v1_docker",
        1,
        "sys/fs/cgroup/memory",
        512 * MIB,
        "cgroup-v1",
        "memory.limit_in_bytes in /",
        120 * MIB,
        110 * MIB,
        1,
    ),
    (
        # the memory hierarchy bind-mounted again later, elsewhere (a chroot): the
        # system's mount is read, not the one that goes away with the chroot
        "v1_bind_mount_elsewhere",
        1,
        "sys/fs/cgroup/memory/workers/celery",
        384 * MIB,
        "cgroup-v1",
        "memory.limit_in_bytes in /workers/celery",
        100 * MIB,
        90 * MIB,
        0,
    ),
    (
        # a second mount of the hierarchy at the same mount point, rooted at the
        # container's cgroup, hides the first: the cgroup is the mount point itself
        "v1_over_mounted",
        1,
        "sys/fs/cgroup/memory",
        256 * MIB,
        "cgroup-v1",
        "memory.limit_in_bytes in /",
        70 * MIB,
        60 * MIB,
        2,
    ),
    (
        "v1_hierarchical_only",
        1,
        "sys/fs/cgroup/memory/parent/child",
        256 * MIB,
        "cgroup-v1",
        "hierarchical_memory_limit",
        90 * MIB,
        85 * MIB,
        0,
    ),
    (
        "v1_unlimited_4k",
        1,
        "sys/fs/cgroup/memory/user.slice",
        None,
        "cgroup-v1",
        "unlimited (9223372036854771712",
        2 * GIB,
        2 * GIB - 10 * MIB,
        0,
    ),
    (
        "v1_unlimited_64k",
        1,
        "sys/fs/cgroup/memory/user.slice",
        None,
        "cgroup-v1",
        "unlimited (9223372036854710272",
        2 * GIB,
        2 * GIB - 10 * MIB,
        0,
    ),
    (
        "v1_joined_controllers",
        1,
        "sys/fs/cgroup/cpu,cpuacct,memory/jobs/celery",
        GIB,
        "cgroup-v1",
        "memory.limit_in_bytes in /jobs/celery",
        400 * MIB,
        380 * MIB,
        0,
    ),
    (
        "v1_escaped_space",
        1,
        "sys/fs/cgroup/my memory/workers",
        300 * MIB,
        "cgroup-v1",
        "memory.limit_in_bytes in /workers",
        100 * MIB,
        99 * MIB,
        4,
    ),
    (
        "v1_path_outside_root",
        1,
        "sys/fs/cgroup/memory",
        384 * MIB,
        "cgroup-v1",
        "memory.limit_in_bytes in /",
        10 * MIB,
        9 * MIB,
        0,
    ),
    (
        "v1_bad_files",
        1,
        "sys/fs/cgroup/memory/broken",
        None,
        "cgroup-v1",
        "empty memory.limit_in_bytes in /broken",
        None,
        None,
        None,
    ),
    # a newline in a directory name: raw in /proc/self/cgroup, \012 in mountinfo
    (
        "v2_newline_in_name",
        2,
        "sys/fs/cgroup/system.slice/odd\nname.service",
        256 * MIB,
        "cgroup-v2",
        "memory.max in /system.slice/odd\nname.service",
        700 * MIB,
        650 * MIB,
        3,
    ),
    (
        "v1_newline_in_name",
        1,
        "sys/fs/cgroup/mem\nory/w\nx",
        300 * MIB,
        "cgroup-v1",
        "memory.limit_in_bytes in /w\nx",
        100 * MIB,
        96 * MIB,
        2,
    ),
    (
        "hybrid_v1_wins",
        1,
        "sys/fs/cgroup/memory/" + PA,
        None,
        "cgroup-v1",
        "unlimited",
        50 * MIB,
        47 * MIB,
        0,
    ),
    (
        "hybrid_no_v1_memory",
        2,
        "sys/fs/cgroup/unified/user.slice/user-0.slice/session-1.scope",
        None,
        "cgroup-v2",
        "no memory.max file",
        None,
        None,
        None,
    ),
]


def _root(case: str) -> str:
    return str(DATA / case)


def _found(case: str) -> Cgroup:
    """The cgroup of a fixture (a name under DATA, or an absolute root)."""
    found = find_memory_cgroup(str(DATA / case))
    assert found.cgroup is not None, found.reason
    return found.cgroup


def test_every_fixture_is_in_a_table() -> None:
    listed = {c[0] for c in CASES} | {c[0] for c in NOT_FOUND}
    assert listed == {p.name for p in DATA.iterdir() if p.is_dir()}


@pytest.mark.parametrize(
    "case,version,suffix,limit,source,reason,usage,working_set,oom_kills",
    CASES,
    ids=[c[0] for c in CASES],
)
def test_fixture(
    case: str,
    version: int,
    suffix: str,
    limit: int | None,
    source: str,
    reason: str,
    usage: int | None,
    working_set: int | None,
    oom_kills: int | None,
) -> None:
    root = _root(case)
    cg = _found(case)
    assert cg.version == version
    assert cg.path == os.path.join(root, suffix)
    assert cg.path.startswith(cg.mount)

    physical, why = physical_memory(root)
    assert (physical, why) == (PHYSICAL, "")

    got = read_limit(cg, physical)
    assert got.bytes == limit, got
    assert got.source == source
    assert reason in got.reason, got.reason
    if limit is not None:
        assert got.path and cg.path.startswith(got.path)

    u = read_usage(cg)
    assert (u.usage, u.working_set) == (usage, working_set), u
    assert (u.reason == "") == (usage is not None and working_set is not None)

    kills, why = read_oom_kills(cg)
    assert kills == oom_kills
    assert (why == "") == (kills is not None)


# Unknown usage / OOM answers carry a reason naming the file and what was wrong with it.
@pytest.mark.parametrize(
    "case,usage_reason,oom_reason",
    [
        ("v2_in_root_cgroup", "missing memory.current in /", "missing memory.events in /"),
        (
            "v2_bad_files",
            "no inactive_file field in memory.stat in /bad",
            "no oom_kill field in memory.events in /bad",
        ),
        ("v2_partial_garbage", "empty memory.current in /app", ""),
        (
            "v1_bad_files",
            "garbage in memory.usage_in_bytes in /broken: '-5'",
            "no oom_kill field in memory.oom_control in /broken",
        ),
    ],
)
def test_unknown_reasons(case: str, usage_reason: str, oom_reason: str) -> None:
    cg = _found(case)
    assert usage_reason in read_usage(cg).reason
    assert oom_reason in read_oom_kills(cg)[1]


def test_limit_reasons_list_every_problem() -> None:
    got = read_limit(_found("v2_bad_files"), PHYSICAL)
    assert got.reason.startswith("no limit found: ")
    assert "empty memory.high in /bad" in got.reason
    got = read_limit(_found("v1_bad_files"), PHYSICAL)
    assert "garbage in hierarchical_memory_limit in memory.stat in /broken" in got.reason


def test_physical_unknown_still_applies_sentinels() -> None:
    assert read_limit(_found("v1_unlimited_64k"), None).bytes is None
    assert read_limit(_found("v2_limit_above_physical"), None).bytes == 64 * GIB
    assert read_limit(_found("v2_nested"), None).bytes == GIB


NOT_FOUND = [
    ("no_memory_controller", "no memory controller in /proc/self/cgroup"),
    ("v1_no_mount", "no cgroup v1 memory mount in /proc/self/mountinfo"),
]


@pytest.mark.parametrize("case,reason", NOT_FOUND, ids=[c[0] for c in NOT_FOUND])
def test_not_found(case: str, reason: str) -> None:
    found = find_memory_cgroup(_root(case))
    assert found.cgroup is None
    assert reason in found.reason


def test_missing_proc_files(tmp_path: Path) -> None:
    found = find_memory_cgroup(str(tmp_path), pid="1234")
    assert found.cgroup is None
    assert found.reason == "missing /proc/1234/cgroup"
    assert physical_memory(str(tmp_path)) == (None, "missing /proc/meminfo")


def test_v2_without_cgroup2_mount(tmp_path: Path) -> None:
    shutil.copytree(DATA / "v2_private_ns", tmp_path, dirs_exist_ok=True)
    (tmp_path / "proc/self/mountinfo").write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
    )
    found = find_memory_cgroup(str(tmp_path))
    assert found.cgroup is None
    assert "no cgroup2 mount" in found.reason


def _make_dir(path: Path) -> None:
    """Turn a file into a directory: reading it then fails (IsADirectoryError) even as root."""
    path.unlink()
    path.mkdir()


def test_unreadable_files(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(DATA / "v2_nested", root)
    leaf = root / "sys/fs/cgroup/kubepods/burstable/pod1/ctr1"

    _make_dir(root / "sys/fs/cgroup/kubepods/burstable/pod1/memory.max")
    _make_dir(leaf / "memory.current")
    _make_dir(leaf / "memory.events")
    _make_dir(leaf / "memory.oom.group")
    _make_dir(root / "proc/meminfo")

    cg = _found(str(root))
    physical, why = physical_memory(str(root))
    assert physical is None
    assert why.startswith("unreadable /proc/meminfo: [Errno 21]")

    got = read_limit(cg, physical)
    assert got.bytes == 8 * GIB  # the pod's limit is unreadable; kubepods' still binds
    assert "memory.max in /kubepods" in got.reason
    assert "skipped: unreadable memory.max in /kubepods/burstable/pod1: [Errno 21]" in got.reason

    u = read_usage(cg)
    assert u.usage is None and u.working_set is None
    assert u.reason.startswith("unreadable memory.current in /kubepods/burstable/pod1/ctr1")
    kills, why = read_oom_kills(cg)
    assert kills is None and why.startswith("unreadable memory.events")
    assert read_oom_group(cg) is None

    _make_dir(root / "proc/self/mountinfo")
    found = find_memory_cgroup(str(root))
    assert found.cgroup is None
    assert found.reason.startswith("unreadable /proc/self/mountinfo: [Errno 21]")


def test_read_on_vanished_cgroup(tmp_path: Path) -> None:
    for version in (1, 2):
        cg = Cgroup(version, str(tmp_path / "gone" / "leaf"), str(tmp_path / "gone"))
        assert read_limit(cg, PHYSICAL).bytes is None
        assert read_usage(cg).usage is None
        assert read_oom_kills(cg)[0] is None
        assert read_oom_group(cg) is None


def test_garbage_meminfo(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    meminfo = tmp_path / "proc" / "meminfo"
    meminfo.write_text("MemTotal:  lots kB\n")
    assert physical_memory(str(tmp_path))[0] is None
    meminfo.write_text("MemFree: 1 kB\n")
    assert physical_memory(str(tmp_path)) == (None, "no MemTotal in /proc/meminfo")


@pytest.mark.parametrize(
    "case,expected",
    [("v2_nested", True), ("v2_private_ns", False), ("v2_memory_high", None), ("v1_docker", None)],
)
def test_oom_group(case: str, expected: bool | None) -> None:
    assert read_oom_group(_found(case)) is expected


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("/sys/fs/cgroup/my\\040memory", "/sys/fs/cgroup/my memory"),
        ("/a\\011b\\012c", "/a\tb\nc"),
        ("/odd\\134dir", "/odd\\dir"),
        ("/odd\\134040", "/odd\\040"),
        ("/plain", "/plain"),
    ],
)
def test_unescape(raw: str, expected: str) -> None:
    assert _unescape(raw) == expected


def test_mountinfo_optional_fields() -> None:
    text = (
        "30 24 0:26 / /zero rw - cgroup2 cgroup2 rw\n"
        "31 24 0:27 / /one rw shared:4 - cgroup2 cgroup2 rw\n"
        "32 24 0:28 / /two rw shared:4 master:1 - cgroup cgroup rw,memory\n"
        "33 24 0:29 /r\\040x /three rw shared:4 master:1 propagate_from:2 - tmpfs none rw\n"
        "34 24 0:30 / /broken rw shared:4\n"
        "\n"
    )
    mounts = _parse_mountinfo(text)
    assert [(m.root, m.mountpoint, m.fstype, m.superoptions) for m in mounts] == [
        ("/", "/zero", "cgroup2", "rw"),
        ("/", "/one", "cgroup2", "rw"),
        ("/", "/two", "cgroup", "rw,memory"),
        ("/r x", "/three", "tmpfs", "rw"),
    ]


def test_this_machine() -> None:
    """The real /proc and /sys: must not raise; v1 where a v1 memory hierarchy is mounted."""
    found = find_memory_cgroup("/")
    physical, _ = physical_memory("/")
    if found.cgroup is not None:
        read_limit(found.cgroup, physical)
        read_usage(found.cgroup)
        read_oom_kills(found.cgroup)
    if not os.path.isdir("/sys/fs/cgroup/memory"):
        needs.unavailable("no cgroup v1 memory hierarchy at /sys/fs/cgroup/memory on this machine")
    assert found.cgroup is not None, found.reason
    assert found.cgroup.version == 1
    assert found.cgroup.path.startswith("/sys/fs/cgroup/memory")
    assert physical is not None and physical > 0


LIMIT_LEVELS = [
    # (fixture, directory whose own file sets the effective limit, relative to the root)
    ("v1_hierarchical_only", "sys/fs/cgroup/memory/parent"),
    ("v1_docker", "sys/fs/cgroup/memory"),
    ("v2_nested", "sys/fs/cgroup/kubepods/burstable/pod1"),
    ("v2_memory_high", "sys/fs/cgroup/app"),
]


@pytest.mark.parametrize("case,level", LIMIT_LEVELS, ids=[c[0] for c in LIMIT_LEVELS])
def test_limit_names_the_level_that_sets_it(case: str, level: str) -> None:
    """Usage is compared with the limit where it is set, so the level must be exact."""
    cg = _found(case)
    limit = read_limit(cg, physical=64 * GIB)
    assert limit.path == os.path.join(_root(case), level)


@pytest.mark.parametrize(
    "case,unreclaimable",
    [
        # usage 100 MiB, inactive_file 20 MiB, active_file 8 MiB
        ("v2_private_ns", 72 * MIB),
        # usage 400 MiB, total_inactive_file 20 MiB, total_active_file 10 MiB
        ("v1_joined_controllers", 370 * MIB),
    ],
)
def test_unreclaimable_is_usage_less_all_page_cache(case: str, unreclaimable: int) -> None:
    """What an OOM kill depends on: the kernel reclaims page cache, active or inactive,
    before it kills (a task that read a large file leaves active file pages)."""
    assert read_usage(_found(case)).unreclaimable == unreclaimable


def test_unreclaimable_is_unknown_without_active_file(tmp_path: Path) -> None:
    (tmp_path / "memory.usage_in_bytes").write_text(f"{100 * MIB}\n")
    (tmp_path / "memory.stat").write_text(f"total_inactive_file {10 * MIB}\n")
    got = read_usage(Cgroup(1, str(tmp_path), str(tmp_path)))
    assert (got.working_set, got.unreclaimable) == (90 * MIB, None)


def test_group_oom_set_on_an_ancestor_is_on_for_the_worker(tmp_path: Path) -> None:
    """The kernel kills the group of the highest ancestor with memory.oom.group=1: set on
    the pod above a worker whose own cgroup has 0, one OOM kill still takes the main
    process (seen on a real v2 kernel, tests/v2). Off at every level: off."""
    root = tmp_path / "root"
    shutil.copytree(DATA / "v2_nested", root)
    pod = root / "sys/fs/cgroup/kubepods/burstable/pod1"
    (pod / "ctr1" / "memory.oom.group").write_text("0\n")
    (pod / "memory.oom.group").write_text("1\n")
    assert read_oom_group(_found(str(root))) is True
    (pod / "memory.oom.group").write_text("0\n")
    assert read_oom_group(_found(str(root))) is False
    (pod / "ctr1" / "memory.oom.group").unlink()  # its own unreadable, none above on
    assert read_oom_group(_found(str(root))) is None
