"""Tracking-plan checks in the running proxy: off the request path for `mode: observe`, inline for `block`.

Observe mode never delays an answer or a delivery. `prepare()` only appends the encoded bytes
(which exist anyway, and are immutable) of each accepted event the plan has something to check in
to a list; after delivery has accepted the request the handler offers them to a bounded queue
(bounded in events and in bytes), and a background task parses and checks one
event per loop turn. Queuing the bytes rather than the parsed dict costs a second parse in the
background (CPU, not latency), but keeps the request's objects from outliving `prepare()`: the
ingress keeps only bytes across awaits so the cyclic GC does not rescan big batches (see
`prepare.py`). When the queue is full (in events or in bytes) the events are not checked, and that is counted.

Block mode checks in `prepare()` itself (`screen`), and a violating event is rejected like any
other per-event rejection. Both modes count violations by source and kind, and log a sample: at
most one line per second per (source, kind), with the number of lines held back since the last.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable

import orjson
from aiohttp import web

from proxy.background import BackgroundTask
from proxy.engine import RuleSet, TrackingPlan, Violation
from proxy.log import LogThrottle, get_logger
from proxy.metrics import Metrics

log = get_logger("splitter.tracking_plan")
QUEUE_CAPACITY = 10_000  # events waiting for a check; a burst beyond this is skipped and counted
QUEUE_MAX_BYTES = 32 * 1024 * 1024  # and their bytes: 10,000 events of up to 32 KB would otherwise be 320 MB
LOG_INTERVAL = 1.0  # seconds between sampled log lines per (source, kind)
_SHOWN_NAME_CHARS = 100  # event names come from clients: a log line quotes this much of one


def screen(plan: TrackingPlan, event: dict[str, object], encoded: bytes, observed: list[bytes], violations: list[Violation]) -> str | None:
    """Apply a source's plan to one event in `prepare()`: the rejection message when a blocking plan
    refuses it, else None. An observing plan only keeps the bytes for the background check, and only
    of events it has something to check in: the others must not take room in the bounded queue."""
    if not plan.blocks:
        if plan.checks(event):
            observed.append(encoded)
        return None
    try:
        found = plan.violations(event)
    except Exception:  # e.g. RecursionError in jsonschema: cost this event's check, not a 500 for the request
        _check_failed(plan.mode)
        return None
    if not found:
        return None
    violations.extend(found)
    return "; ".join(v.message for v in found)


_FAILURE_LOG = LogThrottle(LOG_INTERVAL)


def _check_failed(mode: str, source: str | None = None) -> None:
    """Log a failed check (inside an `except`), at most once a second: a client can make many fail on purpose."""
    if _FAILURE_LOG.allow() is not None:
        log.exception("tracking_plan_check_failed", source=source, mode=mode)


class PlanChecks:
    """The bounded check queue, its consumer task, and the counting and sampled logging of violations."""

    def __init__(self, capacity: int = QUEUE_CAPACITY, clock: Callable[[], float] = time.monotonic, max_bytes: int = QUEUE_MAX_BYTES) -> None:
        self._queue: asyncio.Queue[tuple[TrackingPlan, str, bytes]] = asyncio.Queue(capacity)
        self._max_bytes = max_bytes
        self._queued_bytes = 0
        self._metrics: Metrics | None = None
        self._sampled = LogThrottle(LOG_INTERVAL, clock)  # per (source, kind)
        self._background = BackgroundTask(self._run, "tracking-plan-checks")

    def register(self, app: web.Application, metrics: Metrics) -> None:
        """Count into `metrics`, and run the consumer for as long as `app` runs."""
        self._metrics = metrics
        app.cleanup_ctx.append(self._lifetime)

    @property
    def metrics(self) -> Metrics:
        if self._metrics is None:
            raise RuntimeError("PlanChecks.register() must be called before events are checked")
        return self._metrics

    async def _lifetime(self, app: web.Application) -> AsyncIterator[None]:
        self._background.start()
        yield
        await self._background.stop()

    def submit(self, rules: RuleSet, source: str, events: list[bytes]) -> None:
        """Queue accepted events of `source` for checking, or count those that do not fit."""
        plan = rules.tracking_plans[source]
        for index, data in enumerate(events):
            try:
                if self._queued_bytes + len(data) > self._max_bytes:
                    raise asyncio.QueueFull
                self._queue.put_nowait((plan, source, data))
            except asyncio.QueueFull:
                self.metrics.child(self.metrics.tracking_plan_unchecked, source).inc(len(events) - index)
                return
            self._queued_bytes += len(data)

    def record(self, source: str, violations: Iterable[Violation], mode: str) -> None:
        metrics = self.metrics
        for violation in violations:
            metrics.child(metrics.tracking_plan_violations, source, violation.kind).inc()
            self._sample(source, violation, mode)

    def _sample(self, source: str, violation: Violation, mode: str) -> None:
        held_back = self._sampled.allow((source, violation.kind))
        if held_back is not None:
            log.warning("tracking_plan_violation", source=source, kind=violation.kind, event_name=violation.event[:_SHOWN_NAME_CHARS],
                        message=violation.message, mode=mode, held_back=held_back)

    async def _run(self) -> None:
        while True:
            plan, source, data = await self._queue.get()
            self._queued_bytes -= len(data)
            try:
                self.record(source, plan.violations(orjson.loads(data)), plan.mode)
            except Exception:  # a checker bug must cost one event's check, not every later one
                _check_failed(plan.mode, source)
            await asyncio.sleep(0)  # one event per loop turn: a backlog never holds up requests or delivery
