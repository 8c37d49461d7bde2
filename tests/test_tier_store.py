"""The tier view's store (proxy/observe/tier.py) against a real `redis-server`: what the keepers publish
(one key per kind, replica and process, and an index), the documents `/admin/catalog` and
`/admin/ledger` answer from it (the other replicas' snapshots merged with this host's files, never
twice), refreshes and republishing after Redis lost its data, expiry, and answers while Redis is away."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson

from proxy.engine import CatalogSettings, DedupSettings
from proxy.metrics import Metrics
from proxy.observe.catalog import Catalog
from proxy.observe.catalog_files import CatalogKeeper, catalog_document
from proxy.observe.ledger import ACCEPTED, DELIVERED
from proxy.observe.ledger_files import LedgerKeeper, ledger_document
from proxy.observe.tier import STALE_MARGIN, STALE_PERIODS, TIMEOUT_FLOOR, Tier, index_key, snapshot_key
from tests.redis_server import PASSWORD, RedisServer
from tests.system_tools import needs
from tests.test_dedup_redis import errors

pytestmark = needs("redis-server")
SETTINGS = CatalogSettings()


def tier(server: RedisServer, replica: str, metrics: Metrics | None = None, ttl: float = 3600.0) -> Tier:
    dedup = DedupSettings(store=server.url, store_timeout=0.05)
    return Tier(replica, lambda: dedup, metrics or Metrics(), ttl=ttl)


def catalog_keeper(state: Path, process: str | None, tier_: Tier | None, events: dict[str, int]) -> CatalogKeeper:
    catalog = Catalog()
    for name, count in events.items():
        catalog.record(SETTINGS, "web", {("r", ("segment",), (), "track"): {name: count}})
    return CatalogKeeper(catalog, state, process, lambda: 60.0, tier=tier_)


def totals(document: dict, source: str = "web") -> dict[str, int]:  # type: ignore[type-arg]
    return {e["name"]: e["total"] for e in document["sources"].get(source, {}).get("events", [])}


async def test_replicas_see_each_other_and_their_own_host_once(tmp_path: Path, redis_server: RedisServer) -> None:
    a, b = tier(redis_server, "replica-a"), tier(redis_server, "replica-b")
    try:
        # replica-a: a single process; replica-b: two workers, both on its host's state directory
        one = catalog_keeper(tmp_path / "a", None, a, {"Order Completed": 3})
        workers = [catalog_keeper(tmp_path / "b", f"worker-{i}", b, {"Order Completed": 10, f"Only B{i}": 1}) for i in (1, 2)]
        for keeper in (one, *workers):
            await keeper.publish(await keeper.write())
        async with redis_server.client() as client:
            assert sorted(m.decode() for m in await client.zrange(index_key("catalog"), 0, -1)) == [
                "replica-a:main", "replica-b:worker-1", "replica-b:worker-2"]
            envelope = orjson.loads(await client.get(snapshot_key("catalog", "replica-b:worker-1")))
            assert (envelope["replica"], envelope["process"], envelope["period"]) == ("replica-b", "worker-1", 60.0)
            assert envelope["snapshot"] == orjson.loads((tmp_path / "b" / "catalog.worker-1.json").read_bytes())  # the file's JSON
            assert 3599_000 < await client.pttl(snapshot_key("catalog", "replica-a:main")) <= 3600_000
        # replica-a's single process: its live catalog and replica-b's two workers from Redis
        seen_by_a = await catalog_document(tmp_path / "a", one, tier=a)
        assert totals(seen_by_a) == {"Order Completed": 23, "Only B1": 1, "Only B2": 1}
        assert seen_by_a["tier"] == {"replica": "replica-a", "store": f"redis://****@127.0.0.1:{redis_server.port}/0", "state": "ok",
                                     "replicas": ["replica-a", "replica-b"], "stale": [], "ttl_seconds": 3600.0}
        processes = {(p["replica"], p["process"]): p for p in seen_by_a["processes"]}
        assert set(processes) == {("replica-a", "main"), ("replica-b", "worker-1"), ("replica-b", "worker-2")}
        assert processes["replica-a", "main"]["live"] and processes["replica-b", "worker-1"]["stale"] is False
        assert processes["replica-b", "worker-1"]["age_seconds"] < 5
        # replica-b's supervisor (no live catalog): its workers from its files, not from Redis as well
        seen_by_b = await catalog_document(tmp_path / "b", None, tier=b)
        assert totals(seen_by_b) == {"Order Completed": 23, "Only B1": 1, "Only B2": 1}
        assert len(seen_by_b["processes"]) == 3
        assert PASSWORD not in orjson.dumps([seen_by_a, seen_by_b]).decode()
    finally:
        await a.close()
        await b.close()


async def test_the_ledger_merges_across_replicas(tmp_path: Path, redis_server: RedisServer) -> None:
    a, b = tier(redis_server, "a"), tier(redis_server, "b")
    keepers = []
    try:
        for name, t, count in (("a", a, 5), ("b", b, 7)):
            keeper = LedgerKeeper(tmp_path / name, None, interval=0.05, tier=t)
            keeper.ledger.count(ACCEPTED, "web", "segment", "primary", {("track", "Order Completed"): count})
            keeper.ledger.count(DELIVERED, "web", "segment", "primary", {("track", "Order Completed"): count - 1})
            keeper.start()
            keepers.append(keeper)
        deadline = time.monotonic() + 10
        while True:  # published by the keepers' own background tasks
            document = await ledger_document(tmp_path / "a", keepers[0], tier=a)
            if document["tier"]["replicas"] == ["a", "b"] and document["rows"] and document["rows"][0]["accepted"] == 12:
                break
            assert time.monotonic() < deadline, document
            await asyncio.sleep(0.05)
        [row] = document["rows"]
        assert (row["accepted"], row["delivered"], row["pending"]) == (12, 10, 2)
        assert sorted((p["replica"], p["name"], p["live"]) for p in document["processes"]) == [("a", "serve", True), ("b", "serve", False)]
    finally:
        for keeper in keepers:
            await keeper.stop()
        await a.close()
        await b.close()


async def test_an_unchanged_snapshot_is_refreshed_and_published_again_when_redis_lost_it(tmp_path: Path, redis_server: RedisServer) -> None:
    a = tier(redis_server, "a")
    try:
        keeper = catalog_keeper(tmp_path, None, a, {"Signed Up": 2})
        await keeper.publish(await keeper.write())
        async with redis_server.client() as client:
            key = snapshot_key("catalog", "a:main")
            await client.pexpire(key, 100_000)
            assert await keeper.write() is None  # unchanged: no file write
            await keeper.publish(None)  # a refresh: the expiry again, no snapshot sent
            assert await client.pttl(key) > 3000_000
            await client.flushall()  # a restarted Redis without persistence
            await keeper.publish(None)
            assert orjson.loads(await client.get(key))["snapshot"]["sources"]["web"][0]["name"] == "Signed Up"
    finally:
        await a.close()


async def test_a_gone_replicas_snapshot_is_stale_then_expires(tmp_path: Path, redis_server: RedisServer) -> None:
    a, b = tier(redis_server, "a", ttl=1.5), tier(redis_server, "b", ttl=1.5)
    try:
        gone = catalog_keeper(tmp_path / "b", None, b, {"Order Completed": 4})
        await a.publish("catalog", None, b'{"kind": "splitter-catalog", "sources": {}}', 0.1)
        await b.publish("catalog", None, orjson.dumps(gone.catalog.snapshot(None)), 0.1)  # published every 0.1 s: stale past 0.3 s and STALE_MARGIN
        assert totals(await catalog_document(tmp_path / "a", None, tier=a)) == {"Order Completed": 4}
        await asyncio.sleep(STALE_PERIODS * 0.1 + STALE_MARGIN + 0.05)
        document = await catalog_document(tmp_path / "a", None, tier=a)
        assert totals(document) == {"Order Completed": 4} and document["tier"]["stale"] == ["b:main"]
        await asyncio.sleep(0.5)  # past the TTL: the key expired, and the next publish trims the index
        assert totals(await catalog_document(tmp_path / "a", None, tier=a)) == {}
        await a.publish("catalog", None, b'{"kind": "splitter-catalog", "sources": {}}', 0.1)
        async with redis_server.client() as client:
            assert [m.decode() for m in await client.zrange(index_key("catalog"), 0, -1)] == ["a:main"]
    finally:
        await a.close()
        await b.close()


async def test_redis_away_answers_this_replica_alone_then_comes_back(tmp_path: Path, redis_server: RedisServer) -> None:
    metrics = Metrics()
    a, b = tier(redis_server, "a", metrics), tier(redis_server, "b")
    try:
        mine = catalog_keeper(tmp_path / "a", None, a, {"Mine": 1})
        theirs = catalog_keeper(tmp_path / "b", None, b, {"Theirs": 1})
        await theirs.publish(await theirs.write())
        assert totals(await catalog_document(tmp_path / "a", mine, tier=a)) == {"Mine": 1, "Theirs": 1}
        await redis_server.kill()
        started = time.monotonic()
        document = await catalog_document(tmp_path / "a", mine, tier=a)
        assert time.monotonic() - started < TIMEOUT_FLOOR
        assert totals(document) == {"Mine": 1}
        assert document["tier"]["state"] == "unavailable" and document["tier"]["error"].startswith("connection: ")
        assert PASSWORD not in orjson.dumps(document).decode()
        assert not await mine.tier.publish("catalog", None, b"{}", 60.0)  # type: ignore[union-attr]
        assert errors(metrics, "tier") == 2
        assert (await catalog_document(tmp_path / "a", mine, tier=a))["tier"]["state"] == "unavailable"  # backing off: not asked
        assert errors(metrics, "tier") == 2
        await redis_server.start()  # same port, empty
        assert await theirs.publish(None)  # its next period, in full (Redis came back empty), on a new connection
        deadline = time.monotonic() + 10
        while (document := await catalog_document(tmp_path / "a", mine, tier=a))["tier"]["state"] != "ok":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert totals(document) == {"Mine": 1, "Theirs": 1}
    finally:
        await a.close()
        await b.close()


async def test_without_a_store_there_is_no_tier_view(tmp_path: Path) -> None:
    none = Tier("a", lambda: DedupSettings(window=30), Metrics())
    keeper = catalog_keeper(tmp_path, None, none, {"Mine": 2})
    await keeper.publish(await keeper.write())
    document = await catalog_document(tmp_path, keeper, tier=none)
    assert "tier" not in document and totals(document) == {"Mine": 2}
    assert "replica" not in document["processes"][0]
    assert "tier" not in await ledger_document(tmp_path, None, tier=none)


def test_answers_that_each_cover_the_tier_are_merged_once() -> None:
    from proxy.observe.catalog_view import merge_views

    def answer(count: int, replicas: list[str] | None) -> dict:  # type: ignore[type-arg]
        view = {"generated_at": "2026-12-02T00:00:00Z", "processes": [{"process": "main"}],
                "sources": {"web": {"events": [{"type": "track", "name": "E", "total": count, "paths": {}, "routed": {}}]}}}
        return {**view, "tier": {"replicas": replicas}} if replicas is not None else view

    # one's answer lost Redis (itself alone), two's covers both: two's is taken, one's left out
    assert totals(merge_views([answer(3, ["one"]), answer(10, ["one", "two"])])) == {"E": 10}
    assert totals(merge_views([answer(10, ["one", "two"]), answer(10, ["one", "two"])])) == {"E": 10}
    assert totals(merge_views([answer(3, ["one"]), answer(7, ["two"])])) == {"E": 10}  # two tiers (two stores): both
    assert totals(merge_views([answer(3, None), answer(7, None)])) == {"E": 10}  # no tier view: added up as before


async def test_a_hung_redis_costs_a_read_its_timeout_once_then_answers_at_once(tmp_path: Path, redis_server: RedisServer) -> None:
    a = tier(redis_server, "a")
    try:
        keeper = catalog_keeper(tmp_path, None, a, {"Mine": 1})
        assert await keeper.publish(await keeper.write())
        redis_server.pause()  # SIGSTOP: connections stay open, nothing answers
        started = time.monotonic()
        document = await catalog_document(tmp_path, keeper, tier=a)
        assert TIMEOUT_FLOOR - 0.1 < time.monotonic() - started < TIMEOUT_FLOOR + 1
        assert document["tier"]["state"] == "unavailable" and document["tier"]["error"].startswith("timeout")
        assert totals(document) == {"Mine": 1}
        started = time.monotonic()
        assert (await catalog_document(tmp_path, keeper, tier=a))["tier"]["state"] == "unavailable"
        await keeper.stop()  # the final write; no wait for a store that is not answering
        assert time.monotonic() - started < 0.5
    finally:
        redis_server.resume()
        await a.close()
