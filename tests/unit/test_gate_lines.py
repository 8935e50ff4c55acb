"""What the hand-over gate says when it holds tasks and lets them go (issue 25: mutation
testing found these unpinned): one ``pressure action=hold`` line when holding starts, one
``action=release`` when a task is handed over again; with ``governor=observe`` the task
that would have been held is handed over, and the hold is still logged and counted.

Driven as in test_governor.py: the real governor, ledger and policy over fake children
(300 MiB in use of a 1000 MiB limit, four idle children that ran ``t``). A task of a kind
declared to need 800 MiB does not fit: 300 + 800 passes the high mark (950 MiB).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest

from celery_guard.actuator import Verdict
from celery_guard.governor import Governor

from .test_governor import governor, guard_lines
from .test_terminate_lines import MIB


@dataclass
class Request:
    id: str
    name: str = "t"


def _busy(tmp_path: Path) -> Governor:
    """Four children, one of them running ``t``: the pool is not idle, so a task is
    weighed; ``heavy`` is declared at 800 MiB."""
    budget, _ = governor(tmp_path, 4)
    budget.ledger.tasks.limits["heavy"] = 800 * MIB
    budget.task_accepted(101, "id-101", "t")
    return budget


def _every_child_busy(tmp_path: Path) -> Governor:
    """As ``_busy``, and the other three children running ``t`` too: no free child."""
    budget = _busy(tmp_path)
    for pid in (102, 103, 104):
        budget.task_accepted(pid, f"id-{pid}", "t")
    return budget


def test_holding_starts_with_one_line_that_names_the_first_task_held(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    budget = _busy(tmp_path)
    caplog.set_level(logging.INFO, logger="celery_guard")
    assert budget.gate(Request("h1", "heavy")) is Verdict.HOLD
    assert budget.gate(Request("h2", "heavy")) is Verdict.HOLD
    (line,) = guard_lines(caplog, "action", "hold")  # one line, not one per task held
    assert (line["level"], line["task"], line["task_id"]) == ("high", "heavy", "h1")
    assert line["unreclaimable_mib"] == 300.0 and line["peak_mib"] == 800.0
    assert budget.holds == 2 and budget.holding


def test_each_hold_records_how_long_its_decision_took(tmp_path: Path) -> None:
    """The decision's time (for the summary), in seconds: a fraction of one here."""
    budget = _busy(tmp_path)
    for n in range(3):
        assert budget.gate(Request(f"h{n}", "heavy")) is Verdict.HOLD
    assert len(budget.hold_decisions) == 3
    assert all(0 <= seconds < 1 for seconds in budget.hold_decisions)


def test_the_first_task_handed_over_after_a_hold_logs_the_release_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    budget = _busy(tmp_path)
    assert budget.gate(Request("h1", "heavy")) is Verdict.HOLD
    caplog.set_level(logging.INFO, logger="celery_guard")
    assert budget.gate(Request("s1", "t")) is Verdict.HAND_OVER
    assert budget.gate(Request("s2", "t")) is Verdict.HAND_OVER
    (line,) = guard_lines(caplog, "action", "release")
    assert (line["level"], line["task"], line["held"]) == ("low", "t", 0)
    # 300 MiB in use, and ``t`` grew its child by nothing in its runs so far
    assert (line["unreclaimable_mib"], line["projected_mib"]) == (300.0, 300.0)
    assert not budget.holding
    assert budget.admitted is not None and budget.admitted[:2] == ("s2", "t")
    assert budget.gate(Request("h2", "heavy")) is Verdict.HOLD  # holding starts again
    assert [line["task_id"] for line in guard_lines(caplog, "action", "hold")] == ["h1", "h2"]


@pytest.mark.parametrize(
    ("observing", "verdict"), [(False, Verdict.HOLD), (True, Verdict.HAND_OVER)]
)
def test_a_task_that_waits_for_a_free_child_is_no_hold(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, observing: bool, verdict: Verdict
) -> None:
    """Every child busy: the task waits for one at the gate (observing, it is handed over);
    that is no memory pressure, so no hold line and no hold counted."""
    budget = _every_child_busy(tmp_path)
    budget.observing = observing
    caplog.set_level(logging.INFO, logger="celery_guard")
    assert budget.gate(Request("n1", "t")) is verdict
    assert guard_lines(caplog, "action", "hold") == [] and budget.holds == 0


def test_observing_hands_over_what_it_would_hold_and_logs_the_hold(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    budget = _busy(tmp_path)
    budget.observing = True  # governor=observe: decided and logged, not done
    caplog.set_level(logging.INFO, logger="celery_guard")
    assert budget.gate(Request("h1", "heavy")) is Verdict.HAND_OVER
    (line,) = guard_lines(caplog, "action", "hold")
    assert (line["task"], line["task_id"], line["observe"]) == ("heavy", "h1", True)
    assert budget.holds == 1 and len(budget.hold_decisions) == 1
    assert 0 <= budget.hold_decisions[0] < 1
    assert budget.admitted is not None and budget.admitted[:3] == ("h1", "heavy", 800 * MIB)


def test_observing_hands_over_a_second_run_of_a_kind_being_measured_without_a_hold(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A kind never measured: its second run waits for the first (``DEFER``), unless
    observing; waiting to learn is no memory pressure, so no hold is logged either way."""
    budget = _busy(tmp_path)
    budget.observing = True
    caplog.set_level(logging.INFO, logger="celery_guard")
    assert budget.gate(Request("u1", "u")) is Verdict.HAND_OVER
    budget.task_handed(Request("u1", "u"))
    assert budget.gate(Request("u2", "u")) is Verdict.HAND_OVER
    assert guard_lines(caplog, "action", "hold") == [] and budget.holds == 0


def test_past_the_high_mark_even_a_task_that_fits_is_held(tmp_path: Path) -> None:
    """``Safety.over``: the memory the kernel cannot reclaim settled past the high mark."""
    budget = _busy(tmp_path)
    assert budget.gate(Request("s1", "t")) is Verdict.HAND_OVER
    budget.safety.over = True
    assert budget.gate(Request("s2", "t")) is Verdict.HOLD
    assert budget.holds == 1


def test_with_no_view_built_yet_the_gate_builds_one(tmp_path: Path) -> None:
    budget = _busy(tmp_path)
    budget.cached_view = None
    assert budget.gate(Request("s1", "t")) is Verdict.HAND_OVER
    assert budget.cached_view is not None
    assert budget.cached_view[1].unreclaimable == 300 * MIB


def test_at_a_re_check_the_gate_weighs_a_task_on_the_cgroup_read_then(tmp_path: Path) -> None:
    """The re-check (``_recheck_soon``) reads the cgroup anew: 100 MiB in use then, so
    ``heavy`` (800 MiB) fits under the high mark (950) where the older view (300) did not."""
    from dataclasses import replace

    budget = _busy(tmp_path)
    assert budget.gate(Request("h1", "heavy")) is Verdict.HOLD
    budget.rechecked = replace(budget.fresh_view(), unreclaimable=100 * MIB)
    assert budget.gate(Request("h1", "heavy")) is Verdict.HAND_OVER
