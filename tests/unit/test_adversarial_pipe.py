"""The children's pipe as a boundary (issue 13): whatever arrives on it, the main process
neither raises nor grows without bound, and the sampler never spins.

The pipe is open to every process a task forks, so its records are not trusted: random
and hostile records, floods, records cut by the end of a read, huge numbers, unknown pids.
Also the regressions of findings 1 (a descriptor above 1024), 2 (a failing step retried
every 10 ms; a record that broke every later summary), 4 (the worker memory watch
disarmed by a race), 9 (task names with spaces) and 12 (a signal to a reused pid).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_guard import actuator, procfs, telemetry
from celery_guard.config import load_settings
from celery_guard.ledger import MAX_TASK_NAMES
from celery_guard.limit import LiveLimit
from celery_guard.protect import WorkerMemoryLimit, active_task_names

MIB = 1024 * 1024
QUICK = settings(max_examples=300, deadline=None, database=None)
KNOWN = {101, 102}


def collector(known: set[int] = KNOWN) -> telemetry.Collector:
    config = load_settings({}, {})
    return telemetry.Collector(
        hostname="w@h",
        settings=config,
        live=LiveLimit(1024 * MIB, config),
        parent_rss=100 * MIB,
        cgroup=None,
        children=lambda: [],
        concurrency=lambda: 2,
        known=lambda pid: pid in known,
    )


def record(pid: int = 101, name: str = "app.t", delta: int = MIB, private: int = -1) -> str:
    return f"T {pid} {delta} 1 {delta} {delta} {200 * MIB} {private} -1 -1 -1 1 {name}"


# -- records ---------------------------------------------------------------------------------
def test_a_task_name_with_spaces_keeps_its_growth() -> None:
    """Finding 9: a name with a space split the record into six parts and it was dropped."""
    c = collector()
    c.read_lines([record(name="reports: build the monthly one")])
    assert c.tasks["reports: build the monthly one"].total == MIB
    assert c.dropped == 0


@pytest.mark.parametrize(
    "line",
    [
        "T 101 " + "9" * 3900 + " 1 1 1 1 -1 -1 -1 -1 1 app.t",  # a number of 3,900 digits
        "T 101 1 1 1 1 1 -1 -1 -1 -1 1 " + "x" * 5000,  # a name no task has
        "T 101 1 1 1 1 1 -1 -1 -1 -1 1 app\x1b[2Jt",  # a terminal escape in a name that is logged
        "T 999 1 1 1 1 1 -1 -1 -1 -1 1 app.t",  # not a child of this pool
        "T -5 1 1 1 1 1 -1 -1 -1 -1 1 app.t",
        "T 101 1 2 1 1 1 -1 -1 -1 -1 1 app.t",  # exact is 0 or 1
        "T 101 1 1 1 1 -5 -1 -1 -1 -1 1 app.t",  # no negative RSS
        "T 101 \u0661 1 1 1 1 -1 -1 -1 -1 1 app.t",  # digits must be ASCII
        "T 101 1 1 1 1 1 -1 -1 -1 -1 1",  # no name
        "X 101 1 1 1 1 1 -1 -1 -1 -1 1 app.t",
        "",
        "\x00\x01\x02",
    ],
    ids=lambda line: repr(line[:30]),
)
def test_a_hostile_record_is_dropped_and_nothing_breaks(line: str) -> None:
    """Finding 2: one record with a 3,900-digit number made every later summary and
    guard_stats raise OverflowError. Refused records are counted and go no further."""
    c = collector()
    c.read_lines([line, record()])
    assert c.dropped == 1
    assert c.tasks["app.t"].total == MIB
    c.snapshot(final=True)  # every figure still formats
    c.snapshot().stats()


@QUICK
@given(st.lists(st.text(max_size=120), max_size=50))
def test_any_text_on_the_pipe_never_raises(lines: list[str]) -> None:
    c = collector()
    c.read_lines(lines)
    fields = c.snapshot().summary
    assert fields["worker"] == "w@h"


@QUICK
@given(
    st.lists(
        st.tuples(
            st.integers(-(10**20), 10**20), st.integers(0, 1), st.integers(-(10**20), 10**20),
            st.integers(-(10**20), 10**20), st.integers(-(10**20), 10**20),
            st.integers(-5, 10**20), st.text(min_size=1, max_size=50),
            st.sampled_from([101, 102, 7, 0]),
        ),
        max_size=40,
    )
)  # fmt: skip
def test_records_of_any_figures_keep_every_table_sane(
    rows: list[tuple[int, int, int, int, int, int, str, int]],
) -> None:
    c = collector()
    lines = [
        f"T {pid} {delta} {exact} {peak} {kept} {rss} {private} -1 -1 -1 1 {name}"
        for delta, exact, peak, kept, rss, private, name, pid in rows
    ]
    seen = c.read_lines(lines).records
    for item in seen:  # what got through is within bounds, from a known child
        assert item.pid in KNOWN and 0 <= item.rss < 1 << 50 and item.peak >= 0
        assert len(item.name) <= telemetry.MAX_NAME and item.name.isprintable()
    assert len(seen) + c.dropped == len(lines)
    for growth in c.tasks.values():
        assert 0 <= growth.total < len(lines) * (1 << 50)
    c.snapshot()


def test_a_flood_of_invented_task_names_is_bounded() -> None:
    c = collector()
    c.read_lines([record(name=f"forged.{i}") for i in range(5000)])
    assert len(c.tasks) == MAX_TASK_NAMES + 1  # the rest under "other"
    assert c.tasks["other"].events == 5000 - MAX_TASK_NAMES
    c.read_lines(
        ["L 101 hard 1048576 1048576 id-" + str(i) + " forged." + str(i) for i in range(5000)]
    )
    assert len(c.tasks) == MAX_TASK_NAMES + 1  # hits of new names: under "other" too
    hits = c.snapshot().limit_hits()  # the names kept for the records count their own hits
    assert hits["forged.0"] == {"hard": 1}
    assert hits["other"] == {"hard": 5000 - MAX_TASK_NAMES}


# -- the sampler: cut records, a descriptor above 1024, failing steps ---------------------------
def write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def test_a_record_cut_by_the_end_of_a_read_is_joined_with_its_rest() -> None:
    c = collector()
    read_end, write_end = telemetry.open_channel()
    sampler = telemetry.Sampler(c, read_end, lambda: None)
    try:
        line = (record(name="split.me") + "\n").encode()
        write_all(write_end, line[:20])
        sampler.drain()
        assert "split.me" not in c.tasks and c.dropped == 0  # held back, not dropped
        write_all(write_end, line[20:])
        sampler.drain()
        assert c.tasks["split.me"].total == MIB and c.dropped == 0
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_flood_larger_than_one_read_loses_no_whole_record() -> None:
    c = collector()
    read_end, write_end = telemetry.open_channel()
    sampler = telemetry.Sampler(c, read_end, lambda: None)
    try:
        lines = b"".join((record(name=f"t{i % 50}") + "\n").encode() for i in range(3000))
        sent = 0
        while sent < len(lines):  # the pipe holds 64 KiB: drain as a reader would
            sent += os.write(write_end, lines[sent : sent + 32768])
            sampler.drain()
        sampler.drain()
        assert sum(g.events for g in c.tasks.values()) == 3000 and c.dropped == 0
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_descriptor_above_1024_is_read_without_spinning(tmp_path: Path) -> None:
    """Finding 1: ``select.select`` raised ValueError for descriptors >= 1024, the error
    was swallowed and the loop, whose only wait was that select, ran at 100% CPU."""
    c = collector()
    read_end, write_end = telemetry.open_channel()
    high = os.dup2(read_end, 1500)
    os.set_blocking(high, False)
    sampler = telemetry.Sampler(c, high, lambda: None)
    try:
        sampler.start()
        write_all(write_end, (record(name="high.fd") + "\n").encode())
        deadline = time.monotonic() + 5
        while "high.fd" not in c.tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "high.fd" in c.tasks
        cpu = time.process_time()
        time.sleep(0.5)
        assert time.process_time() - cpu < 0.2  # it waits; it does not spin
    finally:
        sampler.stop()
        for fd in (read_end, write_end, high):
            os.close(fd)


def test_a_step_that_keeps_failing_waits_longer_each_time() -> None:
    """Finding 2: a failing summary was retried every 10 ms (191 tracebacks in 2.2 s)."""
    c = collector()
    calls: list[float] = []

    def broken() -> None:
        calls.append(time.monotonic())
        raise RuntimeError("summary failed")

    sampler = telemetry.Sampler(c, None, broken)
    now, runs = 0.0, []
    for _ in range(6):
        now = sampler._step("summary", now, 1.0, broken)
        runs.append(now)
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0] * 8  # backing off
    assert len(calls) == 6


# -- the worker memory watch (finding 4) ------------------------------------------------------
class ChangingSet:
    """A set that another thread changes while it is read."""

    def __iter__(self) -> Any:
        raise RuntimeError("Set changed size during iteration")


def test_the_worker_memory_watch_stops_the_worker_even_when_its_task_list_is_busy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finding 4: ``tripped`` was set before reading ``active_requests``; a RuntimeError
    there left ``should_stop`` unset for good."""
    from celery.worker import state

    monkeypatch.setattr(state, "active_requests", ChangingSet())
    monkeypatch.setattr(state, "should_stop", None)
    watch = WorkerMemoryLimit(1, "w@h")
    watch.check()
    assert state.should_stop == 75
    assert active_task_names(ChangingSet()) == []
    assert active_task_names([SimpleNamespace(name="b"), SimpleNamespace(name="a")]) == ["a", "b"]


