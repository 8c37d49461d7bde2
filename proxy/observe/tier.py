"""The tier view: every serving process's catalog and ledger snapshots shared on the `dedup.store` Redis,
so that any replica's `/admin/catalog`, `/admin/ledger` (and the console, `splitter catalog --from`,
`splitter parity --from`) answer for the whole tier.

Writing. While the rules name a `dedup.store`, each serving process (a single `serve`, each worker
and drainer of `serve --workers N`) publishes the snapshot it writes to its state file (the same
JSON) from the keeper's background task, one key per kind, replica and process:

    splitter:tier:<kind>:<replica>:<process>   the snapshot, in an envelope naming its replica, process and period
    splitter:tier:<kind>                       a sorted set of `<replica>:<process>`, scored by the last publish time

`<kind>` is `catalog` or `ledger`, `<process>` is `main` for a single process, `worker-<i>` for a
worker. Every `period` (the snapshot interval, or a third of the TTL when that is shorter) the process
publishes: the snapshot when it changed, else only a refresh of the key's expiry and of its score
(and the snapshot after all when the key was gone: Redis restarted empty). Keys and the index expire
`ttl` (`--tier-ttl`, 24 h) after the last publish, and each publish trims index members older than
that: a replica that is gone stays in the tier view, marked stale, until its TTL, then drops out.
Readers never SCAN: one ZREVRANGEBYSCORE of the index (at most MAX_MEMBERS members), one MGET.

Reading. `read()` returns the snapshots of every other replica; this replica's own processes are left
out, since its state directory's files (and its live memory) already give them: nothing is counted twice.
The caller merges them with the same functions the files go through (catalog_view, ledger_view).

The store away or slow: every publish and read is bounded by the store's timeout, but not less than
TIMEOUT_FLOOR (a snapshot can be megabytes, and none of this is on a request's path: the keepers'
background tasks and the admin handlers). On a failure the read answers `unavailable` (the caller
answers with this replica alone and says so), the failure is counted in
`splitter_dedup_store_errors_total{reason="tier"}`, logged at most once a second, a connection error
replaces the client, and reads answer `unavailable` at once for READ_BACKOFF seconds rather than
each waiting for the timeout. Publishing is not held back: each keeper's next period tries again, so
the tier view comes back by itself once Redis answers (in full: after a failure the next publish is
the whole snapshot, not a refresh). Every command here is idempotent (SET, PEXPIRE, ZADD, MGET...),
so unlike the de-duplication's claims one failing on a connection the server dropped is sent again
once, on a new connection: the first publish after a Redis restart goes through.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from proxy.engine import DedupSettings
from proxy.log import LogThrottle, get_logger
from proxy.redis_clients import close_client, failure_reason
from proxy.settings import KEY_SAFE, KEY_UNSAFE_CHAR

if TYPE_CHECKING:
    from proxy.metrics import Metrics

log = get_logger("splitter.tier")
KEY_PREFIX = "splitter:tier:"
KINDS = ("catalog", "ledger")
DEFAULT_TTL = 24 * 3600.0  # seconds a snapshot stays after its last publish: the longest window the catalog and ledger keep
TIMEOUT_FLOOR = 2.0  # seconds: the store's own timeout (50 ms) is sized for a request's few keys, not for a tier's snapshots
READ_BACKOFF = 2.0  # seconds reads answer `unavailable` at once after a failure
STALE_PERIODS = 3  # a snapshot not refreshed for this many of its publisher's periods (and STALE_MARGIN) is marked stale
STALE_MARGIN = 1.0  # seconds
MAX_MEMBERS = 1000  # (replica, process) snapshots read per kind, the most recently published first
POOL_SIZE = 4
ERROR_REASON = "tier"  # the `reason` of splitter_dedup_store_errors_total for a failed publish or read


def _key_part(text: str) -> str:
    """`text` when it is letters, digits, `_`, `.` and `-` (at most 64), else those characters kept and a digest added."""
    if KEY_SAFE.fullmatch(text):
        return text
    kept = KEY_UNSAFE_CHAR.sub("-", text)[:48] or "process"
    return f"{kept}-{hashlib.blake2b(text.encode('utf-8', 'surrogatepass'), digest_size=4).hexdigest()}"


def index_key(kind: str) -> str:
    return f"{KEY_PREFIX}{kind}"


def member_of(replica: str, process: str | None) -> str:
    return f"{replica}:{_key_part(process) if process else 'main'}"


def snapshot_key(kind: str, member: str) -> str:
    return f"{KEY_PREFIX}{kind}:{member}"


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


@dataclass(slots=True)
class TierSnapshot:
    """Another replica's process as the store has it: its snapshot (or why it cannot be read) and when it was last published."""

    replica: str
    process: str
    published_at: float
    period: float
    data: dict[str, Any] | None = None
    error: str | None = None

    def described(self, now: float) -> dict[str, Any]:
        """What the answer's `processes` entry gets: whose it is, how old, whether stale."""
        age = max(0.0, now - self.published_at)
        return {"replica": self.replica, "published_at": _iso(self.published_at), "age_seconds": round(age, 1),
                "stale": age > STALE_PERIODS * self.period + STALE_MARGIN}


