"""Mirror copies: a bounded queue and a few workers per destination, never awaited by a client.

A slow or dead mirror must not slow the primary path (nginx's mirror does, see the anchors), so
`offer()` never waits: when the queue is full the events are dropped and counted. Workers send
what they take and count failures; issue-level durability (spooling mirrors) replaces the drop.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from proxy.delivery.batches import batch_bodies
from proxy.delivery.errors import UpstreamError, UpstreamRejected
from proxy.delivery.upstream import Upstream
from proxy.log import get_logger
from proxy.metrics import Metrics

log = get_logger("splitter.mirror")


@dataclass(frozen=True, slots=True)
class MirrorJob:
    events: list[bytes]
    write_key: str
    forwarded_for: str | None


class MirrorQueue:
    def __init__(self, upstream: Upstream, metrics: Metrics, *, max_events: int, workers: int) -> None:
        self.upstream = upstream
        self.metrics = metrics
        self.max_events = max_events
        self.queued_events = 0
        self._queue: asyncio.Queue[MirrorJob] = asyncio.Queue()
        self._workers = [asyncio.create_task(self._work()) for _ in range(workers)]
        name = upstream.destination.name
        self._depth = metrics.child(metrics.mirror_queue, name)
        self._dropped_full = metrics.child(metrics.mirror_dropped, name, "queue_full")

    def offer(self, job: MirrorJob) -> bool:
        """Queue `job` or count its events as dropped; never blocks."""
        if self.queued_events + len(job.events) > self.max_events:
            self._dropped_full.inc(len(job.events))
            return False
        self.queued_events += len(job.events)
        self._depth.set(self.queued_events)
        self._queue.put_nowait(job)
        return True

    async def _work(self) -> None:
        name = self.upstream.destination.name
        while True:
            job = await self._queue.get()
            try:
                for body, count in batch_bodies(job.events):
                    try:
                        await self.upstream.send(body, job.write_key, job.forwarded_for)
                    except UpstreamError as exc:
                        reason = "rejected" if isinstance(exc, UpstreamRejected) and not exc.retryable else "upstream_error"
                        self.metrics.child(self.metrics.mirror_dropped, name, reason).inc(count)
                        log.warning("mirror_send_failed", destination=name, events=count, error=exc.detail)
            finally:
                self.queued_events -= len(job.events)
                self._depth.set(self.queued_events)
                self._queue.task_done()

    async def drain(self, timeout: float) -> bool:
        """Wait for queued mirror events to be sent; True if everything went within `timeout`."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout)
        return self._queue.empty() and self.queued_events == 0

    async def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