# -- signals only to current children (finding 12) ---------------------------------------------
def test_a_child_whose_pid_was_reused_is_never_signalled(tmp_path: Path) -> None:
    """The start time taken at fork names the process; a pid reused by another process has
    another start time, and PoolControl refuses to act on it."""
    proc = tmp_path / "proc"
    (proc / "4242").mkdir(parents=True)
    stat = "4242 (celery: a (weird) name) S " + " ".join(["0"] * 18) + " 777 0 0"
    (proc / "4242" / "stat").write_text(stat)
    assert procfs.start_time(4242, str(proc)) == 777
    (proc / "4242" / "stat").write_text(stat.replace(" 777 ", " 778 "))
    assert procfs.start_time(4242, str(proc)) == 778
    assert procfs.start_time(4343, str(proc)) is procfs.Unread.GONE
    (proc / "4242" / "stat").write_text("garbage")
    assert procfs.start_time(4242, str(proc)) is procfs.Unread.ODD

    process = SimpleNamespace(pid=os.getpid(), exitcode=None)
    control = actuator.PoolControl(SimpleNamespace())
    control.children[os.getpid()] = actuator.Child(os.getpid(), 1, process)  # a wrong time
    assert control._current(os.getpid()) is None
    control.children[os.getpid()] = actuator.Child(
        os.getpid(), procfs.known(procfs.start_time(os.getpid())), process
    )
    assert control._current(os.getpid()) is not None
    process.exitcode = 0  # reaped: gone, whatever its pid says
    assert control._current(os.getpid()) is None


