"""The composition root: `Server` builds every part of a splitter process, starts it, and unwinds it.

One lifecycle owner (uvicorn's `Server` is the model) for every kind of process, so the wiring is
written once:

- `splitter serve`: delivery, the ingress and admin listeners, the control plane (the active rules,
  the installer and its ramp clock, the reloader, the file watcher);
- a worker of `serve --workers N` (`link`, see proxy/process/worker.py): the same without the admin port,
  which its supervisor serves once for all workers;
- the supervisor of `serve --workers N` (`fleet`, see proxy/process/supervisor.py): the control plane and the
  admin port; its worker processes serve and deliver;
- tests/proxy_harness.py: `serve`'s kind in the test's own event loop (`handle_signals=False`).

`startup()` starts the parts in order: load the rules (a bad file: exit 2 with its FILE:LINE
errors; a file a reload would refuse against the last good rules: those instead, see
proxy/control/start_rules.py), open the GeoIP database (`--geoip-db`; missing or bad: exit 2), set
up the admin app, lock and recover the spool, install the rules, bind the ingress and admin ports,
install the signal handlers, start the fleet, start the background tasks. Each part
enters one `AsyncExitStack` as it starts, so a start that fails half way unwinds exactly what
started, the same way `shutdown()` unwinds a running process: background tasks, the fleet, the
ingress listener (in-flight requests finish within the drain timeout), delivery (sends what it can
in what is left of that time; the rest stays spooled for the next start), and the admin port last,
so `/metrics` and `/readyz` answer while the process drains.

SIGHUP asks for a reload; SIGTERM/SIGINT set `stopping`. The handlers go in once the ports are
bound and before the fleet and the background tasks start, so a SIGHUP held since the process began
(proxy/signals.py) becomes one reload as soon as the reloader runs.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Callable, Coroutine, Mapping
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.admin import build_admin_app
from proxy.console import add_console
from proxy.control.geoip_watch import GeoIPWatcher, described
from proxy.control.history import ChangeHistory
from proxy.control.install import RulesInstaller
from proxy.control.last_good import LastGoodStore
from proxy.control.ramps import Clock
from proxy.control.reload import FILE_CHANGE, Reloader
from proxy.control.standing import FileStanding
from proxy.control.start_rules import FileRefused, StartRules, start_rules
from proxy.control.state import ActiveRules
from proxy.control.traffic import RecentTraffic
from proxy.control.watch import RulesWatcher
from proxy.delivery import Delivery, SpoolLocked
from proxy.delivery.spool import SpoolFormatError
from proxy.delivery.worker_dirs import spool_name, worker_spools
from proxy.engine import RulesError, RuleSet, load_rules
from proxy.exits import BAD_GEOIP_DB, BAD_RULES, OK, STARTUP_FAILURE, WORKER_KILLED
from proxy.geoip import GeoIP, GeoIPError, open_country_db
from proxy.ingress.app import build_ingress_app
from proxy.ingress.handlers import IngressDeps
from proxy.ingress.implementation import CHOSEN
from proxy.ingress.listener import KEEPALIVE_TIMEOUT, IngressListener, listen
from proxy.log import configure, get_logger
from proxy.metrics import Metrics
from proxy.observe.catalog import Catalog
from proxy.observe.catalog_files import CatalogKeeper, catalog_document
from proxy.observe.ledger_files import LedgerKeeper, ledger_document
from proxy.observe.recording import Recorder
from proxy.observe.tier import Tier
from proxy.settings import ServeSettings
from proxy.signals import stop_on_signals

log = get_logger("splitter.server")
ADMIN_SHUTDOWN_TIMEOUT = 2.0  # seconds for a scrape or probe still running when the admin port closes


class StartupFailed(Exception):
    """Start-up stopped after logging why; `code` is the process exit code (proxy/exits.py)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class Link(Protocol):
    """A worker's side of its supervisor (proxy.worker.WorkerLink; typed here so this module need not import it)."""

    def start(self, metrics: Metrics, on_supervisor_lost: Callable[[], None]) -> None: ...

    def draining(self) -> None: ...

    async def stop(self) -> None: ...


