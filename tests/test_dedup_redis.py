"""De-duplication shared on Redis (`dedup: {store: redis://...}`), against a real `redis-server`.

Each test starts its own `redis-server` (Debian package `redis-server`, installed by `make test`) on
a free loopback port, without persistence, and stops it. The store is tested on its own (keys, expiry,
release, timeouts and backoff) and through real `splitter serve` processes sharing one server, with
the stand-in receivers counting what each destination got: each duplicate once across processes
(and a process's workers); Redis SIGKILLed mid-traffic costs no request and no event, is counted and
logged at most once a second; restarted on the same port, it is used again by itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from loadtest.process import SplitterProcess, launch_splitter
from loadtest.receivers import RunningReceiver, start_receiver
from proxy.delivery.dedup import Deduplicator, _kept
from proxy.delivery.dedup_store import KEY_PREFIX, RedisStore, destination_prefix
from proxy.engine import DedupSettings, RulesError, compile_rules
from proxy.metrics import Metrics
from tests.redis_server import PASSWORD, RedisServer
from tests.rules_texts import HEAD, served_head
from tests.system_tools import needs

pytestmark = needs("redis-server")

WRITE_KEY = "dedup-web-key-0123"
RUDDER_KEY = "dedup-rs-key-0123"
LEGACY_RUDDER_KEY = "dedup-rs-legacy-0123"
SECRET = "whsec-dedup-0123456789"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode(), "Content-Type": "application/json"}
TIMEOUT = 30.0


# --------------------------------------------------------------------------- a real redis-server
def settings(server: RedisServer, window: float = 30.0, timeout: float = 1.0) -> DedupSettings:
    """A timeout far above loopback's: what a test expects from the store must not depend on how busy the machine is."""
    return DedupSettings(window=window, store=server.url, store_timeout=timeout)


def errors(metrics: Metrics, reason: str) -> float:
    return float(metrics.registry.get_sample_value("splitter_dedup_store_errors_total", {"reason": reason}) or 0.0)


# --------------------------------------------------------------------------- the store on its own
async def test_a_claim_sets_absent_keys_for_the_window_in_one_command(redis_server: RedisServer) -> None:
    store = RedisStore(settings(redis_server, window=30), Metrics())
    try:
        keys = [store.key("rudderstack", f"m-{n}") for n in range(100)]
        assert keys[0] == "splitter:dedup:rudderstack:m-0"
        first = await store.claim(keys[:50], 30)  # also connects (and names the connection): not measured
        assert first.taken == [False] * 50
        async with redis_server.client() as client:
            before = await redis_server.stats(client)
            second = await store.claim(keys, 30)
            after = await redis_server.stats(client)
            assert second.taken == [True] * 50 + [False] * 50
            # One command (the claim script, which runs the 100 SETs), in one read. The others are the INFOs'.
            assert (after[0] - before[0], after[1] - before[1]) == (1 + 2, 100)
            assert after[2] - before[2] == 1 + 2
            ttl = await client.pttl(keys[99])
            assert 29_000 < ttl <= 30_000  # the window is the expiry
            assert await client.get(keys[0]) == first.token.encode() and await client.get(keys[99]) == second.token.encode()
            assert first.token != second.token
    finally:
        await store.close()


def test_keys_are_namespaced_and_bounded() -> None:
    assert destination_prefix("rudderstack") == f"{KEY_PREFIX}rudderstack:"
    odd = destination_prefix("warehouse:eu")  # a name that could hold the separator gets a digest
    assert odd.startswith(f"{KEY_PREFIX}#") and odd.count(":") == 3 and odd != destination_prefix("warehouse:us")
    assert len(destination_prefix("d" * 500)) < 40
    longest = destination_prefix("d" * 64) + _kept("m" * 30_000)  # a client's messageId can be 32 KB
    assert len(longest.encode()) <= 145


async def test_a_release_deletes_only_this_requests_claims(redis_server: RedisServer) -> None:
    store = RedisStore(settings(redis_server), Metrics())
    try:
        mine, kept, others = (store.key("rudderstack", name) for name in ("mine", "kept", "others"))
        async with redis_server.client() as client:
            await client.set(others, "another-process:1", px=30_000)
            claim = await store.claim([mine, kept, others], 30)
            assert claim.taken == [False, False, True]
            await store.release(claim, [mine, others])  # `others` is not this request's: untouched
            assert await client.exists(mine) == 0 and await client.exists(kept) == 1
            assert await client.get(others) == b"another-process:1"
    finally:
        await store.close()


