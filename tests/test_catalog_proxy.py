"""The event catalog through a running proxy (in process, real loopback sockets, stand-in receivers):
mixed traffic from two sources, with a property whose type changes, a mirror rule, a split, more
names than the cap and a rejected event, then `/admin/catalog` and `splitter catalog` (table, --json,
--csv, --plan) say exactly what was sent and what the receivers got; no write key and no masked
value appears in any of them."""

from __future__ import annotations

import asyncio
import csv
import io
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.proxy_harness import CREDENTIALS, DEFAULT_RULES, SERVER_KEY, WEB_KEY, Stack, proxy_stack

SECRET_VALUE = "ada.lovelace@example.com"  # a property value: masked in the payload samples, so never shown
CATALOG = """\
catalog:
  max_events: 6
  payload_samples: true
  unmasked_paths: [properties.plan]
"""
PLAN = """\
allow_unplanned_events: false
events:
  Mirror Checkout:
    required: [price, plan]
    properties:
      price: {type: number}
      plan: {type: string}
  Signed Up: {}
identify:
  traits:
    email: {type: string}
"""
EVERY_KEY = (WEB_KEY, SERVER_KEY, *(key for keys in CREDENTIALS.values() for key in keys.values()))


def track(name: str, i: int, **properties: Any) -> dict[str, Any]:
    return {"type": "track", "event": name, "anonymousId": f"anon-{name}-{i}", "messageId": f"{name}-{i}", "properties": properties}


async def send_traffic(stack: Stack) -> None:
    """What the tests below expect, request by request (each single call is sampled: its name's first in the request)."""
    for i, price in enumerate([10.5, 12, "10.50", 7.25]):  # `price` is a string once
        status, _, _ = await stack.post("/v1/track", track("Mirror Checkout", i, price=price, plan="team", email=SECRET_VALUE))
        assert status == 200
    batch = [track("Split Signup", i, plan="free") for i in range(6)]
    batch += [{"type": "page", "name": "Home", "anonymousId": f"p{i}", "properties": {"path": "/"}} for i in range(3)]
    batch += [{"type": "identify", "userId": f"u{i}", "traits": {"email": SECRET_VALUE}} for i in range(2)]
    batch.append({"type": "track", "event": "No Identity"})  # rejected: neither userId nor anonymousId, so never counted
    status, body, _ = await stack.post("/v1/batch", {"batch": batch})
    assert status == 200 and [r["code"] for r in body["rejected"]] == ["no_user_anon_id"]
    for i in range(4):  # names 5 and 6 take the last places under max_events: 6; 7 and 8 are counted under (other)
        assert (await stack.post("/v1/track", track(f"Extra {i + 1}", i)))[0] == 200
    for i in range(2):
        assert (await stack.post("/v1/track", track("Mirror Checkout", 10 + i, price=1.5), key=SERVER_KEY))[0] == 200
    assert (await stack.post("/v1/track", track("Server Job", 0), key=SERVER_KEY))[0] == 200


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    async with proxy_stack(DEFAULT_RULES + CATALOG) as running:
        await send_traffic(running)
        yield running


async def admin_catalog(stack: Stack, query: str = "") -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as client, client.get(stack.admin_url + "/admin/catalog" + query) as response:
        return response.status, await response.read()


