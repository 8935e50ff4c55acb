"""Adversarial tests for the state file boundary (celery_guard.history).

``CELERY_GUARD_STATE_FILE`` is read at every worker start, before the pool forks. Whatever
sits at that path (another file type, a huge or binary file, deeply nested or
out-of-range JSON), ``load`` answers ``(None, reason)`` or a plausible cost, at once:
it never raises, never blocks, never reads more than MAX_BYTES. Cases that hung or ate
memory before the fix run in a child process with a timeout and a memory limit, so that
a regression fails the test instead of the test run.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import needs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_guard import history
from celery_guard.logline import parse_line

QUICK = settings(max_examples=200, deadline=None, database=None)
GIB = 1 << 30
PHYSICAL = 8 * GIB
PAGE = 4096


def _write(path: Path, record: Any) -> str:
    path.write_text(json.dumps(record) if not isinstance(record, str) else record)
    return str(path)


def _load(path: str) -> tuple[int | None, str]:
    return history.load(path, physical=PHYSICAL, page=PAGE)


def _load_in_child(
    path: str, timeout: float = 20, wrapper: list[str] | None = None
) -> tuple[int | None, str]:
    """``history.load`` in a child with 1 GiB of address space: a load that blocks or reads
    without end fails here rather than hanging or swapping the test run. ``wrapper`` is a
    command the child runs under (see _no_read_override)."""
    code = textwrap.dedent(
        f"""
        import json, resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({GIB}, {GIB}))
        from celery_guard import history
        print(json.dumps(history.load(sys.argv[1], physical={PHYSICAL}, page={PAGE})))
        """
    )
    done = subprocess.run(
        [*(wrapper or []), sys.executable, "-c", code, path],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    cost, why = json.loads(done.stdout)
    return cost, why


# --- regressions: issue 13, finding 6 -------------------------------------------------------


def test_deeply_nested_json_is_ignored_not_raised(tmp_path: Path) -> None:
    """RecursionError escaped ``load`` and the worker failed to start."""
    path = _write(tmp_path / "s.json", "[" * 100_000 + "]" * 100_000)
    assert os.path.getsize(path) > history.MAX_BYTES  # over the cap: not even parsed
    assert _load(path)[0] is None
    path = _write(tmp_path / "t.json", '{"a":' * 10_000 + "1" + "}" * 10_000)
    assert os.path.getsize(path) <= history.MAX_BYTES  # under the cap: parsed, too deep
    cost, why = _load(path)
    # CPython up to 3.13 raises RecursionError at this depth (the reason names it); 3.14's
    # json parses it, and the file is then no state file of ours
    assert cost is None and ("RecursionError" in why or why == "unknown format"), why


def test_a_400_digit_cost_is_ignored(tmp_path: Path) -> None:
    """The cost was taken, and mib() raised OverflowError at startup."""
    path = _write(tmp_path / "s.json", '{"version": 1, "child_cost_bytes": ' + "9" * 400 + "}")
    cost, why = _load(path)
    assert cost is None and why.startswith("unreadable")


def test_a_cost_above_physical_memory_is_refused(tmp_path: Path) -> None:
    """1e21 bytes was taken as the cost of one child: concurrency forced to 1 for good."""
    path = _write(tmp_path / "s.json", {"version": 1, "child_cost_bytes": 10**21})
    cost, why = _load(path)
    assert cost is None and why.startswith("implausible child_cost_bytes 1000000000000000000000")


def test_a_cost_below_one_page_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.json", {"version": 1, "child_cost_bytes": 1})
    assert _load(path) == (None, f"implausible child_cost_bytes 1: not from {PAGE} to {PHYSICAL}")


def test_a_fifo_does_not_block(tmp_path: Path) -> None:
    """open() of a FIFO blocks until a writer comes: the worker never started."""
    path = str(tmp_path / "fifo")
    os.mkfifo(path)
    assert _load_in_child(path, timeout=20) == (None, "unreadable: not a regular file")


def test_a_symlink_to_dev_zero_is_not_read(tmp_path: Path) -> None:
    """read() of /dev/zero never ends: the worker's memory grew without bound."""
    path = tmp_path / "zero"
    path.symlink_to("/dev/zero")
    assert _load_in_child(str(path)) == (None, "unreadable: not a regular file")