def test_a_start_time_the_guard_may_not_read_leaves_the_pools_word(tmp_path: Path) -> None:
    """Gone from /proc, or another start time: not the child forked. A stat file that
    cannot be read or makes no sense (hidepid, an odd kernel) proves neither: the pool's
    own word (its exit code) stands, so the guard does not drop a live child."""
    proc = tmp_path / "proc"
    (proc / "4242").mkdir(parents=True)
    control = actuator.PoolControl(SimpleNamespace(), proc=str(proc))
    control.children[4242] = actuator.Child(4242, 777, SimpleNamespace(pid=4242, exitcode=None))
    assert control._current(4242) is None  # no stat: gone
    (proc / "4242" / "stat").write_text("garbage")
    assert control._current(4242) is not None
    stat = "4242 (celery) S " + " ".join(["0"] * 18) + " 778 0 0"
    (proc / "4242" / "stat").write_text(stat)
    assert control._current(4242) is None  # another process with that pid


def test_collecting_while_children_come_and_go_never_raises() -> None:
    """The collector's listing of children is read from the sampler's thread while the
    event loop adds and removes them (PoolControl.pids copies the table first)."""
    control = actuator.PoolControl(SimpleNamespace())
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            control.children[i % 64] = actuator.Child(i % 64, None, None)
            control.children.pop((i + 32) % 64, None)
            i += 1

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(20000):
            control.pids()
    finally:
        stop.set()
        thread.join()


