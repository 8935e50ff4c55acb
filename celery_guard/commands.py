"""``celery -A proj guard ...``: the guard under Celery's own command line.

Registered as a ``celery.commands`` entry point. ``check`` is the startup decision as a
dry run (exit 78 when the requested concurrency does not fit, to gate a deploy);
``imports`` measures what each task module costs in every child; ``report`` is the fleet
view, every worker's figures asked through the remote control.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import click
from billiard import cpu_count

from . import advice, cgroups, fleet, imports_cost, startup, stats, task_limits
from .config import OPTIONS, ConfigError, Settings, error_fields, given_options, load_settings
from .logline import format_event, use_format
from .plan import FORKING_POOLS
from .sizes import mib
from .startup import EX_CONFIG, pool_name


def _guard_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(OPTIONS):
        command = click.option(
            option.flag, default=None, help=f"{option.accepted} (else ${option.variable})"
        )(command)
    return command


def _format_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--format",
        "output",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="text: logfmt lines, as in the worker's log; json: one object a line",
    )(command)


#: ``check`` where nothing can be measured (no /proc, not Linux): sysexits' "service
#: unavailable", as a worker there starts with its concurrency unchanged.
EX_UNAVAILABLE = 69
#: The largest pool size ``check`` takes: beyond it a figure is a typo, not a pool.
MAX_CONCURRENCY = 100_000
#: KiB: 8 EiB, more memory than a machine has.
MAX_KIB = 1 << 43


class Whole(click.ParamType):
    """A whole number of ASCII digits from ``low`` to ``high``: click's INT would take
    ``-5``, Arabic-Indic digits and ``1_0``; a bad value is click's usage error (exit 2)."""

    name = "integer"

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        number = _whole(value, self.low, self.high)
        if number is None:
            self.fail(f"{value!r}: expected a whole number from {self.low} to {self.high}")
        return number


class Concurrency(click.ParamType):
    """``-c`` as Celery takes it: a whole number (0: the setting, else the CPU count) or
    ``auto``."""

    name = "concurrency"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> int | str:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        number = _whole(value, 0, MAX_CONCURRENCY)
        if number is None:
            self.fail(f"{value!r}: expected auto or a whole number from 0 to {MAX_CONCURRENCY}")
        return number


class Autoscale(click.ParamType):
    """``--autoscale MAX,MIN`` (or ``MAX``) as Celery takes it: the larger is the maximum."""

    name = "MAX,MIN"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        parts = str(value).split(",")
        numbers = [n for n in (_whole(part, 0, MAX_CONCURRENCY) for part in parts) if n is not None]
        if len(parts) > 2 or len(numbers) != len(parts) or max(numbers) < 1:
            self.fail(
                f"{value!r}: expected MAX,MIN or MAX, whole numbers from 0 to"
                f" {MAX_CONCURRENCY}, MAX at least 1"
            )
        return max(numbers), min(numbers) if len(numbers) == 2 else 0


def _whole(value: Any, low: int, high: int) -> int | None:
    """An int, or ASCII digits, from ``low`` to ``high``; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = value
    else:
        text = str(value).strip()
        if not text.isascii() or not text.isdigit() or len(text) > 20:
            return None
        number = int(text)
    return number if low <= number <= high else None


def _conf_whole(conf: Any, setting: str, low: int, high: int) -> int | None:
    """A Celery setting ``check`` uses, from app.conf: None when unset; a bad value is
    click's usage error (exit 2), as ``celery worker`` gives for its own options."""
    value = conf.get(setting)
    if value is None or value == "":
        return None
    number = _whole(value, low, high)
    if number is None:
        raise click.UsageError(
            f"{setting} in app.conf is {value!r}: expected a whole number from {low} to {high}"
        )
    return number


@click.group(name="guard")
def guard() -> None:
    """celery-guard: will this app's worker fit in its memory budget?"""


def _settings(options: dict[str, Any], conf: Any, output: str) -> Settings:
    try:
        return load_settings(os.environ, conf, given_options(options))
    except ConfigError as error:
        click.echo(format_event("config_error", error_fields(error), output))
        sys.exit(EX_CONFIG)


