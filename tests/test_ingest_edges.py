"""The ingest port (proxy/ingress/listener.py) on real sockets, byte by byte where it matters.

Every other ingress test goes through the same listener (the harness listens as `splitter serve`
does); these pin the HTTP edges: framing (pipelining, split writes, chunked, Expect), malformed
heads refused with JSON, in-flight accounting from the headers on, keep-alive and close,
half-close, lone surrogates in bodies, and draining on shutdown. The timeouts and slot limits are
in test_ingest_limits.py; the same cases against a real `splitter serve` process, with hostile
clients, in test_ingest_abuse.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from proxy_harness import WEB_KEY, Stack, proxy_stack
from raw_http import AUTH, Client, head, request, track

from loadtest.process import launch_splitter
from loadtest.receivers import start_receiver
from tests.rules_texts import served_head


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    async with proxy_stack() as running:
        yield running


async def test_pipelined_requests_are_answered_in_order_and_delivered(stack: Stack) -> None:
    client = await Client.open(stack.url)
    await client.send(b"".join(request("/v1/track", track(f"pipe-{i}")) for i in range(3)))
    answers = [await client.response() for _ in range(3)]
    assert [status for status, _, _ in answers] == [200, 200, 200]
    assert all(orjson.loads(body) == {"success": True} for _, _, body in answers)
    assert answers[0][1]["content-type"] == "application/json" and answers[0][1]["date"].endswith("GMT")
    await stack.settle()
    assert stack.segment.message_ids() == ["pipe-0", "pipe-1", "pipe-2"]
    client.close()


async def test_hundreds_of_pipelined_requests_in_one_write_are_answered_in_order(stack: Stack) -> None:
    client = await Client.open(stack.url)
    await client.send(b"".join(request("/v1/track", track(f"many-{i}", f"u{i}")) for i in range(300)))
    statuses = [(await client.response())[0] for _ in range(300)]
    assert statuses == [200] * 300
    await stack.settle()
    assert stack.segment.message_ids() == [f"many-{i}" for i in range(300)]
    client.close()


async def test_a_request_split_across_many_writes_is_framed_correctly(stack: Stack) -> None:
    client = await Client.open(stack.url)
    data = request("/v1/batch", orjson.dumps({"batch": [orjson.loads(track(f"split-{i}", f"u{i}")) for i in range(40)]}))
    for start in range(0, len(data), 97):  # the head arrives in pieces too
        await client.send(data[start:start + 97])
        await asyncio.sleep(0)
    status, _, body = await client.response()
    assert (status, orjson.loads(body)) == (200, {"success": True})
    await stack.settle()
    assert sorted(stack.segment.message_ids()) == sorted(f"split-{i}" for i in range(40))
    client.close()


async def test_different_routes_pipelined_on_one_connection_are_answered_in_order(stack: Stack) -> None:
    """An ingest call, then telemetry (/v1/m), then an ingest call again, all written at once: three answers in order."""
    client = await Client.open(stack.url)
    telemetry = b'{"series":[]}'
    await client.send(request("/v1/track", track("mixed-0")) + request("/v1/m", telemetry) + request("/v1/track", track("mixed-2")))
    answers = [await client.response() for _ in range(3)]
    assert [status for status, _, _ in answers] == [200, 200, 200]
    await stack.settle()
    assert stack.segment.message_ids() == ["mixed-0", "mixed-2"]
    client.close()


@pytest.mark.parametrize("shape", ["chunked", "expect-100"])
async def test_chunked_bodies_and_expect_100_continue_are_answered(stack: Stack, shape: str) -> None:
    client = await Client.open(stack.url)
    body = track(f"handed-{shape}")
    if shape == "chunked":
        await client.send(request("/v1/track", f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n", "Transfer-Encoding: chunked", length=False))
    else:
        await client.send(request("/v1/track", b"", "Expect: 100-continue", f"Content-Length: {len(body)}", length=False))
        assert (await client.reader.readline()).startswith(b"HTTP/1.1 100")
        await client.reader.readline()  # the blank line after 100 Continue
        await client.send(body)
    status, _, answer = await client.response()
    assert (status, orjson.loads(answer)) == (200, {"success": True})
    await stack.settle()
    assert stack.segment.message_ids() == [f"handed-{shape}"]
    client.close()


@pytest.mark.parametrize("head", [
    "Content-Length: 5\r\nContent-Length: 7",  # two lengths: a smuggling attempt, never guessed at
    "Content-Length : 5",  # whitespace before the colon
    "X-Folded: a\r\n  b\r\nContent-Length: 5",  # obsolete line folding
])
async def test_malformed_framing_is_refused_with_json(stack: Stack, head: str) -> None:
    client = await Client.open(stack.url)
    await client.send(f"POST /v1/track HTTP/1.1\r\nHost: x\r\n{head}\r\n\r\n12345".encode())
    status, headers, body = await client.response()
    assert status == 400 and headers["content-type"] == "application/json"
    assert orjson.loads(body)["code"] == "malformed_request"
    assert await client.closed_by_server()
    client.close()
    assert stack.segment.message_ids() == []


async def test_a_bare_lf_request_is_answered_rather_than_left_waiting(stack: Stack) -> None:
    client = await Client.open(stack.url)
    body = track("lf-only")
    await client.send(f"POST /v1/track HTTP/1.1\nHost: x\nAuthorization: {AUTH}\nContent-Length: {len(body)}\n\n".encode() + body)
    status, _, _ = await client.response()  # whatever aiohttp makes of it, the client gets an answer
    assert status in (200, 400)
    client.close()


async def test_an_oversized_body_gets_413_without_being_read(stack: Stack) -> None:
    client = await Client.open(stack.url)
    await client.send(b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nAuthorization: " + AUTH.encode() + b"\r\nContent-Length: 9000000\r\n\r\n")
    status, _, body = await client.response()
    assert status == 413 and orjson.loads(body)["code"] == "request_too_large"
    client.close()


async def test_connection_close_is_honoured(stack: Stack) -> None:
    client = await Client.open(stack.url)
    await client.send(request("/v1/track", track("closing"), "Connection: close"))
    status, headers, _ = await client.response()
    assert status == 200 and headers["connection"] == "close"
    assert await client.closed_by_server()
    client.close()


async def test_http_1_0_is_answered(stack: Stack) -> None:
    client = await Client.open(stack.url)
    await client.send(request("/v1/track", track("old-http"), version="HTTP/1.0"))
    status_line = await asyncio.wait_for(client.reader.readline(), 5)
    assert status_line.split()[1] == b"200"
    client.close()
    await stack.settle()
    assert stack.segment.message_ids() == ["old-http"]


async def test_a_request_counts_in_flight_from_its_headers_and_is_released_if_its_body_never_comes() -> None:
    async with proxy_stack(max_in_flight=1) as stack:
        held = await Client.open(stack.url)
        body = track("held")
        await held.send(request("/v1/track", body)[:-5])  # headers and most of the body
        await stack.wait_metric("splitter_requests_in_flight", 1)
        second = await Client.open(stack.url)
        await second.send(request("/v1/track", track("refused")))
        status, headers, answer = await second.response()
        assert status == 429 and headers["retry-after"] == "1" and orjson.loads(answer)["code"] == "too_many_requests"
        held.close()  # gone mid-body: nothing to answer, nothing delivered, the slot is free again
        async with asyncio.timeout(5):
            while stack.metric("splitter_requests_in_flight") != 0:
                await asyncio.sleep(0.02)
        await second.send(request("/v1/track", track("after")))
        assert (await second.response())[0] == 200
        await stack.settle()
        assert stack.segment.message_ids() == ["after"]
        second.close()


async def test_idle_keepalive_connections_are_closed() -> None:
    async with proxy_stack(keepalive_timeout=0.3) as stack:
        client = await Client.open(stack.url)
        await client.send(request("/v1/track", track("then-idle")))
        assert (await client.response())[0] == 200
        started = time.monotonic()
        assert await client.closed_by_server(timeout=5)
        assert time.monotonic() - started >= 0.25
        client.close()


async def test_shutdown_finishes_the_request_in_flight_and_closes_idle_connections() -> None:
    async with proxy_stack(drain_timeout=5.0) as stack:
        idle = await Client.open(stack.url)
        await idle.send(request("/v1/track", track("before")))
        assert (await idle.response())[0] == 200
        busy = await Client.open(stack.url)
        data = request("/v1/track", track("during"))
        await busy.send(data[:-3])
        await stack.wait_metric("splitter_requests_in_flight", 1)
        closing = asyncio.ensure_future(stack.server.close(drain_timeout=5.0))
        assert await idle.closed_by_server()
        assert not closing.done()  # the held request keeps the drain open
        await busy.send(data[-3:])
        status, headers, _ = await busy.response()
        assert status == 200 and headers["connection"] == "close"
        await asyncio.wait_for(closing, 5)
        idle.close()
        busy.close()
        await stack.settle()
        assert stack.segment.message_ids() == ["before", "during"]


async def test_a_client_that_half_closes_after_its_request_still_gets_the_answer(stack: Stack) -> None:
    client = await Client.open(stack.url)
    await client.send(request("/v1/track", track("half-closed")))
    client.writer.write_eof()
    status, _, _ = await client.response()
    assert status == 200
    assert await client.closed_by_server()
    client.close()
    await stack.settle()
    assert stack.segment.message_ids() == ["half-closed"]


async def test_a_client_that_half_closes_after_pipelined_requests_gets_every_answer(stack: Stack) -> None:
    client = await Client.open(stack.url)
    await client.send(b"".join(request("/v1/track", track(f"half-{i}")) for i in range(3)))
    client.writer.write_eof()
    answers = [await client.response() for _ in range(3)]
    assert [status for status, _, _ in answers] == [200, 200, 200]
    assert "connection" not in answers[0][1] and answers[2][1]["connection"] == "close"
    assert await client.closed_by_server()
    client.close()
    await stack.settle()
    assert stack.segment.message_ids() == ["half-0", "half-1", "half-2"]


async def test_an_ingest_path_spelt_with_percent_escapes_reaches_the_same_handler_through_the_application(stack: Stack) -> None:
    """`/v1/%74rack` is `/v1/track` once decoded: not the connection's exact-path lane, but aiohttp's router
    finds the same handler, with the same answer and delivery."""
    client = await Client.open(stack.url)
    await client.send(request("/v1/%74rack", track("escaped")) + request("/v1/track", track("plain")))
    answers = [await client.response() for _ in range(2)]
    assert [(status, orjson.loads(body)) for status, _, body in answers] == [(200, {"success": True})] * 2
    client.close()
    await stack.settle()
    assert stack.segment.message_ids() == ["escaped", "plain"]


SERVE_RULES = served_head(WEB_KEY) + """\
rules:
  - name: all
    route: {to: [segment]}