def test_a_full_pipe_drops_the_childs_record_and_the_task_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The main process stopped reading (busy, or gone): the child's write finds the pipe
    full or closed. The record is dropped at once, the task path neither blocks nor
    raises, and no error is logged; once there is room, records flow again."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    probe = telemetry.ChildProbe(write_end, "w@h", load_settings({}, {}), 0)
    with caplog.at_level(logging.DEBUG):
        with contextlib.suppress(BlockingIOError):
            while True:  # fill it
                os.write(write_end, b"x" * 65536)
        for number in range(50):
            probe.after_task(f"id-{number}", SimpleNamespace(name="app.full"))
        assert probe.tasks == 50
        drained = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(read_end, 65536):  # the main process catches up
                drained += chunk
        assert drained.strip(b"x") == b""  # the filler only: the records were dropped
        probe.after_task("id-room", SimpleNamespace(name="app.room"))  # a new name: sent
        assert b"app.room" in os.read(read_end, 65536)
        os.close(read_end)  # the reader is gone: EPIPE, dropped too
        probe.after_task("id-closed", SimpleNamespace(name="app.closed"))
    os.close(write_end)
    assert probe.tasks == 52
    assert not [r for r in caplog.records if "event=error" in r.getMessage()]


def test_a_child_reads_its_private_memory_after_the_first_run_of_each_kind_of_task() -> None:
    """The private field (8th) is read after the first task and after the first run of
    each new kind; a kind run again sends no record unless something changed, and then
    without a private reading."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    probe = telemetry.ChildProbe(write_end, "w@h", load_settings({}, {}), 0)
    probe.after_task("id-1", SimpleNamespace(name="app.ping"))
    probe.after_task("id-2", SimpleNamespace(name="app.report"))
    held = mmap.mmap(-1, 4 * 1024 * 1024)  # fresh pages: the RSS moves, a record is sent
    for page in range(0, len(held), mmap.PAGESIZE):
        held[page] = 1
    probe.after_task("id-3", SimpleNamespace(name="app.report"))
    lines = os.read(read_end, 65536).decode().splitlines()
    os.close(read_end)
    os.close(write_end)
    held.close()
    read = [(line.split()[-1], int(line.split()[7]) >= 0) for line in lines]
    assert read == [("app.ping", True), ("app.report", True), ("app.report", False)]


def test_a_child_whose_tasks_change_nothing_still_reports_now_and_then() -> None:
    """The plan is paced by the CPU figures of the records: a child sends one after its
    1st, 2nd, 4th, 8th and 16th task, then every RECORD_EVERY-th, changed or not."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    probe = telemetry.ChildProbe(write_end, "w@h", load_settings({}, {}), 0)
    for number in range(2 * telemetry.RECORD_EVERY):
        probe.after_task(f"id-{number}", SimpleNamespace(name="app.same"))
    lines = os.read(read_end, 65536).decode().splitlines()
    os.close(read_end)
    os.close(write_end)
    tasks = [int(line.split()[11]) for line in lines]
    assert {1, 2, 4, 8, 16, 32, 64} <= set(tasks)
    assert len(tasks) < telemetry.RECORD_EVERY  # not one a task (the RSS may move)
