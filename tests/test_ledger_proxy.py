"""The delivery ledger through a running proxy (in process, real stand-in receivers on loopback):
after mixed traffic from two sources, a mirror rule, one destination down (then back) and the other
answering 400 to a poison event, `/admin/ledger` and `splitter parity` say exactly what happened:
what each receiver got, what the dead-letter files hold, what is still pending, whether mirrored
events reached both sides; and no write key appears in any of it."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from proxy_harness import CREDENTIALS, DEFAULT_RULES, SERVER_KEY, WEB_KEY, Stack, proxy_stack, with_delivery

SECRETS = (WEB_KEY, SERVER_KEY, *(key for keys in CREDENTIALS.values() for key in keys.values()))


def traffic(prefix: str, count: int) -> list[dict[str, Any]]:
    """Mirrored tracks (segment primary, rudderstack mirror), split tracks, and page and identify calls (both primaries)."""
    events: list[dict[str, Any]] = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            events.append({"type": "track", "event": "Mirror Checkout", "anonymousId": f"{prefix}-a{i}", "messageId": f"{prefix}-{i}"})
        elif kind == 1:
            events.append({"type": "track", "event": "Split Click", "anonymousId": f"{prefix}-a{i}", "messageId": f"{prefix}-{i}"})
        elif kind == 2:
            events.append({"type": "page", "name": "Pricing", "anonymousId": f"{prefix}-a{i}", "messageId": f"{prefix}-{i}"})
        else:
            events.append({"type": "identify", "userId": f"{prefix}-u{i}", "messageId": f"{prefix}-{i}"})
    return events


async def ledger(stack: Stack, query: str = "") -> dict[str, Any]:
    async with stack.session.get(stack.admin_url + "/admin/ledger" + query) as response:
        assert response.status == 200
        text = await response.text()
    assert not any(secret in text for secret in SECRETS)
    return orjson.loads(text)  # type: ignore[no-any-return]


def rows(document: dict[str, Any]) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    return {(r["source"], r["event"], r["destination"], r["role"]): r for r in document["rows"]}


async def parity(stack: Stack, *args: str) -> str:
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "proxy", "parity", "--from", stack.admin_url, *args,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode == 0, err
    text = out.decode()
    assert not any(secret in text or secret in err.decode() for secret in SECRETS)
    return text


async def wait_until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_the_ledger_says_exactly_what_each_destination_got_through_an_outage_and_a_poison_event() -> None:
    async with proxy_stack() as stack:
        web, server = traffic("w", 40), traffic("s", 20)
        poison = "w-8"  # a mirrored track: segment refuses it, rudderstack takes its mirror copy
        stack.segment.faults.reject_message_ids = {poison}
        stack.rudder.faults.down = True
        for batch in (web[:25], web[25:]):
            status, _, _ = await stack.post("/v1/batch", {"batch": batch}, settle=False)
            assert status == 200
        status, _, _ = await stack.post("/v1/batch", {"batch": server}, key=SERVER_KEY, settle=False)
        assert status == 200

        async def segment_settled() -> bool:
            return stack.metric("splitter_spool_records", destination="segment") == 0

        await wait_until(segment_settled)
        during = await ledger(stack)
        routed = {r["destination"]: 0 for r in during["rows"]}
        for row in during["rows"]:
            routed[row["destination"]] += row["accepted"]
        rudder_rows = [r for r in during["rows"] if r["destination"] == "rudderstack"]
        assert sum(r["pending"] for r in rudder_rows) == sum(r["accepted"] for r in rudder_rows) > 0  # all of it waits in the spool
        assert sum(r["delivered"] for r in rudder_rows) == 0
        fan_during = {r["source"] + "/" + r["event"]: r for r in during["fanout"]["rows"]}
        assert fan_during["web/Mirror Checkout"]["in_flight_some"] + fan_during["web/Mirror Checkout"]["reached_some"] == 10  # segment's copies went

        stack.rudder.faults.down = False
        await stack.settle(timeout=10)

        async def nothing_pending() -> bool:
            return all(r["pending"] == 0 for r in (await ledger(stack))["rows"])

        await wait_until(nothing_pending)
        after = await ledger(stack)
        found = rows(after)

        # Per destination, what the receiver holds and what the dead-letter file holds, by source and name.
        dead_file = Path(stack.proxy.settings.dead_letter_dir) / "segment.ndjson"
        dead = [orjson.loads(line) for line in dead_file.read_bytes().splitlines()]
        assert [(d["event"]["messageId"], d["reason"], d["status"]) for d in dead] == [(poison, "rejected", 400)]
        for destination, receiver in (("segment", stack.segment), ("rudderstack", stack.rudder)):
            got = Counter((r.write_key, _name(r.event)) for r in receiver.events)
            source_of = {CREDENTIALS["web"][destination]: "web", CREDENTIALS["server"][destination]: "server"}
            counted = Counter()
            for (source, event, row_destination, _), row in found.items():
                if row_destination == destination:
                    counted[source, event] += row["delivered"]
            assert counted == Counter({(source_of[key], name): n for (key, name), n in got.items()}), destination
            assert sum(r["accepted"] for r in after["rows"] if r["destination"] == destination) == routed[destination]
        poisoned = found["web", "Mirror Checkout", "segment", "primary"]
        assert (poisoned["accepted"], poisoned["delivered"], poisoned["dead_lettered"], poisoned["reasons"]) == (10, 9, 1, {"rejected": 1})
        mirror = found["web", "Mirror Checkout", "rudderstack", "mirror"]
        assert (mirror["accepted"], mirror["delivered"], mirror["pending"]) == (10, 10, 0)
        for row in after["rows"]:
            assert row["accepted"] == row["delivered"] + row["dead_lettered"] + row["pending"] + row["unrecorded"]
            assert row["last_hour"]["accepted"] == row["accepted"] and row["last_24h"]["delivered"] == row["delivered"]

        # Events sent to both sides: every one reached both, but the poison (only some: rudderstack's copy).
        fan = {(r["source"], r["event"]): r for r in after["fanout"]["rows"]}
        assert (fan["web", "Mirror Checkout"]["fanned_out"], fan["web", "Mirror Checkout"]["reached_all"], fan["web", "Mirror Checkout"]["reached_some"]) == (10, 9, 1)
        assert (fan["web", "Pricing"]["fanned_out"], fan["web", "Pricing"]["reached_all"]) == (10, 10)
        assert (fan["server", "identify"]["fanned_out"], fan["server", "identify"]["reached_all"]) == (5, 5)
        assert ("web", "Split Click") not in fan  # a split sends each event to one side only
        assert all(r["in_flight_some"] == r["in_flight_none"] == r["untracked"] == 0 for r in fan.values())

        # The same numbers as the per-destination metrics (which have no event names).
        for destination in ("segment", "rudderstack"):
            assert stack.metric("splitter_events_delivered_total", destination=destination) == sum(
                r["delivered"] for r in after["rows"] if r["destination"] == destination)
            assert stack.metric("splitter_events_dead_lettered_total", destination=destination) == sum(
                r["dead_lettered"] for r in after["rows"] if r["destination"] == destination)

        table = [re.split(r"\s{2,}", line.strip()) for line in (await parity(stack)).splitlines()]
        assert ["web", "track", "Mirror Checkout", "segment", "primary", "10", "9", "1 (rejected 1)", "0", "0"] in table
        assert ["total", "segment", "primary", str(routed["segment"]), str(routed["segment"] - 1), "1 (rejected 1)", "0", "0"] in table
        assert ["web", "track", "Mirror Checkout", "10", "9", "1", "0", "0", "0", "0", "0"] in table  # the fan-out section
        csv = (await parity(stack, "--csv")).splitlines()
        assert csv[0].startswith("source,type,event,destination,role,accepted,delivered,dead_lettered,dead_rejected,")
        assert "web,track,Mirror Checkout,segment,primary,10,9,1,1,0,0,0,0,0,0,10,9,1,0,10,9,1,0" in csv
        assert len(csv) == 1 + len(after["rows"])
        consistency = (await parity(stack, "--csv", "--consistency")).splitlines()
        assert "web,track,Mirror Checkout,10,9,1,0,0,0,0,0" in consistency
        as_json = orjson.loads(await parity(stack, "--json"))
        assert as_json["rows"] == after["rows"] and as_json["from"] == [stack.admin_url]
        hourly = await ledger(stack, "?hourly=1")
        assert all(sum(b["accepted"] for b in row["hourly"].values()) == row["accepted"] for row in hourly["rows"])


def _name(event: dict[str, Any]) -> str:
    field = {"track": "event", "page": "name", "screen": "name"}.get(event["type"])
    return event.get(field, event["type"]) if field else event["type"]


async def test_mirror_copies_dropped_at_a_full_spool_are_counted_dropped_and_those_events_reached_only_some() -> None:
    """rudderstack's spool at its quota: its mirror copies are not kept (the client still gets 200)."""
    async with proxy_stack(with_delivery("rudderstack", "spool_quota_mb: 0.001")) as stack:
        mirrored = [{"type": "track", "event": "Mirror Order", "anonymousId": f"a{i}", "messageId": f"m{i}", "properties": {"pad": "x" * 2000}}
                    for i in range(4)]
        status, _, _ = await stack.post("/v1/batch", {"batch": mirrored})
        assert status == 200
        document = await ledger(stack)
        found = rows(document)
        assert (found["web", "Mirror Order", "segment", "primary"]["delivered"], found["web", "Mirror Order", "rudderstack", "mirror"]["dropped"]) == (4, 4)
        assert found["web", "Mirror Order", "rudderstack", "mirror"]["accepted"] == 0
        assert stack.metric("splitter_events_dropped_total", destination="rudderstack", reason="spool_full") == 4
        [fan] = document["fanout"]["rows"]
        assert (fan["fanned_out"], fan["reached_all"], fan["reached_some"]) == (4, 0, 4)
        assert len(stack.rudder.events) == 0


async def test_with_de_duplication_only_what_was_spooled_is_accepted() -> None:
    """A request whose events a destination already has: the filter's copies are counted from their events."""
    async with proxy_stack(DEFAULT_RULES + "dedup: {window: 1h}\n") as stack:
        first = traffic("d", 8)
        assert (await stack.post("/v1/batch", {"batch": first}))[0] == 200
        assert (await stack.post("/v1/batch", {"batch": first[:4] + traffic("e", 4)}))[0] == 200  # 4 repeats, 4 new
        document = await ledger(stack)
        accepted = {d: sum(r["accepted"] for r in document["rows"] if r["destination"] == d) for d in ("segment", "rudderstack")}
        assert accepted == {"segment": len(stack.segment.message_ids()), "rudderstack": len(stack.rudder.message_ids())}
        assert len(set(stack.segment.message_ids())) == len(stack.segment.message_ids())  # no duplicate reached it
        assert all(r["pending"] == 0 and r["delivered"] == r["accepted"] for r in document["rows"])
        assert sum(r["fanned_out"] for r in document["fanout"]["rows"]) == sum(r["reached_all"] for r in document["fanout"]["rows"]) > 0
