"""The ingress + delivery stack end to end, on real loopback sockets against the stand-in upstreams.

Every check looks at three things: the client's status, its JSON body (`success`, `code`,
`message`), and what each receiver recorded (events, credential, path, headers).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from proxy_harness import CREDENTIALS, SERVER_KEY, WEB_KEY, Stack, basic, proxy_stack, with_delivery

from proxy.engine import EventContext, decide

SEG_WEB, RS_WEB = CREDENTIALS["web"]["segment"], CREDENTIALS["web"]["rudderstack"]
SEG_SERVER, RS_SERVER = CREDENTIALS["server"]["segment"], CREDENTIALS["server"]["rudderstack"]
OK = {"success": True}


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    async with proxy_stack() as running:
        yield running


def assert_error(result: tuple[int, Any, Any], status: int, code: str, *in_message: str) -> str:
    got_status, body, _ = result
    assert got_status == status, result
    assert isinstance(body, dict) and body["success"] is False and body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"], body
    for part in in_message:
        assert part in body["message"], (part, body["message"])
    return body["message"]


def assert_ok(result: tuple[int, Any, Any], body: Any = OK) -> None:
    assert result[0] == 200 and result[1] == body, result


def nothing_delivered(stack: Stack) -> None:
    assert stack.segment.events == [] and stack.rudder.events == []
    assert stack.metric("splitter_upstream_requests_total", destination="segment", code="200") == 0
    assert stack.metric("splitter_upstream_requests_total", destination="rudderstack", code="200") == 0


def events(receiver: Any) -> list[dict[str, Any]]:
    return [r.event for r in receiver.events]


def decoded_basic(header: str) -> str:
    assert header.startswith("Basic ")
    return base64.b64decode(header[6:]).decode()


def track(i: int, name: str = "Clicked", **extra: Any) -> dict[str, Any]:
    return {"type": "track", "event": name, "userId": f"user-{i}", "messageId": f"msg-{i}", "properties": {"i": i}, **extra}


# --------------------------------------------------------------------------------- 1. paths
SINGLE_BODIES = {
    "track": {"event": "Clicked", "properties": {"x": 1}},
    "identify": {"traits": {"plan": "pro"}},
    "page": {"name": "Home"},
    "screen": {"name": "Main"},
    "group": {"groupId": "g-1"},
    "alias": {"previousId": "old-id"},
}


@pytest.mark.parametrize("kind", list(SINGLE_BODIES))
async def test_single_paths_imply_the_type_and_arrive_upstream_as_batch(stack: Stack, kind: str) -> None:
    body = {**SINGLE_BODIES[kind], "userId": "user-1", "messageId": f"m-{kind}"}  # no `type`
    assert_ok(await stack.post(f"/v1/{kind}", body, key=SERVER_KEY))
    expected = {**body, "type": kind}  # server route: nothing else added (messageId present, no context.ip)
    for receiver, credential in ((stack.segment, SEG_SERVER), (stack.rudder, RS_SERVER)):
        assert [(r.event, r.path, r.write_key) for r in receiver.events] == [(expected, "/v1/batch", credential)]


@pytest.mark.parametrize("letter, kind", [("t", "track"), ("i", "identify"), ("p", "page"), ("s", "screen"), ("g", "group"), ("a", "alias")])
async def test_short_paths_take_text_plain_from_analytics_js(stack: Stack, letter: str, kind: str) -> None:
    body = {**SINGLE_BODIES[kind], "anonymousId": "anon-1", "messageId": f"ajs-next-{letter}",
            "context": {"library": {"name": "analytics.js", "version": "1.84.0"}}, "_metadata": {"bundled": ["Segment.io"]}}
    result = await stack.post(f"/v1/{letter}", body, auth="body", content_type="text/plain")
    assert_ok(result)
    expected = {**body, "type": kind, "context": {**body["context"], "ip": "127.0.0.1"}}  # client route: context.ip
    for receiver in (stack.segment, stack.rudder):
        assert [(r.event, r.path) for r in receiver.events] == [(expected, "/v1/batch")]
    assert stack.segment.events[0].write_key == SEG_WEB and stack.rudder.events[0].write_key == RS_WEB


async def test_batch_import_and_b_paths(stack: Stack) -> None:
    batch = [track(0), {"type": "identify", "userId": "user-1", "messageId": "msg-1", "traits": {"a": 1}}]
    assert_ok(await stack.post("/v1/batch", {"batch": batch}, key=SERVER_KEY))
    assert events(stack.segment) == batch and events(stack.rudder) == batch

    imported = [track(2), track(3)]
    assert_ok(await stack.post("/v1/import", {"batch": imported}, gzip=True))  # analytics-android: Basic + gzip
    with_ip = [{**e, "context": {"ip": "127.0.0.1"}} for e in imported]
    assert events(stack.segment)[2:] == with_ip and events(stack.rudder)[2:] == with_ip

    sent_at = "2026-01-02T03:04:05.678Z"
    browser = [track(4), track(5, context={"page": {"path": "/x"}})]
    body = {"writeKey": WEB_KEY, "batch": browser, "sentAt": sent_at}  # analytics.js batching dispatcher
    assert_ok(await stack.post("/v1/b", body, auth=None, content_type="text/plain"))
    expected = [
        {**browser[0], "sentAt": sent_at, "context": {"ip": "127.0.0.1"}},
        {**browser[1], "sentAt": sent_at, "context": {"page": {"path": "/x"}, "ip": "127.0.0.1"}},
    ]
    assert events(stack.segment)[4:] == expected and events(stack.rudder)[4:] == expected
    for receiver in (stack.segment, stack.rudder):
        assert {r.path for r in receiver.events} == {"/v1/batch"} and len(receiver.events) == 6


async def test_telemetry_goes_only_to_segment_v1_m(stack: Stack) -> None:
    body = b'{"series":[{"type":"Counter","metric":"analytics_js.invoke","value":1}]}'
    result = await stack.post("/v1/m", body, auth=None, content_type="text/plain")
    assert_ok(result)
    # The stand-in accepts /v1/m without recording it: the upstream-request metric shows where it went.
    await stack.wait_metric("splitter_upstream_requests_total", 1, destination="segment", code="200")
    await asyncio.gather(*stack.delivery._telemetry)  # nothing else still on its way
    assert stack.metric("splitter_upstream_requests_total", destination="segment", code="200") == 1
    assert stack.metric("splitter_upstream_requests_total", destination="rudderstack", code="200") == 0
    assert stack.segment.events == [] and stack.segment.rejected == 0 and stack.rudder.events == []
    assert stack.metric("splitter_requests_total", path="/v1/m", code="200") == 1


# ---------------------------------------------------------------------------------- 2. auth
@pytest.mark.parametrize(
    "auth, path",
    [("basic", "/v1/track"), ("basic-nocolon", "/v1/track"), ("body", "/v1/track"), ("body", "/v1/batch"),
     ("bearer", "/v1/batch"), ("bearer", "/v1/track"), ("basic", "/v1/batch")],
)
async def test_every_auth_form_and_credentials_per_destination(stack: Stack, auth: str, path: str) -> None:
    if path == "/v1/batch":
        body: dict[str, Any] = {"batch": [track(0, writeKey=WEB_KEY), track(1)]}  # an item may carry one too
    else:
        body = track(0)
    assert_ok(await stack.post(path, body, auth=auth))  # type: ignore[arg-type]
    count = len(body.get("batch", [body]))
    for receiver, credential in ((stack.segment, SEG_WEB), (stack.rudder, RS_WEB)):
        assert len(receiver.events) == count
        for record in receiver.events:
            assert "writeKey" not in record.event
            assert record.write_key == credential
            assert decoded_basic(record.headers["Authorization"]) == f"{credential}:"
    assert events(stack.segment) == [track(0), track(1)][:count]


async def test_auth_failures(stack: Stack) -> None:
    assert_error(await stack.post("/v1/track", track(0), auth=None), 401, "missing_write_key", "write key")
    assert_error(await stack.post("/v1/batch", {"batch": [track(0)]}, auth=None), 401, "missing_write_key")
    assert_error(await stack.post("/v1/track", track(0), key="nope-0123456789"), 401, "invalid_write_key", "unknown write key")
    assert_error(await stack.post("/v1/track", track(0), key="nope-0123456789", auth="basic-nocolon"), 401, "invalid_write_key")
    assert_error(await stack.post("/v1/track", track(0), key="nope-0123456789", auth="body"), 401, "invalid_write_key")
    assert_error(await stack.post("/v1/batch", {"batch": [track(0)]}, key="nope-0123456789", auth="body"), 401, "invalid_write_key")
    assert_error(await stack.post("/v1/batch", {"batch": [track(0)]}, key=None, auth="bearer"), 401, "missing_write_key")
    assert_error(await stack.post("/v1/track", track(0), headers={"Authorization": "Basic !!!"}), 401, "invalid_authorization")
    # an unknown header key loses even with a good key in the body
    bad_header = await stack.post("/v1/track", {**track(0), "writeKey": WEB_KEY}, key="nope-0123456789")
    assert_error(bad_header, 401, "invalid_write_key")
    nothing_delivered(stack)
    assert stack.metric("splitter_requests_total", path="/v1/track", code="401") == 6
    assert stack.metric("splitter_requests_total", path="/v1/batch", code="401") == 3


# ---------------------------------------------------------------------------------- 3. gzip
async def test_gzip_batch_is_delivered(stack: Stack) -> None:
    batch = [track(i) for i in range(50)]
    assert_ok(await stack.post("/v1/batch", {"batch": batch}, gzip=True))
    assert events(stack.segment) == batch and events(stack.rudder) == batch


async def test_gzip_bomb_is_refused_quickly(stack: Stack) -> None:
    bomb = gzip.compress(b"0" * 50_000_000, 9)
    assert len(bomb) < 100_000
    started = time.perf_counter()
    result = await stack.post("/v1/batch", bomb, headers={"Content-Encoding": "gzip"})
    assert time.perf_counter() - started < 1.0
    assert_error(result, 413, "request_too_large", "500 KB")
    nothing_delivered(stack)


async def test_bad_gzip_and_unsupported_encodings(stack: Stack) -> None:
    assert_error(await stack.post("/v1/batch", b"\x1f\x8b\x08\x00not gzip at all", headers={"Content-Encoding": "gzip"}),
                 400, "invalid_gzip", "not valid gzip")
    assert_error(await stack.post("/v1/batch", b'{"batch": []}', headers={"Content-Encoding": "gzip"}), 400, "invalid_gzip")
    truncated = gzip.compress(orjson.dumps({"batch": [track(0)]}))[:-12]
    assert_error(await stack.post("/v1/batch", truncated, headers={"Content-Encoding": "gzip"}), 400, "invalid_gzip")
    for encoding in ("br", "deflate", "zstd"):
        assert_error(await stack.post("/v1/batch", b'{"batch": []}', headers={"Content-Encoding": encoding}),
                     415, "unsupported_encoding", encoding)
    nothing_delivered(stack)


# ------------------------------------------------------------------------ 4. limits, malformed
async def test_request_over_500_kb(stack: Stack) -> None:
    big = orjson.dumps({"batch": [track(i, properties={"pad": "x" * 30_000}) for i in range(18)]})
    assert len(big) > 500 * 1024
    assert_error(await stack.post("/v1/batch", big), 413, "request_too_large", "500 KB")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the cap applies while reading
        for start in range(0, len(big), 64 * 1024):
            yield big[start:start + 64 * 1024]

    async with stack.session.post(stack.url + "/v1/batch", data=chunks(), headers={"Authorization": basic(WEB_KEY)}) as response:
        assert response.status == 413 and (await response.json())["code"] == "request_too_large"
    nothing_delivered(stack)


async def test_too_many_events_and_event_too_large(stack: Stack) -> None:
    assert_error(await stack.post("/v1/batch", {"batch": [{"type": "track"}] * 2501}), 413, "too_many_events", "2501", "2500")
    huge = track(0, properties={"blob": "x" * (33 * 1024)})
    assert_error(await stack.post("/v1/track", huge), 413, "event_too_large", "32 KB")
    nothing_delivered(stack)

    result = await stack.post("/v1/batch", {"batch": [track(1), huge, track(2)]})
    assert result[0] == 200 and result[1]["success"] is True
    [rejected] = result[1]["rejected"]
    assert rejected["index"] == 1 and rejected["code"] == "event_too_large" and "32 KB" in rejected["message"]
    assert events(stack.segment) == [track(1), track(2)] and events(stack.rudder) == [track(1), track(2)]
    assert stack.metric("splitter_events_rejected_total", source="web", code="event_too_large") == 2


async def test_malformed_bodies(stack: Stack) -> None:
    assert_error(await stack.post("/v1/track", b'{"type": "track", '), 400, "invalid_request", "malformed JSON")
    assert_error(await stack.post("/v1/batch", b"[1, 2]"), 400, "invalid_request", "JSON object")
    assert_error(await stack.post("/v1/track", [track(0)]), 400, "invalid_request", "JSON object")
    assert_error(await stack.post("/v1/batch", b""), 400, "invalid_request", "empty")
    assert_error(await stack.post("/v1/batch", {"events": [track(0)]}), 400, "invalid_request", "batch")
    nothing_delivered(stack)


async def test_batch_items_rejected_individually(stack: Stack) -> None:
    batch: list[Any] = [track(0), "not an object", track(2), {"type": "track", "event": "x", "properties": {}},
                        {"userId": "u-4", "event": "no type"}, track(5)]
    result = await stack.post("/v1/batch", {"batch": batch})
    assert result[0] == 200
    assert result[1]["success"] is True
    assert [(r["index"], r["code"]) for r in result[1]["rejected"]] == [(1, "invalid_event"), (3, "no_user_anon_id"), (4, "missing_type")]
    assert all(isinstance(r["message"], str) and r["message"] for r in result[1]["rejected"])
    assert "neither userId nor anonymousId" in result[1]["rejected"][1]["message"]
    assert events(stack.segment) == [track(0), track(2), track(5)] and events(stack.rudder) == [track(0), track(2), track(5)]
    for code in ("invalid_event", "no_user_anon_id", "missing_type"):
        assert stack.metric("splitter_events_rejected_total", source="web", code=code) == 1
    assert stack.metric("splitter_events_total", source="web", type="track", rule="everyone", destination="segment", role="primary") == 3


async def test_single_call_without_identity(stack: Stack) -> None:
    assert_error(await stack.post("/v1/track", {"event": "x", "userId": "  "}), 400, "no_user_anon_id", "neither userId nor anonymousId")
    assert_error(await stack.post("/v1/t", {"event": "x"}, auth="body", content_type="text/plain"), 400, "no_user_anon_id")
    nothing_delivered(stack)
    # single calls count too: analytics.js only sends single calls
    assert stack.metric("splitter_events_rejected_total", source="web", code="no_user_anon_id") == 2

    result = await stack.post("/v1/batch", {"batch": [track(0), {"type": "track", "event": "x", "anonymousId": ""}, track(2)]})
    assert result[0] == 200 and result[1] == {
        "success": True,
        "rejected": [{"index": 1, "code": "no_user_anon_id", "message": "event has neither userId nor anonymousId"}],
    }
    assert events(stack.segment) == [track(0), track(2)] and events(stack.rudder) == [track(0), track(2)]
    assert stack.metric("splitter_events_rejected_total", source="web", code="no_user_anon_id") == 3


async def test_unknown_fields_and_types_forwarded_unchanged(stack: Stack) -> None:
    odd = {"type": "experiment_viewed", "userId": "u-1", "messageId": "m-odd", "weird": {"nested": [1, {"a": None}], "n": 1.5},
           "context": {"custom": True}, "timestamp": "2026-01-01T00:00:00Z"}
    known = track(1, extra_field={"keep": "me"}, integrations={"All": False, "Mixpanel": True})
    assert_ok(await stack.post("/v1/batch", {"batch": [odd, known]}, key=SERVER_KEY))
    assert events(stack.rudder) == [odd, known]
    # Segment drops unknown types itself (answering 200); what it was sent is in `dropped`
    assert events(stack.segment) == [known]
    assert [(d.event, d.reason) for d in stack.segment.dropped] == [(odd, "missing or unknown type")]
    assert stack.metric("splitter_events_total", source="server", type="other", rule="everyone", destination="rudderstack", role="primary") == 1

    # a client call: only messageId (missing) and context.ip are added, writeKey removed
    sent = {"event": "Signed Up", "anonymousId": "a-1", "novel": [1, 2, 3], "context": {"locale": "de-DE"}, "writeKey": WEB_KEY}
    assert_ok(await stack.post("/v1/t", sent, auth=None, content_type="text/plain"))
    got = events(stack.rudder)[-1]
    assert events(stack.segment)[-1] == got
    message_id = got.pop("messageId")
    assert str(uuid.UUID(message_id)) == message_id
    expected = {k: v for k, v in sent.items() if k != "writeKey"} | {"type": "track", "context": {"locale": "de-DE", "ip": "127.0.0.1"}}
    assert got == expected


# ------------------------------------------------------------------------ 5. split, per event
async def test_mixed_batch_lands_where_decide_says(stack: Stack) -> None:
    batch = [{"type": "track", "event": f"Split {i % 7}", "anonymousId": f"anon-{i:04d}", "messageId": f"m-{i}", "properties": {"i": i}}
             for i in range(300)]
    assert_ok(await stack.post("/v1/batch", {"batch": batch}, key=SERVER_KEY))
    expected: dict[str, list[str]] = {"segment": [], "rudderstack": []}
    for event in batch:
        decision = decide(stack.rules, event, EventContext(source="server"))
        assert decision.rule == "split" and len(decision.primary) == 1 and decision.mirror == ()
        expected[decision.primary[0]].append(event["messageId"])
    assert 100 < len(expected["segment"]) < 200  # a real split, not all on one side
    assert stack.segment.message_ids() == expected["segment"]  # each event once, in order
    assert stack.rudder.message_ids() == expected["rudderstack"]
    assert {r.write_key for r in stack.segment.events} == {SEG_SERVER} and {r.write_key for r in stack.rudder.events} == {RS_SERVER}
    for destination, ids in expected.items():
        assert stack.metric("splitter_events_total", source="server", type="track", rule="split", destination=destination, role="primary") == len(ids)


# --------------------------------------------------------------------------------- 6. mirror
async def test_mirror_carries_the_same_message_id(stack: Stack) -> None:
    assert_ok(await stack.post("/v1/track", track(1, "Mirror A")))
    assert_ok(await stack.post("/v1/track", {"event": "Mirror B", "userId": "u-2"}))
    assert_ok(await stack.post("/v1/track", {"event": "Mirror B", "userId": "u-2"}))  # a retry: same content
    await stack.rudder.wait_for(3)
    seg_ids, rs_ids = stack.segment.message_ids(), stack.rudder.message_ids()
    assert seg_ids[0] == "msg-1"
    assert seg_ids[1] == seg_ids[2] and str(uuid.UUID(seg_ids[1])) == seg_ids[1]  # deterministic UUID
    assert sorted(rs_ids) == sorted(seg_ids)  # mirrors may finish out of order
    same = sorted(orjson.dumps(e, option=orjson.OPT_SORT_KEYS) for e in events(stack.segment))
    assert sorted(orjson.dumps(e, option=orjson.OPT_SORT_KEYS) for e in events(stack.rudder)) == same  # byte-identical copies
    assert {r.write_key for r in stack.rudder.events} == {RS_WEB} and {r.write_key for r in stack.segment.events} == {SEG_WEB}
    assert stack.metric("splitter_events_total", source="web", type="track", rule="mirrored", destination="rudderstack", role="mirror") == 3
    assert stack.metric("splitter_events_total", source="web", type="track", rule="mirrored", destination="segment", role="primary") == 3


async def test_generated_message_id_ignores_sent_at(stack: Stack) -> None:
    """A batch retried with a new sentAt (it is the send time) keeps the ids it got the first time."""
    event = {"type": "identify", "userId": "u-9", "traits": {"a": 1}}
    assert_ok(await stack.post("/v1/batch", {"batch": [event], "sentAt": "2026-01-01T00:00:00.000Z"}))
    assert_ok(await stack.post("/v1/batch", {"batch": [event], "sentAt": "2026-01-01T00:00:07.000Z"}))
    first, second = stack.segment.message_ids()
    assert first == second
    assert stack.rudder.message_ids() == [first, second]
    assert [e["sentAt"] for e in events(stack.rudder)] == ["2026-01-01T00:00:00.000Z", "2026-01-01T00:00:07.000Z"]


async def test_hung_mirror_does_not_delay_the_primary() -> None:
    async with proxy_stack() as stack:
        stack.rudder.faults.delay = 30
        for i in range(5):
            started = time.perf_counter()
            assert_ok(await stack.post("/v1/track", track(i, "Mirror slow"), settle=False))
            assert time.perf_counter() - started < 1.5
        await stack.segment.wait_for(5)
        assert stack.segment.message_ids() == [f"msg-{i}" for i in range(5)]
        closing = time.perf_counter()
    assert time.perf_counter() - closing < 5.0  # the drain is cut short, not waited out; the mirror copies stay spooled


# ---------------------------------------------------------------------------- 7. envelope
async def test_batch_envelope_merged_for_rudderstack(stack: Stack) -> None:
    envelope_context = {"library": {"name": "analytics-python", "version": "2.3.4"}, "channel": "server", "locale": "en-US"}
    batch = [
        track(0),
        track(1, context={"locale": "fr-FR", "page": {"path": "/p"}}, integrations={"Amplitude": True}, sentAt="2026-05-05T00:00:00Z"),
    ]
    body = {"batch": batch, "context": envelope_context, "integrations": {"All": False, "Amplitude": False}, "sentAt": "2026-06-06T06:06:06Z"}
    assert_ok(await stack.post("/v1/batch", body, key=SERVER_KEY))
    expected = [
        {**track(0), "context": envelope_context, "integrations": {"All": False, "Amplitude": False}, "sentAt": "2026-06-06T06:06:06Z"},
        {**track(1), "context": {**envelope_context, "locale": "fr-FR", "page": {"path": "/p"}},
         "integrations": {"All": False, "Amplitude": True}, "sentAt": "2026-05-05T00:00:00Z"},
    ]
    assert events(stack.rudder) == expected  # RudderStack reads only batch[]: the merge is splitter's
    assert events(stack.segment) == expected


# ---------------------------------------------------------------------------- 8. client ip
async def test_client_address_from_trusted_proxy(stack: Stack) -> None:
    xff = {"X-Forwarded-For": "203.0.113.7"}
    assert_ok(await stack.post("/v1/t", {"event": "x", "anonymousId": "a"}, auth="body", content_type="text/plain", headers=xff))
    assert_ok(await stack.post("/v1/t", {"event": "y", "anonymousId": "a", "context": {"ip": "198.51.100.1"}}, auth="body", headers=xff))
    assert_ok(await stack.post("/v1/batch", {"batch": [track(0)]}, key=SERVER_KEY, headers=xff))
    assert_ok(await stack.post("/v1/batch", {"batch": [track(1, context={"channel": "browser"})]}, key=SERVER_KEY, headers=xff))
    for receiver in (stack.segment, stack.rudder):
        recs = receiver.events
        assert [r.headers["X-Forwarded-For"] for r in recs] == ["203.0.113.7, 127.0.0.1"] * 4
        assert recs[0].event["context"] == {"ip": "203.0.113.7"}
        assert recs[1].event["context"] == {"ip": "198.51.100.1"}  # the event's own ip is kept
        assert "context" not in recs[2].event  # a server call: no ip invented
        assert recs[3].event["context"] == {"channel": "browser", "ip": "203.0.113.7"}


async def test_client_address_chain_and_untrusted_peer() -> None:
    async with proxy_stack() as stack:
        forged = {"X-Forwarded-For": "6.6.6.6, 203.0.113.7, 127.0.0.2"}  # 127.0.0.2 is a trusted hop
        assert_ok(await stack.post("/v1/t", {"event": "x", "anonymousId": "a"}, auth="body", headers=forged))
        [record] = stack.rudder.events
        assert record.event["context"]["ip"] == "203.0.113.7"
        assert record.headers["X-Forwarded-For"] == "203.0.113.7, 127.0.0.2, 127.0.0.1"
    async with proxy_stack(trusted_proxies=()) as stack:
        assert_ok(await stack.post("/v1/t", {"event": "x", "anonymousId": "a"}, auth="body", headers={"X-Forwarded-For": "203.0.113.7"}))
        for receiver in (stack.segment, stack.rudder):
            [record] = receiver.events
            assert record.event["context"]["ip"] == "127.0.0.1"
            assert record.headers["X-Forwarded-For"] == "127.0.0.1"


# ---------------------------------------------------------------------------------- 9. CORS
async def test_cors_preflight_and_post(stack: Stack) -> None:
    origin = {"Origin": "https://shop.example"}
    status, body, headers = await stack.request(
        "OPTIONS", "/v1/t", headers={**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    )
    assert status == 204 and body is None
    assert headers["Access-Control-Allow-Origin"] == "*"
    allowed = {h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "x-retry-count"} <= allowed
    assert "POST" in headers["Access-Control-Allow-Methods"]
    result = await stack.post("/v1/t", {"event": "x", "anonymousId": "a"}, headers=origin, content_type="text/plain")
    assert_ok(result)
    assert result[2]["Access-Control-Allow-Origin"] == "*"
    # errors carry it too, or the browser cannot read them
    failed = await stack.post("/v1/t", {"event": "x"}, headers=origin)
    assert failed[0] == 400 and failed[2]["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Origin" not in (await stack.post("/v1/t", {"event": "x", "anonymousId": "a"}))[2]


async def test_cors_with_an_origin_list() -> None:
    async with proxy_stack(cors_origins=("https://ok.example",)) as stack:
        good = await stack.request("OPTIONS", "/v1/t", headers={"Origin": "https://ok.example", "Access-Control-Request-Method": "POST"})
        assert good[0] == 204 and good[2]["Access-Control-Allow-Origin"] == "https://ok.example" and good[2]["Vary"] == "Origin"
        bad = await stack.request("OPTIONS", "/v1/t", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert "Access-Control-Allow-Origin" not in bad[2] and "Access-Control-Allow-Headers" not in bad[2]
        posted = await stack.post("/v1/t", {"event": "x", "anonymousId": "a"}, headers={"Origin": "https://evil.example"})
        assert_ok(posted)
        assert "Access-Control-Allow-Origin" not in posted[2]
        posted = await stack.post("/v1/t", {"event": "x", "anonymousId": "a"}, headers={"Origin": "https://ok.example"})
        assert posted[2]["Access-Control-Allow-Origin"] == "https://ok.example"


# ---------------------------------------------------------------------- 10. upstream failures
# The client's answer says its events are safe (spooled); what upstreams do later is splitter's job.
async def test_a_poison_event_is_dead_lettered_and_the_rest_delivered(stack: Stack) -> None:
    stack.segment.faults.reject_message_ids = {"msg-2"}
    assert_ok(await stack.post("/v1/batch", {"batch": [track(i) for i in range(5)]}))
    assert stack.segment.message_ids() == ["msg-0", "msg-1", "msg-3", "msg-4"]
    assert stack.rudder.message_ids() == [f"msg-{i}" for i in range(5)]
    [line] = (stack.delivery.dead_letter_dir / "segment.ndjson").read_text().splitlines()
    letter = orjson.loads(line)
    assert letter["status"] == 400 and letter["destination"] == "segment" and letter["event"]["messageId"] == "msg-2"
    assert letter["response"]  # the upstream's own words are kept
    assert stack.metric("splitter_events_dead_lettered_total", destination="segment") == 1
    assert stack.metric("splitter_events_delivered_total", destination="segment") == 4


async def test_a_refused_credential_dead_letters_the_batch_without_splitting_it(stack: Stack) -> None:
    stack.rudder.faults.status = 401
    assert_ok(await stack.post("/v1/batch", {"batch": [track(i) for i in range(6)]}))
    assert stack.metric("splitter_events_dead_lettered_total", destination="rudderstack") == 6
    assert stack.metric("splitter_upstream_requests_total", destination="rudderstack", code="401") == 1  # one try, no bisecting


@pytest.mark.parametrize("fault", ["down", "500"])
async def test_a_primary_outage_costs_the_client_nothing(stack: Stack, fault: str) -> None:
    if fault == "down":
        stack.rudder.faults.down = True
    else:
        stack.rudder.faults.status = 500
    for i in range(5):
        started = time.perf_counter()
        assert_ok(await stack.post("/v1/track", track(i), settle=False))
        assert time.perf_counter() - started < 1.0
    await stack.wait_metric("splitter_upstream_retries_total", 3, destination="rudderstack")
    assert stack.rudder.events == []
    stack.rudder.faults.down, stack.rudder.faults.status = False, None
    await stack.settle()
    assert sorted(stack.rudder.message_ids()) == [f"msg-{i}" for i in range(5)]
    assert sorted(stack.segment.message_ids()) == [f"msg-{i}" for i in range(5)]
    code = "error" if fault == "down" else "500"
    assert stack.metric("splitter_upstream_requests_total", destination="rudderstack", code=code) >= 3


async def test_retry_after_is_honoured(stack: Stack) -> None:
    stack.segment.faults.status, stack.segment.faults.retry_after, stack.segment.faults.fail_next = 429, 0.4, 1
    started = time.perf_counter()
    assert_ok(await stack.post("/v1/track", track(0), settle=False))
    await stack.segment.wait_for(1)
    assert time.perf_counter() - started >= 0.4  # not sooner than the upstream asked, whatever the backoff says
    assert stack.metric("splitter_upstream_requests_total", destination="segment", code="429") == 1
    assert stack.metric("splitter_breaker_state", destination="segment") == 0  # throttling is not an outage


async def test_a_failing_mirror_is_retried_not_lost(stack: Stack) -> None:
    stack.rudder.faults.status = 500
    for i in range(3):
        assert_ok(await stack.post("/v1/track", track(i, "Mirror x"), settle=False))
    await stack.segment.wait_for(3)
    await stack.wait_metric("splitter_upstream_retries_total", 2, destination="rudderstack")
    stack.rudder.faults.status = None
    await stack.settle()
    assert stack.rudder.message_ids() == ["msg-0", "msg-1", "msg-2"]
    assert stack.metric("splitter_mirror_dropped_total", destination="rudderstack", reason="spool_full") == 0


async def test_breaker_opens_on_a_dead_upstream_and_closes_after_a_probe(stack: Stack) -> None:
    stack.rudder.faults.down = True
    assert_ok(await stack.post("/v1/track", track(0), settle=False))
    await stack.wait_metric("splitter_breaker_state", 2, destination="rudderstack")
    stack.rudder.faults.down = False
    await stack.settle()
    assert stack.metric("splitter_breaker_state", destination="rudderstack") == 0
    assert stack.rudder.message_ids() == ["msg-0"]


async def test_spool_quota_primary_answers_503_and_mirror_drops_are_counted() -> None:
    # room for about one record in the mirror's spool and two in the primary's
    rules = with_delivery("rudderstack", "spool_quota_mb: 0.001", with_delivery("segment", "spool_quota_mb: 0.002"))
    async with proxy_stack(rules) as stack:
        stack.rudder.faults.down = stack.segment.faults.down = True
        big = {"blob": "x" * 600}
        answers = [await stack.post("/v1/track", track(i, "Mirror x", properties=big), settle=False) for i in range(4)]
        assert [a[0] for a in answers] == [200, 200, 503, 503]
        full = answers[-1]
        assert_error(full, 503, "spool_full", "segment")
        assert full[2]["Retry-After"] == "5"
        assert stack.metric("splitter_events_dropped_total", destination="rudderstack", reason="spool_full") == 1
        assert stack.metric("splitter_mirror_dropped_total", destination="rudderstack", reason="spool_full") == 1
        accepted = [f"msg-{i}" for i, a in enumerate(answers) if a[0] == 200]
        stack.rudder.faults.down = stack.segment.faults.down = False
        await stack.settle()
        assert stack.segment.message_ids() == accepted  # nothing the client was told about is lost
        dropped = stack.metric("splitter_events_dropped_total", destination="rudderstack", reason="spool_full")
        assert len(stack.rudder.message_ids()) + dropped == len(accepted)


# --------------------------------------------------------------------------- 11. in flight
async def test_max_in_flight() -> None:
    async with proxy_stack(max_in_flight=1) as stack:
        release = asyncio.Event()

        async def slow_body():  # type: ignore[no-untyped-def]
            yield b'{"type":"track","event":"E","userId":"u","messageId":"msg-0"'
            await release.wait()
            yield b"}"

        headers = {"Authorization": basic(WEB_KEY), "Content-Type": "application/json"}
        first = asyncio.create_task(stack.session.post(stack.url + "/v1/track", data=slow_body(), headers=headers))
        async with asyncio.timeout(2):
            while stack.metric("splitter_requests_in_flight") < 1:  # the slow request holds the only place
                await asyncio.sleep(0.005)
        second = await stack.post("/v1/track", track(1), settle=False)
        assert_error(second, 429, "too_many_requests", "capacity")
        assert second[2]["Retry-After"] == "1"
        release.set()
        async with await first as response:
            assert response.status == 200
        assert_ok(await stack.post("/v1/track", track(2)))  # room again
        assert sorted(stack.segment.message_ids()) == ["msg-0", "msg-2"]


# ------------------------------------------------------------------------------ 12. metrics
async def test_metrics_after_traffic(stack: Stack) -> None:
    batch = [track(0, "Mirror a"), track(1, "Mirror b"), track(2), {"type": "page", "userId": "user-3", "name": "Home"},
             {"type": "custom_kind", "anonymousId": "anon-secret-4"}]
    assert_ok(await stack.post("/v1/batch", {"batch": batch}, key=SERVER_KEY))
    assert_ok(await stack.post("/v1/batch", {"batch": [track(5, "Split x", anonymousId="anon-secret-5")]}, key=SERVER_KEY))
    assert_error(await stack.post("/v1/nope", {"batch": []}), 404, "not_found")
    assert_error(await stack.request("GET", "/v1/batch"), 405, "method_not_allowed")
    await stack.rudder.wait_for(2 + 3)
    m = stack.metric
    assert m("splitter_requests_total", path="/v1/batch", code="200") == 2
    # neither the unknown path nor the unrouted method becomes a label of its own
    assert m("splitter_requests_total", path="unmatched", code="404") == 1
    assert m("splitter_requests_total", path="unmatched", code="405") == 1
    assert m("splitter_request_duration_seconds_count", path="/v1/batch") == 2
    assert m("splitter_request_duration_seconds_count", path="unmatched") == 2
    events_total = {k: v for k, v in _samples(stack, "splitter_events_total").items()}
    split_dest = decide(stack.rules, {"type": "track", "event": "Split x", "userId": "user-5", "anonymousId": "anon-secret-5"},
                        EventContext(source="server")).primary[0]
    assert events_total == {
        ("server", "track", "mirrored", "segment", "primary"): 2,
        ("server", "track", "mirrored", "rudderstack", "mirror"): 2,
        ("server", "track", "everyone", "segment", "primary"): 1,
        ("server", "track", "everyone", "rudderstack", "primary"): 1,
        ("server", "page", "everyone", "segment", "primary"): 1,
        ("server", "page", "everyone", "rudderstack", "primary"): 1,
        ("server", "other", "everyone", "segment", "primary"): 1,
        ("server", "other", "everyone", "rudderstack", "primary"): 1,
        ("server", "track", "split", split_dest, "primary"): 1,
    }
    # one upstream request per destination per client request: primaries and mirrors coalesce
    seg_requests = 2 if split_dest == "segment" else 1
    assert m("splitter_upstream_requests_total", destination="segment", code="200") == seg_requests
    assert m("splitter_upstream_requests_total", destination="rudderstack", code="200") == 3 - seg_requests
    assert m("splitter_upstream_duration_seconds_count", destination="segment") == seg_requests
    assert m("splitter_upstream_duration_seconds_count", destination="rudderstack") == 3 - seg_requests
    assert m("splitter_events_delivered_total", destination="segment") + m("splitter_events_delivered_total", destination="rudderstack") == 11
    # label values never hold a user id, an event name, or a raw path
    secrets = {"user-", "anon-secret", "Mirror", "Split", "custom_kind", "/v1/nope"}
    for family in stack.metrics.registry.collect():
        for sample in family.samples:
            for value in sample.labels.values():
                assert not any(s in value for s in secrets), (sample.name, sample.labels)


def _samples(stack: Stack, name: str) -> dict[tuple[str, ...], float]:
    found = {}
    for family in stack.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and sample.value:
                labels = sample.labels
                found[(labels["source"], labels["type"], labels["rule"], labels["destination"], labels["role"])] = sample.value
    return found


# ------------------------------------------------------------------------- review follow-ups
async def test_identical_events_without_ids_in_one_batch_get_distinct_ids(stack: Stack) -> None:
    same = {"type": "track", "event": "Tapped", "anonymousId": "a-1"}
    assert_ok(await stack.post("/v1/batch", {"batch": [same, same]}))
    first, second = stack.segment.message_ids()
    assert first != second and uuid.UUID(first) and uuid.UUID(second)


async def test_forwarded_for_hops_that_are_not_addresses_are_not_believed(stack: Stack) -> None:
    assert_ok(await stack.post("/v1/t", {"event": "x", "anonymousId": "a"}, headers={"X-Forwarded-For": "203.0.113.9, unknown"},
                               content_type="text/plain"))
    [record] = stack.segment.events
    assert record.event["context"]["ip"] == "127.0.0.1"
    assert record.headers["X-Forwarded-For"] == "127.0.0.1"


async def test_cors_preflight_allows_the_headers_the_page_asks_for(stack: Stack) -> None:
    status, _, headers = await stack.request("OPTIONS", "/v1/t", headers={
        "Origin": "https://shop.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-shop-tenant, content-type"})
    assert status == 204
    allowed = [h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")]
    assert "x-shop-tenant" in allowed and allowed.count("content-type") == 1


async def test_cors_preflights_are_counted_under_their_ingest_path(stack: Stack) -> None:
    await stack.request("OPTIONS", "/v1/t", headers={"Origin": "https://shop.example", "Access-Control-Request-Method": "POST"})
    await stack.request("OPTIONS", "/v1/secret-user-123", headers={"Origin": "https://shop.example"})
    assert stack.metric("splitter_requests_total", path="/v1/t", code="204") == 1
    assert stack.metric("splitter_requests_total", path="unmatched", code="204") == 1  # unknown paths never become labels
