"""The startup decision's inputs, over fixture trees: the budget (the setting, else the
cgroup's limit with what is already in use there, else physical memory), the pool's
``-P`` name, and a level for every action the decision can take."""

from __future__ import annotations

import shutil
from pathlib import Path

import psutil
import pytest
from celery.concurrency.prefork import TaskPool
from celery.concurrency.solo import TaskPool as SoloPool

from celery_guard import plan, startup
from celery_guard.config import load_settings

CGROUPS = Path(__file__).resolve().parent.parent / "testdata" / "cgroups"
MIB = 1024 * 1024
PHYSICAL = 16 * 1024 * MIB  # the fixtures' MemTotal


def test_a_cgroup_limit_is_the_budget_less_nothing_but_what_is_in_use() -> None:
    """v1: usage 120 MiB less 10 MiB of inactive page cache is in use already."""
    budget = startup.read_budget(load_settings({}, {}), str(CGROUPS / "v1_docker"))
    assert (budget.limit, budget.source, budget.in_use) == (512 * MIB, "cgroup-v1", 110 * MIB)
    assert budget.cgroup is not None and budget.physical == PHYSICAL


def test_the_setting_wins_over_the_cgroup() -> None:
    settings = load_settings({"CELERY_GUARD_MEMORY_LIMIT": "300M"}, {})
    budget = startup.read_budget(settings, str(CGROUPS / "v1_docker"))
    assert (budget.limit, budget.source, budget.in_use) == (300 * MIB, "env", 0)


def test_without_a_memory_controller_physical_memory_is_the_budget() -> None:
    budget = startup.read_budget(load_settings({}, {}), str(CGROUPS / "no_memory_controller"))
    assert (budget.limit, budget.source, budget.cgroup) == (PHYSICAL, "physical", None)
    assert "no memory controller" in budget.detail


def test_a_limit_given_as_a_setting_counts_the_main_process_as_in_use() -> None:
    """Under a limit given as a setting no cgroup reading says what is in use: the main
    process is (every child is forked from it, under the same limit), so the decision
    starts from its RSS, not from nothing."""
    settings = load_settings(
        {"CELERY_GUARD_MEMORY_LIMIT": "4G", "CELERY_GUARD_CHILD_MEMORY": "100M"}, {}
    )
    measured = startup.measure(
        settings, "prefork", 4, forked=False, root=str(CGROUPS / "v1_docker")
    )
    assert measured.budget.in_use == 0  # nothing read: the limit is a setting
    rss = psutil.Process().memory_info().rss
    assert measured.in_use == measured.parent.rss
    assert 0.5 * rss < measured.in_use < 2 * rss


@pytest.mark.parametrize(("pool", "has_fits"), [("prefork", True), ("threads", False),
                                               ("solo", False)])  # fmt: skip
def test_a_pool_that_does_not_fork_has_no_children_that_fit(pool: str, has_fits: bool) -> None:
    """``fits`` counts children that fit the budget: a pool that runs its tasks in the
    main process forks none, so its line leaves the key empty rather than print a count
    of children it will never have (the figures it logs stay)."""
    settings = load_settings({"CELERY_GUARD_CHILD_MEMORY": "100M"}, {})
    measured = startup.measure(settings, pool, 1, forked=False, root=str(CGROUPS / "v1_docker"))
    fields = measured.fields()
    assert (fields["fits"] is not None) is has_fits
    assert fields["child_estimate_mib"] == 100.0 and fields["action"] == "kept"