def by_name(document: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    return {event["name"]: event for event in document["sources"][source]["events"]}


def received(stack: Stack) -> Counter[tuple[str, str, str]]:
    """(destination, the source's credential there, event name) -> events the receivers got."""
    found: Counter[tuple[str, str, str]] = Counter()
    for destination, receiver in (("segment", stack.segment), ("rudderstack", stack.rudder)):
        for record in receiver.events:
            name = record.event.get("event") or record.event.get("name") or record.event["type"]
            found[destination, record.write_key, name] += 1
    return found


def assert_nothing_secret(text: str) -> None:
    assert SECRET_VALUE not in text
    for key in EVERY_KEY:
        assert key not in text, key


async def test_the_admin_catalog_says_exactly_what_was_sent_and_what_the_receivers_got(stack: Stack) -> None:
    status, raw = await admin_catalog(stack)
    assert status == 200
    document = orjson.loads(raw)
    web, server = by_name(document, "web"), by_name(document, "server")
    assert {name: e["total"] for name, e in web.items()} == {
        "Mirror Checkout": 4, "Split Signup": 6, "Home": 3, "identify": 2, "Extra 1": 1, "Extra 2": 1, "(other)": 2}
    assert {name: e["total"] for name, e in server.items()} == {"Mirror Checkout": 2, "Server Job": 1}
    assert {name: e["type"] for name, e in web.items()} == {
        "Mirror Checkout": "track", "Split Signup": "track", "Home": "page", "identify": "identify", "Extra 1": "track", "Extra 2": "track",
        "(other)": "(other)"}
    assert all(e["last_hour"] == e["total"] == e["last_24h"] and e["first_seen"] <= e["last_seen"] for e in [*web.values(), *server.values()])
    # Routes: per destination and role, as decided; and the receivers got exactly that many of each name with the source's credential.
    assert web["Mirror Checkout"]["routed"] == {"segment": {"primary": 4}, "rudderstack": {"mirror": 4}}
    assert web["Home"]["routed"] == {"segment": {"primary": 3}, "rudderstack": {"primary": 3}}
    split = web["Split Signup"]["routed"]
    assert sum(roles["primary"] for roles in split.values()) == 6 and set(split) <= {"segment", "rudderstack"}
    got = received(stack)
    for source, events in (("web", web), ("server", server)):
        for name, event in events.items():
            if name == "(other)":
                continue
            for destination, roles in event["routed"].items():
                assert got[destination, CREDENTIALS[source][destination], name] == sum(roles.values()), (source, name, destination)
    assert got["segment", CREDENTIALS["web"]["segment"], "Extra 3"] + got["segment", CREDENTIALS["web"]["segment"], "Extra 4"] == 2  # (other)'s


async def test_a_type_change_is_visible_and_samples_are_masked(stack: Stack) -> None:
    document = orjson.loads((await admin_catalog(stack))[1])
    checkout = by_name(document, "web")["Mirror Checkout"]
    assert checkout["sampled"] == 4
    assert checkout["paths"]["properties.price"] == {"seen": 4, "types": {"number": 2, "integer": 1, "string": 1}, "mixed": True}
    assert checkout["paths"]["properties.email"] == {"seen": 4, "types": {"string": 4}, "mixed": False}
    assert checkout["sample"]["properties"] == {"price": 7.25, "plan": "team", "email": "****"}  # plan is allowed unmasked; numbers are kept
    assert checkout["sample"]["anonymousId"] == "****" and checkout["sample"]["event"] == "Mirror Checkout"
    assert by_name(document, "web")["identify"]["paths"] == {"traits.email": {"seen": 1, "types": {"string": 1}, "mixed": False}}
    assert by_name(document, "web")["(other)"]["paths"] == {}
    assert_nothing_secret(raw_text := (await admin_catalog(stack))[1].decode())
    assert "No Identity" not in raw_text


async def test_source_filter(stack: Stack) -> None:
    document = orjson.loads((await admin_catalog(stack, "?source=server"))[1])
    assert list(document["sources"]) == ["server"]
    assert orjson.loads((await admin_catalog(stack, "?source=nobody"))[1])["sources"] == {}


async def run_cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "proxy", "catalog", *args,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()


def cells(line: str) -> list[str]:
    return [cell for cell in line.split("  ") if cell.strip()]


async def test_splitter_catalog_table_json_and_csv(stack: Stack) -> None:
    code, out, err = await run_cli("--from", stack.admin_url)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("catalog at ") and "1 process: main live" in lines[0]
    rows = {(c[0].strip(), c[2].strip()): [x.strip() for x in c] for c in map(cells, lines) if len(c) >= 8}
    assert rows["web", "Mirror Checkout"][:6] == ["web", "track", "Mirror Checkout", "4", "4", "4"]
    assert rows["web", "Mirror Checkout"][-1] == "segment 4, rudderstack (mirror) 4"
    assert rows["web", "(other)"][3] == "2" and rows["server", "Server Job"][3] == "1"
    assert any("properties.price" in line and "number 2, integer 1, string 1  (mixed types)" in line and "4 of 4 sampled" in line for line in lines)
    assert_nothing_secret(out)

    code, out, _ = await run_cli("--from", stack.admin_url, "--json", "--source", "web")
    as_json = orjson.loads(out)
    direct = orjson.loads((await admin_catalog(stack, "?source=web"))[1])
    assert as_json["sources"] == direct["sources"]
    assert_nothing_secret(out)

    code, out, _ = await run_cli("--from", stack.admin_url, "--csv")
    sheet = list(csv.DictReader(io.StringIO(out)))
    price = next(r for r in sheet if r["source"] == "web" and r["event"] == "Mirror Checkout" and r["path"] == "properties.price")
    assert (price["total"], price["types"], price["seen_in"], price["mixed"], price["sampled"]) == ("4", "number 2, integer 1, string 1", "4", "yes", "4")
    assert price["routed"] == "segment 4, rudderstack (mirror) 4"
    assert {(r["source"], r["event"], r["total"]) for r in sheet if r["path"] == ""} >= {("web", "Extra 1", "1"), ("web", "(other)", "2")}
    assert sum(int(r["total"]) for r in sheet if r["source"] == "server" and r["path"] in ("", "properties.price")) == 3
    assert_nothing_secret(out)


async def test_splitter_catalog_against_a_plan(stack: Stack, tmp_path: Path) -> None:
    plan = tmp_path / "web-plan.yaml"
    plan.write_text(PLAN)
    code, out, err = await run_cli("--from", stack.admin_url, "--source", "web", "--plan", str(plan))
    assert code == 0, err
    section = out[out.index("PLAN web"):].splitlines()
    assert section == [
        f"PLAN web ({plan})",
        "  not in the plan: Split Signup (6 events)",
        "  not in the plan: Extra 1 (1 event)",
        "  not in the plan: Extra 2 (1 event)",
        "  planned, never seen: Signed Up",
        "  type breaks the plan: Mirror Checkout properties.price is string 1 of 4 sampled (plan: number)",
    ]
    code, out, _ = await run_cli("--from", stack.admin_url, "--source", "web", "--plan", str(plan), "--json")
    found = orjson.loads(out)["plan"]["web"]
    assert found["never_seen"] == ["Signed Up"] and found["missing_required"] == []
    assert found["type_breaks"] == [{"event": "Mirror Checkout", "path": "properties.price", "expected": ["number"], "observed": {"string": 1}, "sampled": 4}]
    code, out, _ = await run_cli("--from", stack.admin_url, "--source", "web", "--plan", str(plan), "--csv")
    sheet = list(csv.DictReader(io.StringIO(out)))
    price = next(r for r in sheet if r["event"] == "Mirror Checkout" and r["path"] == "properties.price")
    assert (price["plan"], price["plan_detail"]) == ("planned", "type breaks the plan (plan: number)")
    assert next(r for r in sheet if r["event"] == "Split Signup")["plan"] == "not planned"
    assert next(r for r in sheet if r["event"] == "Home")["plan"] == "not covered"
    assert next(r for r in sheet if r["event"] == "identify")["plan"] == "planned"  # the plan has identify
    assert next(r for r in sheet if r["event"] == "Signed Up")["plan"] == "never seen"


async def test_splitter_catalog_fails_clearly(tmp_path: Path) -> None:
    code, _, err = await run_cli()
    assert code == 2 and "give --from URL" in err
    code, _, err = await run_cli("--from", "http://127.0.0.1:9")
    assert code == 2 and "http://127.0.0.1:9: cannot read /admin/catalog" in err
    (tmp_path / "not.json").write_text("{}")
    code, _, err = await run_cli("--snapshot", str(tmp_path / "not.json"))
    assert code == 2 and "neither a catalog snapshot nor an /admin/catalog answer" in err
