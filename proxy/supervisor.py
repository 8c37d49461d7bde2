"""`splitter serve --workers N`: a supervisor process and N workers sharing the ingress port.

Each worker is a full `splitter serve` (proxy/worker.py) that binds the ingress address itself with
SO_REUSEPORT, so the kernel spreads new connections over the workers; one Python process is one
core. The supervisor serves nothing on the ingress port. It:

- binds the ingress address once without listening, which resolves `:0` to one port for all
  workers and keeps the port reserved while a worker restarts (a socket that does not listen gets
  no connections);
- gives worker i its own spool, `<spool-dir>/worker-<i>`, and dead letters, `<dead-letter-dir>/
  worker-<i>` (a spool has one writer), and starts a drainer process for every spool no worker owns
  that still holds records (`proxy.layout.leftovers`: N was lowered, or a single process wrote it);
- serves the admin port once: `/metrics` merges the workers' prometheus_client multiprocess files
  (PROMETHEUS_MULTIPROC_DIR: a fresh directory, removed at exit; a dead worker's live gauges are
  removed by `mark_process_dead`), `/readyz` is ready when every worker is, `/admin/*` as usual;
- keeps its own copy of the rules for `/admin/config` and the rules gauges, and forwards SIGHUP and
  `POST /admin/reload` to every worker (workers notice file changes themselves);
- restarts a worker that exits unexpectedly, with backoff; the new worker recovers and replays its
  spool. SIGTERM/SIGINT: every worker drains its own spool within the drain timeout; exit 0.
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from prometheus_client.multiprocess import mark_process_dead

from proxy.admin import build_admin_app
from proxy.engine import RuleSet
from proxy.layout import leftovers, worker_dir
from proxy.log import configure, get_logger
from proxy.metrics import Metrics, SupervisorMetrics
from proxy.ramp_clock import RampScheduler
from proxy.reload import Reloader, ReloadResult
from proxy.server import BAD_RULES, OK, STARTUP_FAILURE, bound_addresses, load_initial_rules, run_loop
from proxy.settings import ServeSettings
from proxy.signals import stop_on_signals
from proxy.state import ActiveRules
from proxy.watch import RulesWatcher
from proxy.worker import DRAIN_PREFIX

log = get_logger("splitter.supervisor")
WORKER_KILLED = 1  # exit code: a worker did not stop within the drain timeout and was killed
METRICS_DIR_PREFIX = "splitter-metrics-"
FILE_CHANGE = "file_change"
WORKER_COMMAND = ("-c", "from proxy.signals import hold_sighup; hold_sighup(); from proxy.worker import main; main()")
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


class FanOutReloader(Reloader):
    """The supervisor's reloader: an operator's reload (SIGHUP, `POST /admin/reload`) reaches every worker.

    The supervisor compiles the same file with the same checks, so its result is the workers'
    result; a change its own watcher sees is not forwarded, since every worker watches the file too.
    """

    def __init__(self, *args: Any, forward: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._forward = forward

    async def reload(self, trigger: str) -> ReloadResult:
        result = await super().reload(trigger)
        if trigger != FILE_CHANGE:
            self._forward()
        return result


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
        Child(f"worker-{i}", replace(settings, listen=(settings.listen[0], port), reuse_port=True, workers=1,
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
    def __init__(self, children: list[Child], metrics: SupervisorMetrics, env: Mapping[str, str]) -> None:
        self.children = children
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

    def is_ready(self) -> bool:
        return self._started and not self._stop.is_set() and all(child.ready for child in self.workers)

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
    rules = await load_initial_rules(settings, env)  # a bad file stops start-up before any worker runs
    if rules is None:
        return BAD_RULES
    try:
        reserved = reserve_port(settings.listen)
    except OSError as exc:
        log.error("listen_failed", error=str(exc), listen=f"{settings.listen[0]}:{settings.listen[1]}")
        return STARTUP_FAILURE
    metrics_dir = fresh_metrics_dir()
    try:
        with reserved:
            return await _supervise(settings, env, rules, reserved.getsockname()[:2], metrics_dir)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


async def _supervise(settings: ServeSettings, env: Mapping[str, str], rules: RuleSet, listen: tuple[str, int], metrics_dir: str) -> int:
    metrics = Metrics()  # the supervisor's own: only its rules gauges are exported
    metrics.show_rules(rules)
    active = ActiveRules(rules)
    ramps = RampScheduler(active, metrics)  # keeps the supervisor's rules, and so its rollout gauge, at the workers' step
    ramps.apply_due()
    exported = SupervisorMetrics(metrics_dir, metrics)
    supervisor = Supervisor(plan(settings, listen[1]), exported, dict(env, PROMETHEUS_MULTIPROC_DIR=metrics_dir))
    reloader = FanOutReloader(settings.config, active, metrics, env, ramps, forward=lambda: supervisor.signal_ready_workers(signal.SIGHUP))
    watcher = RulesWatcher(settings.config, lambda: reloader.reload(FILE_CHANGE), interval=settings.reload_poll_interval, baseline=rules.sha256)
    admin = web.AppRunner(
        build_admin_app(active=active, reloader=reloader, metrics=metrics, token=settings.admin_token, is_ready=supervisor.is_ready,
                        registry=exported.registry),
        access_log=None, shutdown_timeout=2.0, handle_signals=False,
    )
    await admin.setup()
    try:
        await web.TCPSite(admin, *settings.admin).start()
    except OSError as exc:
        log.error("listen_failed", error=str(exc), admin=f"{settings.admin[0]}:{settings.admin[1]}")
        await admin.cleanup()
        return STARTUP_FAILURE
    stop = stop_on_signals(reloader.request)
    failed = await supervisor.start()
    if failed is not None:
        log.error("workers_failed_to_start", code=failed)
        await admin.cleanup()
        return failed
    reloader.start()
    ramps.start()
    watcher.start()
    log.info("started", listen=[f"{listen[0]}:{listen[1]}"], admin=bound_addresses(admin), workers=settings.workers,
             drainers=[c.role for c in supervisor.children if not c.serves], rules=settings.config, sha256=rules.sha256[:12], pid=os.getpid())

    await stop.wait()
    log.info("draining", timeout=settings.drain_timeout, workers=settings.workers)
    await watcher.stop()
    await reloader.stop()
    await ramps.stop()
    clean = await supervisor.stop(timeout=settings.drain_timeout + KILL_GRACE)
    await admin.cleanup()
    log.info("stopped", killed_workers=not clean)
    return OK if clean else WORKER_KILLED


def supervise(settings: ServeSettings) -> int:
    """`splitter serve --workers N` (N > 1): run the supervisor until SIGTERM; the process exit code."""
    structlog.contextvars.bind_contextvars(process="supervisor")
    return run_loop(supervise_async(settings, os.environ))
