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



def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"n": value}
    return value


async def test_an_event_a_transform_nests_too_deep_to_encode_is_rejected_never_sent_untransformed() -> None:
    deep_rules = DEFAULT_RULES.replace(
        RUDDER_DESTINATION, RUDDER_DESTINATION + "transforms: [{rename_property: {from: properties.a, to: properties.x.y.z}}], ")
    fits = event(1, "Clicked", properties={"a": nested(240)})
    too_deep = event(2, "Clicked", properties={"a": nested(252)})  # encodable as sent; 254 levels once moved under x.y.z
    async with proxy_stack(deep_rules) as stack:
        body = b'{"batch":[' + orjson.dumps(fits) + b"," + orjson.dumps(too_deep) + b"]}"  # by hand: the envelope adds two levels
        status, answer, _ = await stack.post("/v1/batch", body, key=SERVER_KEY)
        assert status == 200 and answer is not None
        assert [(r["index"], r["code"]) for r in answer["rejected"]] == [(1, "invalid_event")]
        assert "once transformed" in answer["rejected"][0]["message"]
        assert [r.event["messageId"] for r in stack.rudder.events] == ["msg-1"]
        assert [r.event["messageId"] for r in stack.segment.events] == ["msg-1"]  # rejected as a whole: one answer per event


async def test_an_event_nested_deeper_than_can_be_forwarded_is_rejected_not_a_500() -> None:
    deep = orjson.dumps(event(1, "Clicked"))[:-1] + b',"deep":' + b'{"n":' * 300 + b'"leaf"' + b"}" * 300 + b"}"  # JSON allows it; orjson writes 255 levels
    async with proxy_stack() as stack:
        status, answer, _ = await stack.post("/v1/batch", b'{"batch":[' + deep + b"," + orjson.dumps(event(2, "Clicked")) + b"]}", key=SERVER_KEY)
        assert status == 200 and answer is not None
        assert [(r["index"], r["code"]) for r in answer["rejected"]] == [(0, "invalid_event")]
        assert sorted(r.event["messageId"] for r in stack.segment.events) == ["msg-2"]
