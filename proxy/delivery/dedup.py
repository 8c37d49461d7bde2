"""messageId de-duplication per destination, so an event that arrives twice is sent at most once.

A filter in front of the spool write (`Delivery.accept` goes through it while the rules turn
de-duplication on, and `Delivery.apply` hands it their settings): whatever door an event came in
by, webhook or direct, it meets the same windows. The messageIds come with the `Submission`
(`prepare()` stamped one on every event), so nothing is parsed again here.

The same event can reach splitter directly from an app and again through Segment's Webhooks
destination. Each destination remembers the messageIds it was given for a time window, in an
`OrderedDict` messageId -> expiry: a look-up is O(1), expired ids are dropped from the front (the
oldest) and the oldest are dropped when a destination holds more than `max_ids`. `OrderedDict`
rather than `dict` because removing from the front of a plain dict leaves holes that every later
`next(iter(d))` walks over again.

Correctness under failure and concurrency:
- An id is remembered only once the request carrying it was accepted (the spool write returned
  ok). A request that fails (503, spool full) leaves no trace, so the client's retry goes through.
- While a request's events are being accepted, their ids are *claimed*. A concurrent request with
  the same id for the same destination waits for that outcome: when the first is accepted, the
  second drops the event; when it fails, the second delivers it. Never twice, never lost.
- The state is per process and in memory: with several processes or replicas, only duplicates
  that reach the same process are caught, and a restart forgets the window. Unless the rules name a
  shared store (`dedup: {store: redis://...}`, proxy/delivery/dedup_store.py): then what passes the
  memory here is also claimed there, in one round trip per request, and an id another process
  claimed is dropped too. Memory keeps what this process delivered either way, so when the store
  does not answer (within `store_timeout`) the request is filtered by memory alone and goes on: a
  duplicate across processes may then get through, an event is never held or dropped for the store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.delivery.dedup_store import RedisStore, StoreClaim
from proxy.delivery.submission import Chunk, Outcome, Submission
from proxy.engine import DedupSettings
from proxy.log import LogThrottle, get_logger
from proxy.metrics import Metrics

log = get_logger("splitter.dedup")
Key = tuple[str, str]  # (destination, messageId)
_NOTHING: Mapping[str, float] = {}
MAX_KEPT_ID_CHARS = 64  # a UUID is 36; a longer messageId is remembered by a digest, so an id costs ~200 bytes whatever its length


@dataclass
class Claim:
    """One request's events minus the duplicates, and the (destination, messageId) pairs it holds."""

    primary: dict[str, Chunk] = field(default_factory=dict)
    mirror: dict[str, Chunk] = field(default_factory=dict)
    held: dict[Key, asyncio.Future[bool]] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)  # destination -> events dropped as duplicates
    taken: set[Key] = field(default_factory=set)  # held, but the shared store says another request has them


