"""Reload the rules file: compile it whole, then swap it in or keep the old rules.

Every trigger (SIGHUP, the file watcher, `POST /admin/reload`) ends in `Reloader.reload`, which is
all-or-nothing: a file that does not compile, or that would reshuffle users between destinations
without saying `reshuffle: true`, is logged and counted and the last good rules stay active. Reloads
are serialized by a lock, so two triggers can never compare against, or swap over, each other.
A rule set that passes is put into effect by the process's `RulesInstaller` (proxy/control/install.py), the
same step start-up and ramp steps take. In a `--workers N` supervisor, `forward` passes an
operator's reload (anything but the supervisor's own file watcher) on to every worker.

What a change does to users is judged by `proxy.engine.compare`, from both rule sets and the recent
traffic this process kept (`traffic`, proxy/control/traffic.py): every rollback it finds is in the
answer, logged as `config_rollback` and counted in `splitter_config_rollbacks_total`. A file that
fails (does not compile, or is refused) is counted and logged once however many triggers try it:
an operator's `POST /admin/reload` and the file watcher both see the same edit. Every attempt that
is not `unchanged` goes into the change history (through the installer), a repeated failure once.

Signal handlers must not do work, so `request()` only records a trigger and sets an event; the
`run()` task wakes, takes every trigger recorded so far, and reloads once for the whole burst.
The rules text is never logged (it may hold literal write keys), only the engine's located errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from proxy.background import BackgroundTask
from proxy.control.install import RulesInstaller
from proxy.control.state import ActiveRules
from proxy.control.traffic import RecentTraffic
from proxy.engine import RolloutReport, RulesError, RuleSet, compare, load_rules, plan_files
from proxy.log import get_logger
from proxy.metrics import Metrics

log = get_logger(__name__)
FILE_CHANGE = "file_change"  # the trigger of the rules watcher, which every process of `--workers N` runs itself
Status = Literal["success", "error", "refused", "unchanged"]  # proxy.metrics.RELOAD_RESULTS presets each at 0


@dataclass(frozen=True)
class ReloadResult:
    status: Status
    trigger: str
    sha256: str | None  # of the rules active after the attempt
    errors: tuple[str, ...] = ()  # `FILE:LINE: path: message` lines, or why a reshuffle was refused
    rollbacks: tuple[dict[str, Any], ...] = ()  # {"rule", "buckets_back"} per split, then every other move back (Move.as_dict)

    repeated: bool = False  # the same failure as the attempt before: not counted again

    @property
    def ok(self) -> bool:
        return self.status in ("success", "unchanged")


class Reloader:
    def __init__(self, path: str, active: ActiveRules, metrics: Metrics, env: Mapping[str, str], installer: RulesInstaller | None = None, *,
                 forward: Callable[[], None] | None = None, traffic: RecentTraffic | None = None) -> None:
        """`active` is read and `metrics` counts reloads; `installer` puts new rules into effect (the
        process's own, with its ramps and delivery; by default one over `active` and `metrics` alone);
        `traffic` is the recent traffic a change is replayed on. A worker's `metrics` do not count
        reloads (`Metrics.counts_reloads`): its supervisor reloads the same file and counts it once for all."""
        self._installer = installer or RulesInstaller(active, metrics)
        assert self._installer.active is active, "the installer must install into the rules this reloader reads"
        self._path = path
        self._forward = forward
        self._active = active
        self._metrics = metrics
        self._env = env
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._triggers: list[str] = []
        self._traffic = traffic
        self._last_failure: tuple[str, ...] | None = None  # what the last failed attempt said, to count a file once
        self._background = BackgroundTask(self.run, "rules-reloader")

    async def reload(self, trigger: str) -> ReloadResult:
        """Compile the file and install it if it is valid, new, and reshuffles no one unasked."""
        async with self._lock:
            result = await self._attempt(trigger)
            if self._metrics.counts_reloads and not result.repeated:
                self._metrics.config_reloads.labels(result=result.status).inc()
        if self._forward is not None and trigger != FILE_CHANGE:  # the workers compile the same file with the same checks
            self._forward()
        return result

    async def _attempt(self, trigger: str) -> ReloadResult:
        try:
            new = await asyncio.to_thread(load_rules, self._path, self._env)
        except RulesError as exc:
            return self._failed(trigger, "error", list(exc.lines))  # the engine never quotes URL credentials
        except OSError as exc:
            return self._failed(trigger, "error", [f"{self._path}: cannot read the rules file: {exc.strerror or exc}"])
        except Exception as exc:  # an engine bug must not take the last good rules down with it
            log.exception("config_reload_crashed", trigger=trigger, path=self._path)
            return self._failed(trigger, "error", [f"{self._path}: internal error while compiling: {type(exc).__name__}"])
        # Read only now: a ramp step may have been applied while the file compiled in a thread, and
        # the comparison must be against the rules that are live, or a rollback from that step is missed.
        old = self._active.current
        new = self._installer.live(new)  # ramped splits are compared and installed at the step due now
        if new.sha256 == old.sha256 and plan_files(new.tracking_plans) == plan_files(old.tracking_plans):
            self._last_failure = None
            log.info("config_reload_unchanged", trigger=trigger, sha256=old.sha256[:12])
            return ReloadResult("unchanged", trigger, old.sha256)
        old, new, report = await self._compared(old, new)
        if report.refused:
            return self._failed(trigger, "refused", list(report.refused), sha256=new.sha256)
        self._last_failure = None
        self._installer.install(new, trigger=trigger, report=report)
        log.info("config_reloaded", trigger=trigger, old_sha256=old.sha256[:12], new_sha256=new.sha256[:12])
        rollbacks = report.rollback_entries()
        for entry in rollbacks:
            log.warning("config_rollback", trigger=trigger, **entry)
            if self._metrics.counts_reloads:
                self._metrics.config_rollbacks.labels(kind=entry.get("kind", "split")).inc()
        return ReloadResult("success", trigger, new.sha256, (), rollbacks)

    async def _compared(self, old: RuleSet, new: RuleSet) -> tuple[RuleSet, RuleSet, RolloutReport]:
        """`compare` in a thread (a replay of thousands of events must not stall requests), against
        the rules live when it finishes: a ramp step taken meanwhile is compared again."""
        samples = self._traffic.snapshot() if self._traffic is not None else []
        report = await asyncio.to_thread(compare, old, new, samples)
        for _ in range(3):
            if self._active.current is old:
                break
            old = self._active.current
            new = self._installer.live(new)
            report = await asyncio.to_thread(compare, old, new, samples)
        return old, new, report

    def _failed(self, trigger: str, status: Status, errors: list[str], *, sha256: str | None = None) -> ReloadResult:
        """A file that cannot be installed; the same failure again (the watcher and an operator's
        POST seeing one edit) is answered and logged for an operator, but counted once."""
        failure = (status, sha256 or "", *errors)
        repeated = failure == self._last_failure
        self._last_failure = failure
        if not repeated:
            self._installer.failed(trigger, status, errors, sha256)
        if not (repeated and trigger == FILE_CHANGE):
            if status == "refused":
                log.error("config_reload_refused", trigger=trigger, path=self._path, sha256=(sha256 or "")[:12], errors=errors)
            else:
                log.error("config_reload_failed", trigger=trigger, path=self._path, errors=errors)
        return ReloadResult(status, trigger, self._active.current.sha256, tuple(errors), repeated=repeated)

    def request(self, trigger: str) -> None:
        """Ask `run()` for a reload. Only records and wakes, so a signal handler may call it."""
        self._triggers.append(trigger)
        self._wake.set()

    async def run(self) -> None:
        """Reload once per burst of `request()`s; one arriving mid-reload causes one more pass."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            triggers, self._triggers = self._triggers, []
            try:
                await self.reload(",".join(dict.fromkeys(triggers)) or "request")
            except Exception:
                log.exception("config_reload_crashed", trigger=",".join(triggers))

    def start(self) -> None:
        self._background.start()

    async def stop(self) -> None:
        await self._background.stop()

