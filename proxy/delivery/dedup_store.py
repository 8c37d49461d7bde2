"""The shared de-duplication store (`dedup: {store: redis://...}`): messageIds claimed in Redis, so
the processes and replicas of a tier share one window per destination.

`Deduplicator` asks it once per request, after its own in-memory filter: one pipeline of
`SET key token NX PX window`, one per (destination, messageId) the request would deliver, in one
round trip. A key that was absent is now this request's claim; one that was there belongs to an
event another process (or this one, earlier) already took, and the event is dropped. An id a
destination did not get after all (the request was refused, a mirror copy was dropped) is released:
its keys are deleted if they still hold this request's token (a Lua compare-and-delete), so the
client's retry goes through.

Keys: `splitter:dedup:<destination>:<messageId>`. The destination is its name when that is made of
letters, digits, `_`, `.` and `-` (at most 64), else `#` and a digest of it; the messageId is kept as
the in-memory store keeps it (a digest when longer than 64 characters). So a key is at most ~145
bytes whatever the client sends, and nothing else in Redis is read or written.

The store is never allowed to fail or hold up a request:
- every call is bounded by `dedup.store_timeout` (50 ms) in all: connecting, waiting for one of the
  pool's connections, the round trip;
- when it does not answer in time or answers an error, the request falls back to the in-memory
  filter alone (a duplicate that went to another process may then be delivered twice: the lesser
  harm, as warehouses de-duplicate on messageId; an event is never dropped for want of the store).
  Each such request is counted in `splitter_dedup_store_errors_total{reason}` and logged at most
  once a second;
- after a failure the store is not asked for a backoff (0.1 s doubling to 2 s, with jitter) and
  requests fall back at once (reason `unavailable`); then one request probes it, on a fresh
  connection, and the first answer ends the outage. No reconnect storm, and no wait for redis-py's
  own retries, which are turned off.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.engine import DedupSettings
from proxy.log import LogThrottle, get_logger
from proxy.metrics import Metrics

log = get_logger("splitter.dedup")
KEY_PREFIX = "splitter:dedup:"
POOL_SIZE = 16  # connections per process; a request waits for a free one within its timeout
BACKOFF_MIN = 0.1  # seconds the store is not asked after it failed; doubles while probes fail
BACKOFF_MAX = 2.0
MAX_UNRELEASED = 10_000  # keys whose release failed, released when the store answers again; beyond: forgotten (and logged)
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# Delete each key that still holds this request's token: a key that expired and was claimed again
# by another request in the meantime is not ours to delete.
RELEASE_SCRIPT = """
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    n = n + redis.call('DEL', key)
  end
end
return n
"""


def destination_prefix(destination: str) -> str:
    """`splitter:dedup:<destination>:`, with a digest for a name that could hold a `:` or run long."""
    if _PLAIN_NAME.fullmatch(destination):
        return f"{KEY_PREFIX}{destination}:"
    return f"{KEY_PREFIX}#{hashlib.blake2b(destination.encode('utf-8', 'surrogatepass'), digest_size=8).hexdigest()}:"


@dataclass(slots=True)
class StoreClaim:
    """One request's keys in the store and what it answered."""

    token: str
    keys: list[str]
    taken: list[bool] | None = None  # per key: another process had it. None: no answer, the request falls back to memory
    sent: bool = False  # the SETs may have reached the store (answered, or timed out after sending): release applies


