"""The active rules: one reference, replaced whole by `proxy.install.RulesInstaller` (start-up, reload, ramp step).

Handlers read `active.current` once per request and use that snapshot to the end, so a request
started under the old rules finishes under them even if a reload lands mid-request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from proxy.engine import RuleSet


@dataclass(frozen=True, slots=True)
class Snapshot:
    rules: RuleSet
    loaded_at: float  # wall clock, for /admin/config


class ActiveRules:
    def __init__(self, rules: RuleSet) -> None:
        self._snapshot = Snapshot(rules, time.time())

    @property
    def current(self) -> RuleSet:
        return self._snapshot.rules

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def swap(self, rules: RuleSet) -> RuleSet:
        """Install `rules` in one rebind; returns the rules it replaced."""
        previous = self._snapshot.rules
        self._snapshot = Snapshot(rules, time.time())
        return previous