class Fleet(Protocol):
    """The worker processes a supervisor runs (proxy.supervisor.Supervisor)."""

    @property
    def registry(self) -> CollectorRegistry:
        """What `/metrics` exports: the workers' values merged, and the supervisor's rules gauges."""

    def is_ready(self) -> bool: ...

    def describe(self) -> dict[str, Any]:
        """Fields for the `started` line: the shared ingress address, the workers, the drainers."""

    async def start(self) -> int | None:
        """Start every worker; None once all are ready, else the exit code of one that failed."""

    def forward_reload(self) -> None:
        """An operator asked for a reload: pass it on to every worker."""

    async def drain(self, drain_timeout: float) -> bool:
        """Stop every worker within `drain_timeout`; False if one had to be killed."""


async def load_initial_rules(settings: ServeSettings, env: Mapping[str, str]) -> StartRules | None:
    """The rules to start with (the file's, or the last good ones in `--state-dir` when a reload would
    refuse the file), or None after logging why the file cannot be used."""
    try:
        rules = await asyncio.to_thread(load_rules, settings.config, env)
    except RulesError as exc:
        log.error("config_invalid", file=settings.config, errors=exc.lines)
        return None
    except OSError as exc:
        log.error("config_unreadable", file=settings.config, error=str(exc))
        return None
    return await asyncio.to_thread(start_rules, rules, LastGoodStore(settings.state_dir), env, datetime.now(UTC))


async def open_geoip(path: str) -> GeoIP | None:
    """The database `--geoip-db` names, or None after logging why it cannot be used."""
    try:
        db = await asyncio.to_thread(open_country_db, path)
    except GeoIPError as exc:
        log.error("geoip_db_invalid", path=path, error=str(exc))
        return None
    log.info("geoip_db_opened", **described(db))
    return GeoIP(db)


def start_delivery(settings: ServeSettings, rules: RuleSet, metrics: Metrics, tier: Tier | None = None) -> Delivery | None:
    """Lock and recover the spool (what a crash left is sent first), or None after logging why not."""
    ledger = LedgerKeeper(settings.state_dir, spool_name(settings.spool_dir), tier=tier)  # the delivery ledger follows its spool (drainers too)
    ledger.load()
    delivery = Delivery(metrics, spool_dir=Path(settings.spool_dir), dead_letter_dir=Path(settings.dead_letter_dir), ledger=ledger,
                        sync_interval=settings.sync_interval if settings.durability == "interval" else None)
    try:
        delivery.start(rules)
    except (SpoolLocked, SpoolFormatError, OSError) as exc:
        log.error("spool_unavailable", spool_dir=settings.spool_dir, error=str(exc))
        return None
    return delivery


def addresses(runner: web.AppRunner) -> list[str]:
    """HOST:PORT of every socket `runner`'s sites listen on (the kernel's port where `:0` was asked)."""
    return [f"{host}:{port}" for host, port, *_ in runner.addresses]


