"""The real Python SDKs, pointed at a real `splitter serve`, deliver to both stand-in upstreams.

`segment-analytics-python` (write key in the body, gzip optional, sync or background consumer) and
`rudder-sdk-python` (HTTP Basic, gzip on by default) are configured exactly as docs/sdk-setup.md
tells users: only their `host` changes. Every call type goes through; each upstream must hold the
very messages the SDK built (same messageId, properties, traits, context, unicode), under that
upstream's own credential, and the SDK must have seen no error.

The SDKs are synchronous (requests + a consumer thread), so they run in a worker thread while the
event loop keeps serving the stand-in receivers.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from loadtest.process import SplitterProcess, launch_splitter
from loadtest.receivers import RunningReceiver, start_receiver
from proxy.engine import EventContext, RuleSet, compile_rules, decide

try:
    from rudderstack import analytics as rudder_analytics
    from segment import analytics as segment_analytics
except ImportError as missing:  # the other client tests import this module's helpers: skip only the Python SDK tests
    segment_analytics = rudder_analytics = None
    MISSING_SDKS = f"segment-analytics-python / rudder-sdk-python are not installed ({missing}); pip install -e '.[test]'"
else:
    MISSING_SDKS = ""
needs_python_sdks = pytest.mark.skipif(bool(MISSING_SDKS), reason=MISSING_SDKS)

CLIENT_KEY = "sdk-client-key-0123"        # what every SDK in these tests is configured with
SEGMENT_KEY = "sdk-segment-cred-0123"     # what splitter presents to Segment
RUDDER_KEY = "sdk-rudder-cred-0123"       # what splitter presents to RudderStack
UNICODE = "Grüße 🚀 — naïve façade 日本語"

RULES = f"""\
version: 1
destinations:
  segment:     {{kind: segment,     url: "${{SEGMENT_URL}}", delivery: {{flush_interval: 0.005}}}}
  rudderstack: {{kind: rudderstack, url: "${{RUDDERSTACK_DATA_PLANE_URL}}", delivery: {{flush_interval: 0.005}}}}
sources:
  - name: backend
    write_keys: ["{CLIENT_KEY}"]
    credentials: {{segment: "{SEGMENT_KEY}", rudderstack: "{RUDDER_KEY}"}}
cohort: {{key: [anonymousId, userId], salt: sdk-clients}}
rules:
  - name: rollout
    route:
      split: {{rudderstack: 50, segment: 50}}
      mirror: [segment]
"""

Upstreams = tuple[RunningReceiver, RunningReceiver]


@pytest.fixture
async def upstreams():  # type: ignore[no-untyped-def]
    segment = await start_receiver("segment", record=True, valid_keys=[SEGMENT_KEY])
    rudder = await start_receiver("rudderstack", record=True, valid_keys=[RUDDER_KEY])
    yield segment, rudder
    await segment.close()
    await rudder.close()


def splitter_env(segment: RunningReceiver, rudder: RunningReceiver) -> dict[str, str]:
    return dict(os.environ, SEGMENT_URL=segment.url, RUDDERSTACK_DATA_PLANE_URL=rudder.url)


async def start_splitter(tmp_path: Path, upstreams: Upstreams, extra: list[str] | None = None) -> tuple[SplitterProcess, RuleSet]:
    segment, rudder = upstreams
    rules_path = tmp_path / "rules.yaml"
    rules_path.write_text(RULES)
    env = splitter_env(segment, rudder)
    args = ["--spool-dir", str(tmp_path / "spool"), "--dead-letter-dir", str(tmp_path / "dead"), "--drain-timeout", "2", *(extra or [])]
    return await launch_splitter(str(rules_path), env, args), compile_rules(RULES, env=env)


def user_routed_to(rules: RuleSet, destination: str, prefix: str) -> str:
    """A userId the rollout split sends to `destination` as primary (found deterministically)."""
    for n in range(1000):
        candidate = f"{prefix}-{n}"
        if decide(rules, {"type": "track", "userId": candidate}, EventContext("backend")).primary == (destination,):
            return candidate
    raise AssertionError(f"no user routed to {destination}")


def expected_destinations(rules: RuleSet, message: dict[str, Any]) -> set[str]:
    decision = decide(rules, message, EventContext("backend"))
    return {*decision.primary, *decision.mirror}


def every_call(client: Any, user: str) -> Iterator[tuple[bool, dict[str, Any]]]:
    """One call of each type, with unicode in properties and traits; yields each call's (ok, message)."""
    context = {"app": {"name": "shop", "version": "5.1.0"}, "locale": "de-DE", "campaign": {"name": UNICODE}}
    yield client.identify(user, traits={"name": UNICODE, "email": f"{user}@example.com", "plan": "pro"}, context=context)
    yield client.track(user, "Order Completed", properties={"title": UNICODE, "revenue": 42.5, "items": [{"sku": "A-1", "qty": 2}]},
                       context=context)
    yield client.page(user, "Docs", "SDK setup", properties={"path": "/docs/sdk", "title": UNICODE}, context=context)
    yield client.screen(user, "Checkout", "Payment", properties={"step": 3, "note": UNICODE}, context=context)
    yield client.group(user, f"org-{user}", traits={"name": UNICODE, "employees": 12}, context=context)
    yield client.alias(f"anon-{user}", user, context=context)


