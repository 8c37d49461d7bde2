"""Put a rule set into effect: the one step start-up, every reload and every ramp step take.

A new rule set is applied whole, in one place, outside the request path:

1. `Delivery.apply` builds or reconfigures every destination's pipeline (options, breaker,
   concurrency, quota, spool) before the first request that needs it. It goes first because it is
   the step that can fail (a new destination's spool that cannot be opened): then nothing has
   changed, and the reload fails with the last good rules still serving;
2. `ActiveRules.swap` rebinds the active rules (a request keeps the snapshot it started with);
3. `Metrics.show_rules` republishes the rules gauges (`splitter_config_info`, `splitter_rollout_percent`);
4. the ramp schedule is replanned from the rules now in effect;
5. the rules file's text is kept as the last good rules (proxy/control/last_good.py), in the process
   that writes them (a single process, or a supervisor; `last_good` is None in a worker). A copy
   that cannot be written is logged and changes nothing else: the rules are in effect;
6. the change is written to the change history (proxy/control/history.py), by the same process as
   the last good rules: what triggered it and what changed. Start-up (`start`) writes one entry for
   the rules it ends on, a ramp step already due included; a reload passes its trigger and its
   `compare` report, a ramp step its own trigger. A failed reload installs nothing, and says so
   through `failed`, so the history has every attempt in one place.

All of it runs in one synchronous call, so no request can see the new rules while delivery still has
the old ones. Before this module the step was spread over reload.py, ramp_clock.py and server.py,
and a reload that changed a destination's delivery options reached only part of its pipeline.

A supervisor (`serve --workers N`) installs without a delivery: its workers deliver, and each one
installs the same rules in its own process.
"""

from __future__ import annotations

from proxy.control.history import ChangeHistory
from proxy.control.last_good import LastGoodStore
from proxy.control.ramps import Clock, RampScheduler
from proxy.control.start_rules import FileRefused
from proxy.control.state import ActiveRules
from proxy.delivery import Delivery
from proxy.engine import RolloutReport, RuleSet
from proxy.log import get_logger
from proxy.metrics import Metrics

log = get_logger(__name__)


class RulesInstaller:
    """Owns the step that puts rules into effect, and the ramp scheduler whose steps go through it."""

    def __init__(self, active: ActiveRules, metrics: Metrics, delivery: Delivery | None = None, *, clock: Clock | None = None,
                 last_good: LastGoodStore | None = None, history: ChangeHistory | None = None) -> None:
        self.active = active
        self.metrics = metrics
        self.delivery = delivery
        self.last_good = last_good
        self.history = history  # None where last_good is: a worker of `serve --workers N`
        self.ramps = RampScheduler(self, clock)  # the installer replans it; its steps are installed here

    @property
    def current(self) -> RuleSet:
        return self.active.current

    def start(self, rules: RuleSet, *, previous: RuleSet | None = None, refused: FileRefused | None = None) -> None:
        """Start-up: install `rules`, apply the ramp steps already due, and write one history entry for
        the rules now in effect. `previous`: the last good rules (what the file changed since the last
        run); `refused`: the file was refused and `rules` are the last good ones."""
        self.install(rules)
        self.ramps.apply_due(trigger=None)  # part of the start, not a step of its own in the history
        if self.history is not None:
            self.history.started(self.current, self.live(previous) if previous is not None else None, refused)

    def install(self, rules: RuleSet, *, trigger: str | None = None, report: RolloutReport | None = None) -> RuleSet:
        """Apply `rules` to delivery, swap them in, publish them, replan the ramps and keep them as the last good; returns the rules replaced.

        With a `trigger` (a reload's, or a ramp step's) the change is written to the history, with the
        reload's `report` when there is one."""
        if self.delivery is not None:
            self.delivery.apply(rules)
        previous = self.active.swap(rules)
        self.metrics.show_rules(rules)
        self.ramps.replan()
        if self.last_good is not None:
            try:
                self.last_good.save(rules)  # one small file and two fsyncs, at start-up and at an accepted reload (a ramp step's text is unchanged)
            except OSError as exc:
                log.error("last_good_save_failed", record=str(self.last_good.path), error=str(exc),
                          hint="a restart cannot fall back to these rules if the file is later refused; check --state-dir")
        if trigger is not None and self.history is not None:
            self.history.installed(trigger, previous, rules, report)
        return previous

    def failed(self, trigger: str, status: str, errors: list[str], sha256: str | None) -> None:
        """A reload that installed nothing (the file does not compile, or is refused): written to the history."""
        if self.history is not None:
            self.history.failed(trigger, status, errors, sha256, self.current)

    def live(self, rules: RuleSet) -> RuleSet:
        """`rules` with each ramp at the step due now: what a reload compares against and installs."""
        return self.ramps.live(rules)
