"""Segment webhook intake and messageId de-duplication, through the running in-process proxy.

Real receivers stand in for Segment and RudderStack (RudderStack checks credentials). Requests are
signed the way Segment's Webhooks destination signs them: hex HMAC-SHA1 of the body in X-Signature.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from typing import Any

import orjson
import pytest

from proxy.admin import describe
from proxy.engine import DedupSettings, RulesError, compile_rules
from proxy.log import mask_write_keys
from tests.proxy_harness import FAST_DELIVERY, WEB_KEY, Stack, proxy_stack
from tests.rules_texts import DESTINATIONS, SOURCES, lines

SECRET = "whsec-0123456789abcdef"
LEGACY_RS_KEY = "rs-server-key-0123456789"  # one of the keys the RudderStack receiver accepts
RULES = """\
version: 1
destinations:
  segment: {kind: segment, url: "${SEGMENT_URL}", timeout: 5, delivery: {FAST}}
  rudderstack: {kind: rudderstack, url: "${RUDDERSTACK_URL}", timeout: 5, delivery: {FAST}}
sources:
  - name: web
    write_keys: ["web-key-0123456789"]
    credentials: {segment: "seg-web-key-0123456789", rudderstack: "rs-web-key-0123456789"}
  - name: legacy
    webhook: {secret: "SECRET"}
    credentials: {rudderstack: "LEGACY_RS_KEY"}
rules:
  - name: legacy
    when: {source: legacy}
    route: rudderstack
  - name: everyone
    route: [segment, rudderstack]
""".replace("{FAST}", "{" + FAST_DELIVERY + "}").replace("SECRET", SECRET).replace("LEGACY_RS_KEY", LEGACY_RS_KEY)
WEBHOOK = "/v1/webhook/segment/legacy"


def event(message_id: str = "msg-1", **extra: Any) -> dict[str, Any]:
    return {"type": "track", "event": "Order Completed", "userId": "u-1", "messageId": message_id,
            "context": {"ip": "203.0.113.9"}, "properties": {"total": 9.5}, **extra}


def signed(body: bytes, secret: str = SECRET) -> dict[str, str]:
    return {"X-Signature": hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()}


async def hook(stack: Stack, body: Any, *, path: str = WEBHOOK, headers: dict[str, str] | None = None,
               settle: bool = True) -> tuple[int, Any, Any]:
    """POST as Segment's Webhooks destination does: JSON body, signed unless `headers` says otherwise."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return await stack.post(path, data, auth=None, headers=signed(data) if headers is None else headers, settle=settle)


def assert_refused(answer: tuple[int, Any, Any], status: int, code: str) -> None:
    assert answer[0] == status, answer
    assert answer[1]["success"] is False and answer[1]["code"] == code and answer[1]["message"], answer[1]


# --------------------------------------------------------------------------- intake
async def test_a_signed_event_is_routed_with_the_sources_credentials() -> None:
    async with proxy_stack(RULES) as stack:
        answer = await hook(stack, event())
        assert answer[0] == 200 and answer[1] == {"success": True}
        assert stack.segment.events == []  # Segment has it already: the rule routes it to RudderStack only
        [received] = stack.rudder.events
        assert received.write_key == LEGACY_RS_KEY
        assert received.event["messageId"] == "msg-1" and received.event["properties"] == {"total": 9.5}
        assert received.event["context"]["ip"] == "203.0.113.9"  # the user's, as Segment recorded it, not Segment's server
        assert "X-Forwarded-For" not in received.headers
        assert stack.metric("splitter_events_total", source="legacy", type="track", rule="legacy", destination="rudderstack", role="primary") == 1
        assert stack.metric("splitter_requests_total", path="/v1/webhook/segment/{source}", code="200") == 1


async def test_the_signature_covers_the_body_as_sent() -> None:
    async with proxy_stack(RULES) as stack:
        data = b'{ "type": "identify", "userId": "u-2", "messageId": "msg-2", "traits": {"plan": "pro"} }'  # spacing kept
        assert (await hook(stack, data))[0] == 200
        assert stack.rudder.message_ids() == ["msg-2"]
        assert stack.rudder.events[0].event["type"] == "identify"


