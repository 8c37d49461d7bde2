"""Upstreams and CDNs that misbehave, against a real `splitter serve` on loopback.

Each stand-in is a real server on 127.0.0.1: one that redirects (a balancer sending http:// to
https://), one that answers with hundreds of megabytes (streamed lazily, never allocated), one that
lies at the HTTP level (cut answers, wrong Content-Length, hangs, garbage), and a CDN that is down or
answers with a giant bundle. Every test counts messageIds in (told 200 by splitter) and out (held
by an upstream that gave a complete 2xx, or in the dead-letter file): nothing acknowledged is lost.
Memory is judged from the kernel's own peak (/proc/PID/status VmHWM) of the splitter process.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from loadtest.process import SplitterProcess, launch_splitter
from loadtest.receivers import RunningReceiver, start_receiver
from proxy.engine.masking import mask
from tests.rules_texts import served_head

WRITE_KEY = "edges-web-key-0123456789"
SECRET = "s3cret-in-location"
LEAKY_KEY = "leaky-key-in-query-0123"
MB = 1024 * 1024
HUGE = 500 * MB  # what the misbehaving upstream offers; never allocated by it
RSS_BOUND_KB = 200 * 1024  # generous: splitter idles at ~60 MB
TIMEOUT = 60.0  # bounds every wait; never a performance assertion
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode(), "Content-Type": "application/json"}


def rules_text(timeout: float) -> str:
    return served_head(WRITE_KEY, timeout=timeout, delivery="retry_base: 0.01, retry_max: 0.05, breaker_cooldown: 0.05, flush_interval: 0.005") + """\
rules:
  - name: all
    route: {to: [segment]}
"""


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


async def start_splitter(tmp_path: Path, upstream_url: str, *, timeout: float = 5.0, extra: tuple[str, ...] = ()) -> SplitterProcess:
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text(timeout))
    env = dict(os.environ, SEGMENT_URL=upstream_url, PYTHONUNBUFFERED="1")
    return await launch_splitter(str(rules), env, ["--spool-dir", str(tmp_path / "spool"), "--dead-letter-dir", str(tmp_path / "dead"),
                                                   "--drain-timeout", "1", "--reload-interval", "60", *extra])


async def send(splitter: SplitterProcess, prefix: str, requests: int, per_request: int = 20) -> list[str]:
    """POST batches; the messageIds of every one splitter answered 200 (all of them, or the test fails)."""
    acked: list[str] = []
    async with aiohttp.ClientSession() as client:
        for n in range(requests):
            ids = [f"{prefix}-{n}-{i}" for i in range(per_request)]
            body = {"batch": [{"type": "track", "event": "E", "anonymousId": m, "messageId": m} for m in ids]}
            async with client.post(splitter.ingress + "/v1/batch", data=orjson.dumps(body), headers=AUTH) as response:
                assert response.status == 200, await response.text()
            acked.extend(ids)
    return acked


async def metric(splitter: SplitterProcess, name: str) -> float:
    async with aiohttp.ClientSession() as client, client.get(splitter.admin + "/metrics") as response:
        text = await response.text()
    return sum(float(m.group(1)) for m in re.finditer(rf'^{name}{{destination="segment"}} (\S+)$', text, re.MULTILINE))


async def eventually(check: Callable[[], Awaitable[bool]], what: str, splitter: SplitterProcess, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}; last log lines: {splitter.log[-8:]}")
        await asyncio.sleep(0.05)


def peak_rss_kb(pid: int) -> int:
    """The kernel's high-water mark of the process's resident memory."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


def ids_in(body: bytes) -> list[str]:
    return [str(e["messageId"]) for e in orjson.loads(body)["batch"]] if body else []


def dead_letters(tmp_path: Path) -> list[dict[str, object]]:
    path = tmp_path / "dead" / "segment.ndjson"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


