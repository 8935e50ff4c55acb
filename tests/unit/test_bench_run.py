"""``bench/run.py``'s vanilla bisection asks whether a concurrency fits in memory: a run
that ran out of time with no OOM kill fits (issue 25: a timeout counted as "does not fit"
gave the same vanilla largest at 768 and 1024 MiB for a 10.8 MiB child)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import run


@pytest.mark.parametrize(
    ("completed", "oom_kills", "fits", "verdict"),
    [
        (48, 0, True, "ok"),
        (30, 0, True, "fits (no OOM kill; 30/48 done in time)"),  # slow, not too big
        (48, 1, False, "fails (1 OOM kills)"),
        (30, 2, False, "fails (2 OOM kills)"),
    ],
)
def test_a_run_fits_when_nothing_was_oom_killed(
    completed: int, oom_kills: int, fits: bool, verdict: str
) -> None:
    outcome = run.Run(concurrency=8, completed=completed, sent=48, oom_kills=oom_kills)
    assert outcome.fits is fits
    assert outcome.verdict() == verdict


@pytest.mark.parametrize(("threshold", "high"), [(0, 24), (1, 24), (10, 24), (17, 24), (24, 24)])
def test_the_bisection_finds_the_largest_concurrency_that_fits(threshold: int, high: int) -> None:
    tried: list[int] = []

    def fits(concurrency: int) -> bool:
        tried.append(concurrency)
        return concurrency <= threshold

    assert run.largest(fits, high) == threshold
    assert len(tried) <= 5  # a bisection of 1..24, not a walk
