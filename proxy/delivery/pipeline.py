"""One sender per destination: spool → upstream `/v1/batch`, with retries, breaker and dead letters.

Records (one client request's events each) are read from the spool in order and coalesced
across client requests into upstream batches (one per credential, within the size and count
limits), by joining their bytes. A batch is retried on 5xx, 429,
timeouts and connection errors with exponential backoff and full jitter, never sooner than a
`Retry-After`, and the breaker stops the retries from hammering an upstream that is down. A
permanent rejection (400/413) is split in halves until the bad events are found; those, and
whole batches refused for their credential (401/403), go to the dead-letter file.

A 3xx is a failure too: redirects are never followed (a followed 302 turns the POST into a
body-less GET whose 200 would count events as delivered that nobody received). It is retried
like a 5xx, breaker included, because a redirect can be passing (a maintenance page, a balancer
being reconfigured) and the spool holds the events safely meanwhile; but a wrong URL never heals
by itself, so after `redirect_attempts` 3xx answers the batch goes, whole, to the dead-letter file
with reason `redirected`, ready to be replayed once the URL is fixed. The first 3xx a destination
URL gives is logged at error level with where it points, so the operator learns which URL is
wrong from the first failed batch rather than from a dead-letter file. Acks reach the
spool in read order even when batches finish out of order, so its on-disk notes never claim a
record was delivered while an earlier one was not.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections import deque
from dataclasses import dataclass, field

from proxy.delivery.accounting import Accounting
from proxy.delivery.batches import Batch, upstream_batches
from proxy.delivery.breaker import STATE_VALUES, Breaker
from proxy.delivery.deadletter import DeadLetters
from proxy.delivery.errors import UpstreamError, UpstreamRejected
from proxy.delivery.options import DeliveryOptions
from proxy.delivery.spool import Record, Spool
from proxy.delivery.upstream import Upstream, UpstreamRedirected
from proxy.log import get_logger
from proxy.metrics import Metrics

log = get_logger("splitter.delivery")
CREDENTIAL_STATUSES = (401, 403)


@dataclass
class _InFlight:
    records: list[Record]
    done: bool = False


@dataclass
class Pipeline:
    upstream: Upstream
    spool: Spool
    dead_letters: DeadLetters
    metrics: Metrics
    options: DeliveryOptions
    accounting: Accounting | None = None  # the delivery ledger's, when there is one
    breaker: Breaker = field(init=False)
    _in_flight: deque[_InFlight] = field(default_factory=deque, init=False)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, init=False)
    _runner: asyncio.Task[None] | None = field(default=None, init=False)
    _redirect_reported: Upstream | None = field(default=None, init=False)  # the client whose first 3xx was logged
    _room: asyncio.Event = field(default_factory=asyncio.Event, init=False)  # set when a batch slot may have freed
    _inline: bool = field(default=False, init=False)  # the runner is delivering a batch itself (see `_run`)
    _stopping: bool = field(default=False, init=False)  # `stop()` waits for that batch: the runner ends after it
    _read_back_counted: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.breaker = Breaker(failures=self.options.breaker_failures, cooldown=self.options.breaker_cooldown, max_cooldown=self.options.retry_max)
        name = self.name
        m = self.metrics
        self._delivered = m.child(m.events_delivered, name)
        self._dead = m.child(m.events_dead_lettered, name)
        self._retries = m.child(m.upstream_retries, name)
        m.child(m.spool_bytes, name).set_function(lambda: self.spool.disk_bytes)
        m.child(m.spool_records, name).set_function(lambda: self.spool.pending)
        m.child(m.spool_oldest_age, name).set_function(self.spool.oldest_age)
        m.child(m.delivery_queue_depth, name).set_function(lambda: sum(r.count for e in self._in_flight for r in e.records))
        m.child(m.breaker_state, name).set_function(lambda: STATE_VALUES[self.breaker.state])
        self._read_back = m.child(m.spool_read_back_bytes, name)

    @property
    def name(self) -> str:
        return self.upstream.destination.name

    @property
    def lagging(self) -> bool:
        """Behind the records its spool keeps in memory while its upstream answers: intake should take
        turns with it (proxy/delivery/pacing.py). An upstream that is down does not count."""
        return self.spool.lagging and self.breaker.state == "closed"

    def start(self) -> None:
        self._runner = asyncio.ensure_future(self._run())
        self._runner.add_done_callback(self._runner_ended)

    def _runner_ended(self, runner: asyncio.Task[None]) -> None:
        """A sender that stops other than by `stop()` must not stop silently: its spool would only grow."""
        if not runner.cancelled() and runner.exception() is not None:
            log.error("sender_stopped", destination=self.name, error=repr(runner.exception()),
                      hint="nothing more is sent to this destination until a restart; its spool keeps what comes")

    def reconfigure(self, options: DeliveryOptions, upstream: Upstream | None = None) -> None:
        """A reload changed this destination: every setting takes effect for the next batch, the
        breaker's thresholds and the concurrency included (`upstream`: a new client for a new URL or
        timeout; the caller closes the old one). Batches already in flight finish as they started."""
        if upstream is not None:
            self.upstream = upstream
        self.options = options
        self.spool.quota_bytes = options.spool_quota_bytes
        self.breaker.configure(failures=options.breaker_failures, cooldown=options.breaker_cooldown, max_cooldown=options.retry_max)
        self._room.set()  # a larger max_in_flight may let the reader go on now

    async def _run(self) -> None:
        """Read, deliver or spawn, repeat; cancelled by `stop()`. Cancelling is safe at any await
        here: the spool hands records out only when `read()` returns, with no await in between. The
        number of batches in flight is checked against the options of the moment, so a reload changes it.

        With one batch at a time (`max_in_flight: 1`, the default) the runner delivers it itself:
        a task of its own would cost its start, its done callback and the runner's wake-up, each a
        pass of the event loop, which under load is what a round trip waits for most (ablation:
        the senders fell behind half as far, and the CPU per event delivered fell by about 3 %)."""
        while True:
            while len(self._tasks) >= self.options.max_in_flight:
                self._room.clear()
                await self._room.wait()
            records = await self.spool.read(self.options.batch_max_events, self.options.batch_max_bytes, self.options.flush_interval)
            entry = _InFlight(records)
            self._in_flight.append(entry)
            self._count_read_back()
            if self.options.max_in_flight == 1 and not self._tasks:
                self._inline = True
                try:
                    await self._deliver_until_done(entry)
                finally:
                    self._inline = False
                try:
                    self._settle(entry)
                except Exception:  # as a task's done callback would have it: logged, and the sender goes on
                    log.exception("delivery_ack_failed", destination=self.name)
                if self._stopping:
                    return
                continue
            task = asyncio.ensure_future(self._deliver_until_done(entry))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._finished, entry=entry))

    def _count_read_back(self) -> None:
        read_back = self.spool.read_back
        if read_back != self._read_back_counted:
            self._read_back.inc(read_back - self._read_back_counted)
            self._read_back_counted = read_back

    def _finished(self, task: asyncio.Task[None], entry: _InFlight) -> None:
        self._tasks.discard(task)
        self._room.set()
        if task.cancelled() or task.exception() is not None:
            if not task.cancelled():
                log.error("delivery_task_failed", destination=self.name, error=repr(task.exception()))
            return  # not acked: the records stay in the spool and are sent again after a restart
        self._settle(entry)

    def _settle(self, entry: _InFlight) -> None:
        """`entry` is delivered (or dead-lettered): ack it and every delivered batch after it, in read order."""
        entry.done = True
        while self._in_flight and self._in_flight[0].done:
            self.spool.ack(self._in_flight.popleft().records)

    async def _deliver_until_done(self, entry: _InFlight) -> None:
        """Deliver a batch, surviving the unexpected (a dead-letter write on a full disk, a bug):
        an abandoned batch would never be acked and, acks being in order, would hold back every
        later one. Retrying may resend part of the batch; messageIds make that harmless."""
        attempt = 0
        while True:
            try:
                await self._deliver(entry)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("delivery_failed_unexpectedly", destination=self.name, events=sum(r.count for r in entry.records), attempt=attempt)
                await asyncio.sleep(self._backoff(attempt, None))
                attempt += 1

    async def _deliver(self, entry: _InFlight) -> None:
        groups: dict[str, list[Record]] = {}
        for record in entry.records:
            groups.setdefault(record.credential, []).append(record)
        for records in groups.values():
            for batch in upstream_batches(records, self.options.batch_max_events, self.options.batch_max_bytes):
                await self._deliver_batch(batch)

    async def _deliver_batch(self, batch: Batch) -> None:
        rejection = await self._send_with_retry(batch)
        if rejection is None:
            self._delivered.inc(batch.count)
            if self.accounting is not None:
                self.accounting.settled(self.name, batch, None)
            return
        reason = _dead_letter_reason(rejection, batch.count)
        if reason is not None:
            body = rejection.detail.encode() if isinstance(rejection, UpstreamRedirected) else rejection.body
            await self.dead_letters.add(batch.events(), rejection.status, body, reason)
            self._dead.inc(batch.count)
            if self.accounting is not None:
                self.accounting.settled(self.name, batch, reason)
            log.error("events_dead_lettered", destination=self.name, events=batch.count, status=rejection.status, reason=reason,
                      error=rejection.detail)
            return
        for half in batch.halves():
            await self._deliver_batch(half)

    async def _send_with_retry(self, batch: Batch) -> UpstreamRejected | None:
        """None once the upstream accepted the batch; the rejection if it refused it for good.
        A batch of events from different clients has no X-Forwarded-For: context.ip carries each one's address."""
        body = batch.body()
        attempt = redirects = 0
        while True:
            wait = self.breaker.wait_time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            try:
                await self.upstream.send(body, batch.credential, batch.forwarded_for)
            except UpstreamRedirected as exc:
                self.breaker.failure()  # as configured, the destination takes no events: an outage to the sender
                self._report_redirect(exc)
                redirects += 1
                if redirects >= self.options.redirect_attempts:
                    return exc
                delay = self._backoff(attempt, None)
            except UpstreamRejected as exc:
                if not exc.retryable:
                    self.breaker.success()  # the upstream is up; it just refuses this
                    return exc
                delay = self._backoff(attempt, exc.retry_after)
                if exc.status != 429:  # throttling is the upstream working as designed, not an outage
                    self.breaker.failure()
            except UpstreamError as exc:
                delay = self._backoff(attempt, None)
                self.breaker.failure()
                if attempt == 0 or self.breaker.state == "open":
                    log.warning("upstream_unavailable", destination=self.name, error=exc.detail, attempt=attempt, breaker=self.breaker.state)
            else:
                self.breaker.success()
                return None
            self._retries.inc()
            attempt += 1
            await asyncio.sleep(delay)

    def _report_redirect(self, exc: UpstreamRedirected) -> None:
        """Once per destination URL (a reload to a new URL is reported afresh): which URL redirects, and where to."""
        if self._redirect_reported is self.upstream:
            return
        self._redirect_reported = self.upstream
        log.error("upstream_redirected", destination=self.name, url=self.upstream.public_url, status=exc.status, location=exc.location,
                  hint=f"splitter never follows redirects for events; set destinations.{self.name}.url to the address events should go to")

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        ceiling = min(self.options.retry_max, self.options.retry_base * (2 ** min(attempt, 30)))
        delay = random.uniform(0, ceiling)  # full jitter: replicas recovering together don't stampede
        return max(delay, retry_after or 0.0)

    async def stop(self, timeout: float) -> bool:
        """Stop reading; give batches in flight `timeout` to finish. True if nothing was left undone."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        if self._runner is not None:
            if self._inline:  # the runner's own batch is in flight: it ends after that one, or at the timeout
                self._stopping = True
                await asyncio.wait({self._runner}, timeout=max(0.0, deadline - loop.time()))
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - loop.time()))
        leftover = set(self._tasks)
        for task in leftover:
            task.cancel()
        if leftover:
            await asyncio.gather(*leftover, return_exceptions=True)
        await self.spool.close()
        return not leftover and self.spool.pending == 0

    async def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` for the spool to empty (everything delivered or dead-lettered)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.spool.pending > 0 and loop.time() < deadline:
            await asyncio.sleep(0.02)
        return self.spool.pending == 0


def _dead_letter_reason(rejection: UpstreamRejected, count: int) -> str | None:
    """Why a refused batch goes to the dead-letter file as it is, or None to bisect it further:
    a redirect or a refused credential is about the request, not its events, so halves would fare
    no better; a permanent rejection is about some event, found by bisecting down to one."""
    if isinstance(rejection, UpstreamRedirected):
        return "redirected"
    if rejection.status in CREDENTIAL_STATUSES:
        return "credential_refused"
    return "rejected" if count == 1 else None
