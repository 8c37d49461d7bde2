"""`splitter serve --workers N`: a supervisor process and N workers sharing the ingress port.

Each worker is a full `splitter serve` (proxy/process/worker.py) that binds the ingress address itself with
SO_REUSEPORT, so the kernel spreads new connections over the workers; one Python process is one
core. The supervisor serves nothing on the ingress port. It:

- binds the ingress address once without listening, which resolves `:0` to one port for all
  workers and keeps the port reserved while a worker restarts (a socket that does not listen gets
  no connections);
- gives worker i its own spool, `<spool-dir>/worker-<i>`, and dead letters, `<dead-letter-dir>/
  worker-<i>` (a spool has one writer), and starts a drainer process for every spool no worker owns
  that still holds records (`proxy.delivery.worker_dirs.leftovers`: N was lowered, or a single process wrote it);
- serves the admin port once: `/metrics` merges the workers' prometheus_client multiprocess files
  (PROMETHEUS_MULTIPROC_DIR: a fresh directory, removed at exit; a dead worker's live gauges are
  removed by `mark_process_dead`), `/readyz` is ready when every worker is, `/admin/*` as usual;
- keeps its own copy of the rules for `/admin/config` and the rules gauges, and forwards SIGHUP and
  `POST /admin/reload` to every worker (workers notice file changes themselves);
- is the one process that writes the last good rules (`--state-dir`); each worker reads them at
  start, as the supervisor did, so all start on the same rules (proxy/control/start_rules.py);
- restarts a worker that exits unexpectedly, with backoff; the new worker recovers and replays its
  spool. SIGTERM/SIGINT: every worker drains its own spool within the drain timeout; exit 0.

The control plane and the admin port are `proxy.server.Server`'s, the same lifecycle a single
process runs, with `Supervisor` as its fleet: started once the admin port is bound, drained before
the admin port closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import mark_process_dead

from proxy.control.start_rules import StartRules
from proxy.delivery.worker_dirs import leftovers, worker_dir
from proxy.exits import BAD_RULES, STARTUP_FAILURE
from proxy.log import configure, get_logger
from proxy.metrics import Metrics, SupervisorMetrics
from proxy.process.worker import DRAIN_PREFIX
from proxy.server import Server, load_initial_rules, run_loop
from proxy.settings import ServeSettings

log = get_logger("splitter.supervisor")
METRICS_DIR_PREFIX = "splitter-metrics-"
WORKER_COMMAND = ("-c", "from proxy.signals import hold_sighup; hold_sighup(); from proxy.process.worker import main; main()")
RESTART_BACKOFF = (0.5, 30.0)  # first and largest wait before restarting a worker that exited
STABLE_AFTER = 30.0  # seconds a worker must have run for its next restart to wait the shortest time again
KILL_GRACE = 10.0  # seconds past the drain timeout before a worker that has not exited is killed


@dataclass
class Child:
    """One process the supervisor keeps running: a serving worker, or a drainer of a leftover spool."""

    role: str
    settings: ServeSettings
    serves: bool  # a serving worker is restarted whenever it exits; a drainer only when it fails
    ready: bool = False
    failures: int = 0  # consecutive unexpected exits, for the restart backoff
    process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


def reserve_port(address: tuple[str, int]) -> socket.socket:
    """Bind (never listen) the ingress address with SO_REUSEPORT; the workers bind the port it got."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(*address, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(sockaddr)
    return sock


def fresh_metrics_dir() -> str:
    """A new PROMETHEUS_MULTIPROC_DIR, after removing those left by supervisors that were killed.

    The directory is named after the supervisor's pid; one whose process is gone (or is this
    process: a container restarts its entry point as the same pid) is stale, and its values too.
    """
    prefix = f"{METRICS_DIR_PREFIX}{os.getpid()}-"
    for old in Path(tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}*-*"):
        pid = old.name.removeprefix(METRICS_DIR_PREFIX).partition("-")[0]
        if pid.isdigit() and (old.name.startswith(prefix) or not _alive(int(pid))):
            shutil.rmtree(old, ignore_errors=True)
    return tempfile.mkdtemp(prefix=prefix)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def plan(settings: ServeSettings, port: int) -> list[Child]:
    """The workers, each with its own spool and dead letters, then a drainer per leftover spool."""
    workers = [
        Child(f"worker-{i}", replace(settings, listen=(settings.listen[0], port), reuse_port=True, workers=1, process_name=f"worker-{i}",
                                     spool_dir=str(worker_dir(settings.spool_dir, i)), dead_letter_dir=str(worker_dir(settings.dead_letter_dir, i))),
              serves=True)
        for i in range(settings.workers)
    ]
    spool_dir = Path(settings.spool_dir)
    drainers = [
        Child(f"{DRAIN_PREFIX}{leftover.name}", replace(settings, workers=1, spool_dir=str(leftover),
                                                         dead_letter_dir=str(Path(settings.dead_letter_dir) / leftover.relative_to(spool_dir))),
              serves=False)
        for leftover in leftovers(spool_dir, settings.workers)
    ]
    return workers + drainers