def _requested(
    concurrency: int | str | None, autoscale: tuple[int, int] | None, conf: Any, forks: bool
) -> tuple[int, bool]:
    """(the concurrency the worker would start with, whether it came from the host's CPU
    count), by Celery's own rules: ``--autoscale`` max, ``-c``, ``worker_concurrency``,
    else billiard's ``cpu_count``."""
    if autoscale:
        return autoscale[0], False
    value: int | str | None = concurrency or None  # 0: the setting, as in Celery
    if value is None:
        setting = conf.get("worker_concurrency")
        auto = isinstance(setting, str) and setting.strip().lower() == "auto"
        value = "auto" if auto else _conf_whole(conf, "worker_concurrency", 0, MAX_CONCURRENCY)
    if value == "auto":
        budget = _cpu_budget(forks)
        return (budget if budget is not None else cpu_count()), False
    if value:
        return int(value), False
    return cpu_count(), True


def _cpu_budget(cpu_bound: bool = True) -> int | None:
    """What Celery's ``-c auto`` would start (Celery 5.7+), else None."""
    try:
        from celery.utils.sysinfo import cpu_budget  # type: ignore[attr-defined]  # Celery 5.7+, not in celery-types
    except ImportError:
        return None
    return int(cpu_budget(use_cgroup_quota=cpu_bound).count)


def _import_like_a_worker(app: Any, pool: str | None) -> Any:
    """What the worker's main process holds before it forks: the task modules, the
    worker's own modules, the pool and the broker's client library."""
    from celery import concurrency

    app.loader.import_default_modules()
    import celery.apps.worker
    import celery.worker.consumer  # noqa: F401

    name = pool or app.conf.worker_pool
    try:
        pool_cls = concurrency.get_implementation(name)
    except (ImportError, AttributeError, ValueError) as error:  # an unknown or missing pool
        where = "--pool" if pool else "worker_pool in app.conf"
        names = ", ".join(concurrency.get_available_pool_names())
        raise click.UsageError(
            f"{where} is {name!r}: cannot load it ({type(error).__name__}: {error});"
            f" expected one of {names}, or module:Class"
        ) from None
    try:
        app.connection_for_read().transport  # noqa: B018 - imports the client library
    except Exception:  # noqa: BLE001 - an unknown transport is the worker's to report
        pass
    return pool_cls