async def stream_lazily(request: web.Request, response: web.StreamResponse, total: int) -> int:
    """Write `total` bytes in 1 MiB pieces of one shared buffer; stop when the client goes away."""
    await response.prepare(request)
    piece, sent = b"x" * MB, 0
    try:
        for _ in range(total // MB):  # bounded
            await response.write(piece)
            sent += MB
    except (ConnectionError, RuntimeError):
        pass  # the reader closed the connection: what splitter should do
    return sent


# -- redirects ----------------------------------------------------------------------------------------------------------


@dataclass
class Redirector:
    """A balancer answering every POST with 302 to another receiver, which 200s anything it is sent."""

    posts: int = 0
    target_requests: list[str] = field(default_factory=list)
    target_ids: list[str] = field(default_factory=list)


@pytest.fixture
async def redirector() -> AsyncIterator[tuple[Redirector, str, str]]:
    state = Redirector()

    async def target(request: web.Request) -> web.Response:
        state.target_requests.append(request.method)
        state.target_ids.extend(ids_in(await request.read()))
        return web.json_response({"success": True})

    target_app = web.Application()
    target_app.router.add_route("*", "/{tail:.*}", target)
    target_runner, target_url = await serve(target_app)
    location = target_url.replace("http://", f"http://user:{SECRET}@") + f"/v1/batch?writeKey={LEAKY_KEY}"

    async def balancer(request: web.Request) -> web.Response:
        await request.read()
        state.posts += 1
        return web.Response(status=302, headers={"Location": location}, text="moved")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", balancer)
    runner, url = await serve(app)
    yield state, url, target_url
    await runner.cleanup()
    await target_runner.cleanup()


async def test_a_redirect_is_never_followed_and_its_events_end_as_redirected_dead_letters(tmp_path: Path, redirector) -> None:  # type: ignore[no-untyped-def]
    state, url, target_url = redirector
    splitter = await start_splitter(tmp_path, url)
    try:
        acked = await send(splitter, "redir", 1)

        async def settled() -> bool:  # dead-lettered, or (the bug) counted delivered
            return len(dead_letters(tmp_path)) >= len(acked) or await metric(splitter, "splitter_events_delivered_total") > 0

        await eventually(settled, "the redirected events settled", splitter)
        assert await metric(splitter, "splitter_events_delivered_total") == 0
        assert state.target_requests == [] and state.target_ids == []  # nothing followed the redirect
        assert state.posts > 1  # retried before giving up
        letters = dead_letters(tmp_path)
        assert sorted(str(letter["event"]["messageId"]) for letter in letters) == sorted(acked)  # type: ignore[index]
        host = target_url.removeprefix("http://")
        for letter in letters:
            assert letter["reason"] == "redirected" and letter["status"] == 302
            assert f"{host}/v1/batch" in str(letter["response"])
        assert await metric(splitter, "splitter_events_dead_lettered_total") == len(acked)
        [warned] = splitter.events("upstream_redirected")  # once per URL, not once per attempt
        assert warned["destination"] == "segment" and f"{host}/v1/batch" in str(warned["location"])
        assert url.removeprefix("http://") in str(warned["url"])
    finally:
        assert await splitter.stop() == 0
    everything = orjson.dumps(splitter.log).decode() + (tmp_path / "dead" / "segment.ndjson").read_text()
    for credential in (SECRET, LEAKY_KEY, WRITE_KEY):
        assert credential not in everything


# -- huge answers -------------------------------------------------------------------------------------------------------


@dataclass
class Flood:
    """Answers the first `left` batches with HUGE bytes, then behaves: forwards to a real receiver."""

    style: str
    receiver: RunningReceiver
    left: int = 3
    sent_bytes: list[int] = field(default_factory=list)


@pytest.fixture
async def flood(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Flood, str]]:
    receiver = await start_receiver("segment", record=True)
    state = Flood(request.param, receiver)
    client = aiohttp.ClientSession()

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: request.headers[k] for k in ("Authorization", "Content-Type") if k in request.headers}
        async with client.post(receiver.url + request.path, data=body, headers=headers) as answer:
            return web.Response(status=answer.status, body=await answer.read(), content_type="application/json")

    async def handler(request: web.Request) -> web.StreamResponse:
        if state.left <= 0:
            return await forward(request)
        state.left -= 1
        if state.style == "200-chunked":  # the events are taken, then the answer never ends
            await forward(request)
            response = web.StreamResponse(status=200)
        else:
            await request.read()
            response = web.StreamResponse(status=500, headers={"Content-Type": "text/plain"})
        if state.style == "500-length":
            response.content_length = HUGE
        state.sent_bytes.append(await stream_lazily(request, response, HUGE))
        return response

    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    runner, url = await serve(app)
    yield state, url
    await runner.cleanup()
    await client.close()
    await receiver.close()


@pytest.mark.parametrize("flood", ["500-chunked", "500-length", "200-chunked"], indirect=True)
async def test_a_huge_answer_is_read_only_up_to_a_bound_and_the_events_still_arrive(tmp_path: Path, flood) -> None:  # type: ignore[no-untyped-def]
    state, url = flood
    splitter = await start_splitter(tmp_path, url, timeout=30)
    try:
        acked: list[str] = []

        async def arrived() -> bool:
            return set(acked) <= set(state.receiver.receiver.message_ids())

        for round_ in range(5):  # one request at a time, so each is its own upstream batch
            acked += await send(splitter, f"huge{round_}", 1)
            await eventually(arrived, "every event at the receiver", splitter)
        assert state.left == 0 and len(state.sent_bytes) == 3  # every huge answer was really served
        assert peak_rss_kb(splitter.process.pid) < RSS_BOUND_KB
        assert all(sent < 64 * MB for sent in state.sent_bytes), state.sent_bytes  # closed, not drained
        assert dead_letters(tmp_path) == []
    finally:
        assert await splitter.stop() == 0


# -- liars --------------------------------------------------------------------------------------------------------------