"""


async def test_splitter_serve_answers_a_preflight_a_chunked_and_a_plain_call_on_one_connection(tmp_path: Path) -> None:
    """The real process (uvloop's transports): one keep-alive connection, a plain call, then a CORS
    preflight, a chunked call and another plain call pipelined, answered in order."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(SERVE_RULES)
    async with await start_receiver("segment", record=True) as segment:
        splitter = await launch_splitter(str(rules), dict(os.environ, SEGMENT_URL=segment.url))
        try:
            client = await Client.open(splitter.ingress)
            body = track("serve-chunked")
            await client.send(request("/v1/track", track("serve-fast")))
            assert (await client.response())[0] == 200
            await client.send(b"OPTIONS /v1/track HTTP/1.1\r\nHost: x\r\nOrigin: https://shop.example\r\n"
                              b"Access-Control-Request-Method: POST\r\n\r\n"
                              + request("/v1/track", f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n", "Transfer-Encoding: chunked", length=False)
                              + request("/v1/track", track("serve-after")))
            preflight, chunked, after = [await client.response() for _ in range(3)]
            assert preflight[0] == 204 and preflight[1]["access-control-allow-origin"] == "*"
            assert chunked[0] == 200 and after[0] == 200
            client.close()
            await segment.receiver.wait_for(3)
            assert segment.receiver.message_ids() == ["serve-fast", "serve-chunked", "serve-after"]
        finally:
            assert await splitter.stop() == 0


async def test_a_content_length_of_thousands_of_digits_is_answered(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    client = await Client.open(stack.url)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        await client.send(head("Content-Length: " + "0" * 4400 + "2") + b"{}")
        status, _, body = await client.response()
    client.close()
    assert status == 400 and orjson.loads(body)["code"] == "invalid_request"
    assert not [record for record in caplog.records if "data_received" in record.getMessage()]


@pytest.mark.parametrize("data", [
    head("Content-Length: 2")[:-4] + b"\n\r\n{}",  # a bare LF before the final CRLF
    b"POST /v1/track HTTP/1.1\r\nHost: x\nContent-Length: 2\n\r\n{}",  # bare LFs after a CRLF request line
    b"POST /v1/track HTTP/1.1\rHost: x\rContent-Length: 2\r\r{}",  # bare CRs
], ids=["lf-before-crlf", "mixed-lf", "bare-cr"])
async def test_a_head_that_never_ends_in_crlfcrlf_is_answered_at_once(stack: Stack, data: bytes) -> None:
    client = await Client.open(stack.url)
    await client.send(data)
    assert await asyncio.wait_for(client.reader.readline(), 2)  # aiohttp's 400, not silence until the idle timeout
    client.close()


@pytest.mark.parametrize("extra", ["X-Note: a\x00b", "X-Forwarded-For: 1.2.3.4\x01", "X(Bad)@: v", "X-Long: " + "a" * 9000],
                         ids=["nul", "control", "not-a-token", "line-over-8190"])
async def test_a_head_llhttp_refuses_is_refused_not_delivered(stack: Stack, extra: str) -> None:
    body = track("refused-head")
    client = await Client.open(stack.url)
    await client.send(head(extra, f"Content-Length: {len(body)}") + body)
    status, _, answer = await client.response()
    assert orjson.loads(answer)["success"] is False
    client.close()
    assert status == 400
    assert stack.segment.message_ids() == []


async def test_a_head_refused_behind_pipelined_requests_is_answered_after_them_and_nothing_of_it_is_delivered(stack: Stack) -> None:
    """Two good calls, then a head with more header fields than allowed, written at once: 200, 200, then
    the 400 in its turn, and the connection closes; a call written after the bad head is never read."""
    client = await Client.open(stack.url)
    crowded = head(*(f"X-Field-{i}: {i}" for i in range(130)), "Content-Length: 2") + b"{}"
    await client.send(request("/v1/track", track("ahead-0")) + request("/v1/track", track("ahead-1")) + crowded
                      + request("/v1/track", track("behind")))
    answers = [await client.response() for _ in range(3)]
    assert [status for status, _, _ in answers] == [200, 200, 400]
    assert orjson.loads(answers[2][2])["code"] == "malformed_request" and "header fields" in orjson.loads(answers[2][2])["message"]
    assert answers[2][1]["connection"] == "close"
    assert await client.closed_by_server()
    client.close()
    await stack.settle()
    assert stack.segment.message_ids() == ["ahead-0", "ahead-1"]


async def test_a_request_target_over_the_limit_is_refused_with_its_write_key_masked(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    client = await Client.open(stack.url)
    target = "/v1/track?writeKey=" + WEB_KEY + "&pad=" + "a" * 8200
    await client.send(f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}".encode())
    status, _, answer = await client.response()
    assert status == 400 and orjson.loads(answer)["code"] == "malformed_request"
    assert WEB_KEY.encode() not in answer
    assert await client.closed_by_server()
    client.close()


async def test_an_upgrade_request_without_a_body_is_answered_as_http_1_1_and_one_with_a_body_is_refused(stack: Stack) -> None:
    """splitter speaks no other protocol: a request asking for `Upgrade: h2c` (curl --http2 on plain HTTP)
    is an ordinary request when it has no body. With a body it is refused: llhttp stops before such a
    body without checking its framing, so splitter would have to frame it by hand."""
    upgrade = ("Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAAQAAP__")
    client = await Client.open(stack.url)
    await client.send(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n" + "\r\n".join(upgrade).encode() + b"\r\n\r\n"
                      + request("/v1/track", track("after-upgrade")))
    answers = [await client.response() for _ in range(2)]
    assert [status for status, _, _ in answers] == [404, 200]
    await client.send(request("/v1/track", track("upgrading-with-body"), *upgrade))
    status, headers, body = await client.response()
    assert status == 400 and "switch protocols" in orjson.loads(body)["message"] and headers["connection"] == "close"
    assert await client.closed_by_server()
    client.close()
    await stack.settle()
    assert stack.segment.message_ids() == ["after-upgrade"]


async def test_trailers_are_dropped_and_never_become_headers_of_the_next_request(stack: Stack) -> None:
    """A chunked body's trailer fields (here a Content-Encoding and another write key) belong to no request."""
    body = track("trailed")
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\nContent-Encoding: gzip\r\nAuthorization: Basic bm9ib2R5Og==\r\n\r\n"
    client = await Client.open(stack.url)
    await client.send(request("/v1/track", chunked, "Transfer-Encoding: chunked", length=False) + request("/v1/track", track("next")))
    answers = [await client.response() for _ in range(2)]
    assert [(status, orjson.loads(answer)) for status, _, answer in answers] == [(200, {"success": True})] * 2
    client.close()
    await stack.settle()
    assert stack.segment.message_ids() == ["trailed", "next"]


@pytest.mark.parametrize("where", ["head", "trailer"])
async def test_a_field_that_never_ends_is_refused_within_its_limit(stack: Stack, where: str) -> None:
    """httptools holds a field until it ends: bytes fed while a head (or a body's framing) is unfinished
    are counted, and the request is refused past 1 MiB instead of growing for the whole timeout."""
    client = await Client.open(stack.url)
    if where == "head":
        await client.send(b"POST /v1/track HTTP/1.1\r\nHost: x\r\nX-Big: ")
    else:
        await client.send(request("/v1/track", b"2\r\n{}\r\n0\r\nX-Big: ", "Transfer-Encoding: chunked", length=False))
    started = time.monotonic()
    try:
        for _ in range(64):  # up to 4 MiB, 64 KiB at a time
            await client.send(b"a" * 65536)
    except ConnectionError:
        pass  # refused and closed while still sending
    status, _, answer = await client.response()
    # the head: refused as such; the trailer: the request was dispatched at its head, and its body read fails
    assert status == 400 and orjson.loads(answer)["code"] in ({"malformed_request"} if where == "head" else {"malformed_request", "incomplete_body"})
    assert time.monotonic() - started < 5
    client.close()
    assert stack.segment.message_ids() == []


async def test_thousands_of_tiny_requests_in_one_write_are_parsed_as_the_answers_catch_up(stack: Stack) -> None:
    """The connection feeds llhttp a slice at a time and holds the rest while 32 requests wait, so one
    read full of tiny requests never queues thousands of them; all are answered, in order."""
    client = await Client.open(stack.url)
    await client.send(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n" * 3000 + request("/v1/track", track("after-many")))
    statuses = [(await client.response())[0] for _ in range(3001)]
    assert statuses == [404] * 3000 + [200]
    client.close()
    await stack.settle()
    assert stack.segment.message_ids() == ["after-many"]


async def test_a_get_and_a_head_pipelined_between_ingest_calls_are_answered_in_order(stack: Stack) -> None:
    """The application's routes (a 404 here, and a HEAD, whose answer has no body) share a connection
    with ingest calls: each answer in its turn, the connection kept."""
    client = await Client.open(stack.url)
    await client.send(request("/v1/track", track("around-0")) + b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
                      + b"HEAD /nowhere HTTP/1.1\r\nHost: x\r\n\r\n" + request("/v1/track", track("around-1")))
    first = await client.response()
    missing = await client.response()
    status_line = await client.reader.readline()  # HEAD: a status line and headers, no body
    while (await client.reader.readline()) not in (b"\r\n", b""):
        pass
    last = await client.response()
    assert (first[0], missing[0], last[0]) == (200, 404, 200) and status_line.split()[1] == b"404"
    assert orjson.loads(missing[2])["code"] == "not_found"
    await stack.settle()
    assert stack.segment.message_ids() == ["around-0", "around-1"]
    client.close()


@pytest.mark.parametrize("escape", ["\\ud83d", "\\ude00", "x\\ud83d\\ud83dy"], ids=["high", "low", "two-highs"])
async def test_a_lone_surrogate_escape_becomes_u_fffd_and_the_batch_is_accepted(stack: Stack, escape: str) -> None:
    """A browser cut a string inside an emoji: that event and its siblings are delivered, not refused with 400."""
    cut = b'{"type":"track","event":"Cut","userId":"u-2","messageId":"cut","properties":{"title":"ok \\ud83d\\ude00 then ' + escape.encode() + b'"}}'
    body = b'{"batch":[' + track("before") + b"," + cut + b"," + track("after") + b"]}"
    client = await Client.open(stack.url)
    await client.send(request("/v1/batch", body))
    status, _, answer = await client.response()
    client.close()
    assert (status, orjson.loads(answer)) == (200, {"success": True})
    await stack.settle()
    assert stack.segment.message_ids() == ["before", "cut", "after"]
    title = next(r.event for r in stack.segment.events if r.event["messageId"] == "cut")["properties"]["title"]
    assert title.startswith("ok \U0001F600 then ") and "\ufffd" in title and not any(0xD800 <= ord(c) <= 0xDFFF for c in title)


async def test_the_surrogate_repair_still_refuses_what_is_not_json(stack: Stack) -> None:
    client = await Client.open(stack.url)
    await client.send(request("/v1/track", b'{"type":"track","event":"\\ud83d","userId":"u","x":NaN}'))
    status, _, answer = await client.response()
    client.close()
    assert status == 400 and orjson.loads(answer)["code"] == "invalid_request"
