"""The delivery ledger of real `splitter serve` processes, with stand-in receivers on loopback:
`splitter parity` merges two replicas (and their files once they stopped); a SIGKILL mid-outage and a
restart keep the ledger consistent, the replayed records attributed to their sources and names;
`--workers 2`'s supervisor merges its workers' files; a spool the previous release wrote is delivered
and counted as (unknown); the admin token guards /admin/ledger; no write key appears anywhere."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
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

WRITE_KEY = "ledger-web-key-0123"
RUDDER_KEY = "ledger-rs-key-0123"
TOKEN = "ledger-admin-token-0123"
SECRETS = (WRITE_KEY, RUDDER_KEY, TOKEN, "fixture-seg-key", "fixture-rs-key")
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode(), "Content-Type": "application/json"}
FIXTURE = Path(__file__).resolve().parent / "data" / "spool-format-2"
TIMEOUT = 30.0  # generous: these wait for processes, retries and snapshots, never measure them
RULES = served_head(WRITE_KEY, RUDDER_KEY, delivery="retry_base: 0.05, retry_max: 0.3, breaker_cooldown: 0.1, flush_interval: 0.005") + """\
cohort: {key: [anonymousId, userId], salt: ledger}
rules:
  - name: mirrored
    when: {type: track, event: ["Order *"]}
    route: {to: [segment], mirror: [rudderstack]}
  - name: everyone
    route: {to: [segment, rudderstack]}
"""


@pytest.fixture
async def upstreams() -> AsyncIterator[tuple[RunningReceiver, RunningReceiver]]:
    segment = await start_receiver("segment", record=True)
    rudder = await start_receiver("rudderstack", record=True, valid_keys=[RUDDER_KEY, "fixture-rs-key"])
    yield segment, rudder
    await segment.close()
    await rudder.close()


def env_for(upstreams: tuple[RunningReceiver, RunningReceiver], **more: str) -> dict[str, str]:
    segment, rudder = upstreams
    return dict(os.environ, SEGMENT_URL=segment.url, RUDDERSTACK_DATA_PLANE_URL=rudder.url, PYTHONUNBUFFERED="1", **more)


async def start(tmp_path: Path, name: str, upstreams: tuple[RunningReceiver, RunningReceiver], *extra: str, **env: str) -> SplitterProcess:
    (tmp_path / "rules.yaml").write_text(RULES)
    home = tmp_path / name
    return await launch_splitter(str(tmp_path / "rules.yaml"), env_for(upstreams, **env),
                                 ["--spool-dir", str(home / "spool"), "--dead-letter-dir", str(home / "dead"), "--state-dir", str(home / "state"),
                                  "--drain-timeout", "2", "--reload-interval", "60", *extra])


def events(prefix: str, count: int) -> list[dict[str, Any]]:
    """Order tracks (mirrored to rudderstack), page calls (to both), identify calls (to both)."""
    made: list[dict[str, Any]] = []
    for i in range(count):
        if i % 3 == 0:
            made.append({"type": "track", "event": "Order Placed", "anonymousId": f"{prefix}-a{i}", "messageId": f"{prefix}-{i}"})
        elif i % 3 == 1:
            made.append({"type": "page", "name": "Checkout", "anonymousId": f"{prefix}-a{i}", "messageId": f"{prefix}-{i}"})
        else:
            made.append({"type": "identify", "userId": f"{prefix}-u{i}", "messageId": f"{prefix}-{i}"})
    return made


async def send(splitter: SplitterProcess, batch: list[dict[str, Any]], per_request: int = 10) -> None:
    """Each request on a fresh connection (so `--workers N` spreads them over its workers)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as client:
        for start_at in range(0, len(batch), per_request):
            body = orjson.dumps({"batch": batch[start_at:start_at + per_request]})
            async with client.post(splitter.ingress + "/v1/batch", data=body, headers=AUTH) as response:
                assert response.status == 200, await response.text()


