"""Real parts for the integration tests and the measurement scripts (``tests/`` and
``bench/`` both import it; it is not part of the package).

A Redis server on a free loopback port, cgroup-v1 memory cgroups created under this
process's own cgroup, and ``celery worker`` processes of the example app started inside
them. Nothing is faked: the kernel enforces the limits and counts the OOM kills.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery_guard import cgroups
from celery_guard.logline import parse_line

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MIB = 1024 * 1024


class Unavailable(Exception):
    """A real part this machine cannot provide (no redis-server, no writable cgroup)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """redis-server on 127.0.0.1, no persistence, stopped on close."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(binary):
            raise Unavailable("redis-server is not installed (apt-get install redis-server)")
        self.workdir = workdir
        self.port = port or free_port()
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        self.close()
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def restart(self, down: float = 2.0) -> None:
        """Stop the server, wait ``down`` seconds, start it again on the same port."""
        self.close()
        time.sleep(down)
        self.__init__(self.workdir, self.port)  # type: ignore[misc]

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def close(self) -> None:
        self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        if self.process.poll() is None:
            self.process.kill()


RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # Debian's, as the user running it


class RabbitServer:
    """A private RabbitMQ node (Debian's rabbitmq-server) on 127.0.0.1: its own node
    name, ports, data and log directories under ``workdir``; ``consumer_timeout`` in
    seconds (the server's setting: a delivery unacknowledged that long closes its
    channel). Stopped on close."""

    def __init__(self, workdir: Path, consumer_timeout: float | None = None) -> None:
        if not os.path.exists(RABBITMQ_SERVER):
            raise Unavailable("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
        self.workdir = workdir
        self.port, dist = free_port(), free_port()
        for sub in ("mnesia", "log"):
            (workdir / sub).mkdir(parents=True, exist_ok=True)
        config = [f"listeners.tcp.default = 127.0.0.1:{self.port}", "loopback_users = none"]
        if consumer_timeout is not None:
            config.append(f"consumer_timeout = {int(consumer_timeout * 1000)}")
        (workdir / "rabbit.conf").write_text("\n".join(config) + "\n")
        (workdir / "enabled_plugins").write_text("[].\n")
        self.env = {
            **os.environ,
            "HOME": str(workdir),  # the Erlang cookie
            "RABBITMQ_NODENAME": f"guard-{self.port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(dist),
            "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(workdir / "log"),
            "RABBITMQ_CONFIG_FILE": str(workdir / "rabbit"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
        }
        self._start()

    def _start(self) -> None:
        with open(self.workdir / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                [RABBITMQ_SERVER], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.process.poll() is None:
            if self._answers():
                return
            time.sleep(0.2)
        self.close()
        raise RuntimeError(f"rabbitmq-server did not start:\n{self.log[-3000:]}")

    def _answers(self) -> bool:
        from kombu import Connection

        try:
            with Connection(self.url(), connect_timeout=1) as connection:
                connection.connect()
                return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    @property
    def log(self) -> str:
        return (self.workdir / "server.log").read_text(errors="replace")

    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def restart(self, down: float = 2.0) -> None:
        """Stop the node, wait ``down`` seconds, start it again: the same name, ports and
        data (durable queues and their persistent messages come back)."""
        self.close()
        time.sleep(down)
        self._start()

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def own_memory_cgroup() -> Path:
    """This process's cgroup-v1 memory directory, where test cgroups can be made."""
    found = cgroups.find_memory_cgroup("/")
    if found.cgroup is None or found.cgroup.version != 1:
        raise Unavailable(f"no cgroup-v1 memory controller: {found.reason}")
    path = Path(found.cgroup.path)
    probe = path / f"cgtest-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as error:
        raise Unavailable(f"cannot create a memory cgroup under {path}: {error}") from None
    return path


class Cgroup:
    """A cgroup-v1 memory cgroup for one test; every process in it is killed on close."""

    def __init__(self, parent: Path, limit: int | None = None, name: str = "") -> None:
        self.path = parent / f"cgtest-{name or uuid.uuid4().hex[:10]}"
        self.path.mkdir()
        if limit is not None:
            (self.path / "memory.limit_in_bytes").write_text(str(limit))

    def child(self, limit: int | None = None) -> Cgroup:
        return Cgroup(self.path, limit)

    def _value(self, name: str) -> int:
        return int((self.path / name).read_text())

    def usage(self) -> int:
        return self._value("memory.usage_in_bytes")

    def max_usage(self) -> int:
        return self._value("memory.max_usage_in_bytes")

    def stat(self) -> dict[str, int]:
        text = (self.path / "memory.stat").read_text()
        return {key: int(value) for key, value in (line.split() for line in text.splitlines())}

    def working_set(self) -> int:
        """Usage minus inactive file pages, as the guard and the kubelet read it."""
        return self.usage() - self.stat()["total_inactive_file"]

    def private(self) -> int:
        """What the cgroup is charged for other than page cache: anonymous and kernel
        memory. A file page is charged once, to the first cgroup that reads it, so page
        cache is not a cost each child adds (see bench/estimate.py)."""
        return self.usage() - self.stat()["total_cache"]

    def oom_kills(self) -> int:
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        raise AssertionError("this kernel has no oom_kill counter in memory.oom_control")

    def pids(self) -> list[int]:
        pids = [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        for sub in self.path.glob("cgtest-*"):
            pids += [int(p) for p in (sub / "cgroup.procs").read_text().split()]
        return pids

    def close(self) -> None:
        _empty_and_remove(self.path)


def _empty_and_remove(path: Path) -> None:
    for sub in path.glob("cgtest-*"):
        _empty_and_remove(sub)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = (path / "cgroup.procs").read_text().split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        with contextlib.suppress(OSError):
            path.rmdir()
            return
        time.sleep(0.05)
    raise RuntimeError(f"could not remove test cgroup {path}")


def _enable_memory(path: Path) -> None:
    """Hand the memory controller to ``path``'s children (cgroup v2): a child has
    ``memory.*`` files only when its parent's ``cgroup.subtree_control`` lists memory."""
    control = path / "cgroup.subtree_control"
    if "memory" not in control.read_text().split():
        control.write_text("+memory")


def own_memory_cgroup_v2() -> Path:
    """A cgroup-v2 directory whose children get the memory controller, where test cgroups
    can be made: this process's own cgroup. v2 lets no cgroup but the root both hold
    processes and hand controllers to its children, so outside the root this process
    first moves into a leaf of its own (``cgtest-self-PID``) below it."""
    found = cgroups.find_memory_cgroup("/")
    if found.cgroup is None or found.cgroup.version != 2:
        raise Unavailable(f"no cgroup-v2 memory controller: {found.reason}")
    path, mount = Path(found.cgroup.path), Path(found.cgroup.mount)
    try:
        if "memory" not in (path / "cgroup.controllers").read_text().split():
            raise Unavailable(f"the memory controller is not available in {path} (bound to v1?)")
        if path != mount:
            leaf = path / f"cgtest-self-{os.getpid()}"
            leaf.mkdir(exist_ok=True)
            (leaf / "cgroup.procs").write_text(str(os.getpid()))
        _enable_memory(path)
        probe = path / f"cgtest-probe-{uuid.uuid4().hex[:8]}"
        probe.mkdir()
        has_memory = (probe / "memory.max").exists()
        probe.rmdir()
    except OSError as error:
        raise Unavailable(f"cannot make a cgroup-v2 memory cgroup under {path}: {error}") from None
    if not has_memory:
        raise Unavailable(f"a cgroup made under {path} has no memory.max")
    return path


class CgroupV2(Cgroup):
    """A cgroup-v2 memory cgroup for one test; every process in it (and in its children)
    is killed on close. The same questions as ``Cgroup``, asked of v2's files."""

    def __init__(
        self, parent: Path, limit: int | None = None, name: str = "", oom_group: bool = False
    ) -> None:
        self.path = parent / f"cgtest-{name or uuid.uuid4().hex[:10]}"
        self.path.mkdir()
        if limit is not None:
            self.set_limit(limit)
        if oom_group:
            (self.path / "memory.oom.group").write_text("1")

    def child(self, limit: int | None = None) -> CgroupV2:
        """A child cgroup; this one then can no longer hold processes itself (v2's rule)."""
        _enable_memory(self.path)
        return CgroupV2(self.path, limit)

    def set_limit(self, limit: int | None) -> None:
        """``memory.max``: where the OOM killer acts (None: no limit, "max")."""
        (self.path / "memory.max").write_text("max" if limit is None else str(limit))

    def usage(self) -> int:
        return self._value("memory.current")

    def max_usage(self) -> int:
        return self._value("memory.peak")

    def working_set(self) -> int:
        return self.usage() - self.stat()["inactive_file"]

    def private(self) -> int:
        return self.usage() - self.stat()["file"]

    def events(self) -> dict[str, int]:
        """``memory.events``: hierarchical counts (a child's kills show here too)."""
        return self.stat("memory.events")

    def stat(self, name: str = "memory.stat") -> dict[str, int]:
        text = (self.path / name).read_text()
        return {key: int(value) for key, value in (line.split() for line in text.splitlines())}

    def oom_kills(self) -> int:
        return self.events()["oom_kill"]


@dataclass
class Worker:
    """A ``celery worker`` of the example app, started inside a cgroup (or not)."""

    args: list[str]
    env: dict[str, str]
    log_path: Path
    cgroup: Cgroup | None = None
    queue: str = field(default_factory=lambda: f"q-{uuid.uuid4().hex[:8]}")
    process: subprocess.Popen[bytes] | None = None
    app: str = "heavy_app"  # a module in examples/
    #: drop the capabilities that let root read any file: a file of mode 000 is EACCES
    no_read_override: bool = False

    def start(self) -> Worker:
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            self.app,
            "worker",
            "-Q",
            self.queue,
            "-n",
            f"{self.queue}@%h",
            "-l",
            "info",
            *self.args,
        ]
        if self.no_read_override:
            caps = "-dac_override,-dac_read_search"
            command = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--", *command]
        if self.cgroup is not None:
            # Join the cgroup first, then become the worker: every fork stays inside.
            procs = self.cgroup.path / "cgroup.procs"
            command = ["sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh", *command]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=EXAMPLES,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """Wait for a regex in the log; fail early if the worker exits first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = regex.search(self.log)
            if match:
                return match
            if self.process is not None and self.process.poll() is not None:
                match = regex.search(self.log)
                if match:
                    return match
                raise AssertionError(
                    f"worker exited ({self.process.returncode}) before /{pattern}/:\n{self.log}"
                )
            time.sleep(0.1)
        raise AssertionError(f"no /{pattern}/ within {timeout} s:\n{self.log}")

    def wait_ready(self, timeout: float = 60) -> None:
        self.wait_for(r"@\S+ ready\.", timeout)

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def startup(self) -> dict[str, str]:
        """The fields of the ``event=startup`` line, in either log format."""
        match = self.wait_for(r"(celery-guard event=startup .*|\{\"event\":\"startup\".*\})")
        text = match.group(1)
        if text.startswith("{"):
            return {key: str(value) for key, value in json.loads(text).items()}
        return parse_line(text)

    def events(self, event: str, since: int = 0) -> list[dict[str, str]]:
        """Every text-format celery-guard line of that event, parsed; with ``since``,
        only those after that offset of the log (``len(worker.log)`` taken earlier)."""
        marker = f"celery-guard event={event} "
        return [parse_line(line) for line in self.log[since:].splitlines() if marker in line]

    def smallest_pool(self) -> int | None:
        """The smallest pool size the guard's lines (plan, pressure, recycle) report once
        the pool has been forked: the sizes it reports while its first waves are forked
        (they rise to a first peak) are not a pool brought down. None: no such line."""
        sizes = []
        kinds = ("plan", "pressure", "recycle")
        for line in self.log.splitlines():
            if any(f"celery-guard event={kind} " in line for kind in kinds):
                fields = parse_line(line)
                if fields.get("concurrency", "").isdigit():
                    sizes.append(int(fields["concurrency"]))
        peak = 0
        while peak + 1 < len(sizes) and sizes[peak + 1] >= sizes[peak]:
            peak += 1
        return min(sizes[peak:]) if sizes else None

    def still_moving(self, quiet: float = 5.0) -> bool:
        """Did the guard change the pool (or act on pressure) in the last ``quiet``
        seconds? The benchmarks run more of a workload while it does."""
        stamps = re.findall(
            r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+: \w+/MainProcess\] "
            r"celery-guard event=pressure",
            self.log,
        )
        if not stamps:
            return False
        last = time.mktime(time.strptime(stamps[-1], "%Y-%m-%d %H:%M:%S"))
        return time.time() - last < quiet

    def final_summary(self) -> dict[str, str]:
        """The fields of the last ``event=summary final=true`` line; empty if none."""
        finals = [s for s in self.events("summary") if s.get("final") == "true"]
        return finals[-1] if finals else {}

    def forks(self) -> int:
        return len(re.findall(r"heavy_app pool child started", self.log))

    def turns_after_plan(self) -> int | None:
        """How often the pool's size changed direction (grow after retire, or back)
        after the governor's first throughput plan (``event=plan``); None: no plan."""
        lines = self.log.splitlines()
        first = next((i for i, line in enumerate(lines) if "reason=throughput" in line), None)
        if first is None:
            return None
        sizes = []
        for line in lines[first:]:
            if "celery-guard event=pressure " in line:
                fields = parse_line(line)
                if fields.get("action") in ("grow", "retire"):
                    sizes.append(int(fields["concurrency"]))
        steps = [b - a for a, b in itertools.pairwise(sizes) if b != a]
        return sum(1 for a, b in itertools.pairwise(steps) if (a > 0) != (b > 0))

    def stop(self, grace: float = 15) -> None:
        """Warm shutdown, then SIGKILL the whole process group if it hangs."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)


def run_celery(
    args: list[str], env: dict[str, str], cgroups: list[Path] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """``celery -A heavy_app ARGS`` as a user would run it, inside ``cgroups`` (each a
    cgroup-v1 directory to join first), with its output and exit status."""
    command = [sys.executable, "-m", "celery", "-A", "heavy_app", *args]
    if cgroups:
        joins = " && ".join(f'echo $$ > "{path / "cgroup.procs"}"' for path in cgroups)
        command = ["sh", "-c", f'{joins} && exec "$@"', "sh", *command]
    return subprocess.run(
        command, cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=timeout
    )


def cpu_cgroup(cpus: float) -> Path:
    """A cgroup-v1 cpu cgroup under this process's own, with a CFS quota of ``cpus``;
    remove it with ``_empty_and_remove``."""
    mount = Path("/sys/fs/cgroup/cpu")
    own = "/"
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            own = path
    parent = mount / own.lstrip("/")
    if not (parent / "cpu.cfs_quota_us").exists():
        raise Unavailable(f"no cgroup-v1 cpu controller at {parent}")
    path = parent / f"cgtest-cpu-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
        period = int((path / "cpu.cfs_period_us").read_text())
        (path / "cpu.cfs_quota_us").write_text(str(int(period * cpus)))
    except OSError as error:
        raise Unavailable(f"cannot make a cpu cgroup under {parent}: {error}") from None
    return path


def guard_stats(worker: Worker, env: dict[str, str]) -> dict[str, Any]:
    """``celery inspect guard_stats`` for this worker, as a user runs it."""
    node = worker.wait_for(r"(\S+@\S+) ready\.").group(1)
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "heavy_app", "inspect", "guard_stats",
         "-d", node, "--json", "--timeout", "10"],
        cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return dict(json.loads(out.stdout)[node])


def broadcast_guard_stats(redis: RedisServer, worker: Worker) -> dict[str, Any]:
    """guard_stats through the remote control's broadcast, which every Celery supported
    accepts (Celery 5.3's ``celery inspect`` takes only its built-in commands: its list
    is made before the app, and the guard's command, are loaded)."""
    from celery import Celery

    node = worker.wait_for(r"(\S+@\S+) ready\.").group(1)
    client = Celery("client", broker=redis.url(0))
    replies = client.control.broadcast("guard_stats", reply=True, destination=[node], timeout=10)
    (reply,) = replies
    return dict(reply[node])


def worker_env(
    redis: RedisServer | None, extra: Mapping[str, str] | None = None, guard: bool = True
) -> dict[str, str]:
    """The environment of a worker: this one minus any CELERY_GUARD_*, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_GUARD_")}
    env["PYTHONPATH"] = os.pathsep.join([str(EXAMPLES), str(ROOT)])
    env["HEAVY_APP_GUARD"] = "1" if guard else "0"
    if redis is not None:
        env["HEAVY_APP_BROKER"] = redis.url(0)
        env["HEAVY_APP_BACKEND"] = redis.url(1)
    env.update(extra or {})
    return env


def send_tasks(
    redis: RedisServer,
    queue: str,
    name: str,
    count: int,
    args: tuple[Any, ...] = (),
    app: str = "heavy_app",
) -> list[Any]:
    """Send ``count`` tasks by name, without importing the (heavy) example app here."""
    from celery import Celery

    client = Celery("client", broker=redis.url(0), backend=redis.url(1))
    return [client.send_task(f"{app}.{name}", args=args, queue=queue) for _ in range(count)]


def eventually(check: Callable[[], bool], timeout: float = 30) -> bool:
    """Wait for ``check()`` to become true (an event, polled), at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def date_done(result: Any) -> datetime.datetime:
    """When a task ended, as its worker stored it (Celery gives a datetime or a string)."""
    done = result.date_done
    return done if isinstance(done, datetime.datetime) else datetime.datetime.fromisoformat(done)


def wait_for_results(results: list[Any], timeout: float, group: Cgroup | None = None) -> bool:
    """True when every task succeeded; False on a failure, an OOM kill or the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if group is not None and group.oom_kills():
            return False
        if all(r.ready() for r in results):
            return all(r.successful() for r in results)
        time.sleep(0.2)
    return False


def outcome(results: list[Any], group: Cgroup | None, worker: Worker | None = None) -> str:
    """Why a wait for results failed, for the assertion's message: the OOM kills, each
    task's state and the worker's guard lines (its log is gone once the test ends)."""
    states = sorted(str(r.state) for r in results)
    parts = [f"states={states}"]
    if group is not None:
        parts.append(f"oom_kills={group.oom_kills()}")
    if worker is not None:
        lines = [
            line for line in worker.log.splitlines() if "celery-guard" in line or "Error" in line
        ]
        parts.append("\n".join(lines[-60:]))
    return "\n".join(parts)


def runs_walk_workload(
    redis: RedisServer, group: Cgroup, concurrency: int, log_path: Path, guard: bool = False
) -> bool:
    """Does the example app at ``concurrency`` run 3 walk tasks per child in ``group``
    with no OOM kill? The measure behind "the children that really fit"."""
    worker = Worker(
        args=["-c", str(concurrency)],
        env=worker_env(redis, guard=guard),
        log_path=log_path,
        cgroup=group,
    )
    worker.start()
    try:
        worker.wait_ready(60)
        results = send_tasks(redis, worker.queue, "walk", 3 * concurrency)
        return wait_for_results(results, 120, group) and group.oom_kills() == 0
    except AssertionError:  # the worker died before it was ready
        return False
    finally:
        worker.stop()


def allocate_in(group: Cgroup, mib: int, timeout: float = 60) -> int:
    """A process that is no pool child (a sidecar in the same container) joins ``group``
    with ``oom_score_adj`` 1000 and touches ``mib`` MiB; its exit status (-9 when the
    kernel's OOM killer took it)."""
    code = (
        "import sys\nblock = bytearray(int(sys.argv[1]) * 1048576)\n"
        "for offset in range(0, len(block), 4096):\n    block[offset] = 1\n"
    )
    procs = group.path / "cgroup.procs"
    setup = f'echo $$ > "{procs}" && echo 1000 > /proc/$$/oom_score_adj && exec "$@"'
    command = ["sh", "-c", setup, "sh", sys.executable, "-c", code, str(mib)]
    return subprocess.run(command, timeout=timeout).returncode


def running_on(redis: RedisServer, worker: Worker, task_id: str, timeout: float = 30) -> int:
    """Wait until a pool child has accepted the task (``celery inspect active`` lists it
    with its ``worker_pid``); that child's pid."""
    from celery import Celery

    node = worker.wait_for(r"(\S+@\S+) ready\.").group(1)
    client = Celery("client", broker=redis.url(0), backend=redis.url(1))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replies = client.control.inspect(destination=[node], timeout=1).active() or {}
        for request in replies.get(node, []):
            if request.get("id") == task_id and request.get("worker_pid"):
                return int(request["worker_pid"])
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} was not running within {timeout} s:\n{worker.log}")
