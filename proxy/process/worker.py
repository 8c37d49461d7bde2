"""A worker process of `splitter serve --workers N`: its link to the supervisor, and its entry point.

The supervisor starts each worker as `python -c "from proxy.process.worker import main; main()" ROLE FD`
with the worker's `ServeSettings` pickled on stdin (its own spool and dead-letter directories,
`reuse_port` on) and PROMETHEUS_MULTIPROC_DIR in its environment, so prometheus_client keeps every
value in shared files from the first import. FD is this process's end of a socket pair: the worker
writes `ready` / `draining` lines on it, and end-of-file on it means the supervisor is gone, which
drains and stops the worker rather than leaving it serving unsupervised.

ROLE is `worker-<i>` for a serving worker, or `drain:<directory>` for a drainer: a process that only
delivers what a spool no worker owns still holds (see `proxy.delivery.worker_dirs`), then exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import socket
import sys
from collections.abc import Callable, Mapping

import structlog

from proxy.background import BackgroundTask
from proxy.exits import BAD_RULES, OK, STARTUP_FAILURE
from proxy.log import configure, get_logger
from proxy.metrics import Metrics
from proxy.server import load_initial_rules, run_loop, serve, start_delivery
from proxy.settings import ServeSettings
from proxy.signals import stop_on_signals

log = get_logger("splitter.worker")
REFRESH_INTERVAL = 0.5  # seconds between copies of the set_function gauges into the shared files
DRAIN_PREFIX = "drain:"


class WorkerLink:
    """This process's side of the supervisor: readiness reports, gauge refresh, supervisor loss.

    `proxy.server.Server` drives it (as its `link`) through the `Link` protocol declared there, so
    that the server never imports this module, which imports the server."""

    def __init__(self, fd: int) -> None:
        self._socket = socket.socket(fileno=fd)
        self._socket.setblocking(False)
        self._metrics: Metrics | None = None
        self._refresher = BackgroundTask(self._refresh, "live-gauges")

    def start(self, metrics: Metrics, on_supervisor_lost: Callable[[], None]) -> None:
        """Report ready, keep the shared gauges fresh, and call `on_supervisor_lost` if it dies."""
        self._metrics = metrics
        metrics.refresh()
        self._refresher.start()
        asyncio.get_running_loop().add_reader(self._socket.fileno(), self._check_supervisor, on_supervisor_lost)
        self._report("ready")

    def draining(self) -> None:
        self._report("draining")

    async def stop(self) -> None:
        asyncio.get_running_loop().remove_reader(self._socket.fileno())
        await self._refresher.stop()
        if self._metrics is not None:
            self._metrics.refresh()
        self._socket.close()

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_INTERVAL)
            if self._metrics is not None:
                self._metrics.refresh()

    def _check_supervisor(self, on_lost: Callable[[], None]) -> None:
        try:
            data = self._socket.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self._socket.fileno())
            log.error("supervisor_lost", hint="the supervisor process is gone; draining and stopping this worker")
            on_lost()

    def _report(self, state: str) -> None:
        with contextlib.suppress(OSError):  # the supervisor may already be gone: end-of-file tells us
            self._socket.send(f"{state}\n".encode())


async def drain(settings: ServeSettings, link: WorkerLink, env: Mapping[str, str]) -> int:
    """Deliver what the spool at `settings.spool_dir` holds, then exit; SIGTERM stops early.

    Used for a spool that no worker owns any more (N was lowered, or the spool came from a single
    process): the events in it were acknowledged to clients, so they are sent, never forgotten.
    It needs no control plane: it serves nothing, and only delivers what the spool holds.
    """
    configure(settings.log_level)
    start = await load_initial_rules(settings, env)  # the rules its supervisor and workers start on
    if start is None:
        return BAD_RULES
    metrics = Metrics()
    delivery = start_delivery(settings, start.rules, metrics)
    if delivery is None:
        return STARTUP_FAILURE
    stop = stop_on_signals()
    link.start(metrics, stop.set)
    log.info("leftover_spool_draining", spool_dir=settings.spool_dir, pending=delivery.pending)
    while delivery.pending and not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)
    await delivery.close(drain_timeout=settings.drain_timeout)
    await link.stop()
    log.info("leftover_spool_drained" if not delivery.pending else "spooled_for_next_start", spool_dir=settings.spool_dir, pending=delivery.pending)
    return OK


def main() -> None:
    """Entry point of a worker or drainer process (argv: ROLE FD; settings pickled on stdin)."""
    role, fd = sys.argv[1], int(sys.argv[2])
    settings: ServeSettings = pickle.load(sys.stdin.buffer)  # written by our own supervisor, never by a client
    structlog.contextvars.bind_contextvars(process=role)
    link = WorkerLink(fd)
    if role.startswith(DRAIN_PREFIX):
        sys.exit(run_loop(drain(settings, link, os.environ)))
    sys.exit(run_loop(serve(settings, link=link)))