async def test_a_hung_server_costs_one_timeout_then_requests_skip_it_until_it_answers(redis_server: RedisServer) -> None:
    metrics = Metrics()
    store = RedisStore(settings(redis_server, timeout=0.05), metrics)
    try:
        assert (await store.claim([store.key("rs", "warm")], 30)).taken == [False]
        redis_server.pause()
        started = time.monotonic()
        claim = await store.claim([store.key("rs", "during")], 30)
        assert claim.taken is None and claim.sent  # no answer: the request falls back to memory
        assert time.monotonic() - started < 0.05 + 0.2
        assert errors(metrics, "timeout") == 1
        started = time.monotonic()
        for n in range(20):  # backing off: not even a connection attempt
            assert (await store.claim([store.key("rs", f"skip-{n}")], 30)).taken is None
        assert time.monotonic() - started < 0.1
        assert errors(metrics, "unavailable") == 20
        redis_server.resume()
        deadline = time.monotonic() + 5
        while (await store.claim([store.key("rs", "after")], 30)).taken is None:
            assert time.monotonic() < deadline, "the store was not asked again after its backoff"
            await asyncio.sleep(0.01)
        assert (await store.claim([store.key("rs", "after")], 30)).taken == [True]
    finally:
        redis_server.resume()
        await store.close()


async def test_a_dead_server_is_probed_once_per_backoff_not_per_request(redis_server: RedisServer) -> None:
    metrics = Metrics()
    store = RedisStore(settings(redis_server), metrics)
    try:
        assert (await store.claim([store.key("rs", "warm")], 30)).taken == [False]
        await redis_server.kill()
        started = time.monotonic()
        requests = 0
        while time.monotonic() - started < 1.5:
            assert (await store.claim([store.key("rs", f"m-{requests}")], 30)).taken is None
            requests += 1
            await asyncio.sleep(0.002)
        probes = errors(metrics, "connection") + errors(metrics, "timeout")
        # backoff 0.1 s doubling to 2 s (±20 %): about 4 attempts in 1.5 s, whatever the request rate
        assert 2 <= probes <= 6, probes
        assert errors(metrics, "unavailable") == requests - probes and requests > 200
        await redis_server.start()  # same port, empty
        deadline = time.monotonic() + 5
        while (await store.claim([store.key("rs", "back")], 30)).taken is None:
            assert time.monotonic() < deadline, "the store did not reconnect"
            await asyncio.sleep(0.02)
    finally:
        await store.close()


async def test_a_deduplicator_without_an_answer_filters_by_memory_alone(redis_server: RedisServer) -> None:
    """What `Delivery.accept` runs: the process's own memory still drops what it delivered."""
    dedup = Deduplicator()
    metrics = Metrics()
    dedup.apply(settings(redis_server), metrics)
    assert dedup.store is not None
    try:
        dedup.remember(settings(redis_server), "rs", ["seen-here"])
        await redis_server.kill()
        assert dedup.seen("rs", "seen-here")
        dedup.apply(DedupSettings(window=30), metrics)  # a reload without the store closes its client
        assert dedup.store is None and dedup.settings == DedupSettings(window=30)
    finally:
        await dedup.close()


# --------------------------------------------------------------------------- the rules
def rules_with(dedup: str) -> str:
    return HEAD + f"rules:\n  - name: all\n    route: rudderstack\ndedup: {dedup}\n"


