"""The shared de-duplication store (`dedup: {store: redis://...}`): messageIds claimed in Redis, so
the processes and replicas of a tier share one window per destination.

`Deduplicator` asks it once per request, after its own in-memory filter: `SET key token NX PX
window` for each (destination, messageId) the request would deliver, all run by one small Lua
script (`EVALSHA`, loaded once): one command and one round trip per request, whatever its size,
and far less client CPU than a pipeline of SETs (redis-py spends ~20 µs packing and parsing each
command; measured in loadtest/bench_dedup.py). A key that was absent is now this request's claim;
one that was there belongs to an event another process (or this one, earlier) already took, and
the event is dropped. An id a
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
  requests fall back at once (reason `unavailable`); then one request probes it, and the first
  answer ends the outage. A connection error also replaces the connection pool (the old one is
  closed once its requests are over), so the probe connects afresh rather than trying the dead
  connections a restarted server left one by one. No reconnect storm, and no wait for redis-py's
  own retries, which are off: a retried `SET NX` whose first try did land would report the
  request's own key as another's, and drop its event;
- a timeout while the store answered other requests (the wait was this process's own: a busy
  event loop) falls back for that request alone and does not stop the others from asking;
- a command the request stopped waiting for is not cancelled but left to finish (for up to 1 s):
  cancelling it would close its connection (redis-py cannot tell where in the reply it stopped),
  and under load the reconnections cost more than the late answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from proxy.engine import DedupSettings
from proxy.log import LogThrottle, get_logger
from proxy.metrics import Metrics
from proxy.redis_clients import close_client, failure_reason
from proxy.settings import KEY_SAFE

log = get_logger("splitter.dedup")
KEY_PREFIX = "splitter:dedup:"
POOL_SIZE = 32  # connections per process; a request waits for a free one within its timeout
LATE_LIMIT = 1.0  # seconds a command may run on once its request stopped waiting, before it is cancelled
RETIRE_AFTER = LATE_LIMIT + 0.5  # seconds past the timeout before a replaced pool is closed: its commands are over by then
BACKOFF_MIN = 0.1  # seconds the store is not asked after it failed; doubles while probes fail
BACKOFF_MAX = 2.0
MAX_UNRELEASED = 10_000  # keys whose release failed, released when the store answers again; beyond: forgotten (and logged)
T = TypeVar("T")
# SET NX PX for each key; per key 1 where this request now holds it, 0 where it was there already.
# KEYS: the request's keys; ARGV[1]: its token; ARGV[2]: the window in milliseconds.
CLAIM_SCRIPT = """
local claimed = {}
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then claimed[i] = 1 else claimed[i] = 0 end
end
return claimed
"""
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
    if KEY_SAFE.fullmatch(destination):
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
        self._client, self._claim, self._release = self._connect()
        self._password = self._client.connection_pool.connection_kwargs.get("password")
        self._retiring: dict[asyncio.Task[None], aioredis.Redis] = {}  # replaced clients, closed after a delay
        self._last_answer = float("-inf")  # when the store last answered a request
        self._late: set[asyncio.Task[Any]] = set()  # commands whose requests stopped waiting
        self._process = os.urandom(4).hex()
        self._requests = itertools.count()
        self._down_since: float | None = None  # set while the store is failing
        self._retry_at = 0.0
        self._backoff = BACKOFF_MIN
        self._probing = False
        self._unreleased: list[tuple[list[str], str]] = []  # (keys, token) still to release
        self._log = LogThrottle()
        self._prefixes: dict[str, str] = {}

    def _connect(self) -> tuple[aioredis.Redis, AsyncScript, AsyncScript]:
        """A client on a pool of its own (no I/O until a request asks)."""
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url, max_connections=POOL_SIZE, timeout=LATE_LIMIT,  # the wait for a connection counts towards our own timeout
            socket_connect_timeout=self.timeout, socket_timeout=max(self.timeout, LATE_LIMIT),  # our own timeouts come first
            retry=Retry(NoBackoff(), 0),  # no hidden retries: see the module's docstring
            health_check_interval=0,
        )
        client = aioredis.Redis(connection_pool=pool)
        return client, client.register_script(CLAIM_SCRIPT), client.register_script(RELEASE_SCRIPT)

    def key(self, destination: str, kept_id: str) -> str:
        prefix = self._prefixes.get(destination)
        if prefix is None:
            prefix = self._prefixes[destination] = destination_prefix(destination)
        return prefix + kept_id

    # -- the request path -------------------------------------------------------------------------------
    async def claim(self, keys: list[str], window: float) -> StoreClaim:
        """Set every key that is absent, in one command; `taken` says which were there already."""
        claim = StoreClaim(f"{self._process}:{next(self._requests)}", keys)
        ask, probing = self._permit()
        if not ask:
            return claim
        started = self._clock()
        try:
            claim.sent = True
            answers = await self._ask(self._set(self._claim, self._release, keys, claim.token, max(1, round(window * 1000))))
        except Exception as exc:  # whatever goes wrong, the request goes on without the store
            self._failed(exc, probing, "claim", started)
            return claim
        claim.taken = [answer == 0 for answer in answers]
        self._answered(probing)
        return claim

    async def release(self, claim: StoreClaim, keys: Sequence[str]) -> None:
        """Delete `keys` (of `claim`) that still hold its token: their events were not delivered."""
        if not keys or not claim.sent:
            return
        ask, probing = self._permit()
        if ask:
            started = self._clock()
            try:
                await self._ask(self._delete(self._release, list(keys), claim.token))
            except Exception as exc:
                self._failed(exc, probing, "release", started)
            else:
                self._answered(probing)
                return
        self._keep_unreleased(list(keys), claim.token)

    async def warm(self) -> None:
        """Connect and load the scripts before the first request needs them: a cold start then costs
        requests no NOSCRIPT round trip. Silent: when the store is away, requests find out (and say so)."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(max(LATE_LIMIT, self.timeout)):
                await self._client.script_load(CLAIM_SCRIPT)
                await self._client.script_load(RELEASE_SCRIPT)

    async def close(self) -> None:
        for late in list(self._late):
            late.cancel()
        for task, old in list(self._retiring.items()):
            task.cancel()
            await close_client(old)
        await close_client(self._client)

    # -- the commands --------------------------------------------------------------------------------------------
    async def _ask(self, command: Coroutine[Any, Any, T]) -> T:
        """`command`'s answer within the timeout; past it the request goes on and the command runs on (up to LATE_LIMIT)."""
        task = asyncio.ensure_future(command)
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.timeout)
        finally:
            if not task.done():
                self._late.add(task)
                task.add_done_callback(self._late_done)

    def _late_done(self, task: asyncio.Task[Any]) -> None:
        self._late.discard(task)
        if not task.cancelled() and task.exception() is None:
            self._last_answer = self._clock()  # the store is there, only slower than this process waited

    async def _set(self, claim: AsyncScript, release: AsyncScript, keys: list[str], token: str, milliseconds: int) -> Any:
        async with asyncio.timeout(max(LATE_LIMIT, self.timeout)):
            if self._unreleased:
                await self._release_pending(release)
            return await claim(keys=keys, args=[token, milliseconds])

    async def _delete(self, release: AsyncScript, keys: list[str], token: str) -> Any:
        async with asyncio.timeout(max(LATE_LIMIT, self.timeout)):
            return await release(keys=keys, args=[token])

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
        self._last_answer = now = self._clock()
        if probing:
            self._probing = False
        if self._down_since is None:  # (a request from before the outage may have answered first)
            return
        if self._log.allow("recovered") is not None:
            log.warning("dedup_store_recovered", store=self.shown, down_seconds=round(now - self._down_since, 3))
        self._down_since = None
        self._backoff = BACKOFF_MIN

    def _failed(self, exc: Exception, probing: bool, operation: str, started: float) -> None:
        reason = failure_reason(exc)
        self._metrics.child(self._metrics.dedup_store_errors, reason).inc()
        now = self._clock()
        if reason == "timeout" and not probing and self._down_since is None and self._last_answer >= started:
            if self._log.allow("busy") is not None:  # the store answered others meanwhile: the wait was this process's
                log.warning("dedup_store_unavailable", store=self.shown, operation=operation, reason=reason, error=self._scrubbed(exc),
                            hint="the store answered other requests meanwhile: this process is busy (CPU); raise dedup.store_timeout "
                                 "if this goes on; this request was de-duplicated in this process only")
            return
        if reason == "connection":
            self._renew()
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

    def _renew(self) -> None:
        """A fresh pool for the requests to come; the old one is closed once its requests are over."""
        old = self._client
        self._client, self._claim, self._release = self._connect()
        task = asyncio.get_running_loop().create_task(close_client(old, delay=self.timeout + RETIRE_AFTER))
        self._retiring[task] = old
        task.add_done_callback(self._retired)

    def _retired(self, task: asyncio.Task[None]) -> None:
        self._retiring.pop(task, None)

    def _scrubbed(self, exc: Exception) -> str:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        password = self._password
        return text.replace(password, "****") if isinstance(password, str) and password else text

    def _keep_unreleased(self, keys: list[str], token: str) -> None:
        room = MAX_UNRELEASED - sum(len(k) for k, _ in self._unreleased)
        if room < len(keys):
            log.error("dedup_store_release_forgotten", store=self.shown, keys=len(keys) - max(room, 0),
                      hint="these messageIds stay claimed in the store until their window ends; a retry of their events within it is dropped there")
            keys = keys[:max(room, 0)]
        if keys:
            self._unreleased.append((keys, token))

    async def _release_pending(self, release: AsyncScript) -> None:
        pending, self._unreleased = self._unreleased, []
        try:
            for keys, token in pending:
                await release(keys=keys, args=[token])
        except BaseException:
            self._unreleased[:0] = pending
            raise