# The worker's own options are taken (those the check does not use, ignored): ``guard
# check`` takes a worker's command line as it is.
@guard.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option(
    "-c",
    "--concurrency",
    type=Concurrency(),
    default=None,
    help="as for celery worker: a number or auto",
)
@click.option("-P", "--pool", default=None, help="as for celery worker (default: worker_pool)")
@click.option("--autoscale", type=Autoscale(), default=None, help="as for celery worker: MAX,MIN")
@click.option(
    "--max-memory-per-child", type=Whole(0, MAX_KIB), default=None, help="KiB, as for celery worker"
)
@click.option(
    "--prefetch-multiplier",
    type=Whole(0, MAX_CONCURRENCY),
    default=None,
    help="as for celery worker",
)
@click.option("--without-gossip", is_flag=True, help="as for celery worker")
@click.option("--without-mingle", is_flag=True, help="as for celery worker")
@click.option("--without-heartbeat", is_flag=True, help="as for celery worker")
@_format_option
@_guard_options
@click.pass_context
def check(ctx: click.Context, **options: Any) -> None:
    """The worker's startup decision, without starting a worker.

    Prints the startup line's keys as event=check, then advice, each with a reason and a
    fix. Exit status 0 when the requested concurrency fits, 78 when it does not. Run it
    where the worker will run (the same container and memory limit), before the worker.
    """
    app = ctx.obj.app
    output = options["output"]
    use_format(output)  # a line the measurement logs (a state file refused) too
    settings = _settings(options, app.conf, output)
    pool = pool_name(_import_like_a_worker(app, options["pool"]))
    forks = pool in FORKING_POOLS
    requested, from_host = _requested(options["concurrency"], options["autoscale"], app.conf, forks)
    try:
        measured = startup.measure(settings, pool, requested)
    except startup.Unsupported as error:  # the worker's startup line says the same
        fields = startup.unmeasured_fields(settings, pool, requested, str(error))
        click.echo(format_event("check", fields, output))
        ctx.exit(EX_UNAVAILABLE)
    fields = measured.fields()
    # From the estimate (the worker's summary gives it again from what its children
    # used); a pool that does not fork needs room for the main process alone.
    fields["recommended_memory_limit_mib"] = stats.container_limit(
        parent=mib(measured.parent.rss), requested=requested if forks else 0,
        child_peak=mib(measured.child), headroom_fraction=measured.settings.headroom,
    )  # fmt: skip
    click.echo(format_event("check", fields, output))

    conf, own = app.conf, measured.budget.own
    facts = advice.Facts.of(
        conf,
        settings,
        pool=pool,
        parent_rss=measured.parent.rss,
        max_memory_per_child_kib=options["max_memory_per_child"]
        or _conf_whole(conf, "worker_max_memory_per_child", 0, MAX_KIB)
        or 0,
        oom_group=bool(own is not None and cgroups.read_oom_group(own)),
        concurrency_from_host_cpus=from_host,
        host_cpus=cpu_count(),
        cpu_budget=_cpu_budget(),
        prefetch_multiplier=options["prefetch_multiplier"]
        or _conf_whole(conf, "worker_prefetch_multiplier", 0, MAX_CONCURRENCY)
        or 1,
        left_on=tuple(
            name for name in ("gossip", "mingle", "heartbeat") if not options[f"without_{name}"]
        ),
    )
    for item in advice.check_advice(facts):
        click.echo(format_event("advice", item.fields(), output))
    _check_task_limits(app, settings, measured, forks, output)
    fits = not forks or requested <= measured.decision.fits
    ctx.exit(0 if fits else EX_CONFIG)


def _check_task_limits(
    app: Any, settings: Settings, measured: startup.Measured, forks: bool, output: str
) -> None:
    """One ``event=task_limit`` line per task that declares a memory limit, and advice
    for a limit no child can ever reach: what one child can have is the budget less the
    headroom and what the main process uses."""
    try:
        limits = task_limits.declared(
            app.tasks, settings.task_memory_limit, settings.task_soft_memory_limit
        )
    except task_limits.LimitError as error:
        bad = {"variable": f"{error.task}.{error.option}", "setting": error.option,
               "source": "task", "value": str(error.value)[:200],
               "accepted": error.accepted}  # fmt: skip
        click.echo(format_event("config_error", bad, output), err=True)
        raise SystemExit(EX_CONFIG) from None
    room = measured.budget.limit - measured.decision.headroom - measured.in_use
    for name, limit in sorted(limits.items()):
        largest = max(x for x in (limit.hard, limit.soft) if x is not None)
        fields: dict[str, Any] = {
            "task": name,
            "memory_limit_mib": mib(limit.hard) if limit.hard else None,
            "soft_memory_limit_mib": mib(limit.soft) if limit.soft else None,
            "child_room_mib": mib(max(room, 0)),
            "reachable": largest <= room,
        }
        click.echo(format_event("task_limit", fields, output))
        if largest > room:
            item = advice.Advice(
                "task_limit_above_budget",
                f"{name} may grow to {mib(largest)} MiB before its limit stops it, more than "
                f"one child can ever have here ({mib(max(room, 0))} MiB: the budget less the "
                "headroom and the main process): the worker runs out first",
                "a limit below what one child can have, or more memory",
                {"task": name},
            )
            click.echo(format_event("advice", item.fields(), output))
    if limits and not forks:
        click.echo(format_event("advice", advice.Advice(
            "task_memory_limit_ignored",
            "tasks declare memory limits, and this pool runs tasks in the main process",
            "the prefork pool", {},
        ).fields(), output))  # fmt: skip