@pytest.mark.parametrize(("path", "headers", "status", "code"), [
    (WEBHOOK, signed(orjson.dumps(event()), "another-secret-0123456789"), 401, "invalid_signature"),
    (WEBHOOK, {"X-Signature": "not hex at all"}, 401, "invalid_signature"),
    (WEBHOOK, {}, 401, "missing_signature"),
    ("/v1/webhook/segment/nobody", signed(orjson.dumps(event())), 401, "unknown_source"),
    ("/v1/webhook/segment/web", signed(orjson.dumps(event())), 401, "unknown_source"),  # a source without a webhook
])
async def test_refused_requests_deliver_nothing(path: str, headers: dict[str, str], status: int, code: str) -> None:
    async with proxy_stack(RULES) as stack:
        assert_refused(await hook(stack, event(), path=path, headers=headers), status, code)
        assert (await hook(stack, event("msg-after")))[0] == 200  # delivery works, and it is the only event
        assert stack.rudder.message_ids() == ["msg-after"]
        assert stack.segment.events == []


async def test_a_tampered_body_is_refused() -> None:
    async with proxy_stack(RULES) as stack:
        headers = signed(orjson.dumps(event()))
        tampered = orjson.dumps(event(properties={"total": 0}))
        assert_refused(await hook(stack, tampered, headers=headers), 401, "invalid_signature")
        await stack.settle()
        assert stack.rudder.events == []


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"{not json", 400, "invalid_request"),
    (orjson.dumps([event("a"), event("b")]), 400, "batch_not_supported"),
    (orjson.dumps({"type": "purchase", "userId": "u"}), 400, "invalid_event"),
    (orjson.dumps({"userId": "u", "event": "E"}), 400, "invalid_event"),
    (orjson.dumps({"type": "track", "event": "E", "messageId": "m"}), 400, "no_user_anon_id"),
])
async def test_bodies_that_are_not_one_segment_event_are_400(body: bytes, status: int, code: str) -> None:
    async with proxy_stack(RULES) as stack:
        assert_refused(await hook(stack, body), status, code)
        await stack.settle()
        assert stack.rudder.events == [] and stack.segment.events == []


async def test_a_batched_actions_request_gets_a_hint_to_turn_batching_off() -> None:
    async with proxy_stack(RULES) as stack:
        first, batch = orjson.dumps(event("a")), orjson.dumps([event("a"), event("b")])
        answer = await hook(stack, batch, headers=signed(first))  # Actions signs the first event of a batch only
        assert_refused(answer, 401, "invalid_signature")
        assert "turn batching off" in answer[1]["message"]


async def test_a_deletion_notice_is_acknowledged_and_not_routed() -> None:
    async with proxy_stack(RULES) as stack:
        answer = await hook(stack, {"type": "delete", "userId": "u-1", "timestamp": "2026-01-01T00:00:00Z"})
        assert answer[0] == 200 and answer[1] == {"success": True, "ignored": "delete"}
        assert stack.rudder.events == [] and stack.segment.events == []


# --------------------------------------------------------------------------- de-duplication
async def test_an_event_arriving_directly_and_through_the_webhook_reaches_each_destination_once() -> None:
    async with proxy_stack(RULES) as stack:
        assert stack.rules.dedup == DedupSettings()  # on by default: a source has a webhook
        assert (await stack.post("/v1/track", event("dup-1"), key=WEB_KEY))[0] == 200
        assert (await hook(stack, event("dup-1")))[0] == 200
        assert (await hook(stack, event("dup-2")))[0] == 200  # the other order: webhook first,
        assert (await stack.post("/v1/track", event("dup-2"), key=WEB_KEY))[0] == 200  # then directly
        assert stack.rudder.message_ids() == ["dup-1", "dup-2"]
        assert stack.segment.message_ids() == ["dup-1", "dup-2"]  # the direct calls' other destination
        assert stack.metric("splitter_dedup_hits_total", destination="rudderstack") == 2
        assert stack.metric("splitter_dedup_hits_total", destination="segment") == 0
        assert stack.metric("splitter_dedup_tracked_ids", destination="rudderstack") == 2


