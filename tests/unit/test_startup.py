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