@dataclass
class Liar:
    """A raw HTTP/1.1 upstream: each request gets the next behaviour of `plan`, then `ok` forever."""

    plan: list[str]
    done: list[str] = field(default_factory=list)
    accepted: set[str] = field(default_factory=set)  # ids of requests given a complete 2xx

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
                ids = ids_in(await reader.readexactly(length))
                behaviour = self.plan.pop(0) if self.plan else "ok"
                self.done.append(behaviour)
                if behaviour in ("ok", "garbage-200"):
                    self.accepted.update(ids)
                    body = b'{"success": true}' if behaviour == "ok" else b"<html>\x00\xff not json"
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                elif behaviour == "short-200":  # announces 100 bytes, sends 6, closes
                    writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"succ')
                    break
                elif behaviour == "cut-chunked-200":  # one chunk, then the connection ends without the last chunk
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"suc\r\n")
                    break
                elif behaviour == "close-before-answer":
                    break
                elif behaviour in ("hang", "hang-mid-200"):
                    if behaviour == "hang-mid-200":
                        writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"su')
                    await asyncio.wait_for(reader.read(), TIMEOUT)  # until splitter gives up and closes
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()


async def test_an_upstream_that_lies_or_hangs_loses_nothing(tmp_path: Path) -> None:
    liar = Liar(["hang", "short-200", "cut-chunked-200", "hang-mid-200", "close-before-answer", "garbage-200"])
    server = await asyncio.start_server(liar.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    splitter = await start_splitter(tmp_path, f"http://127.0.0.1:{port}", timeout=1)
    try:
        acked = await send(splitter, "liar", 3)

        async def settled() -> bool:
            return not liar.plan and set(acked) <= liar.accepted

        await eventually(settled, "every event taken with a complete 2xx", splitter)
        assert liar.done[:6] == ["hang", "short-200", "cut-chunked-200", "hang-mid-200", "close-before-answer", "garbage-200"]
        assert dead_letters(tmp_path) == []
        assert await metric(splitter, "splitter_events_delivered_total") == len(acked)  # each counted once, when it was taken
    finally:
        assert await splitter.stop() == 0
        server.close()
        await server.wait_closed()


# -- the CDN ------------------------------------------------------------------------------------------------------------


async def closed_port_url() -> str:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    return f"http://127.0.0.1:{port}"  # nothing listens there any more


async def test_an_unreachable_cdn_is_logged_without_the_write_key(tmp_path: Path) -> None:
    splitter = await start_splitter(tmp_path, await closed_port_url(), extra=("--cdn-url", await closed_port_url()))
    try:
        async with aiohttp.ClientSession() as client:
            for path in (f"/v1/projects/{WRITE_KEY}/settings", f"/analytics.js/v1/{WRITE_KEY}/analytics.min.js?v={WRITE_KEY}"):
                async with client.get(splitter.ingress + path) as response:
                    assert response.status == 502
                    assert (await response.json())["code"] == "cdn_unavailable"
        lines = splitter.events("cdn_unavailable")
        assert len(lines) == 2
        assert all(mask(WRITE_KEY) in str(line["url"]) for line in lines)
    finally:
        assert await splitter.stop() == 0
    assert WRITE_KEY not in orjson.dumps(splitter.log).decode()


@pytest.fixture
async def giant_cdn() -> AsyncIterator[tuple[str, list[int]]]:
    sent: list[int] = []

    async def giant(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/javascript"})
        if request.query.get("length"):
            response.content_length = HUGE
        sent.append(await stream_lazily(request, response, HUGE))
        return response

    async def small(request: web.Request) -> web.Response:
        return web.json_response({"integrations": {"Segment.io": {"apiKey": request.match_info["key"]}}})

    app = web.Application()
    app.router.add_get("/v1/projects/{key}/settings", small)
    app.router.add_get("/analytics.js/v1/{key}/analytics.min.js", giant)
    runner, url = await serve(app)
    yield url, sent
    await runner.cleanup()


async def test_a_giant_cdn_answer_is_refused_with_502_and_never_buffered(tmp_path: Path, giant_cdn) -> None:  # type: ignore[no-untyped-def]
    cdn_url, sent = giant_cdn
    splitter = await start_splitter(tmp_path, await closed_port_url(), extra=("--cdn-url", cdn_url))
    try:
        async with aiohttp.ClientSession() as client:
            for query in ("", "?length=1"):
                async with client.get(splitter.ingress + f"/analytics.js/v1/{WRITE_KEY}/analytics.min.js{query}") as response:
                    assert response.status == 502, response.headers  # checked before reading: a 200 here is the giant body
                    answer = await response.json()
                    assert answer["success"] is False and answer["code"] == "cdn_answer_too_large"
            async with client.get(splitter.ingress + f"/v1/projects/{WRITE_KEY}/settings") as response:
                assert response.status == 200  # the CDN is still usable
        assert peak_rss_kb(splitter.process.pid) < RSS_BOUND_KB
        assert len(sent) == 2 and all(n < 64 * MB for n in sent), sent
    finally:
        assert await splitter.stop() == 0
    assert WRITE_KEY not in orjson.dumps(splitter.log).decode()
