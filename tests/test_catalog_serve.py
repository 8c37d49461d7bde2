"""The event catalog across real `splitter serve` processes: a restart keeps it, `--workers 2` merges its
workers' files on the supervisor's admin port, `splitter catalog` merges replicas (`--from` twice) and
reads snapshot files, and the admin token guards it. Stand-in receivers on loopback, real signals."""

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
from tests.rules_texts import served_head

WRITE_KEY = "catalog-web-key-0123"
RUDDER_KEY = "catalog-rs-key-0123"
TOKEN = "catalog-admin-token-42"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode(), "Content-Type": "application/json"}
RULES = served_head(WRITE_KEY, RUDDER_KEY, delivery="retry_base: 0.05, retry_max: 0.5") + """\
cohort: {key: [anonymousId], salt: catalog}
rules:
  - name: checkout
    when: {type: track, event: ["Order *"]}
    route: {to: [segment], mirror: [rudderstack]}
  - name: rollout
    route: {split: {rudderstack: 50, segment: 50}}
catalog: {snapshot_interval: 200ms}
"""
TIMEOUT = 30.0


@pytest.fixture
async def upstreams() -> AsyncIterator[tuple[RunningReceiver, RunningReceiver]]:
    segment = await start_receiver("segment", record=True)
    rudder = await start_receiver("rudderstack", record=True, valid_keys=[RUDDER_KEY])
    yield segment, rudder
    await segment.close()
    await rudder.close()


async def start(tmp_path: Path, upstreams: tuple[RunningReceiver, RunningReceiver], name: str, *extra: str,
                token: str | None = None) -> SplitterProcess:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    segment, rudder = upstreams
    env = dict(os.environ, SEGMENT_URL=segment.url, RUDDERSTACK_DATA_PLANE_URL=rudder.url, PYTHONUNBUFFERED="1")
    if token is not None:
        env["SPLITTER_ADMIN_TOKEN"] = token
    home = tmp_path / name
    return await launch_splitter(str(rules), env, ["--spool-dir", str(home / "spool"), "--dead-letter-dir", str(home / "dead-letter"),
                                                   "--state-dir", str(home / "state"), *extra])


