"""The ingest port's fast lane (proxy/ingress/fastlane.py) on real sockets, byte by byte where it matters.

Every other ingress test goes through the fast lane already (the harness listens as `splitter serve`
does); these tests pin what is particular to it: framing (pipelining, split writes), handing a
connection to aiohttp for anything that is not the plain case, in-flight accounting from the
headers on, keep-alive and close, and draining on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from loadtest.process import launch_splitter
from loadtest.receivers import start_receiver
from proxy.ingress.app import FAST_INGRESS, FastIngress, Observer
from proxy.ingress.fastlane import PAUSE_ABOVE, HttpDate, serialize
from proxy.ingress.listener import IngressListener, listen
from proxy.ingress.responses import error, success
from proxy.metrics import Metrics
from proxy_harness import WEB_KEY, Stack, basic, proxy_stack

AUTH = basic(WEB_KEY)


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    async with proxy_stack() as running:
        yield running


def track(message_id: str, user: str = "u-1") -> bytes:
    return orjson.dumps({"type": "track", "event": "Fast", "userId": user, "messageId": message_id})


def request(path: str, body: bytes, *extra: str, version: str = "HTTP/1.1", length: bool = True) -> bytes:
    head = [f"POST {path} {version}", "Host: 127.0.0.1", f"Authorization: {AUTH}", "Content-Type: application/json", *extra]
    if length:
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class Client:
    """A raw HTTP/1.1 connection: what is written is exactly what splitter reads."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, stack: Stack | str) -> Client:
        host, port = (stack if isinstance(stack, str) else stack.url).removeprefix("http://").rsplit(":", 1)
        return cls(*await asyncio.open_connection(host, int(port)))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
        """One response: status, headers (lower-cased names), body (Content-Length framed)."""
        async with asyncio.timeout(timeout):
            status_line = await self.reader.readline()
            assert status_line.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), status_line
            headers: dict[str, str] = {}
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return int(status_line.split()[1]), headers, body

    async def closed_by_server(self, timeout: float = 5.0) -> bool:
        async with asyncio.timeout(timeout):
            return await self.reader.read(1) == b""

    def close(self) -> None:
        self.writer.close()

    def reset(self) -> None:
        """Go away with a RST, as a crashed client does: the server sees the connection lost, not an EOF."""
        self.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


async def test_pipelined_requests_are_answered_in_order_and_delivered(stack: Stack) -> None:
    client = await Client.open(stack)
    await client.send(b"".join(request("/v1/track", track(f"pipe-{i}")) for i in range(3)))
    answers = [await client.response() for _ in range(3)]
    assert [status for status, _, _ in answers] == [200, 200, 200]
    assert all(orjson.loads(body) == {"success": True} for _, _, body in answers)
    assert answers[0][1]["content-type"] == "application/json" and answers[0][1]["date"].endswith("GMT")
    await stack.settle()
    assert stack.segment.message_ids() == ["pipe-0", "pipe-1", "pipe-2"]
    client.close()


async def test_hundreds_of_pipelined_requests_in_one_write_are_answered_in_order(stack: Stack) -> None:
    client = await Client.open(stack)
    await client.send(b"".join(request("/v1/track", track(f"many-{i}", f"u{i}")) for i in range(300)))
    statuses = [(await client.response())[0] for _ in range(300)]
    assert statuses == [200] * 300
    await stack.settle()
    assert stack.segment.message_ids() == [f"many-{i}" for i in range(300)]
    client.close()


async def test_a_request_split_across_many_writes_is_framed_correctly(stack: Stack) -> None:
    client = await Client.open(stack)
    data = request("/v1/batch", orjson.dumps({"batch": [orjson.loads(track(f"split-{i}", f"u{i}")) for i in range(40)]}))
    for start in range(0, len(data), 97):  # the head arrives in pieces too
        await client.send(data[start:start + 97])
        await asyncio.sleep(0)
    status, _, body = await client.response()
    assert (status, orjson.loads(body)) == (200, {"success": True})
    await stack.settle()
    assert sorted(stack.segment.message_ids()) == sorted(f"split-{i}" for i in range(40))
    client.close()


async def test_after_a_handed_over_request_the_connection_stays_correct(stack: Stack) -> None:
    """Fast, then telemetry (/v1/m: aiohttp's), then fast again, all written at once: three answers in order."""
    client = await Client.open(stack)
    telemetry = b'{"series":[]}'
    await client.send(request("/v1/track", track("mixed-0")) + request("/v1/m", telemetry) + request("/v1/track", track("mixed-2")))
    answers = [await client.response() for _ in range(3)]
    assert [status for status, _, _ in answers] == [200, 200, 200]
    await stack.settle()
    assert stack.segment.message_ids() == ["mixed-0", "mixed-2"]
    client.close()