def run_sdk(make_client: Callable[[Callable[..., None]], Any], users: list[str], *, flush: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """Send every call for every user through one client; returns (messages the SDK built, errors it reported)."""
    errors: list[str] = []

    def on_error(error: Exception, batch: Any) -> None:
        errors.append(f"{type(error).__name__}: {error}")

    client = make_client(on_error)
    messages: list[dict[str, Any]] = []
    try:
        for user in users:
            for ok, message in every_call(client, user):
                assert ok, f"the SDK refused to enqueue {message}"
                messages.append(message)
        if flush:
            client.flush()
    finally:
        if flush:
            client.shutdown()  # flush what is queued, stop the consumer thread (sync_mode clients have none)
    return messages, errors


def assert_same_message(received: dict[str, Any], sent: dict[str, Any]) -> None:
    """Every field the SDK built arrives unchanged (splitter may only add fields, e.g. the envelope's sentAt)."""
    for key, value in sent.items():
        assert received.get(key) == value, f"{sent['type']} {sent['messageId']}: {key} changed: {received.get(key)!r} != {value!r}"
    assert "writeKey" not in received


async def wait_for_ids(receiver: RunningReceiver, ids: set[str], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ids <= set(receiver.receiver.message_ids()):
            return
        await asyncio.sleep(0.05)
    missing = ids - set(receiver.receiver.message_ids())
    raise AssertionError(f"{receiver.kind}: {len(missing)} of {len(ids)} events never arrived: {sorted(missing)[:5]}")


async def check_delivery(upstreams: Upstreams, rules: RuleSet, messages: list[dict[str, Any]], others: frozenset[str] = frozenset()) -> None:
    """Each upstream holds exactly the messages the rules route there (plus `others`, sent by other means), intact."""
    segment, rudder = upstreams
    by_destination: dict[str, dict[str, dict[str, Any]]] = {"segment": {}, "rudderstack": {}}
    for message in messages:
        for destination in expected_destinations(rules, message):
            by_destination[destination][message["messageId"]] = message
    # The users were chosen so that both sides get primaries, and the mirror gives Segment everything.
    assert len(by_destination["segment"]) == len(messages)
    assert 0 < len(by_destination["rudderstack"]) < len(messages)
    for receiver, destination, credential in ((segment, "segment", SEGMENT_KEY), (rudder, "rudderstack", RUDDER_KEY)):
        expected = by_destination[destination]
        await wait_for_ids(receiver, set(expected))
        await asyncio.sleep(0.2)  # anything extra (a wrongly routed event) would show up by now
        received = {k: v for k, v in receiver.receiver.by_message_id().items() if k not in others}
        assert set(received) == set(expected), f"{destination}: unexpected events {set(received) - set(expected)}"
        for message_id, copies in received.items():
            for copy in copies:
                assert copy.write_key == credential, f"{destination} got {copy.write_key!r}, not its own credential"
                assert_same_message(copy.event, expected[message_id])
    assert {m["type"] for m in by_destination["rudderstack"].values()} == {"identify", "track", "page", "screen", "group", "alias"}


CLIENTS = {
    # name: (client factory taking on_error and the splitter URL, flush-based?)
    "segment-background-gzip": (
        lambda url, on_error: segment_analytics.Client(CLIENT_KEY, host=url, gzip=True, on_error=on_error, max_retries=1, upload_interval=0.05),
        True),
    "segment-sync-plain": (
        lambda url, on_error: segment_analytics.Client(CLIENT_KEY, host=url, gzip=False, sync_mode=True, max_retries=1),
        False),
    "rudderstack-background-gzip": (
        lambda url, on_error: rudder_analytics.Client(CLIENT_KEY, host=url, on_error=on_error, max_retries=1, upload_interval=0.05),
        True),
    "rudderstack-sync-plain": (
        lambda url, on_error: rudder_analytics.Client(CLIENT_KEY, host=url, gzip=False, sync_mode=True, max_retries=1),
        False),
}


@needs_python_sdks
@pytest.mark.parametrize("name", list(CLIENTS))
async def test_python_sdk_through_splitter(tmp_path: Path, upstreams: Upstreams, name: str) -> None:
    factory, flush = CLIENTS[name]
    splitter, rules = await start_splitter(tmp_path, upstreams)
    try:
        users = [user_routed_to(rules, "rudderstack", f"{name}-r"), user_routed_to(rules, "segment", f"{name}-s")]
        # sync_mode raises on any non-200 answer; the background consumer reports through on_error.
        messages, errors = await asyncio.to_thread(run_sdk, lambda on_error: factory(splitter.ingress, on_error), users, flush=flush)
        assert errors == []
        assert len({m["messageId"] for m in messages}) == len(messages) == 12
        await check_delivery(upstreams, rules, messages)
    finally:
        assert await splitter.stop() == 0


@needs_python_sdks
async def test_python_sdks_share_one_source(tmp_path: Path, upstreams: Upstreams) -> None:
    """Both SDKs at once against one splitter: each message keeps its own SDK's shape (rudder's channel, integrations)."""
    splitter, rules = await start_splitter(tmp_path, upstreams)
    try:
        users = [user_routed_to(rules, "rudderstack", "mixed-r"), user_routed_to(rules, "segment", "mixed-s")]
        runs = await asyncio.gather(*(
            asyncio.to_thread(run_sdk, lambda on_error, f=CLIENTS[n][0]: f(splitter.ingress, on_error), users, flush=True)
            for n in ("segment-background-gzip", "rudderstack-background-gzip")
        ))
        for _, errors in runs:
            assert errors == []
        segment_messages, rudder_messages = runs[0][0], runs[1][0]
        assert all(m["channel"] == "server" and m["integrations"] == {"All": True} for m in rudder_messages)
        assert all("channel" not in m for m in segment_messages)
        await check_delivery(upstreams, rules, segment_messages + rudder_messages)
    finally:
        assert await splitter.stop() == 0