def test_what_the_cgroup_holds_beyond_the_main_process_counts_as_in_use(tmp_path: Path) -> None:
    """A cgroup whose working set (4000 MiB: siblings, a sidecar) is more than the main
    process: the decision starts from the cgroup's figure."""
    root = tmp_path / "root"
    shutil.copytree(CGROUPS / "v1_docker", root)
    memory = root / "sys" / "fs" / "cgroup" / "memory"
    (memory / "memory.limit_in_bytes").write_text(f"{8192 * MIB}\n")
    (memory / "memory.usage_in_bytes").write_text(f"{4010 * MIB}\n")  # 10 MiB inactive file
    settings = load_settings({"CELERY_GUARD_CHILD_MEMORY": "100M"}, {})
    measured = startup.measure(settings, "prefork", 4, forked=False, root=str(root))
    assert measured.budget.in_use == measured.in_use == 4000 * MIB
    assert measured.parent.rss < measured.in_use


class Threads:  # a pool class Celery does not know
    pass


@pytest.mark.parametrize(
    "pool_cls,name",
    [
        ("threads", "threads"),  # a name is a name
        (TaskPool, "prefork"),  # Celery's "processes" alias too
        (SoloPool, "solo"),
        (type("MyPrefork", (TaskPool,), {}), "prefork"),  # a subclass still forks
        (Threads, "Threads"),
    ],
)
def test_the_pool_is_named_as_on_the_command_line(pool_cls: object, name: str) -> None:
    assert startup.pool_name(pool_cls) == name


def test_every_action_of_the_decision_has_a_level() -> None:
    seen = {
        plan.decide(mode=mode, limit=limit, headroom_fraction=0.1, in_use=0, child=100 * MIB,
                    requested=8, minimum=minimum, pool="prefork").action
        for mode in ("scale", "warn", "refuse", "off")
        for limit in (4096 * MIB, 300 * MIB, 50 * MIB)
        for minimum in (1, 4)
    }  # fmt: skip
    assert seen == set(startup.LEVELS)


@pytest.mark.parametrize(
    ("fixture", "limit_mib", "source", "detail", "in_use_mib", "measured_at", "own"),
    [
        ("v1_docker", 512, "cgroup-v1", "memory.limit_in_bytes in /", 110,
         "/sys/fs/cgroup/memory", "/sys/fs/cgroup/memory"),
        # the limit is set above the process's own cgroup: usage is compared there
        ("v2_nested", 1024, "cgroup-v2", "memory.max in /kubepods/burstable/pod1", 0,
         "/sys/fs/cgroup/kubepods/burstable/pod1", "/sys/fs/cgroup/kubepods/burstable/pod1/ctr1"),
        ("no_memory_controller", 16384, "physical", "no memory controller in /proc/self/cgroup",
         0, None, None),
        # a cgroup, but no limit in it: physical memory, and nothing compared at run time
        ("v1_unlimited_4k", 16384, "physical",
         "unlimited (9223372036854771712 in memory.limit_in_bytes in /user.slice)", 0,
         None, "/sys/fs/cgroup/memory/user.slice"),
        ("v2_limit_above_physical", 16384, "physical",
         "no limit: 68719476736 >= physical memory 17179869184 (memory.max in /big)", 0,
         None, "/sys/fs/cgroup/big"),
    ],
)  # fmt: skip
def test_the_budget_says_where_its_limit_comes_from_and_where_usage_is_measured(
    fixture: str, limit_mib: int, source: str, detail: str, in_use_mib: int,
    measured_at: str | None, own: str | None,
) -> None:  # fmt: skip
    root = str(CGROUPS / fixture)
    budget = startup.read_budget(load_settings({}, {}), root)
    assert (budget.limit, budget.source, budget.detail, budget.in_use) == (
        limit_mib * MIB, source, detail, in_use_mib * MIB,
    )  # fmt: skip
    assert (budget.cgroup.path if budget.cgroup else None) == (
        root + measured_at if measured_at else None
    )
    assert (budget.own.path if budget.own else None) == (root + own if own else None)
    assert budget.physical == PHYSICAL


def test_a_limit_given_as_a_setting_is_compared_with_the_usage_of_the_own_cgroup() -> None:
    root = str(CGROUPS / "v1_docker")
    budget = startup.read_budget(load_settings({"CELERY_GUARD_MEMORY_LIMIT": "300M"}, {}), root)
    assert (budget.detail, budget.physical) == ("env setting", PHYSICAL)
    assert budget.cgroup is not None and budget.cgroup == budget.own
    assert budget.cgroup.path == root + "/sys/fs/cgroup/memory"


