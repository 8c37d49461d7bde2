"""RudderStack's own wire forms at splitter's ingest port, in process on real sockets.

`@rudderstack/analytics-js` with `useBeacon: true` posts `navigator.sendBeacon` batches to
`/beacon/v1/batch?writeKey=KEY` as `text/plain`, with no Authorization header (a beacon cannot set
one); its error reports go to `/rsaMetrics`; `@rudderstack/rudder-sdk-node` posts gzip with axios'
`application/x-www-form-urlencoded`. A write key in the query is accepted on every ingest path, as
RudderStack's gateway takes it; when a request carries several, the Authorization header wins, then
the query, then the body. The key in a URL is never echoed, and never a metric label.

The real SDKs run in tests/test_clients_rudderstack_node.py and tests/test_clients_rudderstack_browser.py.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from prometheus_client import generate_latest
from proxy_harness import CREDENTIALS, SERVER_KEY, WEB_KEY, Stack, basic, proxy_stack
from structlog.testing import capture_logs

SEG_WEB, RS_WEB = CREDENTIALS["web"]["segment"], CREDENTIALS["web"]["rudderstack"]
SEG_SERVER, RS_SERVER = CREDENTIALS["server"]["segment"], CREDENTIALS["server"]["rudderstack"]
UNKNOWN_KEY = "unknown-query-key-0123456789"


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    async with proxy_stack() as running:
        yield running


def track(i: int, **extra: Any) -> dict[str, Any]:
    return {"type": "track", "event": "Clicked", "anonymousId": f"anon-{i}", "messageId": f"rs-{i}", "properties": {"i": i}, **extra}


def credentials(stack: Stack) -> dict[str, set[str]]:
    """Per destination, the credentials its events arrived with."""
    return {"segment": {r.write_key for r in stack.segment.events}, "rudderstack": {r.write_key for r in stack.rudder.events}}


def metrics_text(stack: Stack) -> str:
    return generate_latest(stack.metrics.registry).decode()


async def test_beacon_batch_with_the_key_in_the_query_is_delivered(stack: Stack) -> None:
    body = orjson.dumps({"batch": [track(0), track(1)], "sentAt": "2026-01-01T00:00:00.000Z"})
    status, answer, _ = await stack.post(f"/beacon/v1/batch?writeKey={WEB_KEY}", body, auth=None,
                                         content_type="text/plain;charset=UTF-8", headers={"Origin": "http://shop.example"})
    assert (status, answer) == (200, {"success": True})
    assert sorted(r.event["messageId"] for r in stack.segment.events) == ["rs-0", "rs-1"]
    assert sorted(r.event["messageId"] for r in stack.rudder.events) == ["rs-0", "rs-1"]
    assert credentials(stack) == {"segment": {SEG_WEB}, "rudderstack": {RS_WEB}}
    for record in [*stack.segment.events, *stack.rudder.events]:
        assert "writeKey" not in record.event
        assert record.event["sentAt"] == "2026-01-01T00:00:00.000Z"  # the envelope's, as for any batch
        assert record.event["context"]["ip"] == "127.0.0.1"  # a browser's batch: context.ip from the connection
        assert WEB_KEY not in record.path
    assert stack.metric("splitter_requests_total", path="/beacon/v1/batch", code="200") == 1
    assert WEB_KEY not in metrics_text(stack)


@pytest.mark.parametrize("path", ["/v1/track", "/v1/batch", "/v1/t", "/v1/b", "/v1/import"])
async def test_a_query_key_works_on_every_ingest_path(stack: Stack, path: str) -> None:
    body = {"batch": [track(0)]} if path in ("/v1/batch", "/v1/b", "/v1/import") else track(0)
    assert (await stack.post(f"{path}?writeKey={SERVER_KEY}", body, auth=None))[0] == 200
    assert credentials(stack) == {"segment": {SEG_SERVER}, "rudderstack": {RS_SERVER}}


async def test_the_header_wins_over_the_query_and_the_query_over_the_body(stack: Stack) -> None:
    # Authorization (web) and ?writeKey= (server): the header's source.
    assert (await stack.post(f"/v1/batch?writeKey={SERVER_KEY}", {"batch": [track(0)]}, key=WEB_KEY, auth="basic"))[0] == 200
    assert credentials(stack) == {"segment": {SEG_WEB}, "rudderstack": {RS_WEB}}
    stack.segment.events.clear()
    stack.rudder.events.clear()
    # ?writeKey= (server) and writeKey in the body (web): the query's source, and the body's key is removed.
    assert (await stack.post(f"/v1/batch?writeKey={SERVER_KEY}", {"batch": [track(1)]}, key=WEB_KEY, auth="body"))[0] == 200
    assert credentials(stack) == {"segment": {SEG_SERVER}, "rudderstack": {RS_SERVER}}
    assert all("writeKey" not in r.event for r in [*stack.segment.events, *stack.rudder.events])
    # A good header is not spoiled by a bad query key: the header decides alone.
    assert (await stack.post(f"/v1/track?writeKey={UNKNOWN_KEY}", track(2), key=WEB_KEY))[0] == 200
    # An empty ?writeKey= is no key: the body's counts.
    assert (await stack.post("/v1/track?writeKey=", track(3), key=WEB_KEY, auth="body"))[0] == 200


async def test_an_unknown_query_key_is_refused_and_never_echoed_logged_or_labelled(stack: Stack) -> None:
    with capture_logs() as logs:
        status, answer, _ = await stack.post(f"/beacon/v1/batch?writeKey={UNKNOWN_KEY}", {"batch": [track(0)]}, auth=None,
                                             content_type="text/plain")
        missing = await stack.post("/beacon/v1/batch", {"batch": [track(0)]}, auth=None, content_type="text/plain")
    assert status == 401 and answer["code"] == "invalid_write_key", answer
    assert UNKNOWN_KEY not in orjson.dumps(answer).decode()
    assert missing[0] == 401 and missing[1]["code"] == "missing_write_key" and "?writeKey=" in missing[1]["message"]
    assert stack.segment.events == [] and stack.rudder.events == []
    # The rejection is logged with the key under `write_key`, which the log processor masks; never in the path.
    (rejected, _) = [line for line in logs if line["event"] == "request_rejected"]
    assert rejected["write_key"] == UNKNOWN_KEY and rejected["path"] == "/beacon/v1/batch"
    assert all(UNKNOWN_KEY not in str(value) for line in logs for name, value in line.items() if name != "write_key")
    assert stack.metric("splitter_requests_total", path="/beacon/v1/batch", code="401") == 2
    assert UNKNOWN_KEY not in metrics_text(stack)


async def test_rsa_metrics_is_answered_and_dropped(stack: Stack) -> None:
    report = {"version": "1", "message_id": "m-1", "source": {"name": "js", "sdk_version": "3.34.1", "write_key": WEB_KEY,
                                                              "install_type": "npm", "category": "sdk"}, "errors": {"payloadVersion": "5"}}
    headers = {"Origin": "http://shop.example", "Authorization": basic(WEB_KEY)}
    status, answer, response_headers = await stack.post("/rsaMetrics", orjson.dumps(report), auth=None,
                                                        content_type="application/json;charset=UTF-8", headers=headers)
    assert (status, answer) == (200, {"success": True})
    assert response_headers["Access-Control-Allow-Origin"] == "*"
    preflight = await stack.request("OPTIONS", "/rsaMetrics", headers={"Origin": "http://shop.example", "Access-Control-Request-Method": "POST",
                                                                        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight[0] == 204 and "authorization" in preflight[2]["Access-Control-Allow-Headers"].lower()
    assert stack.segment.events == [] and stack.rudder.events == []
    assert stack.metric("splitter_upstream_requests_total", destination="segment", code="200") == 0
    assert stack.metric("splitter_requests_total", path="/rsaMetrics", code="200") == 1
    assert stack.metric("splitter_requests_total", path="/rsaMetrics", code="204") == 1
    assert (await stack.post("/rsaMetrics", b"x" * 600_000, auth=None))[0] == 413  # read within the same limits


async def test_rudder_sdk_node_wire_form_gzip_as_form_urlencoded(stack: Stack) -> None:
    """What @rudderstack/rudder-sdk-node 3.x sends: axios posts the gzip Buffer as x-www-form-urlencoded."""
    body = {"batch": [track(0, channel="server", context={"library": {"name": "analytics-node", "version": "3.0.13"}})],
            "timestamp": "2026-01-01T00:00:00.000Z", "sentAt": "2026-01-01T00:00:00.000Z"}
    status, answer, _ = await stack.post("/v1/batch", gzip.compress(orjson.dumps(body)), key=WEB_KEY, content_type="application/x-www-form-urlencoded",
                                         headers={"Content-Encoding": "gzip", "User-Agent": "analytics-node/3.0.13"})
    assert (status, answer) == (200, {"success": True})
    assert [r.event["messageId"] for r in stack.rudder.events] == ["rs-0"]
    assert credentials(stack) == {"segment": {SEG_WEB}, "rudderstack": {RS_WEB}}


async def test_rudderstack_browser_and_app_events_get_the_client_ip_on_any_path(stack: Stack) -> None:
    """analytics-js sends `/v1/track` and `/v1/batch` (not the browser-only short paths) with a top-level
    `channel: "web"` (its mobile SDKs: "mobile"): splitter fills their `context.ip` as for analytics.js;
    server SDKs' events ("server") get none."""
    xff = {"X-Forwarded-For": "203.0.113.7"}
    batch = [track(0, channel="web", context={"library": {"name": "RudderLabs JavaScript SDK"}}), track(1, channel="mobile"), track(2, channel="server")]
    assert (await stack.post("/v1/batch", {"batch": batch}, key=WEB_KEY, headers=xff))[0] == 200
    assert (await stack.post("/v1/track", track(3, channel="web"), key=WEB_KEY, headers=xff))[0] == 200
    for receiver in (stack.segment, stack.rudder):
        by_id = {r.event["messageId"]: r.event for r in receiver.events}
        assert by_id["rs-0"]["context"] == {"library": {"name": "RudderLabs JavaScript SDK"}, "ip": "203.0.113.7"}
        assert by_id["rs-1"]["context"] == {"ip": "203.0.113.7"} and by_id["rs-3"]["context"] == {"ip": "203.0.113.7"}
        assert "context" not in by_id["rs-2"]


@pytest.mark.parametrize("line", [b"POST /beacon/v1/batch?writeKey=SECRETKEY\x01123456 HTTP/1.1",
                                  b"GET /v1/projects/SECRETKEY\x01123456/settings HTTP/1.1"])
async def test_a_request_line_llhttp_cannot_parse_is_refused_without_its_key_anywhere(stack: Stack, line: bytes,
                                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A request line llhttp refuses gets a JSON 400 naming llhttp's reason; the write key in it appears
    neither in the answer nor in the log line that records the refusal."""
    host, port = stack.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(line + b"\r\nHost: x\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert b"malformed_request" in answer and b"Invalid char in url" in answer, answer
    assert b"SECRETKEY" not in answer
    logged = capsys.readouterr().out
    assert "request_refused" in logged and "Invalid char in url" in logged
    assert "SECRETKEY" not in logged
