"""The composition root: build every part, listen, react to signals, drain, exit.

Lifecycle, in order: compile the rules (a bad file stops start-up with its FILE:LINE errors),
start delivery, the ingress and admin listeners, the reload loop and file watcher; then wait.
SIGHUP asks for a reload. SIGTERM/SIGINT: stop accepting, let in-flight requests finish, deliver
what the spools hold until the drain timeout, leave the rest spooled for the next start, exit 0.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.admin import build_admin_app
from proxy.delivery import Delivery, SpoolLocked
from proxy.delivery.spool import SpoolFormatError
from proxy.engine import RuleSet, RulesError, load_rules
from proxy.ingress.app import build_ingress_app
from proxy.ingress.handlers import IngressDeps
from proxy.ingress.listener import IngressListener, listen
from proxy.log import configure, get_logger
from proxy.metrics import Metrics
from proxy.ramp_clock import RampScheduler
from proxy.reload import Reloader
from proxy.settings import ServeSettings
from proxy.signals import stop_on_signals
from proxy.state import ActiveRules
from proxy.watch import RulesWatcher
from proxy.layout import worker_spools
from proxy.worker import WorkerLink

log = get_logger("splitter.server")
OK, BAD_RULES, STARTUP_FAILURE = 0, 2, 3


def bound_addresses(runner: web.AppRunner) -> list[str]:
    addresses = []
    for site in runner.sites:
        server = getattr(site, "_server", None)
        for sock in getattr(server, "sockets", None) or ():
            host, port = sock.getsockname()[:2]
            addresses.append(f"{host}:{port}")
    return addresses


async def load_initial_rules(settings: ServeSettings, env: Mapping[str, str]) -> RuleSet | None:
    """The rules to start with, or None after logging why the file cannot be used."""
    try:
        return await asyncio.to_thread(load_rules, settings.config, env)
    except RulesError as exc:
        log.error("config_invalid", file=settings.config, errors=exc.lines)
    except OSError as exc:
        log.error("config_unreadable", file=settings.config, error=str(exc))
    return None


def start_delivery(settings: ServeSettings, rules: RuleSet, metrics: Metrics) -> Delivery | None:
    """Lock and recover the spool (what a crash left is sent first), or None after logging why not."""
    delivery = Delivery(metrics, spool_dir=Path(settings.spool_dir), dead_letter_dir=Path(settings.dead_letter_dir))
    try:
        delivery.start(rules)
    except (SpoolLocked, SpoolFormatError, OSError) as exc:
        log.error("spool_unavailable", spool_dir=settings.spool_dir, error=str(exc))
        return None
    return delivery


async def serve(settings: ServeSettings, env: Mapping[str, str] | None = None, worker: WorkerLink | None = None) -> int:
    """Run the proxy: alone, or as one worker of `serve --workers N` (`worker`: its link to the supervisor)."""
    env = os.environ if env is None else env
    configure(settings.log_level)
    rules = await load_initial_rules(settings, env)
    if rules is None:
        return BAD_RULES

    metrics = Metrics()
    metrics.show_rules(rules)
    active = ActiveRules(rules)
    ramps = RampScheduler(active, metrics)
    ramps.apply_due()  # a ramp step already due is in effect before the first request
    delivery = start_delivery(settings, rules, metrics)
    if delivery is None:
        return STARTUP_FAILURE
    if worker is None:  # a single process does not read the per-worker spools a `--workers N` run left
        for leftover in worker_spools(Path(settings.spool_dir)):
            log.error("spool_orphaned", directory=str(leftover), hint="left by `serve --workers N`; start with --workers 2 or more to deliver it")
    reloader = Reloader(settings.config, active, metrics, env, ramps)
    ready = False
    deps = IngressDeps(active, delivery, metrics, settings.region, settings.trusted_proxies)
    ingress_app = build_ingress_app(deps, cors_origins=settings.cors_origins, max_in_flight=settings.max_in_flight,
                                    cdn_url=settings.cdn_url, public_url=settings.public_url, cdn_cache_seconds=settings.cdn_cache_seconds)
    ingress = web.AppRunner(ingress_app,
                            access_log=None, shutdown_timeout=settings.drain_timeout, handle_signals=False)
    admin = web.AppRunner(
        build_admin_app(active=active, reloader=reloader, metrics=metrics, token=settings.admin_token, is_ready=lambda: ready),
        access_log=None, shutdown_timeout=2.0, handle_signals=False,
    )
    watcher = RulesWatcher(settings.config, lambda: reloader.reload("file_change"), interval=settings.reload_poll_interval, baseline=rules.sha256)
    loop = asyncio.get_running_loop()
    listener: IngressListener | None = None
    try:
        await ingress.setup()
        await admin.setup()
        listener = await listen(ingress, *settings.listen, reuse_port=settings.reuse_port, backlog=1024,
                                header_timeout=settings.header_timeout, body_timeout=settings.body_timeout)
        if worker is None:  # a worker's admin port is its supervisor's, served once for all workers
            await web.TCPSite(admin, *settings.admin).start()
    except OSError as exc:
        log.error("listen_failed", error=str(exc), listen=f"{settings.listen[0]}:{settings.listen[1]}", admin=f"{settings.admin[0]}:{settings.admin[1]}")
        if listener is not None:
            await listener.close(0)
        else:
            await ingress.cleanup()
        await admin.cleanup()
        await delivery.close(drain_timeout=0)
        return STARTUP_FAILURE
    assert listener is not None
    stop = stop_on_signals(reloader.request)  # installed to the end: a second SIGTERM while draining only sets it again
    reloader.start()
    ramps.start()
    watcher.start()
    ready = True
    log.info("started" if worker is None else "worker_started", listen=listener.addresses, admin=bound_addresses(admin), rules=settings.config, sha256=rules.sha256[:12], region=settings.region, pid=os.getpid())
    if worker is not None:
        worker.start(metrics, stop.set)  # after the log line: a supervisor's `started` comes after its workers'

    await stop.wait()
    ready = False
    if worker is not None:
        worker.draining()
    log.info("draining", timeout=settings.drain_timeout)
    drain_deadline = loop.time() + settings.drain_timeout
    await watcher.stop()
    await reloader.stop()
    await ramps.stop()
    await listener.close(settings.drain_timeout)  # stops accepting, waits for in-flight requests up to the drain timeout
    await delivery.close(drain_timeout=max(0.0, drain_deadline - loop.time()))  # deliver what it can; the rest stays spooled
    await admin.cleanup()
    if worker is not None:
        await worker.stop()
    log.info("stopped")
    return OK


def run(settings: ServeSettings) -> int:
    return run_loop(serve(settings))


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return asyncio.run(main)
    return uvloop.run(main)