async def test_the_same_id_twice_in_one_batch_is_sent_once() -> None:
    async with proxy_stack(RULES) as stack:
        body = {"batch": [event("same"), event("same", event="Other"), event("different")]}
        assert (await stack.post("/v1/batch", body, key=WEB_KEY))[0] == 200
        assert stack.rudder.message_ids() == ["same", "different"]
        assert stack.segment.message_ids() == ["same", "different"]
        assert stack.metric("splitter_dedup_hits_total", destination="segment") == 1


async def test_concurrent_duplicates_are_sent_once() -> None:
    async with proxy_stack(RULES) as stack:
        answers = await asyncio.gather(*(hook(stack, event("race"), settle=False) for _ in range(6)))
        assert [a[0] for a in answers] == [200] * 6
        await stack.settle()
        assert stack.rudder.message_ids() == ["race"]
        assert stack.metric("splitter_dedup_hits_total", destination="rudderstack") == 5


async def test_after_the_window_an_id_is_delivered_again() -> None:
    async with proxy_stack(RULES + "dedup: {window: 50ms}\n") as stack:
        assert (await hook(stack, event("again")))[0] == 200
        await asyncio.sleep(0.1)  # past the window: the id is forgotten
        assert (await hook(stack, event("again")))[0] == 200
        assert stack.rudder.message_ids() == ["again", "again"]
        assert stack.metric("splitter_dedup_hits_total", destination="rudderstack") == 0


async def test_a_failed_accept_does_not_mark_the_ids() -> None:
    # Segment's spool has room for one big event: the second direct call is refused as a whole, so
    # RudderStack, which had room, must not remember its id: the webhook copy still reaches it.
    rules = RULES.replace('url: "${SEGMENT_URL}", timeout: 5, delivery: {', 'url: "${SEGMENT_URL}", timeout: 5, delivery: {spool_quota_mb: 0.001, ')
    async with proxy_stack(rules) as stack:
        stack.segment.faults.down = True
        big = {"blob": "x" * 600}
        assert (await stack.post("/v1/track", event("filler", properties=big), key=WEB_KEY, settle=False))[0] == 200
        assert_refused(await stack.post("/v1/track", event("refused", properties=big), key=WEB_KEY, settle=False), 503, "spool_full")
        assert (await hook(stack, event("refused", properties=big), settle=False))[0] == 200
        await stack.rudder.wait_for(2)
        assert sorted(stack.rudder.message_ids()) == ["filler", "refused"]
        assert stack.metric("splitter_dedup_hits_total", destination="rudderstack") == 0
        stack.segment.faults.down = False


async def test_with_dedup_off_duplicates_pass_through() -> None:
    async with proxy_stack(RULES + "dedup: off\n") as stack:
        assert stack.rules.dedup is None
        assert (await stack.post("/v1/track", event("twice"), key=WEB_KEY))[0] == 200
        assert (await hook(stack, event("twice")))[0] == 200
        assert stack.rudder.message_ids() == ["twice", "twice"]


# --------------------------------------------------------------------------- configuration
HEAD = DESTINATIONS + "sources:\n  - name: legacy\n"
LEGACY = lines(HEAD)  # the line of the source legacy: config() writes its webhook on the next line, its rule `all` 4 lines below


