"""Transforms through the running proxy: RudderStack receives its transformed copy while Segment
receives the event exactly as the client sent it, with the same messageId."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from proxy_harness import DEFAULT_RULES, SERVER_KEY, proxy_stack

SALT = "dev-only-salt"
RUDDER_DESTINATION = 'rudderstack: {kind: rudderstack, url: "${RUDDERSTACK_URL}", timeout: 5, '
# RudderStack hashes e-mails on everything it receives; the `everyone` rule also renames a legacy event.
RULES = DEFAULT_RULES.replace(
    RUDDER_DESTINATION,
    RUDDER_DESTINATION + 'transforms: [{hash_property: {path: context.traits.email, salt: "${PII_SALT:-' + SALT + '}"}}], ',
).replace(
    "    route: {to: [segment, rudderstack]}\n",
    "    route: {to: [segment, rudderstack]}\n"
    '    transforms: {rudderstack: [{rename_event: {from: "Order Done", to: "Order Completed"}}]}\n',
)


def event(i: int, name: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "track", "event": name, "userId": f"user-{i}", "messageId": f"msg-{i}",
        "context": {"traits": {"email": f"user{i}@example.com"}, "library": {"name": "analytics-python"}},
        "properties": {"total": i}, **extra,
    }


async def test_a_transform_applies_to_one_destination_only() -> None:
    assert RULES.count("transforms:") == 2
    sent = [event(0, "Order Done"), event(1, "Mirror Order Done"), event(2, "Clicked")]
    unstamped = {key: value for key, value in event(3, "Order Done").items() if key != "messageId"}
    async with proxy_stack(RULES) as stack:
        status, answer, _ = await stack.post("/v1/batch", {"batch": [*sent, unstamped]}, key=SERVER_KEY)
        assert (status, answer) == (200, {"success": True})
        segment = {r.event["messageId"]: r.event for r in stack.segment.events}
        rudder = {r.event["messageId"]: r.event for r in stack.rudder.events}
    assert sorted(segment) == sorted(rudder)  # the same messageIds on both sides, also the one splitter stamped
    stamped = (set(segment) - {"msg-0", "msg-1", "msg-2"}).pop()
    assert segment[stamped] == {**unstamped, "messageId": stamped}
    assert rudder[stamped]["event"] == "Order Completed"
    for original in sent:
        assert orjson.dumps(segment[original["messageId"]]) == orjson.dumps(original)  # Segment: as sent, byte for byte
    hashed = [hashlib.sha256(f"{SALT}user{i}@example.com".encode()).hexdigest() for i in range(3)]
    assert rudder["msg-0"] == {**sent[0], "event": "Order Completed", "context": {**sent[0]["context"], "traits": {"email": hashed[0]}}}
    # `Mirror *` is the mirrored rule: no rule transforms there (the name stays), the destination's hashing still applies.
    assert rudder["msg-1"] == {**sent[1], "context": {**sent[1]["context"], "traits": {"email": hashed[1]}}}
    assert rudder["msg-2"] == {**sent[2], "context": {**sent[2]["context"], "traits": {"email": hashed[2]}}}


async def test_without_transforms_both_destinations_receive_the_same_event() -> None:
    sent = event(3, "Order Done")
    async with proxy_stack() as stack:
        status, _, _ = await stack.post("/v1/track", sent, key=SERVER_KEY)
        assert status == 200
        assert [r.event for r in stack.segment.events] == [r.event for r in stack.rudder.events] == [sent]

