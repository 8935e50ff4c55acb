"""``bench/runtime.py``'s exit status: CI's short run fails when a guarded run failed what
the guard is for (a task lost, stopped or unfinished, an OOM kill), whatever the times."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import runtime


def outcome(label: str, **changed: object) -> runtime.Outcome:
    figures: dict[str, object] = {
        "seconds": 10.0, "succeeded": 240, "sent": 240, "failed": {}, "oom_kills": 0,
        "smallest_pool": 4,
    }  # fmt: skip
    figures.update(changed)
    return runtime.Outcome(label, **figures)  # type: ignore[arg-type]


def comparison(*guarded: runtime.Outcome) -> runtime.Comparison:
    vanilla = outcome("vanilla -c 4", smallest_pool=None)
    return runtime.Comparison(
        "leaky", 768, [vanilla], vanilla, 4, [vanilla], {"early": list(guarded), "late": []}
    )


@pytest.mark.parametrize(
    ("changed", "unclean"),
    [
        ({}, False),
        ({"seconds": 99.0}, False),  # slow: reported, not judged
        ({"oom_kills": 1}, True),
        ({"stopped": 1}, True),
        ({"succeeded": 239}, True),  # lost
        ({"seconds": None, "succeeded": 200, "failed": {"unfinished": 40}}, True),
    ],
    ids=["clean", "slow", "oom-kill", "stopped", "lost", "unfinished"],
)
def test_a_guarded_run_that_failed_its_tasks_fails_the_run(
    changed: dict[str, object], unclean: bool
) -> None:
    found = runtime.not_clean([comparison(outcome("guard"), outcome("guard", **changed))])
    assert bool(found) is unclean
    assert all(line.startswith("leaky 768 MiB acks=early: guard") for line in found)