class Server:
    """One splitter process: `startup()`, then `stopping` is awaited, then `shutdown()`; `serve()` does all three."""

    def __init__(self, settings: ServeSettings, env: Mapping[str, str], *, rules: RuleSet | None = None, refused: FileRefused | None = None,
                 previous: RuleSet | None = None, metrics: Metrics | None = None, link: Link | None = None, fleet: Fleet | None = None,
                 clock: Clock | None = None, handle_signals: bool = True, keepalive_timeout: float = KEEPALIVE_TIMEOUT,
                 owns_interpreter: bool = True) -> None:
        """`rules`: already chosen (a supervisor loads them before reserving the port, with `refused`
        when they are the last good rules; a test compiles text), else loaded from `settings.config`
        by `startup()`. `previous`: the last good rules they were chosen against, for the change history.
        `clock`: the ramp clock. `owns_interpreter`: False in a test's process, whose objects are not
        this server's to freeze (see `_freeze_startup_objects`)."""
        self.settings = settings
        self.env = env
        self.rules = rules
        self.refused = refused
        self.previous = previous
        self.metrics = metrics or Metrics(counts_reloads=link is None)  # a worker's reloads are counted by its supervisor
        self.link = link
        self.fleet = fleet
        self._clock = clock
        self._handle_signals = handle_signals
        self._keepalive_timeout = keepalive_timeout
        self._owns_interpreter = owns_interpreter
        self._log = get_logger("splitter.supervisor" if fleet is not None else "splitter.server")
        self._exits = AsyncExitStack()
        self._deadline = 0.0  # loop time by which shutdown must be done; a failed start drains nothing
        self.ready = False
        self.killed_workers = False
        self.stopping = asyncio.Event()  # replaced by the signal handlers' event once they are installed
        # The parts, set by startup():
        self.active: ActiveRules | None = None
        self.standing: FileStanding | None = None
        self.installer: RulesInstaller | None = None
        self.history: ChangeHistory | None = None
        self.reloader: Reloader | None = None
        self.traffic: RecentTraffic | None = None
        self.recorder: Recorder | None = None
        self.watcher: RulesWatcher | None = None
        self.geoip: GeoIP | None = None  # `--geoip-db`, in a process that serves requests
        self.geoip_watcher: GeoIPWatcher | None = None
        self.delivery: Delivery | None = None
        self.catalog: CatalogKeeper | None = None  # the event catalog, where events are served
        self.tier: Tier | None = None  # the catalog and ledger shared on the rules' dedup.store (proxy/observe/tier.py)
        self.listener: IngressListener | None = None
        self.admin: web.AppRunner | None = None

    def is_ready(self) -> bool:
        return self.ready and (self.fleet is None or self.fleet.is_ready())

    async def serve(self) -> int:
        """The whole life of the process; returns its exit code."""
        try:
            await self.startup()
        except StartupFailed as exc:
            return exc.code
        if CHOSEN.why_python is not None and self.fleet is None:
            self._log.warning("compiled_prepare_unavailable", reason=CHOSEN.why_python,
                              hint="SPLITTER_NO_EXTENSIONS=1 chooses the pure-Python one on purpose, without this warning")
        self._log.info("started" if self.link is None else "worker_started", **self._started_fields())
        if self.link is not None:  # after the log line: a supervisor's `started` comes after its workers'
            self.link.start(self.metrics, self.stopping.set)
        await self.stopping.wait()
        self.ready = False
        if self.link is not None:
            self.link.draining()
        extra = {"workers": self.settings.workers} if self.fleet is not None else {}
        self._log.info("draining", timeout=self.settings.drain_timeout, **extra)
        await self.shutdown()
        if self.link is not None:
            await self.link.stop()
        self._log.info("stopped", **({"killed_workers": self.killed_workers} if self.fleet is not None else {}))
        return WORKER_KILLED if self.killed_workers else OK

    async def startup(self) -> None:
        """Start every part in order; on failure unwind what started and raise `StartupFailed` (already logged)."""
        try:
            await self._start(self._exits)
        except BaseException:
            self._deadline = asyncio.get_running_loop().time()
            await self._exits.aclose()
            raise

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Unwind in reverse order of start-up, within `drain_timeout` (by default the settings')."""
        self.ready = False
        timeout = self.settings.drain_timeout if drain_timeout is None else drain_timeout
        self._deadline = asyncio.get_running_loop().time() + timeout
        await self._exits.aclose()

    def _left(self) -> float:
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    async def _start(self, exits: AsyncExitStack) -> None:
        settings, fleet = self.settings, self.fleet
        if self.rules is None:
            start = await load_initial_rules(settings, self.env)
            if start is None:
                raise StartupFailed(BAD_RULES)
            self.rules, self.refused, self.previous = start.rules, start.refused, start.last_good
        rules = self.rules
        if settings.geoip_db is not None:
            geoip = await open_geoip(settings.geoip_db)
            if geoip is None:
                raise StartupFailed(BAD_GEOIP_DB)
            if fleet is None:
                self.geoip = geoip
                self.geoip_watcher = GeoIPWatcher(geoip, self.metrics, interval=settings.reload_poll_interval)
                exits.callback(geoip.close)  # entered before the listener: closed once no request can look up
            else:
                geoip.close()  # a supervisor only checks the file: each of its workers opens and watches its own
        self.active = active = ActiveRules(rules)
        self.standing = standing = FileStanding(active, self.metrics, self.refused)
        # The tier view follows the applied rules' dedup.store (a reload may add or drop it); closed
        # last, after the catalog's and the ledger's final publishes.
        self.tier = tier = Tier(settings.replica, lambda: active.current.dedup, self.metrics, ttl=settings.tier_ttl)
        exits.push_async_callback(tier.close)
        if fleet is None:
            self.delivery = start_delivery(settings, rules, self.metrics, tier)  # a supervisor's workers deliver, not the supervisor
            if self.delivery is None:
                raise StartupFailed(STARTUP_FAILURE)
            exits.push_async_callback(self._close_delivery)
            if self.link is None:  # a single process does not read the per-worker spools a `--workers N` run left
                for leftover in worker_spools(Path(settings.spool_dir)):
                    log.error("spool_orphaned", directory=str(leftover), hint="left by `serve --workers N`; start with --workers 2 or more to deliver it")
            self.catalog = CatalogKeeper(Catalog(), settings.state_dir, settings.process_name, lambda: active.current.catalog.snapshot_interval,
                                         tier=tier)
            await asyncio.to_thread(self.catalog.load)
            exits.push_async_callback(self.catalog.stop)  # after the ingress closes: the last requests are in the last write
        last_good = LastGoodStore(settings.state_dir) if self.link is None else None  # one writer: not a supervisor's workers
        self.history = history = ChangeHistory(settings.state_dir, settings.config) if self.link is None else None  # the same one writer
        self.installer = installer = RulesInstaller(active, self.metrics, self.delivery, clock=self._clock, last_good=last_good, history=history)
        installer.start(rules, previous=self.previous, refused=self.refused)  # with a ramp step already due: in effect before the first request
        self.traffic = RecentTraffic() if fleet is None else None  # kept where requests are served
        self.recorder = Recorder(settings.state_dir) if fleet is None else None  # writes while the rules' `record:` says so
        self.reloader = reloader = Reloader(settings.config, active, self.metrics, self.env, installer,
                                            forward=fleet.forward_reload if fleet is not None else None, traffic=self.traffic)

        async def file_changed() -> None:
            await standing.file_changed(await reloader.reload(FILE_CHANGE))

        # The baseline is the file's own sha256, also when the last good rules serve: the file
        # refused at start is not reloaded (and refused) again until it changes.
        self.watcher = RulesWatcher(settings.config, file_changed, interval=settings.reload_poll_interval,
                                    baseline=self.refused.file_sha256 if self.refused is not None else rules.sha256)
        if self.link is None:  # a worker's admin port is its supervisor's, served once for all workers
            admin = build_admin_app(active=active, reloader=reloader, metrics=self.metrics, token=settings.admin_token, is_ready=self.is_ready,
                                    registry=fleet.registry if fleet is not None else None, detail=standing.detail,
                                    catalog=lambda source: catalog_document(settings.state_dir, self.catalog, source, tier=tier),
                                    history=history.entries if history is not None else None,
                                    ledger=lambda hourly: ledger_document(settings.state_dir, self.delivery.ledger if self.delivery else None,
                                                                          hourly=hourly, tier=tier))
            add_console(admin, region=settings.region)  # GET / on the admin port (proxy/console)
            self.admin = web.AppRunner(admin, access_log=None, shutdown_timeout=ADMIN_SHUTDOWN_TIMEOUT, handle_signals=False)
            await self.admin.setup()
            exits.push_async_callback(self.admin.cleanup)  # entered before the listener: the admin port closes last
        await self._bind(exits)
        if self._handle_signals:  # installed to the end: a second SIGTERM while draining only sets it again
            self.stopping = stop_on_signals(reloader.request)
        if fleet is not None:
            code = await fleet.start()
            if code is not None:
                self._log.error("workers_failed_to_start", code=code)
                raise StartupFailed(code)
            exits.push_async_callback(self._drain_fleet)
        if self.catalog is not None:
            self.catalog.start()
        reloader.start()
        installer.ramps.start()
        self.watcher.start()
        if self.geoip_watcher is not None:
            self.geoip_watcher.start()
        exits.push_async_callback(self._stop_control_plane)
        if self._owns_interpreter:
            self._log.info("startup_objects_frozen", objects=_freeze_startup_objects())
        self.ready = True

    async def _bind(self, exits: AsyncExitStack) -> None:
        """Listen on the ingress port (unless a fleet serves it) and the admin port; OSError: exit 3."""
        settings = self.settings
        try:
            if self.fleet is None:
                assert self.active is not None and self.delivery is not None
                deps = IngressDeps(self.active, self.delivery, self.metrics, settings.region, settings.trusted_proxies, traffic=self.traffic,
                                   recorder=self.recorder,
                                   geoip=self.geoip, catalog=self.catalog.catalog if self.catalog is not None else None)
                app = build_ingress_app(deps, cors_origins=settings.cors_origins, max_in_flight=settings.max_in_flight, cdn_url=settings.cdn_url,
                                        public_url=settings.public_url, cdn_cache_seconds=settings.cdn_cache_seconds)
                ingress = web.AppRunner(app, access_log=None, shutdown_timeout=settings.drain_timeout, handle_signals=False)
                await ingress.setup()
                exits.push_async_callback(self._close_ingress, ingress)
                self.listener = await listen(ingress, *settings.listen, reuse_port=settings.reuse_port, backlog=1024,
                                             keepalive_timeout=self._keepalive_timeout, header_timeout=settings.header_timeout,
                                             body_timeout=settings.body_timeout)
            if self.admin is not None:
                await web.TCPSite(self.admin, *settings.admin).start()
        except OSError as exc:
            where = {"admin": f"{settings.admin[0]}:{settings.admin[1]}"}
            if self.fleet is None:  # a supervisor reserved the ingress address before it got here
                where = {"listen": f"{settings.listen[0]}:{settings.listen[1]}", **where}
            log.error("listen_failed", error=str(exc), **where)
            raise StartupFailed(STARTUP_FAILURE) from None

    def _started_fields(self) -> dict[str, Any]:
        rules = self.rules
        assert rules is not None
        if self.fleet is not None:
            where = self.fleet.describe()
        else:
            where = {"listen": self.listener.addresses if self.listener is not None else []}
        fields: dict[str, Any] = {**where, "admin": addresses(self.admin) if self.admin is not None else [],
                                  "rules": self.settings.config, "sha256": rules.sha256[:12]}
        if self.standing is not None and self.standing.refused is not None:
            fields["rules_source"] = "last_good"
        if self.fleet is None:
            fields["region"] = self.settings.region
            fields["prepare"] = CHOSEN.name  # the compiled prepare() or the pure-Python one (proxy/ingress/implementation.py)
        return {**fields, "pid": os.getpid()}

    # The exit stack's callbacks, in the order they run on the way down.
    async def _stop_control_plane(self) -> None:
        assert self.watcher is not None and self.reloader is not None and self.installer is not None
        await self.watcher.stop()
        if self.geoip_watcher is not None:
            await self.geoip_watcher.stop()
        await self.reloader.stop()
        await self.installer.ramps.stop()

    async def _drain_fleet(self) -> None:
        assert self.fleet is not None
        self.killed_workers = not await self.fleet.drain(self._left())

    async def _close_ingress(self, ingress: web.AppRunner) -> None:
        """Stop accepting and let in-flight requests finish (the listener also cleans the runner up)."""
        if self.listener is not None:
            await self.listener.close(self._left())
        else:
            await ingress.cleanup()

    async def _close_delivery(self) -> None:
        """Deliver what can be delivered in the time left; the rest stays spooled for the next start."""
        assert self.delivery is not None
        await self.delivery.close(drain_timeout=self._left())


async def serve(settings: ServeSettings, env: Mapping[str, str] | None = None, link: Link | None = None) -> int:
    """Run the proxy: alone, or as one worker of `serve --workers N` (`link`: its link to the supervisor)."""
    configure(settings.log_level)
    return await Server(settings, os.environ if env is None else env, link=link).serve()


def run(settings: ServeSettings) -> int:
    return run_loop(serve(settings))


def _freeze_startup_objects() -> int:
    """Move every object alive once the process has started (modules, the compiled rules, the apps:
    a few hundred thousand) out of the cyclic GC's reach, after collecting what is garbage already.

    They live as long as the process, and each full collection scanned them all: 40 to 60 ms with
    the event loop stopped, every few seconds under load, which was most of the p99 at half load
    (measured with a gc callback on a `serve` taking 1,000 batches a second). Frozen, a full
    collection scans only what was made since. Objects a reload replaces stay frozen (a compiled
    rule set, a few MB at most): freed by reference counting when nothing refers to them, as
    nearly all are, and never collected if they sit in a cycle, which costs less than the pauses.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return asyncio.run(main)
    return uvloop.run(main)
