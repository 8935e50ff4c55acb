"""``event=recycle`` for billiard's own recycles: both of its limits end a child with the
same status (155, ``EX_RECYCLE``), and the line names the one that did."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from .test_adversarial_pipe import MIB, collector
from .test_governor import guard_lines

EX_RECYCLE = 155


@pytest.mark.parametrize(
    ("max_tasks", "said_memory", "reason", "counted"),
    [
        (2, False, "max_tasks_per_child", 0),  # it ran its two tasks
        (2, True, "max_memory_per_child", 1),  # its record said its memory passed
        (0, False, "max_memory_per_child", 1),  # only the memory limit ends a child so
    ],
)
def test_a_recycle_names_billiards_limit_that_ended_the_child(
    caplog: pytest.LogCaptureFixture,
    max_tasks: int,
    said_memory: bool,
    reason: str,
    counted: int,
) -> None:
    c = dataclasses.replace(collector(), max_memory_kib=100 * 1024, max_tasks_per_child=max_tasks)
    kind = "R" if said_memory else "T"
    c.read_lines([f"{kind} 101 {MIB} 1 {MIB} 0 {150 * MIB} -1 -1 -1 -1 2 app.t"])
    with caplog.at_level(logging.INFO, logger="celery_guard"):
        c.on_exit(101, EX_RECYCLE, None)
    (line,) = guard_lines(caplog, "event", "recycle")
    assert line["reason"] == reason
    assert c.recycles == counted  # the summary's: recycles by worker_max_memory_per_child
