"""The tier view across real `splitter serve` replicas sharing one real `redis-server`, with stand-in
receivers on loopback: each replica's /admin/catalog and /admin/ledger answer for both; Redis
SIGKILLed, each answers for itself alone (saying so) and no request fails; Redis back on the same
port, the tier view comes back by itself; a replica stopped stays until its TTL, then drops out."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from loadtest.process import SplitterProcess, launch_splitter
from loadtest.receivers import RunningReceiver, start_receiver
from tests.redis_server import PASSWORD, RedisServer
from tests.rules_texts import served_head
from tests.system_tools import needs
from tests.test_dedup_redis import total

pytestmark = needs("redis-server")

WRITE_KEY = "tier-web-key-0123"
RUDDER_KEY = "tier-rs-key-0123"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode(), "Content-Type": "application/json"}
TTL = 3.0  # --tier-ttl: the processes publish every second (a third of it)
TIMEOUT = 30.0
RULES = served_head(WRITE_KEY, RUDDER_KEY, delivery="retry_base: 0.05, retry_max: 0.3, breaker_cooldown: 0.1, flush_interval: 0.005") + """\
dedup: {store: "${DEDUP_STORE}", store_timeout: 200ms}
catalog: {snapshot_interval: 200ms}
rules:
  - name: checkout
    when: {type: track, event: ["Order *"]}
    route: {to: [segment], mirror: [rudderstack]}
  - name: everyone
    route: [segment, rudderstack]
