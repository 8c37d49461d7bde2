"""Delivery: getting encoded events to each destination.

The ingress hands over, per request, the encoded events for each primary and mirror destination.
Primaries are awaited and summarised in one `Outcome` the handler turns into the client's answer;
mirrors are queued and never awaited. This facade is the whole interface: the lossless pipeline
(batching across requests, retries, spool) replaces what is behind it, not how it is called.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.delivery.batches import batch_bodies
from proxy.delivery.errors import UpstreamError, UpstreamRejected
from proxy.delivery.mirror import MirrorJob, MirrorQueue
from proxy.delivery.upstream import Upstream
from proxy.engine import Destination, RuleSet, Source
from proxy.log import get_logger
from proxy.metrics import Metrics

log = get_logger("splitter.delivery")
DestinationKey = tuple[str, str, str, float]


@dataclass(frozen=True, slots=True)
class Outcome:
    """How the primaries took a request's events: `ok`, or the status the client should see."""

    ok: bool
    status: int = 200
    code: str = ""
    message: str = ""
    retry_after: float | None = None


OK = Outcome(True)


def _key(destination: Destination) -> DestinationKey:
    return (destination.name, destination.kind, destination.url, destination.timeout)


class Delivery:
    def __init__(self, metrics: Metrics, *, mirror_queue_size: int = 10_000, mirror_concurrency: int = 4) -> None:
        self.metrics = metrics
        self._mirror_queue_size = mirror_queue_size
        self._mirror_concurrency = mirror_concurrency
        self._upstreams: dict[DestinationKey, Upstream] = {}
        self._mirrors: dict[DestinationKey, MirrorQueue] = {}
        self._background: set[asyncio.Task[None]] = set()

    def upstream(self, destination: Destination) -> Upstream:
        """The client for a destination as the active rules define it (a reload may change its URL)."""
        key = _key(destination)
        found = self._upstreams.get(key)
        if found is None:
            found = self._upstreams[key] = Upstream(destination, self.metrics)
        return found

    async def send_primary(self, rules: RuleSet, parts: Mapping[str, list[bytes]], source: Source, presented_key: str,
                           forwarded_for: str | None) -> Outcome:
        if not parts:
            return OK
        names = list(parts)
        results = await asyncio.gather(
            *(self._send_all(rules.destinations[name], parts[name], source.credential_for(name, presented_key), forwarded_for) for name in names),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        for failure in failures:
            if not isinstance(failure, UpstreamError):
                raise failure
        return summarise([f for f in failures if isinstance(f, UpstreamError)])

    async def _send_all(self, destination: Destination, events: list[bytes], write_key: str, forwarded_for: str | None) -> None:
        upstream = self.upstream(destination)
        for body, _ in batch_bodies(events):
            await upstream.send(body, write_key, forwarded_for)

    def send_mirror(self, rules: RuleSet, parts: Mapping[str, list[bytes]], source: Source, presented_key: str,
                    forwarded_for: str | None) -> None:
        for name, events in parts.items():
            destination = rules.destinations[name]
            queue = self._mirrors.get(_key(destination))
            if queue is None:
                queue = self._mirrors[_key(destination)] = MirrorQueue(
                    self.upstream(destination), self.metrics, max_events=self._mirror_queue_size, workers=self._mirror_concurrency
                )
            queue.offer(MirrorJob(events, source.credential_for(name, presented_key), forwarded_for))

    def forward_telemetry(self, rules: RuleSet, body: bytes, content_type: str) -> None:
        """analytics.js metrics (`/v1/m`) go to Segment destinations only, in the background."""
        for destination in rules.destinations.values():
            if destination.kind == "segment":
                self._spawn(self._telemetry(self.upstream(destination), body, content_type))

    async def _telemetry(self, upstream: Upstream, body: bytes, content_type: str) -> None:
        try:
            await upstream.send(body, None, path="/v1/m", content_type=content_type)
        except UpstreamError as exc:
            log.info("telemetry_forward_failed", destination=upstream.destination.name, error=exc.detail)

    def _spawn(self, coroutine: object) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self, drain_timeout: float = 5.0) -> None:
        """Let queued mirror copies go out within `drain_timeout`, then close every connection."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        for queue in self._mirrors.values():
            drained = await queue.drain(max(0.0, deadline - loop.time()))
            if not drained:
                log.warning("mirror_drain_incomplete", destination=queue.upstream.destination.name, events=queue.queued_events)
        if self._background:
            await asyncio.wait(self._background, timeout=max(0.1, deadline - loop.time()))
        for queue in self._mirrors.values():
            await queue.close()
        for upstream in self._upstreams.values():
            await upstream.close()


def summarise(failures: list[UpstreamError]) -> Outcome:
    """One answer for the client from every primary's failure.

    Something a retry can fix wins (503, or 429 when the only trouble is throttling), so the SDK
    keeps the events and tries again; a permanent rejection is passed through with its status.
    """
    if not failures:
        return OK
    retryable = [f for f in failures if f.retryable]
    throttled = [f for f in retryable if isinstance(f, UpstreamRejected) and f.status == 429]
    if throttled and len(throttled) == len(retryable):
        wait = max((f.retry_after or 0.0) for f in throttled) or 5.0
        return Outcome(False, 429, "rate_limited", "; ".join(f"{f}" for f in throttled), wait)
    if retryable:
        return Outcome(False, 503, "upstream_unavailable", "; ".join(str(f) for f in retryable))
    first = failures[0]
    status = first.status if isinstance(first, UpstreamRejected) else 502
    return Outcome(False, status, "upstream_rejected", "; ".join(str(f) for f in failures))