class RedisStore:
    """One Redis server's windows, for every destination; one per process and `dedup.store` URL."""

    def __init__(self, settings: DedupSettings, metrics: Metrics, *, clock: Callable[[], float] = time.monotonic) -> None:
        assert settings.store is not None
        self.url = settings.store
        self.shown = settings.shown_store
        self.timeout = settings.store_timeout
        self._metrics = metrics
        self._clock = clock
        self._pool = aioredis.BlockingConnectionPool.from_url(
            self.url, max_connections=POOL_SIZE, timeout=None,  # the wait for a connection counts towards our own timeout
            socket_connect_timeout=self.timeout, socket_timeout=max(self.timeout, 0.01),
            retry=Retry(NoBackoff(), 0),  # no hidden retries: a failure falls back at once, and the backoff below paces reconnects
            health_check_interval=0, client_name="splitter",
        )
        self._client = aioredis.Redis(connection_pool=self._pool)
        self._release = self._client.register_script(RELEASE_SCRIPT)
        self._process = os.urandom(4).hex()
        self._requests = itertools.count()
        self._down_since: float | None = None  # set while the store is failing
        self._retry_at = 0.0
        self._backoff = BACKOFF_MIN
        self._probing = False
        self._unreleased: list[tuple[list[str], str]] = []  # (keys, token) still to release
        self._log = LogThrottle()
        self._prefixes: dict[str, str] = {}

    def key(self, destination: str, kept_id: str) -> str:
        prefix = self._prefixes.get(destination)
        if prefix is None:
            prefix = self._prefixes[destination] = destination_prefix(destination)
        return prefix + kept_id

    # -- the request path -------------------------------------------------------------------------------
    async def claim(self, keys: list[str], window: float) -> StoreClaim:
        """Set every key that is absent, in one round trip; `taken` says which were there already."""
        claim = StoreClaim(f"{self._process}:{next(self._requests)}", keys)
        ask, probing = self._permit()
        if not ask:
            return claim
        try:
            async with asyncio.timeout(self.timeout):
                if self._unreleased:
                    await self._release_pending()
                pipe = self._client.pipeline(transaction=False)
                milliseconds = max(1, round(window * 1000))
                for key in keys:
                    pipe.set(key, claim.token, nx=True, px=milliseconds)
                claim.sent = True
                answers = await pipe.execute()
        except Exception as exc:  # whatever goes wrong, the request goes on without the store
            await self._failed(exc, probing, "claim")
            return claim
        claim.taken = [answer is None for answer in answers]
        self._answered(probing)
        return claim

    async def release(self, claim: StoreClaim, keys: Sequence[str]) -> None:
        """Delete `keys` (of `claim`) that still hold its token: their events were not delivered."""
        if not keys or not claim.sent:
            return
        ask, probing = self._permit()
        if ask:
            try:
                async with asyncio.timeout(self.timeout):
                    await self._release(keys=keys, args=[claim.token])
            except Exception as exc:
                await self._failed(exc, probing, "release")
            else:
                self._answered(probing)
                return
        self._keep_unreleased(list(keys), claim.token)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.aclose()
            await self._pool.aclose()

    # -- outages ----------------------------------------------------------------------------------------------
    def _permit(self) -> tuple[bool, bool]:
        """(ask the store, as the probe). Not while backing off after a failure, nor while another
        request probes: such a request is counted and falls back without asking."""
        if self._down_since is None:
            return True, False
        if self._probing or self._clock() < self._retry_at:
            self._metrics.child(self._metrics.dedup_store_errors, "unavailable").inc()
            return False, False
        self._probing = True  # this request asks; the others fall back until it has an answer
        return True, True

    def _answered(self, probing: bool) -> None:
        if probing:
            self._probing = False
        if self._down_since is None:  # (a request from before the outage may have answered first)
            return
        log.warning("dedup_store_recovered", store=self.shown, down_seconds=round(self._clock() - self._down_since, 3))
        self._down_since = None
        self._backoff = BACKOFF_MIN

    async def _failed(self, exc: Exception, probing: bool, operation: str) -> None:
        reason = _reason(exc)
        self._metrics.child(self._metrics.dedup_store_errors, reason).inc()
        now = self._clock()
        if self._down_since is None:
            self._down_since = now
            self._backoff = BACKOFF_MIN
        elif probing:
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        if probing or self._retry_at <= now:
            self._retry_at = now + self._backoff * random.uniform(0.8, 1.2)
        if probing:
            self._probing = False
        held_back = self._log.allow()
        if held_back is not None:
            log.warning("dedup_store_unavailable", store=self.shown, operation=operation, reason=reason, error=self._scrubbed(exc),
                        retry_in=round(self._retry_at - now, 3), held_back=held_back,
                        hint="de-duplicating in this process only until the store answers; duplicates across processes may be delivered")
        with contextlib.suppress(Exception):  # the next probe connects afresh: idle connections may be dead (a restarted server)
            await self._pool.disconnect(inuse_connections=False)

    def _scrubbed(self, exc: Exception) -> str:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        password = self._pool.connection_kwargs.get("password")
        return text.replace(password, "****") if isinstance(password, str) and password else text

    def _keep_unreleased(self, keys: list[str], token: str) -> None:
        room = MAX_UNRELEASED - sum(len(k) for k, _ in self._unreleased)
        if room < len(keys):
            log.error("dedup_store_release_forgotten", store=self.shown, keys=len(keys) - max(room, 0),
                      hint="these messageIds stay claimed in the store until their window ends; a retry of their events within it is dropped there")
            keys = keys[:max(room, 0)]
        if keys:
            self._unreleased.append((keys, token))

    async def _release_pending(self) -> None:
        pending, self._unreleased = self._unreleased, []
        try:
            for keys, token in pending:
                await self._release(keys=keys, args=[token])
        except BaseException:
            self._unreleased[:0] = pending
            raise


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (TimeoutError, RedisTimeoutError)):
        return "timeout"
    if isinstance(exc, (RedisConnectionError, OSError)):
        return "connection"
    return "error"