class Deduplicator:
    """The windows of every destination, shared by all requests of this process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.settings: DedupSettings | None = None  # set by apply() from the rules; None: off, every event passes
        self.store: RedisStore | None = None  # the shared store the settings name, if any
        self.windows: dict[str, OrderedDict[str, float]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._held: dict[Key, asyncio.Future[bool]] = {}
        self._log = LogThrottle()  # a steady stream of duplicates is expected

    def apply(self, settings: DedupSettings | None, metrics: Metrics) -> None:
        """The rules' settings; a store client for their `store` (a new one when its URL or timeout
        changed: the old one closes in the background, its requests in flight fall back)."""
        store = self.store
        if store is not None and (settings is None or (settings.store, settings.store_timeout) != (store.url, store.timeout)):
            self.store = None
            self._spawn_close(store)
        if settings is not None and settings.store is not None and self.store is None:
            self.store = RedisStore(settings, metrics)
            log.info("dedup_store", store=settings.shown_store, timeout=settings.store_timeout)
            self._spawn(self.store.warm())
        self.settings = settings

    async def close(self) -> None:
        if self.store is not None:
            self._spawn_close(self.store)
            self.store = None
        if self._closing:
            await asyncio.wait(self._closing)

    def _spawn_close(self, store: RedisStore) -> None:
        self._spawn(store.close())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            task = asyncio.get_running_loop().create_task(work)
        except RuntimeError:  # applied outside a running loop: nothing was connected yet
            work.close()
            return
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def seen(self, destination: str, message_id: str) -> bool:
        expiry = self.windows.get(destination, _NOTHING).get(_kept(message_id))
        return expiry is not None and expiry > self.clock()

    def remember(self, settings: DedupSettings, destination: str, message_ids: list[str]) -> int:
        """Record ids a destination was given; returns how many it now tracks."""
        window = self.windows.setdefault(destination, OrderedDict())
        now = self.clock()
        while window:
            oldest, expiry = next(iter(window.items()))
            if expiry > now:
                break
            del window[oldest]
        expiry = now + settings.window
        for message_id in map(_kept, message_ids):
            window.pop(message_id, None)  # an expired leftover moves to the back
            window[message_id] = expiry
        while len(window) > settings.max_ids:
            window.popitem(last=False)
        return len(window)

    async def accept(self, submission: Submission, write: Callable[[Submission], Awaitable[Outcome]], metrics: Metrics) -> Outcome:
        """`write` the events no destination has yet; remember their ids if that was accepted."""
        settings, store = self.settings, self.store  # read once: a reload while this request waits does not change its window
        if settings is None:
            return await write(submission)
        claim = await self._claim(submission.primary, submission.mirror)  # ids as sent: seen() and remember() store them as kept
        shared: StoreClaim | None = None
        ok, dropped = False, frozenset[str]()
        try:
            if store is not None and claim.held:
                shared = await self._claim_shared(store, settings, claim)
            outcome = await write(dataclasses.replace(submission, primary=claim.primary, mirror=claim.mirror, routed=None))  # routed: before the filter
            ok, dropped = outcome.ok, outcome.dropped_mirrors
        finally:
            undelivered = self._settle(settings, metrics, claim, ok, dropped)
            if store is not None and shared is not None and undelivered:  # claimed there by this request, not delivered after all
                await store.release(shared, [shared.keys[index] for index in undelivered])
        if ok and claim.hits:
            self._report(metrics, claim.hits, submission.source.name)
        return outcome

    async def _claim(self, primary: Mapping[str, Chunk], mirror: Mapping[str, Chunk]) -> Claim:
        """Filter out what each destination has; wait for concurrent requests holding the same ids."""
        while True:
            claim, others = Claim(), set[asyncio.Future[bool]]()
            for role, chunks in ((claim.primary, primary), (claim.mirror, mirror)):
                for destination, chunk in chunks.items():
                    role[destination] = self._fresh(claim, others, destination, chunk)
            if not others:
                for held_key, future in claim.held.items():
                    self._held[held_key] = future
                return claim
            await asyncio.wait(others)  # nothing was held yet: the pass starts over when they settle

    def _fresh(self, claim: Claim, others: set[asyncio.Future[bool]], destination: str, chunk: Chunk) -> Chunk:
        loop = asyncio.get_running_loop()
        kept = Chunk()
        meta = chunk.meta
        for index, data in enumerate(chunk):
            message_id, event_type, name = meta[3 * index:3 * index + 3]
            held_key = (destination, message_id)
            pending = self._held.get(held_key)
            if pending is not None:
                others.add(pending)
            elif held_key in claim.held or self.seen(destination, message_id):
                claim.hits[destination] = claim.hits.get(destination, 0) + 1
            else:
                claim.held[held_key] = loop.create_future()
                kept.add(data, message_id, event_type, name)
        return kept

    async def _claim_shared(self, store: RedisStore, settings: DedupSettings, claim: Claim) -> StoreClaim:
        """Claim what memory let through in the shared store too; drop what another request has there."""
        shared = await store.claim([store.key(destination, _kept(message_id)) for destination, message_id in claim.held], settings.window)
        if shared.taken is not None and any(shared.taken):
            claim.taken = {key for key, taken in zip(claim.held, shared.taken) if taken}
            for destination, _ in claim.taken:
                claim.hits[destination] = claim.hits.get(destination, 0) + 1
            for role in (claim.primary, claim.mirror):
                for destination, chunk in role.items():
                    role[destination] = _without(chunk, destination, claim.taken)
        return shared

    def _settle(self, settings: DedupSettings, metrics: Metrics, claim: Claim, ok: bool, dropped: frozenset[str]) -> list[int]:
        """Release the claim; remember the ids each destination now has (not those of dropped mirror
        copies). Returns the positions in `claim.held` of those it does not have and that no other
        request had in the shared store: this request's claims there, to release."""
        by_destination: dict[str, list[str]] = {}
        undelivered = []
        others = claim.taken  # empty without a store
        for index, (held_key, future) in enumerate(claim.held.items()):
            del self._held[held_key]
            destination, message_id = held_key
            taken = held_key in others
            delivered = ok and destination not in dropped and not taken
            future.set_result(delivered)
            if delivered:
                by_destination.setdefault(destination, []).append(message_id)
            elif not taken:
                undelivered.append(index)
        for destination, message_ids in by_destination.items():  # filled only when the request was accepted
            tracked = self.remember(settings, destination, message_ids)
            metrics.child(metrics.dedup_tracked_ids, destination).set(tracked)
        return undelivered

    def _report(self, metrics: Metrics, hits: dict[str, int], source: str) -> None:
        for destination, count in hits.items():
            metrics.child(metrics.dedup_hits, destination).inc(count)
        if self._log.allow() is not None:
            log.info("duplicates_dropped", source=source, destinations=hits)


def _without(chunk: Chunk, destination: str, taken: set[Key]) -> Chunk:
    kept = Chunk()
    meta = chunk.meta
    for index, data in enumerate(chunk):
        if (destination, meta[3 * index]) not in taken:
            kept.append(data)
            kept.meta += meta[3 * index:3 * index + 3]
    return kept


def _kept(message_id: str) -> str:
    """The id itself, or for a long one (the client's choice, up to 32 KB) a digest that no short id can equal."""
    if len(message_id) <= MAX_KEPT_ID_CHARS:
        return message_id
    return "\0" + hashlib.blake2b(message_id.encode("utf-8", "surrogatepass"), digest_size=20).hexdigest()