def test_the_startup_line_has_every_figure_in_its_order() -> None:
    from celery_guard.cgroups import Cgroup
    from celery_guard.footprint import Estimate, Footprint

    settings = load_settings({"CELERY_GUARD_MEMORY_LIMIT": "1G"}, {})
    budget = startup.Budget(1024 * MIB, "env", "env setting", 0, Cgroup(1, "/c", "/c"))
    decision = plan.Decision(6, "scaled", 6, 102 * MIB)
    measured = startup.Measured(
        settings, "prefork", 8, budget, Footprint(200 * MIB, 150 * MIB, MIB),
        Estimate(110 * MIB, "census"), 120 * MIB, "measured", 210 * MIB, decision,
    )  # fmt: skip
    assert list(measured.fields().items()) == [
        ("mode", "scale"), ("pool", "prefork"), ("limit_mib", 1024.0), ("limit_source", "env"),
        ("headroom_mib", 102.0), ("parent_rss_mib", 200.0), ("child_estimate_mib", 120.0),
        ("child_estimate_source", "measured"), ("requested", 8), ("concurrency", 6),
        ("action", "scaled"), ("fits", 6), ("in_use_mib", 210.0),
        ("child_estimate_method", "census"), ("gc_freeze", True),
        ("limit_detail", "env setting"), ("usage_measured", "cgroup"),
    ]  # fmt: skip
    no_cgroup = startup.Measured(
        settings, "prefork", 8, startup.Budget(1024 * MIB, "physical", "none", 0),
        measured.parent, measured.estimate, 120 * MIB, "measured", 210 * MIB, decision,
    )  # fmt: skip
    assert no_cgroup.fields()["usage_measured"] == "none"


def _history_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    from celery_guard.logline import RECORD_ATTRIBUTE

    return [
        fields
        for record in caplog.records
        if (fields := getattr(record, RECORD_ATTRIBUTE, None)) is not None
        and fields["event"] == "history"
    ]


def test_a_cost_kept_by_an_earlier_run_is_used_when_no_child_cost_is_given(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from celery_guard import history

    state = str(tmp_path / "state.json")
    history.save(state, 64 * MIB, 3, fsync=lambda fd: None)
    settings = load_settings({"CELERY_GUARD_STATE_FILE": state}, {})
    assert startup.remembered_cost(settings, PHYSICAL) == 64 * MIB
    given = load_settings(
        {"CELERY_GUARD_STATE_FILE": state, "CELERY_GUARD_CHILD_MEMORY": "100M"}, {}
    )
    assert startup.remembered_cost(given, PHYSICAL) is None  # the setting wins
    # the cost is bounded by the physical memory it is given, not this machine's
    assert startup.remembered_cost(settings, 32 * MIB) is None
    assert [line["action"] for line in _history_lines(caplog)] == ["ignored"]


def test_a_state_file_not_written_yet_is_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings({"CELERY_GUARD_STATE_FILE": str(tmp_path / "none.json")}, {})
    assert startup.remembered_cost(settings, PHYSICAL) is None
    assert _history_lines(caplog) == []
    assert startup.remembered_cost(load_settings({}, {}), PHYSICAL) is None  # no state file


def test_a_state_file_that_cannot_be_used_is_one_warning_with_the_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    state = tmp_path / "state.json"
    state.write_text('{"version": 1}')
    settings = load_settings({"CELERY_GUARD_STATE_FILE": str(state)}, {})
    assert startup.remembered_cost(settings, PHYSICAL) is None
    (line,) = _history_lines(caplog)
    assert line == {
        "event": "history", "action": "ignored", "path": str(state),
        "reason": "no valid child_cost_bytes",
    }  # fmt: skip
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