def test_a_true_version_is_not_version_1(tmp_path: Path) -> None:
    """``true == 1`` in Python: a file of another format was taken for this one."""
    path = _write(tmp_path / "s.json", {"version": True, "child_cost_bytes": 64 << 20})
    assert _load(path) == (None, "unknown format")


def test_save_syncs_the_directory_after_the_rename(tmp_path: Path) -> None:
    """Without a sync of the directory, a crash may lose the rename."""
    path = tmp_path / "s.json"
    synced: list[tuple[str, bytes]] = []

    def record(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        synced.append((kind, path.read_bytes() if path.exists() else b""))
        os.fsync(fd)

    history.save(str(path), 64 << 20, 3, fsync=record)
    assert [kind for kind, _ in synced] == ["file", "dir"]
    assert synced[0][1] == b"" and b"67108864" in synced[1][1]  # the dir after the rename
    assert _load(str(path)) == (64 << 20, "")


# --- every odd file type ---------------------------------------------------------------------


def test_a_directory(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    assert _load(str(tmp_path / "d")) == (None, "unreadable: not a regular file")


def test_a_unix_socket(tmp_path: Path) -> None:
    import socket

    path = str(tmp_path / "sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        assert _load(path) == (None, "unreadable: not a regular file")


def test_a_character_device() -> None:
    assert _load("/dev/null") == (None, "unreadable: not a regular file")


def test_a_dangling_symlink_is_no_file(tmp_path: Path) -> None:
    (tmp_path / "s.json").symlink_to(tmp_path / "nowhere")
    assert _load(str(tmp_path / "s.json")) == (None, history.NO_FILE)


def test_a_symlink_to_a_good_file_is_followed(tmp_path: Path) -> None:
    target = _write(tmp_path / "real.json", {"version": 1, "child_cost_bytes": 64 << 20})
    (tmp_path / "s.json").symlink_to(target)
    assert _load(str(tmp_path / "s.json")) == (64 << 20, "")


def test_a_path_under_a_file(tmp_path: Path) -> None:
    _write(tmp_path / "f", "x")
    cost, why = _load(str(tmp_path / "f" / "s.json"))
    assert cost is None and why.startswith("unreadable")


def test_a_path_with_a_nul() -> None:
    cost, why = _load("/tmp/a\0b")
    assert cost is None and why.startswith("unreadable")


def test_a_huge_sparse_file_is_not_read(tmp_path: Path) -> None:
    """A terabyte file (sparse: no disk used) is refused from its size, in no time."""
    path = tmp_path / "huge"
    with open(path, "wb") as file:
        file.truncate(1 << 40)
    assert _load_in_child(str(path), timeout=20) == (
        None,
        f"unreadable: larger than {history.MAX_BYTES} bytes",
    )


def test_a_file_just_over_the_cap(tmp_path: Path) -> None:
    record = json.dumps({"version": 1, "child_cost_bytes": 64 << 20, "pad": ""})
    padded = record[:-2] + " " * (history.MAX_BYTES + 1 - len(record)) + '"}'
    path = _write(tmp_path / "s.json", padded)
    assert os.path.getsize(path) == history.MAX_BYTES + 1
    assert _load(path)[0] is None


def _no_read_override() -> list[str]:
    """A command prefix that drops the capabilities with which root reads any file
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), as harness/ does for a
    worker; skips the test where setpriv is missing or cannot drop them."""
    caps = "-dac_override,-dac_read_search"
    prefix = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--"]
    if shutil.which("setpriv") is None:
        needs.unavailable("root reads a file of mode 000, and there is no setpriv to stop it")
    tried = subprocess.run([*prefix, "true"], capture_output=True, text=True, check=False)
    if tried.returncode != 0:
        needs.unavailable(
            f"root reads a file of mode 000, and setpriv failed: {tried.stderr.strip()}"
        )
    return prefix


def test_an_unreadable_file(tmp_path: Path) -> None:
    """Mode 000: Permission denied. As root, the load runs in a child without the
    capabilities that would read the file anyway."""
    path = _write(tmp_path / "s.json", {"version": 1, "child_cost_bytes": 64 << 20})
    os.chmod(path, 0)
    if os.geteuid() == 0:
        cost, why = _load_in_child(path, wrapper=_no_read_override())
    else:
        cost, why = _load(path)
    assert cost is None and "Permission denied" in why


# --- every odd content ---------------------------------------------------------------------

# id, file content, expected reason (the cost is None in every case)
CONTENTS: list[tuple[str, str | bytes, str]] = [
    ("empty", "", "unreadable: not JSON"),
    ("binary", bytes(range(256)), "unreadable: not UTF-8 text"),
    ("bom", "\ufeff" + json.dumps({"version": 1, "child_cost_bytes": 1 << 26}), "unreadable"),
    ("truncated", '{"version": 1, "child_cost_bytes": 671', "unreadable: not JSON"),
    ("nan", '{"version": 1, "child_cost_bytes": NaN}', "unreadable: not JSON"),
    ("infinity", '{"version": 1, "child_cost_bytes": Infinity}', "unreadable: not JSON"),
    ("nan-elsewhere", '{"version": 1, "child_cost_bytes": 67108864, "x": NaN}', "unreadable"),
    ("minus-infinity", '{"version": 1, "child_cost_bytes": -Infinity}', "unreadable: not JSON"),
    ("float-cost", '{"version": 1, "child_cost_bytes": 1e21}', "no valid child_cost_bytes"),
    ("whole-float", '{"version": 1, "child_cost_bytes": 67108864.0}', "no valid child_cost_bytes"),
    ("string-cost", '{"version": 1, "child_cost_bytes": "67108864"}', "no valid child_cost_bytes"),
    ("bool-cost", '{"version": 1, "child_cost_bytes": true}', "no valid child_cost_bytes"),
    ("null-cost", '{"version": 1, "child_cost_bytes": null}', "no valid child_cost_bytes"),
    ("zero-cost", '{"version": 1, "child_cost_bytes": 0}', "no valid child_cost_bytes"),
    ("negative-cost", '{"version": 1, "child_cost_bytes": -5}', "no valid child_cost_bytes"),
    ("list-cost", '{"version": 1, "child_cost_bytes": [67108864]}', "no valid child_cost_bytes"),
    ("no-cost", '{"version": 1}', "no valid child_cost_bytes"),
    ("huge-negative", '{"version": 1, "child_cost_bytes": -' + "9" * 5000 + "}", "unreadable"),
    ("5000-digits", '{"version": 1, "child_cost_bytes": ' + "9" * 5000 + "}", "unreadable"),
    ("version-2", '{"version": 2, "child_cost_bytes": 67108864}', "unknown format"),
    ("version-float", '{"version": 1.0, "child_cost_bytes": 67108864}', "unknown format"),
    ("version-string", '{"version": "1", "child_cost_bytes": 67108864}', "unknown format"),
    ("array", "[1, 67108864]", "unknown format"),
    ("number", "67108864", "unknown format"),
    ("string", '"67108864"', "unknown format"),
    ("null", "null", "unknown format"),
    ("two-objects", '{"version": 1}{"version": 1}', "unreadable: not JSON"),
    ("nul-bytes", b"\0" * 100, "unreadable: not JSON"),
    ("nested-cost", '{"version": 1, "child_cost_bytes": ' + "[" * 5000 + "]" * 5000 + "}", ""),
]


@pytest.mark.parametrize(
    ("content", "reason"), [c[1:] for c in CONTENTS], ids=[c[0] for c in CONTENTS]
)
def test_odd_contents_are_ignored_with_a_reason(
    tmp_path: Path, content: str | bytes, reason: str
) -> None:
    path = tmp_path / "s.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    cost, why = _load(str(path))
    assert cost is None and why.startswith(reason) and why
    assert "\n" not in why


def test_duplicate_keys_take_the_last_and_extra_keys_are_fine(tmp_path: Path) -> None:
    text = '{"version": 1, "child_cost_bytes": 1, "child_cost_bytes": 67108864, "x": [1]}'
    assert _load(_write(tmp_path / "s.json", text)) == (67108864, "")


# --- properties ---------------------------------------------------------------------------


@QUICK
@given(content=st.binary(max_size=2000))
def test_any_bytes_never_raise(tmp_path_factory: pytest.TempPathFactory, content: bytes) -> None:
    """Never-raises: any content gives a plausible cost or None with a one-line reason."""
    path = tmp_path_factory.mktemp("s") / "s.json"
    path.write_bytes(content)
    cost, why = _load(str(path))
    assert (cost is None and why and "\n" not in why) or (PAGE <= (cost or 0) <= PHYSICAL)


#: Any JSON ``save`` could write: no NaN or Infinity (those make the whole file refused, see
#: CONTENTS), numbers of at most 25 digits.
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=20,
)


@QUICK
@given(
    cost=st.one_of(JSON, st.integers(-(2**80), 2**80)),
    version=st.one_of(st.just(1), JSON),
    extra=st.dictionaries(st.text(max_size=8), JSON, max_size=3),
)
def test_any_json_record_never_raises_and_only_plausible_costs_pass(
    tmp_path_factory: pytest.TempPathFactory, cost: Any, version: Any, extra: dict[str, Any]
) -> None:
    """Bounds: whatever the record holds, a cost comes back only if it is a whole number
    of bytes from one page to physical memory and the version is exactly 1."""
    record = {**extra, "version": version, "child_cost_bytes": cost}
    path = tmp_path_factory.mktemp("s") / "s.json"
    path.write_text(json.dumps(record))
    got, why = _load(str(path))
    plausible = type(cost) is int and PAGE <= cost <= PHYSICAL and type(version) is int
    if got is not None:
        assert plausible and version == 1 and got == cost and why == ""
    else:
        assert why and not (plausible and version == 1)


@QUICK
@given(cost=st.integers(PAGE, PHYSICAL), samples=st.integers(0, 10**6))
def test_save_then_load_round_trips(
    tmp_path_factory: pytest.TempPathFactory, cost: int, samples: int
) -> None:
    """Round trip: what save writes, load reads back; the file is private (0600)."""
    path = tmp_path_factory.mktemp("s") / "s.json"
    history.save(str(path), cost, samples)
    assert _load(str(path)) == (cost, "")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["s.json"]  # no temporary left


def test_save_refuses_nan_rather_than_writing_what_load_refuses(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        history.save(str(tmp_path / "s.json"), 64 << 20, 1, {"x": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_save_over_a_directory_raises_oserror_and_leaves_no_temporary(tmp_path: Path) -> None:
    (tmp_path / "s.json").mkdir()
    with pytest.raises(OSError):
        history.save(str(tmp_path / "s.json"), 64 << 20, 1)
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


def test_default_bounds_are_this_machine(tmp_path: Path) -> None:
    """Without ``physical``, the bound is this machine's memory: a cost above it is refused
    (the page floor is the kernel's page size)."""
    path, page = str(tmp_path / "s.json"), resource.getpagesize()
    history.save(path, page, 1)
    assert history.load(path) == (page, "")
    for cost in (page - 1, 1 << 60):  # below a page; above any machine's memory
        history.save(path, cost, 1)
        assert history.load(path)[0] is None, cost


@pytest.mark.parametrize(
    ("directory_mode", "owner", "trusted"),
    [
        (0o1777, "other", False),  # /tmp: anyone may have put it there
        (0o0777, "other", False),
        (0o0755, "other", True),  # only its owner writes the directory: theirs to give
        (0o1777, "self", True),
        (0o1777, "root", True),
    ],
)
def test_another_users_state_file_in_a_world_writable_directory_is_not_trusted(
    tmp_path: Path, directory_mode: int, owner: str, trusted: bool
) -> None:
    if os.geteuid() != 0:
        needs.unavailable("giving a file to another user needs root")
    shared = tmp_path / "shared"
    shared.mkdir()
    path = _write(shared / "state.json", {"version": history.VERSION, "child_cost_bytes": GIB})
    uid = {"other": 12345, "self": os.geteuid(), "root": 0}[owner]
    os.chown(path, uid, -1)
    shared.chmod(directory_mode)
    cost, why = _load(path)
    assert (cost == GIB) is trusted, why
    if not trusted:
        assert "another user" in why


def test_a_running_worker_keeps_what_it_can_and_says_what_it_could_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``keep``: saved where it can be; one WARNING naming the path where it cannot (a
    directory that does not exist); nothing for no path, no cost or no samples."""
    caplog.set_level(logging.WARNING, logger="celery_guard")
    path = tmp_path / "state.json"
    history.keep(str(path), 64 << 20, 3)
    assert _load(str(path))[0] == 64 << 20
    history.keep(None, 64 << 20, 3)
    history.keep(str(tmp_path / "none.json"), 0, 3)
    history.keep(str(tmp_path / "few.json"), 64 << 20, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    assert caplog.records == []
    missing = tmp_path / "no-such-dir" / "state.json"
    history.keep(str(missing), 64 << 20, 3)  # no exception out of it
    (record,) = caplog.records
    line = parse_line(record.getMessage())
    assert (line["event"], line["action"], line["path"]) == ("history", "not_saved", str(missing))


# -- memory kills by task id --------------------------------------------------------------
def test_memory_kills_are_kept_beside_the_state_file_and_read_back(tmp_path: Path) -> None:
    path = history.kills_path(str(tmp_path / "state.json"))
    assert path == str(tmp_path / "state.json.kills")
    assert history.kills_path(None) is None
    assert history.load_kills(path) == ({}, history.NO_FILE)
    history.keep_kills(path, {"a": 1, "b": 2})
    assert history.load_kills(path) == ({"a": 1, "b": 2}, "")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_only_the_latest_task_ids_are_kept(tmp_path: Path) -> None:
    path = str(tmp_path / "kills")
    history.keep_kills(path, {f"id-{n}": 1 for n in range(history.KILLS_KEPT + 200)})
    kills, _ = history.load_kills(path)
    assert len(kills) == history.KILLS_KEPT and "id-199" not in kills and "id-200" in kills
    assert os.path.getsize(path) <= history.MAX_BYTES


@pytest.mark.parametrize(
    "record",
    [
        {"version": 1, "memory_kills": {"a": "1"}},  # not a count
        {"version": 1, "memory_kills": {"a": 0}},
        {"version": 1, "memory_kills": {"a": True}},
        {"version": 1, "memory_kills": {"x" * 300: 1}},  # not a task id
        {"version": 2, "memory_kills": {"b": 1}},
        {"version": 1, "memory_kills": ["a"]},
        [1, 2],
    ],
    ids=["text", "zero", "bool", "long-id", "version", "list", "not-a-dict"],
)
def test_a_count_that_cannot_be_trusted_is_not_read(tmp_path: Path, record: Any) -> None:
    path = _write(tmp_path / "kills", record)
    kills, _ = history.load_kills(path)
    assert kills == {}


def test_kills_not_saved_are_one_warning_line_and_counting_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "missing-directory" / "kills")
    with caplog.at_level(logging.WARNING, logger="celery_guard"):
        history.keep_kills(path, {"a": 1})
    (line,) = [parse_line(r.getMessage()) for r in caplog.records]
    assert (line["event"], line["action"], line["path"]) == ("history", "not_saved", path)


def test_a_kills_file_that_cannot_be_used_is_one_warning_line_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write(tmp_path / "kills", {"version": True, "memory_kills": {"a": 2}})
    with caplog.at_level(logging.WARNING, logger="celery_guard"):
        assert history.recall_kills(path) == {}  # true is not version 1
        assert history.recall_kills(str(tmp_path / "none")) == {}  # no file yet: silent
    (line,) = [parse_line(r.getMessage()) for r in caplog.records]
    assert (line["event"], line["action"], line["reason"]) == (
        "history",
        "ignored",
        "unknown format",
    )