def test_the_store_settings_and_their_problems_never_show_the_password() -> None:
    parsed = compile_rules(rules_with(f'{{store: "redis://:{PASSWORD}@redis.internal:6380/2", store_timeout: 20ms, window: 5m}}'), env={})
    assert parsed.dedup == DedupSettings(300.0, store=f"redis://:{PASSWORD}@redis.internal:6380/2", store_timeout=0.02)
    assert parsed.dedup.shown_store == "redis://****@redis.internal:6380/2"
    assert PASSWORD not in repr(parsed.dedup)
    assert compile_rules(rules_with('{store: "${REDIS_URL:-}"}'), env={}).dedup == DedupSettings()  # empty: the embedded store
    assert compile_rules(rules_with('{store: "rediss://redis.internal"}'), env={}).dedup == DedupSettings(store="rediss://redis.internal")
    for dedup, message in [
        (f'{{store: "http://:{PASSWORD}@redis.internal"}}', "must be a redis:// or rediss:// URL with a host (redis://host:6379/0), not 'http://****@redis.internal'"),
        (f'{{store: "redis://:{PASSWORD}@redis.internal:99999"}}', "must be a redis:// or rediss:// URL with a host"),
        (f'{{store: "redis://:{PASSWORD}@redis.internal/cache"}}', "must name the database as a number after the host"),
        (f'{{store: "redis://:{PASSWORD}@redis.internal?timeout=1"}}', "must not carry a query or fragment ('redis://****@redis.internal?****')"),
        (f'{{store: "redis://redis.internal/0?password={PASSWORD}"}}', "must not carry a query or fragment ('redis://redis.internal/0?****')"),
        (f'{{store: "redis://redis.internal:6379/0#{PASSWORD}"}}', "must not carry a query or fragment ('redis://redis.internal:6379/0#****')"),
        ('{store: "redis://h", store_timeout: 6s}', "dedup.store_timeout: must be more than 0 and at most 5s, not '6s'"),
        ("{store_timeout: 20ms}", "dedup.store_timeout: has no effect without dedup.store"),
    ]:
        with pytest.raises(RulesError) as info:
            compile_rules(rules_with(dedup), filename="rules.yaml", env={})
        [line] = info.value.lines
        assert message in line and PASSWORD not in line, line


# --------------------------------------------------------------------------- splitter serve processes sharing one Redis
def rules_text() -> str:
    return served_head(WRITE_KEY, RUDDER_KEY, delivery="retry_base: 0.05, retry_max: 0.5, breaker_cooldown: 0.1, flush_interval: 0.002") + f"""\
  - name: legacy
    webhook: {{secret: "{SECRET}"}}
    credentials: {{rudderstack: "{LEGACY_RUDDER_KEY}"}}
dedup: {{store: "${{DEDUP_STORE}}", store_timeout: 500ms, window: 10m}}
rules:
  - name: legacy
    when: {{source: legacy}}
    route: rudderstack
  - name: everyone
    route: [segment, rudderstack]
"""


def mirror_rules_text() -> str:
    """Segment primary, RudderStack a mirror whose spool holds about one big event (the migration's parallel phase)."""
    return rules_text().replace("  - name: everyone\n    route: [segment, rudderstack]\n",
                                "  - name: everyone\n    route: {to: [segment], mirror: [rudderstack]}\n").replace(
        'url: "${RUDDERSTACK_DATA_PLANE_URL}", delivery: {', 'url: "${RUDDERSTACK_DATA_PLANE_URL}", delivery: {spool_quota_mb: 0.001, ')


@pytest.fixture
async def upstreams() -> AsyncIterator[tuple[RunningReceiver, RunningReceiver]]:
    segment = await start_receiver("segment", record=True)
    rudder = await start_receiver("rudderstack", record=True, valid_keys=[RUDDER_KEY, LEGACY_RUDDER_KEY])
    yield segment, rudder
    await segment.close()
    await rudder.close()


