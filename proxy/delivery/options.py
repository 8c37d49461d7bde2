"""Per-destination delivery settings: defaults, overridable under `destinations.NAME.delivery`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True, slots=True)
class DeliveryOptions:
    batch_max_events: int = 500  # per upstream request
    batch_max_bytes: int = 480 * 1024  # per upstream request, under Segment's 500 KB
    flush_interval: float = 0.02  # seconds a sender waits for a fuller batch when few events are ready
    max_in_flight: int = 1  # upstream requests at once per destination; above 1, order across batches is not kept during retries
    retry_base: float = 0.5  # seconds; backoff doubles per attempt, with full jitter
    retry_max: float = 30.0  # seconds, cap of the backoff and of the breaker's cool-down
    breaker_failures: int = 5  # consecutive failures that open the breaker
    breaker_cooldown: float = 2.0  # seconds before the first half-open probe
    # A batch answered 3xx this many times is dead-lettered as `redirected`: ten, as analytics.js and the
    # Segment SDKs retry, spreads the tries over about a minute of backoff (more while the breaker is open).
    redirect_attempts: int = 10
    spool_quota_mb: float = 1024.0  # disk the spool may use; past it primaries get 503, mirrors drop

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> DeliveryOptions:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @property
    def spool_quota_bytes(self) -> int:
        return int(self.spool_quota_mb * 1024 * 1024)