def errors(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(RulesError) as info:
        compile_rules(text, filename="rules.yaml", env=env or {})
    return info.value.lines


def config(webhook: str, credentials: str = "{rudderstack: rs-key-0123456789}", rules: str = "route: rudderstack", extra: str = "") -> str:
    return HEAD + f"    webhook: {webhook}\n    credentials: {credentials}\nrules:\n  - name: all\n    {rules}\n" + extra


@pytest.mark.parametrize(("webhook", "expected"), [
    ('{secret: ""}', f"rules.yaml:{LEGACY + 1}: sources[0].webhook.secret: must not be empty"),
    ("{secret: short-secret}", f"rules.yaml:{LEGACY + 1}: sources[0].webhook.secret: is 12 characters; use at least 16 (a random string)"),
    ("{}", f"rules.yaml:{LEGACY + 1}: sources[0].webhook.secret: is required (the Shared Secret set in Segment's Webhooks destination)"),
    ("{secret: 0123456789abcdef0, algo: sha256}",
     f"rules.yaml:{LEGACY + 1}: sources[0].webhook.algo: unknown key 'algo' (expected one of: secret)"),
    ("yes", f"rules.yaml:{LEGACY + 1}: sources[0].webhook: must be a mapping, not a value"),
])
def test_webhook_secret_problems(webhook: str, expected: str) -> None:
    assert errors(config(webhook)) == [expected]


def test_a_missing_secret_variable_is_named() -> None:
    assert errors(config('{secret: "${SEGMENT_WEBHOOK_SECRET}"}')) == [
        f"rules.yaml:{LEGACY + 1}: environment variable SEGMENT_WEBHOOK_SECRET is not set and has no default "
        "(write ${SEGMENT_WEBHOOK_SECRET:-default} to give one)"
    ]
    rules = compile_rules(config('{secret: "${SEGMENT_WEBHOOK_SECRET}"}'), env={"SEGMENT_WEBHOOK_SECRET": SECRET})
    assert rules.sources["legacy"].webhook_secret == SECRET and rules.sources["legacy"].write_keys == ()
    assert SECRET not in repr(rules.sources["legacy"])


def test_a_source_needs_write_keys_or_a_webhook() -> None:
    assert errors(HEAD + "rules:\n  - name: all\n    route: rudderstack\n") == [
        f"rules.yaml:{LEGACY}: sources[0].write_keys: is required (the write keys clients of this source present)"
    ]


def test_a_webhook_source_needs_a_credential_for_every_reachable_destination() -> None:
    text = config(f"{{secret: {SECRET}}}", "{segment: seg-key-0123456789}",
                  "when: {source: legacy, type: track}\n    route: {split: {rudderstack: 50, segment: 50}}\n"
                  "  - name: rest\n    route: rudderstack")
    assert errors(text) == [
        f"rules.yaml:{LEGACY}: sources[0].credentials: webhook source 'legacy' needs a credential for every destination "
        "its events can reach; missing: rudderstack (rule 'all')",
        f"rules.yaml:{LEGACY + 4}: rules[0].route: events of webhook source 'legacy' can reach segment destination 'segment': "
        "Segment forwarded them, so it would receive them twice; give this source a rule (before this one) that routes to other destinations only",
    ]


def test_rules_after_the_sources_catch_all_are_not_checked() -> None:
    text = config(f"{{secret: {SECRET}}}", rules="when: {source: legacy}\n    route: rudderstack\n  - name: rest\n    route: segment")
    rules = compile_rules(text, env={})
    assert rules.dedup == DedupSettings()


@pytest.mark.parametrize(("dedup", "expected"), [
    ("{window: 90s, max_ids: 5}", DedupSettings(90.0, 5)),
    ("{window: 1h}", DedupSettings(3600.0)),
    ("{window: 30}", DedupSettings(30.0)),
    ("{max_ids: 1000}", DedupSettings(max_ids=1000)),
    ("off", None),
    ("false", None),
    ("on", DedupSettings()),
])
def test_dedup_settings(dedup: str, expected: DedupSettings | None) -> None:
    assert compile_rules(config(f"{{secret: {SECRET}}}", extra=f"dedup: {dedup}\n"), env={}).dedup == expected


def test_dedup_is_off_without_a_webhook_unless_asked_for() -> None:
    plain = DESTINATIONS + SOURCES + "rules:\n  - name: all\n    route: rudderstack\n"
    assert compile_rules(plain, env={}).dedup is None
    assert compile_rules(plain + "dedup: {window: 5m}\n", env={}).dedup == DedupSettings(300.0)


@pytest.mark.parametrize(("dedup", "expected"), [
    ("{window: soon}", "dedup.window: must be a duration such as 90s, 10m or 1h (a bare number is seconds), not 'soon'"),
    ("{window: 2d}", "dedup.window: must be a duration such as 90s, 10m or 1h (a bare number is seconds), not '2d'"),
    ("{window: 25h}", "dedup.window: must be more than 0 and at most 24h, not '25h'"),
    ("{window: 0}", "dedup.window: must be more than 0 and at most 24h, not 0"),
    ("{max_ids: 0}", "dedup.max_ids: must be a whole number between 1 and 10000000, not 0"),
    ("{max_ids: 2.5}", "dedup.max_ids: must be a whole number between 1 and 10000000, not 2.5"),
    ("{size: 3}", "dedup.size: unknown key 'size' (expected one of: window, max_ids, store, store_timeout)"),
    ("sometimes", "dedup: must be true or false, not 'sometimes'"),
])
def test_dedup_problems(dedup: str, expected: str) -> None:
    line = lines(config(f"{{secret: {SECRET}}}")) + 1  # of the `dedup:` appended to it
    assert errors(config(f"{{secret: {SECRET}}}", extra=f"dedup: {dedup}\n")) == [f"rules.yaml:{line}: {expected}"]


# --------------------------------------------------------------------------- secrets stay secret
def test_admin_config_and_logs_mask_the_secret() -> None:
    rules = compile_rules(config(f"{{secret: {SECRET}}}"), env={})
    described = describe(rules)
    assert SECRET not in orjson.dumps(described).decode()
    assert described["sources"][0]["webhook"] == {"secret": "****"}
    assert described["dedup"] == {"window": 600.0, "max_ids": 200000}
    assert mask_write_keys(None, "info", {"secret": SECRET})["secret"] == "whse****"


async def test_a_dropped_mirror_copy_does_not_count_as_delivered() -> None:
    # Parallel-mirror phase: apps send to Segment, mirrored to RudderStack; Segment's webhook brings
    # the same events back for RudderStack. When RudderStack's spool is full the mirror copy is dropped
    # (splitter_mirror_dropped_total); the webhook copy is then the only one RudderStack can get.
    rules = RULES.replace("route: [segment, rudderstack]", "route: {to: [segment], mirror: [rudderstack]}").replace(
        'url: "${RUDDERSTACK_URL}", timeout: 5, delivery: {', 'url: "${RUDDERSTACK_URL}", timeout: 5, delivery: {spool_quota_mb: 0.001, ')
    async with proxy_stack(rules) as stack:
        stack.rudder.faults.down = True
        big = {"blob": "x" * 600}
        assert (await stack.post("/v1/track", event("filler", properties=big), key=WEB_KEY, settle=False))[0] == 200
        assert (await stack.post("/v1/track", event("mirrored", properties=big), key=WEB_KEY, settle=False))[0] == 200
        assert stack.metric("splitter_mirror_dropped_total", destination="rudderstack", reason="spool_full") == 1
        stack.rudder.faults.down = False
        await stack.rudder.wait_for(1)
        assert (await hook(stack, event("mirrored", properties=big)))[0] == 200
        assert sorted(stack.rudder.message_ids()) == ["filler", "mirrored"]


async def test_a_deeply_nested_event_is_a_400_not_a_500() -> None:
    async with proxy_stack(RULES) as stack:
        body = orjson.dumps(event("deep"))[:-1] + b', "nested": ' + b"[" * 300 + b"]" * 300 + b"}"
        assert_refused(await hook(stack, body), 400, "invalid_event")


async def test_a_long_message_id_is_still_deduplicated() -> None:
    async with proxy_stack(RULES) as stack:
        long_id = "m" * 20_000
        assert (await stack.post("/v1/track", event(long_id), key=WEB_KEY))[0] == 200
        assert (await hook(stack, event(long_id)))[0] == 200
        assert stack.rudder.message_ids() == [long_id]
        assert stack.metric("splitter_dedup_hits_total", destination="rudderstack") == 1
