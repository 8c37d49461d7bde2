"""Apply ramp steps when they fall due, without a reload.

The engine says which split a ramp gives at a time (`effective_rules`) and when the next step is
(`next_step_at`); this module owns the clock. `RampScheduler` sleeps until the next step and installs
the rules with that step applied through the process's `RulesInstaller` (proxy/control/install.py: the same
step as a reload, so the swap, `splitter_rollout_percent` and delivery move together), then logs
`ramp_step_applied`. A reload installs rules already set to "now" (`live()`), and every install
calls `replan()`, so the next wake-up is computed from the rules now in effect. A step is installed
with the trigger `ramp`, which the change history records it under; the steps start-up catches up
on are part of the start's own entry.

The clock is injectable (`Clock`) so tests can move time by hand; `SystemClock` naps at most a
minute at a time and re-reads the wall clock, so a clock stepped by NTP cannot make it oversleep.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Protocol

from proxy.background import BackgroundTask
from proxy.engine import RuleSet, effective_rules, iso, next_step_at
from proxy.log import get_logger

log = get_logger(__name__)
RAMP = "ramp"  # the trigger a step is installed (and written to the change history) with


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware."""

    async def sleep_until(self, when: datetime) -> None:
        """Return at or after `when`, or earlier: callers check `now()` again."""


class Installer(Protocol):
    """What the scheduler needs of `proxy.install.RulesInstaller` (which owns it, so it cannot import it)."""

    @property
    def current(self) -> RuleSet:
        """The rules in effect."""

    def install(self, rules: RuleSet, *, trigger: str | None = None) -> RuleSet:
        """Put `rules` into effect (recorded under `trigger`, when given); returns the rules they replaced."""


class SystemClock:
    MAX_NAP = 60.0

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep_until(self, when: datetime) -> None:
        await asyncio.sleep(min(max((when - self.now()).total_seconds(), 0.0), self.MAX_NAP))


class RampScheduler:
    def __init__(self, installer: Installer, clock: Clock | None = None) -> None:
        self._installer = installer
        self._clock = clock or SystemClock()
        self._wake = asyncio.Event()
        self._latest: datetime | None = None  # the latest time seen: the clock stepped back must not undo a step
        self._background = BackgroundTask(self.run, "ramp-scheduler")

    def now(self) -> datetime:
        """The clock's time, but never earlier than a time already used.

        Ramps only move forward: a wall clock stepped back (NTP, a VM's clock fixed) across a step
        that is in effect would otherwise hand that step's users back until the clock caught up.
        """
        now = self._clock.now()
        if self._latest is not None and now < self._latest:
            return self._latest
        self._latest = now
        return now

    def live(self, rules: RuleSet) -> RuleSet:
        """`rules` with each ramp at the step due now: what a reload compares and installs."""
        return effective_rules(rules, self.now())

    def replan(self) -> None:
        """The active rules were replaced: work out the next step time again (the installer calls this)."""
        self._wake.set()

    def apply_due(self, trigger: str | None = RAMP, *, now: datetime | None = None) -> None:
        """Install the steps due now (or at `now`), if any changed a split; at start-up this catches up at once (`trigger=None`)."""
        if now is None:
            now = self.now()
        current = self._installer.current
        live = effective_rules(current, now)
        if live is current:
            return
        self._installer.install(live, trigger=trigger)
        for before, after in zip(current.rules, live.rules, strict=True):
            if after.route.ramp is not None and after.route.split != before.route.split:
                step = after.route.ramp.index_at(now)
                log.info("ramp_step_applied", rule=after.name, step=step, at=iso(after.route.ramp.steps[step].at) if step is not None else None,
                         percents=dict(after.route.split.percents) if after.route.split else {})

    async def run(self) -> None:
        while True:
            # One reading of the clock for both: a step falling between two readings would be neither
            # applied (the first was before it) nor waited for (the second, after it), and never taken.
            now = self.now()
            self.apply_due(now=now)
            self._wake.clear()  # after: the install above replanned, and the next step is worked out just below
            due = next_step_at(self._installer.current, now)
            if due is None:
                await self._wake.wait()
            else:
                await self._until(due)

    async def _until(self, due: datetime) -> None:
        """Sleep until `due` or until `replan()`, whichever comes first."""
        sleeper = asyncio.ensure_future(self._clock.sleep_until(due))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((sleeper, waker), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()
            await asyncio.gather(sleeper, waker, return_exceptions=True)

    def start(self) -> None:
        self._background.start()

    async def stop(self) -> None:
        await self._background.stop()