@contextlib.asynccontextmanager
async def splitters(tmp_path: Path, server: RedisServer, upstreams: tuple[RunningReceiver, RunningReceiver],
                    *extra: tuple[str, ...], text: str | None = None) -> AsyncIterator[list[SplitterProcess]]:
    """One `splitter serve` per entry of `extra` (its extra flags), all on one rules file and one Redis."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(text or rules_text())
    segment, rudder = upstreams
    env = dict(os.environ, SEGMENT_URL=segment.url, RUDDERSTACK_DATA_PLANE_URL=rudder.url, DEDUP_STORE=server.url, PYTHONUNBUFFERED="1")
    started: list[SplitterProcess] = []
    try:
        for flags in extra:
            started.append(await launch_splitter(str(rules), env, ["--reload-interval", "60", *flags]))
        yield started
    finally:
        for process in started:
            assert await process.stop() == 0
        for process in started:  # the password went into every process: it came out of none
            assert PASSWORD not in orjson.dumps(process.log).decode()


def event(message_id: str, **extra: Any) -> dict[str, Any]:
    return {"type": "track", "event": "Order Completed", "userId": f"u-{message_id}", "messageId": message_id, **extra}


async def direct(client: aiohttp.ClientSession, splitter: SplitterProcess, *ids: str, **extra: Any) -> int:
    body = orjson.dumps({"batch": [event(m, **extra) for m in ids]})
    async with client.post(splitter.ingress + "/v1/batch", data=body, headers=AUTH) as response:
        return response.status


async def webhook(client: aiohttp.ClientSession, splitter: SplitterProcess, message_id: str, **extra: Any) -> int:
    body = orjson.dumps(event(message_id, **extra))
    signature = hmac.new(SECRET.encode(), body, hashlib.sha1).hexdigest()
    headers = {"Content-Type": "application/json", "X-Signature": signature}
    async with client.post(splitter.ingress + "/v1/webhook/segment/legacy", data=body, headers=headers) as response:
        return response.status


async def scrape(splitter: SplitterProcess, path: str = "/metrics") -> str:
    async with aiohttp.ClientSession() as client, client.get(splitter.admin + path) as response:
        assert response.status == 200
        return await response.text()


def total(text: str, name: str, **labels: str) -> float:
    found = 0.0
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        metric, _, label_text = series.partition("{")
        if metric == name and labels.items() <= dict(re.findall(r'(\w+)="([^"]*)"', label_text)).items():
            found += float(value)
    return found


async def settled(upstreams: tuple[RunningReceiver, RunningReceiver], segment: int, rudder: int) -> None:
    """Wait until the receivers hold at least this many events, then a little longer for any extra copy."""
    await upstreams[0].receiver.wait_for(segment, timeout=TIMEOUT)
    await upstreams[1].receiver.wait_for(rudder, timeout=TIMEOUT)
    await asyncio.sleep(0.3)


async def test_two_processes_sharing_redis_send_each_duplicate_once(tmp_path: Path, redis_server: RedisServer, upstreams) -> None:  # type: ignore[no-untyped-def]
    segment, rudder = (u.receiver for u in upstreams)
    async with splitters(tmp_path, redis_server, upstreams, (), ("--workers", "2")) as (a, b), \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as client:  # fresh connections: b's workers share them
        assert (await direct(client, a, "app-then-hook")) == 200 and (await webhook(client, b, "app-then-hook")) == 200
        assert (await webhook(client, a, "hook-then-app")) == 200 and (await direct(client, b, "hook-then-app")) == 200
        assert {await direct(client, a, "app-twice"), await direct(client, b, "app-twice")} == {200}
        for _ in range(4):  # b's two workers: the kernel spreads the connections
            assert await direct(client, b, "workers-twice") == 200
        racing = [direct(client, target, f"race-{n}") for n in range(10) for target in (a, b, a, b)]  # at once, across processes
        assert set(await asyncio.gather(*racing)) == {200}
        await settled(upstreams, 14, 14)
        expected = ["app-then-hook", "hook-then-app", "app-twice", "workers-twice", *(f"race-{n}" for n in range(10))]
        assert Counter(rudder.message_ids()) == Counter(expected)  # each once: the webhook copies and the repeats were dropped
        assert Counter(segment.message_ids()) == Counter(expected)
        hits = [total(await scrape(p), "splitter_dedup_hits_total") for p in (a, b)]
        assert sum(hits) == 1 + 1 + 2 + 3 * 2 + 10 * 3 * 2 and all(hits)  # per destination: the webhook copies, the repeats
        config = orjson.loads(await scrape(a, "/admin/config"))
        assert config["dedup"]["store"] == f"redis://****@127.0.0.1:{redis_server.port}/0"
        assert config["dedup"]["store_timeout"] == 0.5


async def test_a_dropped_mirror_copy_is_released_so_the_webhook_copy_reaches_the_mirror(
        tmp_path: Path, redis_server: RedisServer, upstreams) -> None:  # type: ignore[no-untyped-def]
    """Process a cannot spool RudderStack's mirror copy (its spool is full while RudderStack is down) and
    answers 200 without it; it must take back its claim in Redis, or process b would drop the webhook
    copy, RudderStack's only one, as a duplicate."""
    segment, rudder = (u.receiver for u in upstreams)
    big = {"properties": {"blob": "x" * 600}}
    async with splitters(tmp_path, redis_server, upstreams, (), (), text=mirror_rules_text()) as (a, b), aiohttp.ClientSession() as client:
        rudder.faults.down = True
        assert await direct(client, a, "filler", **big) == 200
        assert await direct(client, a, "mirrored", **big) == 200
        assert total(await scrape(a), "splitter_mirror_dropped_total", destination="rudderstack") == 1
        async with redis_server.client() as redis_client:
            assert await redis_client.exists("splitter:dedup:rudderstack:mirrored") == 0  # released
            assert await redis_client.exists("splitter:dedup:rudderstack:filler") == 1
        rudder.faults.down = False
        assert await webhook(client, b, "mirrored", **big) == 200
        assert await webhook(client, b, "filler", **big) == 200  # this one RudderStack has (from a's spool): dropped
        await settled(upstreams, 2, 2)
        assert Counter(rudder.message_ids()) == Counter(["filler", "mirrored"])
        assert Counter(segment.message_ids()) == Counter(["filler", "mirrored"])