async def ledger(splitter: SplitterProcess, token: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as client, client.get(splitter.admin + "/admin/ledger", headers=headers) as response:
        assert response.status == 200, await response.text()
        text = await response.text()
    assert not any(secret in text for secret in SECRETS)
    return orjson.loads(text)  # type: ignore[no-any-return]


async def parity(*args: str, token: str | None = None, code: int = 0) -> str:
    env = {k: v for k, v in os.environ.items() if k != "SPLITTER_ADMIN_TOKEN"}
    if token:
        env["SPLITTER_ADMIN_TOKEN"] = token
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "proxy", "parity", *args, env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode == code, err
    text = out.decode() + err.decode()
    assert not any(secret in text for secret in SECRETS)
    return text


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


def by_row(document: dict[str, Any]) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    return {(r["source"], r["event"], r["destination"], r["role"]): r for r in document["rows"]}


def totals(document: dict[str, Any], column: str) -> dict[str, int]:
    found: dict[str, int] = {}
    for row in document["rows"]:
        found[row["destination"]] = found.get(row["destination"], 0) + row[column]
    return found


def consistent(document: dict[str, Any]) -> None:
    for row in document["rows"]:
        assert row["accepted"] == row["delivered"] + row["dead_lettered"] + row["unrecorded"] + row["pending"], row


async def test_parity_merges_two_replicas_behind_the_admin_token_and_their_files_once_stopped(tmp_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    segment, rudder = upstreams
    one = await start(tmp_path, "one", upstreams, SPLITTER_ADMIN_TOKEN=TOKEN)
    two = await start(tmp_path, "two", upstreams, SPLITTER_ADMIN_TOKEN=TOKEN)
    try:
        await send(one, events("one", 30))
        await send(two, events("two", 12))

        async def delivered() -> bool:
            return len(segment.receiver.message_ids()) == 42 and len(rudder.receiver.message_ids()) == 42  # every event goes to both

        await eventually(delivered, "every event at both receivers")
        async with aiohttp.ClientSession() as client, client.get(one.admin + "/admin/ledger") as response:
            assert response.status == 401  # like every /admin/* path
        refused = await parity("--from", one.admin, code=2)
        assert "the admin port answered 401 (set SPLITTER_ADMIN_TOKEN to the admin token)" in refused

        async def settled() -> bool:
            documents = [await ledger(s, TOKEN) for s in (one, two)]
            return all(sum(r["pending"] for r in d["rows"]) == 0 for d in documents)

        await eventually(settled, "nothing pending on either replica")
        merged = orjson.loads(await parity("--from", one.admin, "--from", two.admin, "--json", token=TOKEN))
        assert [p["live"] for p in merged["processes"]] == [True, True] and merged["from"] == [one.admin, two.admin]
        assert totals(merged, "delivered") == {"segment": 42, "rudderstack": 42}
        rows = by_row(merged)
        assert rows["web", "Order Placed", "segment", "primary"]["delivered"] == 10 + 4
        assert rows["web", "Order Placed", "rudderstack", "mirror"]["delivered"] == 14
        assert rows["web", "identify", "rudderstack", "primary"]["accepted"] == 10 + 4
        [order] = [r for r in merged["fanout"]["rows"] if r["event"] == "Order Placed"]
        assert (order["fanned_out"], order["reached_all"]) == (14, 14)
        consistent(merged)
        table = await parity("--from", one.admin, "--from", two.admin, token=TOKEN)
        assert f"delivery ledger of {one.admin}, {two.admin} (2 processes" in table
        csv = (await parity("--from", one.admin, "--from", two.admin, "--csv", token=TOKEN)).splitlines()
        assert "web,track,Order Placed,rudderstack,mirror,14,14,0,0,0,0,0,0,0,0,14,14,0,0,14,14,0,0" in csv
    finally:
        assert await one.stop() == 0
        assert await two.stop() == 0
    files = orjson.loads(await parity("--snapshot", str(tmp_path / "one" / "state"), "--snapshot", str(tmp_path / "two" / "state" / "ledger.json"), "--json"))
    assert totals(files, "delivered") == {"segment": 42, "rudderstack": 42}
    assert [p["clean_stop"] for p in files["processes"]] == [True, True]
    assert files["rows"] == merged["rows"] and files["fanout"]["rows"] == merged["fanout"]["rows"]


async def test_a_sigkill_mid_outage_and_a_restart_keep_the_ledger_consistent_and_attributed(tmp_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    segment, rudder = upstreams
    splitter = await start(tmp_path, "node", upstreams)
    state = tmp_path / "node" / "state" / "ledger.json"
    try:
        await send(splitter, events("before", 15))

        async def snapshotted() -> bool:  # the snapshot holds the first traffic, delivered
            data = orjson.loads(state.read_bytes()) if state.exists() else {}
            return sum(row[6] for row in data.get("rows", [])) == 15 + 15

        await eventually(snapshotted, "a snapshot with the first traffic delivered")
        segment.receiver.faults.down = rudder.receiver.faults.down = True
        await send(splitter, events("during", 21))  # accepted (spooled), not delivered: both are down
        during = await ledger(splitter)
        assert totals(during, "pending") == {"segment": 21, "rudderstack": 21}
        splitter.signal(signal.SIGKILL)
        await splitter.process.wait()
    finally:
        await splitter.stop()
    segment.receiver.faults.down = rudder.receiver.faults.down = False
    again = await start(tmp_path, "node", upstreams)
    try:
        async def drained() -> bool:
            return sum(r["pending"] for r in (await ledger(again))["rows"]) == 0

        await eventually(drained, "the replayed spool delivered")
        after = await ledger(again)
    finally:
        assert await again.stop() == 0
    assert sorted(m for m in segment.receiver.message_ids() if m.startswith("during")) == sorted(f"during-{i}" for i in range(21))
    # What each receiver got, replays included: records delivered before the kill whose ack had not
    # reached the disk are sent again after it (at least once; warehouses drop them by messageId).
    received = {"segment": segment.receiver.message_ids(), "rudderstack": rudder.receiver.message_ids()}
    assert {name: len(set(ids)) for name, ids in received.items()} == {"segment": 36, "rudderstack": 36}  # every event
    assert totals(after, "accepted") == totals(after, "delivered") == {name: len(ids) for name, ids in received.items()}
    assert totals(after, "unrecorded") == {"segment": 0, "rudderstack": 0}
    rows = by_row(after)
    replayed = {name: len(ids) - len(set(ids)) for name, ids in received.items()}
    assert 5 + 7 <= rows["web", "Order Placed", "rudderstack", "mirror"]["delivered"] <= 5 + 7 + replayed["rudderstack"]  # under their own names
    assert 5 + 7 <= rows["web", "identify", "segment", "primary"]["delivered"] <= 5 + 7 + replayed["segment"]
    assert not any(r["source"] == "(unknown)" for r in after["rows"])
    consistent(after)
    [process] = after["processes"]
    assert (process["restarts"], process["unclean_restarts"]) == (1, 1)
    for row in after["fanout"]["rows"]:  # tracked as far as the snapshot saw them, all reached both sides
        assert row["reached_all"] == row["fanned_out"] and row["unresolved"] == row["in_flight_some"] == row["in_flight_none"] == 0
    recovered = sorted(r["pending"] for r in again.events("spool_recovered"))  # segment's and rudderstack's, replays included
    assert recovered == sorted([21 + replayed["segment"], 21 + replayed["rudderstack"]])


async def test_the_supervisor_of_two_workers_merges_their_ledger_files(tmp_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    segment, rudder = upstreams
    splitter = await start(tmp_path, "fleet", upstreams, "--workers", "2")
    try:
        await send(splitter, events("fleet", 60), per_request=3)

        async def merged() -> bool:
            document = await ledger(splitter)
            return totals(document, "delivered") == {"segment": 60, "rudderstack": 60}

        await eventually(merged, "both workers' files merged with everything delivered")
        document = await ledger(splitter)
        assert (len(segment.receiver.message_ids()), len(rudder.receiver.message_ids())) == (60, 60)  # what the ledger says they got
        names = sorted(p["name"] for p in document["processes"])
        assert names == ["worker-0", "worker-1"] and not any(p["live"] for p in document["processes"])
        assert all(p["age_seconds"] < 30 for p in document["processes"])
        consistent(document)
        files = sorted(p.name for p in (tmp_path / "fleet" / "state").glob("ledger*.json"))
        assert files == ["ledger.worker-0.json", "ledger.worker-1.json"]
        table = await parity("--from", splitter.admin)
        assert "(2 processes" in table
    finally:
        assert await splitter.stop() == 0


async def test_a_spool_left_by_the_previous_release_is_delivered_and_counted_unknown(tmp_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    segment, rudder = upstreams
    shutil.copytree(FIXTURE, tmp_path / "old" / "spool")
    splitter = await start(tmp_path, "old", upstreams)
    try:
        async def delivered() -> bool:
            return len(segment.receiver.message_ids()) == 5 and len(rudder.receiver.message_ids()) == 2

        await eventually(delivered, "the old spool delivered")
        await send(splitter, events("new", 3))

        async def settled() -> bool:
            return sum(r["pending"] for r in (await ledger(splitter))["rows"]) == 0 and len(segment.receiver.message_ids()) == 8

        await eventually(settled, "everything delivered")
        rows = by_row(await ledger(splitter))
    finally:
        assert await splitter.stop() == 0
    unknown = "(unknown)"
    assert (rows[unknown, unknown, "segment", unknown]["delivered"], rows[unknown, unknown, "rudderstack", unknown]["delivered"]) == (5, 2)
    assert rows["web", "Order Placed", "segment", "primary"]["delivered"] == 1
    table = await parity("--snapshot", str(tmp_path / "old" / "state"))
    assert "(unknown)" in table