@guard.command()
@click.option("--top", type=Whole(0, 1 << 31), default=0, help="only the N largest (0: all)")
@_format_option
@click.pass_context
def imports(ctx: click.Context, top: int, output: str) -> None:
    """What each of the app's task modules, with what it imports, costs in every child.

    Each module is imported in a fresh interpreter, after Celery and the module that
    defines the app, and measured as the child estimate measures the main process.
    Largest first: candidates to import lazily or to give a queue and worker of their own.
    """
    app = ctx.obj.app
    app.loader.import_default_modules()
    base = imports_cost.app_module(app)
    rows = imports_cost.measure_all(imports_cost.task_modules(app), base, sys.executable)
    rows.sort(key=lambda row: -(row.child or 0))
    for row in rows[: top or None]:
        fields = {
            "module": row.module,
            "child_mib": mib(row.child) if row.child is not None else None,
            "main_mib": mib(row.rss) if row.rss is not None else None,
            "defined_tasks": row.tasks,
            **({"error": row.error} if row.error else {}),
        }
        click.echo(format_event("imports", fields, output))


@guard.command()
@click.option("-t", "--timeout", type=float, default=5.0, show_default=True,
              help="seconds to wait for the workers' replies")  # fmt: skip
@click.option(
    "-d", "--destination", multiple=True,
    help="only these workers: node names, comma separated (as for celery inspect), or repeated",
)  # fmt: skip
@click.option(
    "--format", "output", type=click.Choice(["text", "json"]), default="text",
    show_default=True, help="text: a table per worker and one per queue; json: one object",
)  # fmt: skip
@click.option("-j", "--json", "as_json", is_flag=True, help="--format json (as for celery inspect)")
@click.pass_context
def report(
    ctx: click.Context, timeout: float, destination: tuple[str, ...], output: str, as_json: bool
) -> None:
    """Every worker's figures and recommendations, asked through Celery's remote control.

    One table per worker (its queues, pool, children's memory, OOM kills, recycles,
    holds, and the recommended concurrency, worker_max_memory_per_child and container
    memory limit) and one per queue. -j (--format json) prints one object. Exit status 1
    when no worker answered.
    """
    app = ctx.obj.app
    output = "json" if as_json else output
    nodes = [node.strip() for given in destination for node in given.split(",")]
    where = [node for node in nodes if node] or None
    replies = app.control.broadcast("guard_stats", reply=True, timeout=timeout, destination=where)
    stats = {node: reply for answer in replies or [] for node, reply in answer.items()}
    if not stats:
        click.echo("no worker answered guard_stats (is celery_guard in the app?)", err=True)
        ctx.exit(1)
    active = app.control.inspect(timeout=timeout, destination=where).active_queues() or {}
    queues = {
        node: [q.get("name", "?") for q in found if isinstance(q, dict)]
        for node, found in active.items()
        if isinstance(found, list)
    }
    workers = fleet.worker_rows(stats, queues)
    click.echo(fleet.render(workers, fleet.queue_rows(workers), output))


def _shown(value: Any) -> Any:
    """A setting's parsed value as a log value: a flag as true/false, a fraction as is."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


@guard.command(name="config")
@_format_option
@_guard_options
@click.pass_context
def config_command(ctx: click.Context, **options: Any) -> None:
    """Every celery-guard setting as a worker started here would read it.

    One event=config line a setting: its name, variable, the value in effect (sizes in
    bytes, fractions as fractions) and its source: option (a --guard- option, given here
    as to the worker), env (the CELERY_GUARD_* variable), config (app.conf, Django's
    CELERY_ namespace included) or default. Exit status 78 on a value the worker would
    refuse, with the same config_error line.
    """
    app = ctx.obj.app
    output = options["output"]
    settings = _settings(options, app.conf, output)
    for option in OPTIONS:
        fields = {
            "setting": option.setting, "variable": option.variable,
            "value": _shown(getattr(settings, option.name)),
            "source": settings.source(option.name), "default": option.default,
        }  # fmt: skip
        click.echo(format_event("config", fields, output))


__all__ = ["check", "config_command", "guard", "imports", "report"]