async def test_one_round_trip_to_redis_per_request(tmp_path: Path, redis_server: RedisServer, upstreams) -> None:  # type: ignore[no-untyped-def]
    async with splitters(tmp_path, redis_server, upstreams, ()) as (a,), aiohttp.ClientSession() as client:
        assert await direct(client, a, "warm-up") == 200  # connects to Redis
        async with redis_server.client() as redis_client:
            before = await redis_server.stats(redis_client)
            assert await direct(client, a, *(f"batch-{n}" for n in range(50))) == 200  # 50 events x 2 destinations
            after = await redis_server.stats(redis_client)
        assert (after[0] - before[0], after[1] - before[1]) == (1 + 2, 100)  # one command running 100 SETs, and the INFOs
        assert after[2] - before[2] == 1 + 2  # one read for it, and the INFOs'


async def test_redis_killed_mid_traffic_then_restarted(tmp_path: Path, redis_server: RedisServer, upstreams) -> None:  # type: ignore[no-untyped-def]
    """Each round sends a fresh id directly to one process and through the webhook to the other (in
    turns, which first), so every duplicate crosses processes. Segment gets the direct copy only;
    RudderStack gets one copy with Redis, at most two without it; never lost, never an error."""
    segment, rudder = (u.receiver for u in upstreams)
    sent: list[str] = []
    slowest = 0.0

    async def rounds(prefix: str, count: int, pause: float = 0.01) -> None:
        nonlocal slowest
        for n in range(count):
            message_id = f"{prefix}-{n}"
            calls = [(direct, a), (webhook, b)] if n % 2 else [(webhook, a), (direct, b)]
            for call, target in calls if n % 4 < 2 else calls[::-1]:
                started = time.monotonic()
                status = await call(client, target, message_id)
                slowest = max(slowest, time.monotonic() - started)
                assert status == 200, (status, target.log[-5:])
            sent.append(message_id)
            await asyncio.sleep(pause)

    async with splitters(tmp_path, redis_server, upstreams, (), ()) as (a, b), aiohttp.ClientSession() as client:
        await rounds("before", 30)
        await redis_server.kill()
        outage_started = time.monotonic()
        await rounds("during", 150)  # about 2 s of traffic against a dead store
        outage = time.monotonic() - outage_started
        assert slowest < 1.5, slowest  # bounded by store_timeout (500 ms here) plus the spool write, never a hang
        for process in (a, b):
            text = await scrape(process)
            failed = sum(total(text, "splitter_dedup_store_errors_total", reason=reason) for reason in ("connection", "timeout"))
            assert failed >= 1  # the probes (how redis-py reports a refused connection varies by version)
            assert total(text, "splitter_dedup_store_errors_total", reason="unavailable") >= 50
            lines = process.events("dedup_store_unavailable")
            assert 1 <= len(lines) <= outage + 2, (len(lines), outage)  # at most one a second
        await redis_server.start()  # the same port, empty (no persistence)
        deadline = time.monotonic() + TIMEOUT
        n = 0
        while not (a.events("dedup_store_recovered") and b.events("dedup_store_recovered")):
            assert time.monotonic() < deadline, "splitter did not use Redis again after it came back"
            await rounds(f"probe-{n}", 1, pause=0.05)
            n += 1
        await rounds("after", 30)
        await settled(upstreams, len(sent), len(sent))
        assert Counter(segment.message_ids()) == Counter(sent)  # one direct copy each: once, none lost
        in_rudder = Counter(rudder.message_ids())
        assert set(in_rudder) == set(sent)  # nothing lost
        for message_id in sent:
            if message_id.startswith(("before-", "after-")):
                assert in_rudder[message_id] == 1, message_id  # Redis in use: once across both processes
            else:
                assert in_rudder[message_id] <= 2, message_id
        assert any(in_rudder[m] == 2 for m in sent if m.startswith("during-"))  # the outage did let duplicates through