@pytest.mark.parametrize("shape", ["chunked", "expect-100"])
async def test_what_the_lane_does_not_frame_itself_is_answered_by_aiohttp(stack: Stack, shape: str) -> None:
    client = await Client.open(stack)
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
async def test_malformed_framing_is_refused_by_aiohttp(stack: Stack, head: str) -> None:
    client = await Client.open(stack)
    await client.send(f"POST /v1/track HTTP/1.1\r\nHost: x\r\n{head}\r\n\r\n12345".encode())
    status, _, _ = await client.response()
    assert status == 400
    client.close()
    assert stack.segment.message_ids() == []


async def test_a_bare_lf_request_is_handed_over_rather_than_left_waiting(stack: Stack) -> None:
    client = await Client.open(stack)
    body = track("lf-only")
    await client.send(f"POST /v1/track HTTP/1.1\nHost: x\nAuthorization: {AUTH}\nContent-Length: {len(body)}\n\n".encode() + body)
    status, _, _ = await client.response()  # whatever aiohttp makes of it, the client gets an answer
    assert status in (200, 400)
    client.close()


async def test_an_oversized_body_gets_413_without_being_read(stack: Stack) -> None:
    client = await Client.open(stack)
    await client.send(b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nAuthorization: " + AUTH.encode() + b"\r\nContent-Length: 9000000\r\n\r\n")
    status, _, body = await client.response()
    assert status == 413 and orjson.loads(body)["code"] == "request_too_large"
    client.close()


async def test_connection_close_is_honoured(stack: Stack) -> None:
    client = await Client.open(stack)
    await client.send(request("/v1/track", track("closing"), "Connection: close"))
    status, headers, _ = await client.response()
    assert status == 200 and headers["connection"] == "close"
    assert await client.closed_by_server()
    client.close()


async def test_http_1_0_goes_to_aiohttp(stack: Stack) -> None:
    client = await Client.open(stack)
    await client.send(request("/v1/track", track("old-http"), version="HTTP/1.0"))
    status_line = await asyncio.wait_for(client.reader.readline(), 5)
    assert status_line.split()[1] == b"200"
    client.close()
    await stack.settle()
    assert stack.segment.message_ids() == ["old-http"]


async def test_a_request_counts_in_flight_from_its_headers_and_is_released_if_its_body_never_comes() -> None:
    async with proxy_stack(max_in_flight=1) as stack:
        held = await Client.open(stack)
        body = track("held")
        await held.send(request("/v1/track", body)[:-5])  # headers and most of the body
        await stack.wait_metric("splitter_requests_in_flight", 1)
        second = await Client.open(stack)
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
        client = await Client.open(stack)
        await client.send(request("/v1/track", track("then-idle")))
        assert (await client.response())[0] == 200
        started = time.monotonic()
        assert await client.closed_by_server(timeout=5)
        assert time.monotonic() - started >= 0.25
        client.close()


async def test_shutdown_finishes_the_request_in_flight_and_closes_idle_connections() -> None:
    async with proxy_stack(drain_timeout=5.0) as stack:
        idle = await Client.open(stack)
        await idle.send(request("/v1/track", track("before")))
        assert (await idle.response())[0] == 200
        busy = await Client.open(stack)
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
    client = await Client.open(stack)
    await client.send(request("/v1/track", track("half-closed")))
    client.writer.write_eof()
    status, _, _ = await client.response()
    assert status == 200
    assert await client.closed_by_server()
    client.close()
    await stack.settle()
    assert stack.segment.message_ids() == ["half-closed"]


SERVE_RULES = f"""\
version: 1
destinations:
  segment: {{kind: segment, url: "${{SEGMENT_URL}}"}}
sources:
  - name: web
    write_keys: ["{WEB_KEY}"]
rules:
  - name: all
    route: {{to: [segment]}}
"""


async def test_splitter_serve_hands_connections_over_on_uvloop(tmp_path: Path) -> None:
    """The real process (uvloop's transports): a keep-alive connection goes fast, then to aiohttp for a
    CORS preflight and a chunked call, and keeps answering in order."""
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


def head(*lines: str) -> bytes:
    return ("\r\n".join(["POST /v1/track HTTP/1.1", "Host: x", f"Authorization: {AUTH}", *lines]) + "\r\n\r\n").encode("latin-1")


async def test_a_content_length_of_thousands_of_digits_is_answered(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    client = await Client.open(stack)
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
    client = await Client.open(stack)
    await client.send(data)
    assert await asyncio.wait_for(client.reader.readline(), 2)  # aiohttp's 400, not silence until the idle timeout
    client.close()


@pytest.mark.parametrize("extra", ["X-Note: a\x00b", "X-Forwarded-For: 1.2.3.4\x01", "X(Bad)@: v", "X-Long: " + "a" * 9000],
                         ids=["nul", "control", "not-a-token", "line-over-8190"])
async def test_a_head_llhttp_refuses_is_refused_not_delivered(stack: Stack, extra: str) -> None:
    body = track("refused-head")
    client = await Client.open(stack)
    await client.send(head(extra, f"Content-Length: {len(body)}") + body)
    status, _, _ = await client.response()
    client.close()
    assert status == 400
    assert stack.segment.message_ids() == []


class HeldRoute:
    """A fast route whose answer waits until the test says so: a request held "being answered"."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.outcome = ""

    async def __call__(self, request: object) -> web.StreamResponse:
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.outcome = "cancelled"
            raise
        self.outcome = "answered"
        return success()


@asynccontextmanager
async def held_lane() -> AsyncIterator[tuple[IngressListener, HeldRoute]]:
    """The fast lane with one held route (/v1/track) and aiohttp behind it (/v1/m)."""
    route = HeldRoute()
    app = web.Application(client_max_size=4 * 1024**2)
    app.router.add_post("/v1/m", _read_and_succeed)
    app[FAST_INGRESS] = FastIngress({"/v1/track": route}, Observer(Metrics(), ("*",), 10))
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    listener = await listen(runner, "127.0.0.1", 0)
    try:
        yield listener, route
    finally:
        route.release.set()
        await listener.close(drain_timeout=1.0)


async def held_request(listener: IngressListener) -> None:
    """Until the request just sent is being answered (held by the route)."""
    async with asyncio.timeout(5):
        while listener.lane.observer.in_flight != 1:
            await asyncio.sleep(0.01)


async def _read_and_succeed(request: web.Request) -> web.Response:
    await request.read()
    return success()


async def test_shutdown_waits_for_a_request_whose_client_went_away() -> None:
    async with held_lane() as (listener, route):
        client = await Client.open(listener.url)
        await client.send(request("/v1/track", track("orphan")))
        await held_request(listener)
        client.reset()
        await asyncio.sleep(0.1)
        asyncio.get_running_loop().call_later(0.3, route.release.set)
        started = time.monotonic()
        await listener.close(drain_timeout=5.0)
        assert time.monotonic() - started >= 0.25 and route.outcome == "answered"
        assert listener.lane.observer.in_flight == 0 and not listener.lane.tasks


async def test_shutdown_cancels_what_is_still_running_at_the_drain_timeout() -> None:
    async with held_lane() as (listener, route):
        client = await Client.open(listener.url)
        await client.send(request("/v1/track", track("too-slow")))
        await held_request(listener)
        await listener.close(drain_timeout=0.2)
        assert route.outcome == "cancelled"
        assert listener.lane.observer.in_flight == 0 and not listener.lane.tasks
        assert await client.closed_by_server()
        client.close()


async def test_a_connection_reset_while_answering_is_never_handed_to_aiohttp() -> None:
    """Behind the held request, one aiohttp must take, past PAUSE_ABOVE (reading paused); then a RST."""
    errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: errors.append(context))
    async with held_lane() as (listener, route):
        client = await Client.open(listener.url)
        await client.send(request("/v1/track", track("first")))
        await held_request(listener)
        client.writer.write(request("/v1/m", b"x" * (PAUSE_ABOVE + 500 * 1024)))
        await asyncio.sleep(0.2)
        client.reset()
        await asyncio.sleep(0.1)
        route.release.set()
        await asyncio.sleep(0.3)
    assert not errors, [(context.get("message"), repr(context.get("exception"))) for context in errors]


def test_serialize_writes_status_headers_length_and_date() -> None:
    data = serialize(error(429, "too_many_requests", "busy", {"Retry-After": "1"}), "Mon, 23 Nov 2026 12:00:00 GMT", keep_alive=False)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 429 Too Many Requests"
    assert {"Retry-After: 1", "Content-Type: application/json", f"Content-Length: {len(body)}", "Connection: close",
            "Date: Mon, 23 Nov 2026 12:00:00 GMT"} <= set(lines[1:])
    assert orjson.loads(body)["code"] == "too_many_requests"
    assert b"Connection" not in serialize(success(), "d", keep_alive=True)


def test_the_date_header_is_rfc_7231_and_changes_with_the_second() -> None:
    date = HttpDate()
    text = date.now()
    assert text.endswith(" GMT") and len(text) == 29
