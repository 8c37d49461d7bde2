"""A circuit breaker per destination: stop hammering an upstream that is down, probe it now and then.

closed → (N consecutive failures) → open → (cool-down elapsed) → half-open: one probe request →
success closes it, failure opens it again with a longer cool-down (doubling, capped).
"""

from __future__ import annotations

import time
from typing import Literal

State = Literal["closed", "open", "half_open"]
STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}


class Breaker:
    def __init__(self, *, failures: int = 5, cooldown: float = 2.0, max_cooldown: float = 60.0) -> None:
        self.threshold = failures
        self.base_cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.state: State = "closed"
        self.consecutive_failures = 0
        self._cooldown = cooldown
        self._opened_at = 0.0

    def configure(self, *, failures: int, cooldown: float, max_cooldown: float) -> None:
        """New thresholds from a reload, taking effect at once; the state is kept (an upstream that is
        down stays known to be down), and an open breaker's current cool-down is capped by the new bounds."""
        self.threshold = failures
        self.base_cooldown = cooldown
        self.max_cooldown = max_cooldown
        self._cooldown = min(max(self._cooldown, cooldown), max_cooldown) if self.state != "closed" else cooldown
        if self.state == "closed" and self.consecutive_failures >= failures:
            self._open(None)

    def wait_time(self, now: float | None = None) -> float:
        """Seconds to wait before the next request may go; moves open → half-open when due."""
        if self.state != "open":
            return 0.0
        remaining = self._opened_at + self._cooldown - (now if now is not None else time.monotonic())
        if remaining <= 0:
            self.state = "half_open"
            return 0.0
        return remaining

    def success(self) -> None:
        self.state = "closed"
        self.consecutive_failures = 0
        self._cooldown = self.base_cooldown

    def failure(self, now: float | None = None) -> None:
        self.consecutive_failures += 1
        if self.state == "half_open":
            self._cooldown = min(self._cooldown * 2, self.max_cooldown)
            self._open(now)
        elif self.state == "closed" and self.consecutive_failures >= self.threshold:
            self._open(now)

    def _open(self, now: float | None) -> None:
        self.state = "open"
        self._opened_at = now if now is not None else time.monotonic()