async def send(splitter: SplitterProcess, prefix: str, counts: dict[str, int], price: Any = 9.5) -> None:
    """`counts[name]` track events of each name, one request per event on a fresh connection (spread over workers)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as client:
        for name, count in counts.items():
            for i in range(count):
                event = {"type": "track", "event": name, "anonymousId": f"{prefix}-{name}-{i}", "messageId": f"{prefix}-{name}-{i}",
                         "properties": {"price": price}}
                async with client.post(splitter.ingress + "/v1/track", data=orjson.dumps(event), headers=AUTH) as response:
                    assert response.status == 200, await response.text()


async def catalog_of(splitter: SplitterProcess, token: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as client, client.get(splitter.admin + "/admin/catalog", headers=headers) as response:
        assert response.status == 200, await response.text()
        return await response.json()  # type: ignore[no-any-return]


def totals(document: dict[str, Any], source: str = "web") -> dict[str, int]:
    return {e["name"]: e["total"] for e in document["sources"].get(source, {"events": []})["events"]}


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {TIMEOUT} s: {what}")
        await asyncio.sleep(0.1)


async def cli(*args: str, token: str | None = None) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SPLITTER_ADMIN_TOKEN"}
    if token is not None:
        env["SPLITTER_ADMIN_TOKEN"] = token
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "proxy", "catalog", *args, env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()


async def test_a_restart_keeps_the_catalog(tmp_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    splitter = await start(tmp_path, upstreams, "one")
    try:
        await send(splitter, "a", {"Order Completed": 3, "Viewed": 2})
        first = await catalog_of(splitter)
    finally:
        assert await splitter.stop() == 0
    state = tmp_path / "one" / "state" / "catalog.json"
    assert orjson.loads(state.read_bytes())["process"] is None  # written at shutdown, after the last request
    code, out, err = await cli("--snapshot", str(state), "--json")  # the file on its own, as `splitter catalog` reads it
    assert code == 0, err
    assert totals(orjson.loads(out)) == {"Order Completed": 3, "Viewed": 2}

    again = await start(tmp_path, upstreams, "one")
    try:
        before = await catalog_of(again)
        assert totals(before) == {"Order Completed": 3, "Viewed": 2}
        order = next(e for e in before["sources"]["web"]["events"] if e["name"] == "Order Completed")
        assert order == next(e for e in first["sources"]["web"]["events"] if e["name"] == "Order Completed")  # nothing lost or changed
        await send(again, "b", {"Order Completed": 2, "Signed Up": 1}, price="9.50")
        after = await catalog_of(again)
        assert totals(after) == {"Order Completed": 5, "Viewed": 2, "Signed Up": 1}
        order = next(e for e in after["sources"]["web"]["events"] if e["name"] == "Order Completed")
        assert order["routed"] == {"segment": {"primary": 5}, "rudderstack": {"mirror": 5}}
        assert order["paths"]["properties.price"]["types"] == {"number": 3, "string": 2} and order["paths"]["properties.price"]["mixed"]
        assert order["first_seen"] == next(e for e in first["sources"]["web"]["events"] if e["name"] == "Order Completed")["first_seen"]
    finally:
        assert await again.stop() == 0


async def test_two_workers_write_their_own_files_and_the_supervisor_merges_them(tmp_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    splitter = await start(tmp_path, upstreams, "fleet", "--workers", "2")
    try:
        await send(splitter, "w", {"Order Completed": 12, "Viewed": 8})
        sent = {"Order Completed": 12, "Viewed": 8}

        async def merged() -> bool:
            return totals(await catalog_of(splitter)) == sent

        await eventually(merged, f"the supervisor's /admin/catalog shows {sent}")  # within a snapshot interval (200 ms here)
        document = await catalog_of(splitter)
        processes = {p["process"]: p for p in document["processes"]}
        assert set(processes) <= {"worker-0", "worker-1"} and not any(p["live"] for p in processes.values())
        files = sorted(p.name for p in (tmp_path / "fleet" / "state").glob("catalog*.json"))
        assert files == ["catalog.worker-0.json", "catalog.worker-1.json"]
        per_worker = [totals({"sources": {"web": {"events": orjson.loads((tmp_path / "fleet" / "state" / f).read_bytes())["sources"].get("web", [])}}})
                      for f in files]
        assert sum(t.get("Order Completed", 0) for t in per_worker) == 12  # each counted what it served; the sum is all
        segment, rudder = upstreams
        order = next(e for e in document["sources"]["web"]["events"] if e["name"] == "Order Completed")
        viewed = next(e for e in document["sources"]["web"]["events"] if e["name"] == "Viewed")
        await eventually(lambda: _settled(segment, rudder, 12 * 2 + 8), "every copy delivered")
        assert order["routed"] == {"segment": {"primary": 12}, "rudderstack": {"mirror": 12}}
        names = [r.event["event"] for r in rudder.receiver.events]
        assert viewed["routed"].get("rudderstack", {}).get("primary", 0) == names.count("Viewed")
        assert viewed["routed"].get("segment", {}).get("primary", 0) == [r.event["event"] for r in segment.receiver.events].count("Viewed")
    finally:
        assert await splitter.stop() == 0


async def _settled(segment: RunningReceiver, rudder: RunningReceiver, count: int) -> bool:
    return len(segment.receiver.events) + len(rudder.receiver.events) >= count


async def test_splitter_catalog_merges_replicas_and_the_admin_token_guards_it(tmp_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    first = await start(tmp_path, upstreams, "replica-1", token=TOKEN)
    second = await start(tmp_path, upstreams, "replica-2", token=TOKEN)
    try:
        await send(first, "r1", {"Order Completed": 2, "Viewed": 1})
        await send(second, "r2", {"Order Completed": 3})
        async with aiohttp.ClientSession() as client, client.get(first.admin + "/admin/catalog") as response:
            assert response.status == 401  # the same bearer token as every /admin/* path
        code, out, err = await cli("--from", first.admin, "--from", second.admin, "--json", token=TOKEN)
        assert code == 0, err
        merged = orjson.loads(out)
        assert totals(merged) == {"Order Completed": 5, "Viewed": 1}
        assert len(merged["processes"]) == 2
        code, out, err = await cli("--from", first.admin, "--from", second.admin, token=TOKEN)
        assert code == 0 and "Order Completed" in out and "catalog at" in out
        for text in (out, err):
            assert TOKEN not in text and WRITE_KEY not in text and RUDDER_KEY not in text
        code, out, err = await cli("--from", first.admin)  # no token
        assert code == 2 and "answered 401 (set SPLITTER_ADMIN_TOKEN to the admin token)" in err
    finally:
        assert await first.stop() == 0
        assert await second.stop() == 0