@dataclass(slots=True)
class TierRead:
    """One read of a kind's tier: `state` ok (with the other replicas' snapshots) or unavailable (with why)."""

    replica: str
    store: str | None
    ttl: float
    state: str = "ok"
    error: str | None = None
    snapshots: list[TierSnapshot] = field(default_factory=list)

    def summary(self, processes: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """The answer's `tier` object, from its merged `processes` (each tagged with its replica)."""
        processes = list(processes)
        found = {"replica": self.replica, "store": self.store, "state": self.state,
                 "replicas": sorted({self.replica, *(str(p.get("replica")) for p in processes if p.get("replica"))}),
                 "stale": sorted(f"{p.get('replica')}:{p.get('process') or p.get('name')}" for p in processes if p.get("stale")),
                 "ttl_seconds": self.ttl}
        if self.state != "ok":
            found["error"] = self.error
            found["hint"] = "the store did not answer: this is this replica's data alone; the tier view comes back by itself when it does"
        return found


class Tier:
    """This process's side of the tier view: publishes its snapshots, reads the other replicas'."""

    def __init__(self, replica: str, dedup: Callable[[], DedupSettings | None], metrics: Metrics, *, ttl: float = DEFAULT_TTL,
                 clock: Callable[[], float] = time.time) -> None:
        """`dedup`: the applied rules' de-duplication settings, asked before each use (a reload may add, change or drop the store)."""
        self.replica = replica
        self.ttl = ttl
        self._dedup = dedup
        self._metrics = metrics
        self._clock = clock
        self._url: str | None = None
        self._shown: str | None = None
        self._timeout = TIMEOUT_FLOOR
        self._client: aioredis.Redis | None = None
        self._password: Any = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._published: set[tuple[str, str]] = set()  # (kind, member) whose snapshot this client put in the store
        self._down_since: float | None = None  # monotonic, while the store is failing
        self._retry_reads_at = 0.0
        self._last_error: str | None = None
        self._log = LogThrottle()

    def settings(self) -> DedupSettings | None:
        """The rules' settings when they name a store, else None (no tier view)."""
        settings = self._dedup()
        return settings if settings is not None and settings.store else None

    @property
    def active(self) -> bool:
        return self.settings() is not None

    @property
    def answering(self) -> bool:
        """False since a publish or read failed, until one succeeds: a stop does not wait for the store then."""
        return self._down_since is None

    def period(self, interval: float) -> float:
        """How often a keeper with this snapshot interval publishes: often enough that its keys never expire while it runs."""
        return min(interval, self.ttl / 3)

    # -- writing -------------------------------------------------------------------------------------------------
    async def publish(self, kind: str, process: str | None, payload: bytes | Callable[[], bytes], period: float) -> bool:
        """Put this process's snapshot of `kind` in the store: `payload`'s bytes when it changed, or, given a
        function (unchanged since the last publish), a refresh of its expiry, the snapshot itself only if the
        store lost it. False when there is no store or it did not answer (counted, logged)."""
        settings = self.settings()
        if settings is None:
            return False
        member = member_of(self.replica, process)
        key, index = snapshot_key(kind, member), index_key(kind)
        milliseconds = max(1, round(self.ttl * 1000))
        client = self._connected(settings)
        try:
            if callable(payload) and (kind, member) in self._published:
                async with asyncio.timeout(self._timeout):
                    pipe = client.pipeline(transaction=False)
                    pipe.pexpire(key, milliseconds)
                    self._index(pipe, index, member, milliseconds)
                    kept, *_ = await pipe.execute()
                if kept:
                    self._answered()
                    return True
            body = self._envelope(member, process, period, payload() if callable(payload) else payload)  # not timed: no I/O
            async with asyncio.timeout(self._timeout):
                pipe = client.pipeline(transaction=True)
                pipe.set(key, body, px=milliseconds)
                self._index(pipe, index, member, milliseconds)
                await pipe.execute()
        except Exception as exc:  # whatever goes wrong, the process goes on alone; the next period tries again
            self._failed(exc, "publish", kind)
            return False
        self._published.add((kind, member))
        self._answered()
        return True

    def _index(self, pipe: Any, index: str, member: str, milliseconds: int) -> None:
        now = self._clock()
        pipe.zadd(index, {member: now})
        pipe.zremrangebyscore(index, "-inf", f"({now - self.ttl}")  # the members whose snapshots expired
        pipe.pexpire(index, milliseconds)

    def _envelope(self, member: str, process: str | None, period: float, payload: bytes) -> bytes:
        head = orjson.dumps({"replica": self.replica, "process": process, "member": member, "period": period})
        return head[:-1] + b',"snapshot":' + payload + b"}"

    # -- reading -------------------------------------------------------------------------------------------------
    async def read(self, kind: str) -> TierRead | None:
        """The other replicas' snapshots of `kind`; None when the rules name no store (no tier view)."""
        settings = self.settings()
        if settings is None:
            return None
        read = TierRead(self.replica, settings.shown_store, self.ttl)
        if self._down_since is not None and time.monotonic() < self._retry_reads_at:
            read.state, read.error = "unavailable", self._last_error
            return read
        client = self._connected(settings)
        now = self._clock()
        try:
            async with asyncio.timeout(self._timeout):
                members: list[tuple[bytes, float]] = await client.zrevrangebyscore(  # type: ignore[assignment]
                    index_key(kind), "+inf", f"({now - self.ttl}", start=0, num=MAX_MEMBERS, withscores=True)
                others = [(m.decode(), float(score)) for m, score in members if m.decode().partition(":")[0] != self.replica]
                values: list[bytes | None] = (await client.mget([snapshot_key(kind, m) for m, _ in others]) if others else [])  # type: ignore[assignment]
        except Exception as exc:
            self._failed(exc, "read", kind)
            read.state, read.error = "unavailable", self._last_error
            return read
        self._answered()
        read.snapshots = await asyncio.to_thread(_parsed, others, values)
        return read

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        if self._client is not None:
            await close_client(self._client)
            self._client = None

    # -- the connection and outages ---------------------------------------------------------------------------------
    def _connected(self, settings: DedupSettings) -> aioredis.Redis:
        """The client for the rules' store: made on first use, replaced when a reload changes the store or a connection fails."""
        if self._client is None or settings.store != self._url:
            self._retire()
            assert settings.store is not None
            self._url, self._shown = settings.store, settings.shown_store
            self._timeout = max(settings.store_timeout, TIMEOUT_FLOOR)
            pool = aioredis.BlockingConnectionPool.from_url(
                settings.store, max_connections=POOL_SIZE, timeout=self._timeout, socket_connect_timeout=self._timeout,
                socket_timeout=self._timeout, retry=Retry(NoBackoff(), 1), health_check_interval=0)  # all idempotent: a
                # command on a connection a restarted server dropped is sent again once, on a fresh one, within the timeout
            self._client = aioredis.Redis(connection_pool=pool)
            self._password = pool.connection_kwargs.get("password")
            self._published.clear()
        return self._client

    def _retire(self) -> None:
        """Close the current client once what it runs is over (its commands end within the timeout)."""
        old, self._client = self._client, None
        self._published.clear()
        if old is not None:
            task = asyncio.get_running_loop().create_task(close_client(old, delay=self._timeout + 0.5))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    def _answered(self) -> None:
        if self._down_since is None:
            return
        if self._log.allow("recovered") is not None:
            log.warning("tier_store_recovered", store=self._shown, down_seconds=round(time.monotonic() - self._down_since, 3))
        self._down_since = None

    def _failed(self, exc: Exception, operation: str, kind: str) -> None:
        self._metrics.child(self._metrics.dedup_store_errors, ERROR_REASON).inc()
        reason = failure_reason(exc)
        self._last_error = f"{reason}: {self._scrubbed(exc)}"
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        self._retry_reads_at = now + READ_BACKOFF
        self._published.clear()  # the store may come back empty: the next publishes are whole snapshots
        if reason == "connection":
            self._retire()
        held_back = self._log.allow("failed")
        if held_back is not None:
            log.warning("tier_store_unavailable", store=self._shown, operation=operation, kind=kind, reason=reason, error=self._scrubbed(exc),
                        held_back=held_back,
                        hint="/admin/catalog and /admin/ledger answer for this replica alone until the store answers; "
                             "publishing retries every snapshot interval")

    def _scrubbed(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        password = self._password
        return text.replace(password, "****") if isinstance(password, str) and password else text


def _parsed(others: list[tuple[str, float]], values: list[bytes | None]) -> list[TierSnapshot]:
    """Each member's envelope parsed; one whose key expired meanwhile is left out."""
    found = []
    for (member, published_at), value in zip(others, values):
        if value is None:
            continue
        replica, _, process = member.partition(":")
        snapshot = TierSnapshot(replica, process, published_at, 0.0)
        try:
            envelope = orjson.loads(value)
            snapshot.period = float(envelope.get("period", 0.0))
            data = envelope["snapshot"]
            if not isinstance(data, dict):
                raise ValueError("not a snapshot")
            snapshot.data = data
            snapshot.process = str(envelope.get("process") or process)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            snapshot.error = str(exc) or type(exc).__name__
        found.append(snapshot)
    return found