class Supervisor:
    """The worker processes: started, watched, restarted, drained. `proxy.server.Server` runs it as its `fleet`."""

    def __init__(self, children: list[Child], metrics: SupervisorMetrics, env: Mapping[str, str], listen: tuple[str, int]) -> None:
        self.children = children
        self.listen = listen  # the ingress address the supervisor reserved, which every worker binds
        self.metrics = metrics
        self._env = env
        self._started = False
        self._all_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[int]] = []
        self._stop = asyncio.Event()
        metrics.workers_ready.set_function(lambda: sum(c.ready for c in self.workers))
        for child in self.children:
            metrics.worker_restarts.labels(child.role)  # at 0 from the start, so rate() sees the first restart

    @property
    def workers(self) -> list[Child]:
        return [child for child in self.children if child.serves]

    @property
    def registry(self) -> CollectorRegistry:
        return self.metrics.registry

    def is_ready(self) -> bool:
        return self._started and not self._stop.is_set() and all(child.ready for child in self.workers)

    def describe(self) -> dict[str, Any]:
        return {"listen": [f"{self.listen[0]}:{self.listen[1]}"], "workers": len(self.workers), "drainers": [c.role for c in self.children if not c.serves]}

    def forward_reload(self) -> None:
        """An operator's reload (SIGHUP, `POST /admin/reload`) reaches every worker; the supervisor has
        compiled the same file with the same checks, so its result is theirs. A change its own watcher
        sees is not forwarded (proxy.reload.Reloader decides): every worker watches the file too."""
        self.signal_ready_workers(signal.SIGHUP)

    async def drain(self, drain_timeout: float) -> bool:
        """SIGTERM every child; kill those still running `KILL_GRACE` seconds past the drain timeout."""
        return await self.stop(timeout=drain_timeout + KILL_GRACE)

    def signal_ready_workers(self, sig: signal.Signals) -> None:
        """Only ready workers: one still starting has no handler yet, and SIGHUP's default is to die."""
        for child in self.workers:
            if child.ready and child.process is not None and child.process.returncode is None:
                child.process.send_signal(sig)

    async def start(self) -> int | None:
        """Start every child; None once all workers are ready, else the exit code of one that failed."""
        self._tasks = [asyncio.create_task(self._keep_running(child), name=child.role) for child in self.children]
        waiting = asyncio.create_task(self._all_ready.wait())
        await asyncio.wait([waiting, *self._tasks[:len(self.workers)]], return_when=asyncio.FIRST_COMPLETED)
        if not self._all_ready.is_set():
            waiting.cancel()
            code = next(task for task in self._tasks if task.done()).result()
            await self.stop(timeout=KILL_GRACE)
            return code if code in (BAD_RULES, STARTUP_FAILURE) else STARTUP_FAILURE
        self._started = True
        return None

    async def stop(self, timeout: float) -> bool:
        """SIGTERM every child and wait for all to exit; False if one had to be killed after `timeout`.

        As in a single process, a drain cut short by the drain timeout is not a failure: what is
        left stays spooled, and the worker with that index (or a drainer) sends it at the next start.
        """
        self._stop.set()
        for child in self.children:
            if child.process is not None and child.process.returncode is None:
                child.process.send_signal(signal.SIGTERM)
        done, late = await asyncio.wait(self._tasks, timeout=timeout)
        for task in late:
            child = next(c for c in self.children if c.role == task.get_name())
            log.error("worker_kill", role=child.role, pid=child.pid, hint=f"still running {timeout:.0f} s after SIGTERM")
            if child.process is not None and child.process.returncode is None:
                child.process.kill()
        await asyncio.gather(*late)
        unclean = {task.get_name(): task.result() for task in done if task.result() not in (0, -signal.SIGTERM)}
        if unclean:
            log.warning("workers_stopped_uncleanly", codes=unclean)
        return not late

    async def _keep_running(self, child: Child) -> int:
        """Run `child` until the supervisor stops; restart it, with backoff, when it exits unexpectedly."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                code = await self._run_once(child)
            except OSError as exc:  # could not even start the process (fork failed, fd limit): try again later
                log.error("worker_spawn_failed", role=child.role, error=str(exc))
                code = STARTUP_FAILURE
            if self._stop.is_set() or (child.serves and not self._started) or (code == 0 and not child.serves):
                return code
            child.failures = 1 if loop.time() - started >= STABLE_AFTER else child.failures + 1
            wait = min(RESTART_BACKOFF[1], RESTART_BACKOFF[0] * 2 ** (child.failures - 1))
            log.error("worker_exited", role=child.role, pid=child.pid, code=code, restart_in=wait)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), wait)
            if self._stop.is_set():
                return code
            self.metrics.worker_restarts.labels(child.role).inc()

    async def _run_once(self, child: Child) -> int:
        ours, theirs = socket.socketpair()
        with ours:
            with theirs:
                process = await asyncio.create_subprocess_exec(
                    sys.executable, *WORKER_COMMAND, child.role, str(theirs.fileno()),
                    stdin=asyncio.subprocess.PIPE, pass_fds=(theirs.fileno(),), env=dict(self._env),
                )
            child.process = process
            if self._stop.is_set():  # SIGTERM came while it was being started: it would never hear of it
                process.send_signal(signal.SIGTERM)
            assert process.stdin is not None
            process.stdin.write(pickle.dumps(child.settings))
            with contextlib.suppress(ConnectionError):
                await process.stdin.drain()
            process.stdin.close()
            reader, writer = await asyncio.open_unix_connection(sock=ours)
            status = asyncio.create_task(self._follow(child, reader))
            code = await process.wait()
            await status
            writer.close()
        mark_process_dead(process.pid, self._env["PROMETHEUS_MULTIPROC_DIR"])
        return code

    async def _follow(self, child: Child, reader: asyncio.StreamReader) -> None:
        """Track the `ready` / `draining` lines a child writes, until it closes its end."""
        while line := await reader.readline():
            child.ready = line.strip() == b"ready"
            if all(c.ready for c in self.workers):
                self._all_ready.set()
        child.ready = False


async def supervise_async(settings: ServeSettings, env: Mapping[str, str]) -> int:
    configure(settings.log_level)
    start = await load_initial_rules(settings, env)  # a bad file stops start-up before any worker runs
    if start is None:
        return BAD_RULES
    try:
        reserved = reserve_port(settings.listen)
    except OSError as exc:
        log.error("listen_failed", error=str(exc), listen=f"{settings.listen[0]}:{settings.listen[1]}")
        return STARTUP_FAILURE
    metrics_dir = fresh_metrics_dir()
    try:
        with reserved:
            return await _supervise(settings, env, start, reserved.getsockname()[:2], metrics_dir)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


async def _supervise(settings: ServeSettings, env: Mapping[str, str], start: StartRules, listen: tuple[str, int], metrics_dir: str) -> int:
    """The supervisor's control plane and admin port, with the workers as the server's fleet."""
    metrics = Metrics()  # the supervisor's own: only its rules gauges are exported, kept at the workers' ramp step
    exported = SupervisorMetrics(metrics_dir, metrics)
    fleet = Supervisor(plan(settings, listen[1]), exported, dict(env, PROMETHEUS_MULTIPROC_DIR=metrics_dir), listen)
    return await Server(settings, env, rules=start.rules, refused=start.refused, previous=start.last_good, metrics=metrics, fleet=fleet).serve()


def supervise(settings: ServeSettings) -> int:
    """`splitter serve --workers N` (N > 1): run the supervisor until SIGTERM; the process exit code."""
    structlog.contextvars.bind_contextvars(process="supervisor")
    return run_loop(supervise_async(settings, os.environ))