"""


@pytest.fixture
async def upstreams() -> AsyncIterator[tuple[RunningReceiver, RunningReceiver]]:
    segment = await start_receiver("segment", record=True)
    rudder = await start_receiver("rudderstack", record=True, valid_keys=[RUDDER_KEY])
    yield segment, rudder
    await segment.close()
    await rudder.close()


async def start(tmp_path: Path, server: RedisServer, upstreams: tuple[RunningReceiver, RunningReceiver], replica: str, *extra: str) -> SplitterProcess:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    segment, rudder = upstreams
    env = dict(os.environ, SEGMENT_URL=segment.url, RUDDERSTACK_DATA_PLANE_URL=rudder.url, DEDUP_STORE=server.url, PYTHONUNBUFFERED="1",
               SPLITTER_TIER_TTL=str(TTL))
    home = tmp_path / replica
    return await launch_splitter(str(rules), env, ["--spool-dir", str(home / "spool"), "--dead-letter-dir", str(home / "dead"),
                                                   "--state-dir", str(home / "state"), "--replica-id", replica, "--drain-timeout", "2",
                                                   "--reload-interval", "60", *extra])


async def send(splitter: SplitterProcess, prefix: str, counts: dict[str, int]) -> None:
    """`counts[name]` track events of each name, ten to a request, each request on a fresh connection."""
    made = [{"type": "track", "event": name, "anonymousId": f"{prefix}-{name}-{i}", "messageId": f"{prefix}-{name}-{i}"}
            for name, count in counts.items() for i in range(count)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as client:
        for at in range(0, len(made), 10):
            async with client.post(splitter.ingress + "/v1/batch", data=orjson.dumps({"batch": made[at:at + 10]}), headers=AUTH) as response:
                assert response.status == 200, await response.text()


async def admin(splitter: SplitterProcess, path: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as client, client.get(splitter.admin + path) as response:
        assert response.status == 200, await response.text()
        text = await response.text()
    assert PASSWORD not in text
    return orjson.loads(text)  # type: ignore[no-any-return]


def catalog_totals(document: dict[str, Any]) -> dict[str, int]:
    return {e["name"]: e["total"] for e in document["sources"].get("web", {}).get("events", [])}


def delivered(document: dict[str, Any]) -> dict[str, int]:
    found: dict[str, int] = {}
    for row in document["rows"]:
        found[row["destination"]] = found.get(row["destination"], 0) + row["delivered"]
    return found


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.1)


ONE = {"Order Completed": 12, "Signed Up": 5}
TWO = {"Order Completed": 8, "Page Viewed": 20}
BOTH = {"Order Completed": 20, "Signed Up": 5, "Page Viewed": 20}


async def test_each_replica_answers_for_the_tier_and_alone_while_redis_is_away(tmp_path: Path, redis_server: RedisServer, upstreams) -> None:  # type: ignore[no-untyped-def]
    segment, rudder = (u.receiver for u in upstreams)
    one = await start(tmp_path, redis_server, upstreams, "one")
    two = await start(tmp_path, redis_server, upstreams, "two", "--workers", "2")
    try:
        await send(one, "one", ONE)
        await send(two, "two", TWO)
        received = {"segment": sum(BOTH.values()), "rudderstack": sum(BOTH.values())}  # Order * mirrored, the rest to both
        await segment.wait_for(received["segment"], timeout=TIMEOUT)
        await rudder.wait_for(received["rudderstack"], timeout=TIMEOUT)

        async def whole_tier() -> bool:
            for splitter in (one, two):
                catalog, ledger = await admin(splitter, "/admin/catalog"), await admin(splitter, "/admin/ledger")
                if catalog_totals(catalog) != BOTH or delivered(ledger) != received or len(ledger["processes"]) != 3:
                    return False
            return True

        await eventually(whole_tier, "both replicas' catalogs and ledgers in each one's answers")
        assert received == {"segment": len(segment.message_ids()), "rudderstack": len(rudder.message_ids())}  # what the receivers counted
        for splitter in (one, two):
            catalog, ledger = await admin(splitter, "/admin/catalog"), await admin(splitter, "/admin/ledger")
            for document in (catalog, ledger):
                assert document["tier"]["replicas"] == ["one", "two"] and document["tier"]["state"] == "ok"
                assert document["tier"]["store"] == f"redis://****@127.0.0.1:{redis_server.port}/0"
            assert sorted((p["replica"], p["process"]) for p in catalog["processes"]) == [("one", "main"), ("two", "worker-0"), ("two", "worker-1")]
            assert sorted((p["replica"], p["name"]) for p in ledger["processes"]) == [("one", "serve"), ("two", "worker-0"), ("two", "worker-1")]
            for row in ledger["rows"]:
                assert row["accepted"] == row["delivered"] + row["pending"] and row["pending"] == 0, row
        # the CLIs asked both replicas: each answer covers the tier, so one is taken, not both added up
        catalog = orjson.loads(await cli("catalog", "--from", one.admin, "--from", two.admin, "--json"))
        assert catalog_totals(catalog) == BOTH and len(catalog["processes"]) == 3
        assert delivered(orjson.loads(await cli("parity", "--from", one.admin, "--from", two.admin, "--json"))) == received

        # Redis SIGKILLed: each answers for itself, says so, and keeps taking events
        await redis_server.kill()
        await send(one, "one-alone", {"Signed Up": 3})
        await send(two, "two-alone", {"Page Viewed": 4})
        alone = [(one, {"Order Completed": 12, "Signed Up": 8}), (two, {"Order Completed": 8, "Page Viewed": 24})]
        for splitter in (one, two):
            catalog, ledger = await admin(splitter, "/admin/catalog"), await admin(splitter, "/admin/ledger")
            assert catalog["tier"]["state"] == ledger["tier"]["state"] == "unavailable"
            assert catalog["tier"]["error"] and catalog["tier"]["replicas"] == [catalog["tier"]["replica"]]
            assert {p["replica"] for p in ledger["processes"]} == {ledger["tier"]["replica"]}

        async def own_only() -> bool:
            return all([catalog_totals(await admin(s, "/admin/catalog")) == own for s, own in alone])

        await eventually(own_only, "each replica's own catalog, with the events sent while Redis was away")
        errors = total(await (admin_text(one)), "splitter_dedup_store_errors_total", reason="tier")
        assert errors >= 1
        assert one.events("tier_store_unavailable")

        # Redis back on the same port, empty: the tier view comes back by itself
        await redis_server.start()
        after = {"Order Completed": 20, "Signed Up": 8, "Page Viewed": 24}

        async def back() -> bool:
            for splitter in (one, two):
                for path in ("/admin/catalog", "/admin/ledger"):
                    document = await admin(splitter, path)
                    if document["tier"]["state"] != "ok" or document["tier"]["replicas"] != ["one", "two"]:
                        return False
                if catalog_totals(await admin(splitter, "/admin/catalog")) != after:
                    return False
            return True

        await eventually(back, "the tier view after Redis came back")
    finally:
        assert await one.stop() == 0
        assert await two.stop() == 0
    for splitter in (one, two):
        assert PASSWORD not in orjson.dumps(splitter.log).decode()


async def cli(*args: str) -> bytes:
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "proxy", *args, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode == 0, err
    assert PASSWORD.encode() not in out + err
    return out


async def admin_text(splitter: SplitterProcess) -> str:
    async with aiohttp.ClientSession() as client, client.get(splitter.admin + "/metrics") as response:
        return await response.text()


async def test_a_stopped_replica_stays_until_its_ttl_then_drops_out(tmp_path: Path, redis_server: RedisServer, upstreams) -> None:  # type: ignore[no-untyped-def]
    one = await start(tmp_path, redis_server, upstreams, "one")
    two = await start(tmp_path, redis_server, upstreams, "two")
    try:
        await send(one, "one", ONE)
        await send(two, "two", TWO)

        async def both() -> bool:
            return catalog_totals(await admin(one, "/admin/catalog")) == BOTH

        await eventually(both, "replica two's catalog in replica one's answer")
        assert await two.stop() == 0
        stopped = time.monotonic()
        catalog, ledger = await admin(one, "/admin/catalog"), await admin(one, "/admin/ledger")
        assert catalog_totals(catalog) == BOTH and time.monotonic() - stopped < TTL  # still there, within its TTL
        assert next(p for p in ledger["processes"] if p["replica"] == "two")["clean_stop"]  # its last publish was its stop's

        # Each kind is its own key, expiring its TTL after its own last publish: the two drop out apart.
        dropped: dict[str, float] = {}

        async def gone() -> bool:
            catalog, ledger = await admin(one, "/admin/catalog"), await admin(one, "/admin/ledger")
            if "catalog" not in dropped and catalog_totals(catalog) == ONE and catalog["tier"]["replicas"] == ["one"]:
                dropped["catalog"] = time.monotonic() - stopped
            if "ledger" not in dropped and ledger["tier"]["replicas"] == ["one"]:
                dropped["ledger"] = time.monotonic() - stopped
            return len(dropped) == 2

        await eventually(gone, "replica two dropping out of the catalog and the ledger after its TTL", timeout=TTL + 5)
        for kind, after in dropped.items():  # not before (the last publish was at most a period before the stop)
            assert after > TTL - 1.5, (kind, after)
    finally:
        assert await one.stop() == 0
