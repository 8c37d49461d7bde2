"""A real `splitter serve` against broken and hostile clients, on raw loopback sockets.

Each case was reproduced against the hand-written fast lane that framed the ingest port before
(proxy/ingress/listener.py says why it went): pipelined requests split at awkward places went
unanswered or, worse, a request hidden in a body was executed; slow bodies held every in-flight
slot; a client that never read its answers grew splitter's memory without bound. The timeouts are
set through SPLITTER_* variables, as an operator would; every wait is bounded, none is measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import orjson
import pytest
from proxy_harness import WEB_KEY, basic
from raw_http import Client, request, track
from test_ingest_edges import SERVE_RULES

from loadtest.harness import rss_mb
from loadtest.process import SplitterProcess, launch_splitter
from loadtest.receivers import RunningReceiver, start_receiver

RULES = SERVE_RULES  # the same one-destination rules as the in-process edge tests


@pytest.fixture
async def segment() -> AsyncIterator[RunningReceiver]:
    async with await start_receiver("segment", record=True) as running:
        yield running


@asynccontextmanager
async def serving(tmp_path: Path, segment: RunningReceiver, *extra: str, **env: str) -> AsyncIterator[SplitterProcess]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    splitter = await launch_splitter(str(rules), dict(os.environ, SEGMENT_URL=segment.url, **env), extra)
    try:
        yield splitter
    finally:
        assert await splitter.stop() == 0


async def in_flight(session: aiohttp.ClientSession, splitter: SplitterProcess) -> float:
    async with session.get(splitter.admin + "/metrics") as response:
        text = await response.text()
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("splitter_requests_in_flight"))


@pytest.mark.parametrize("pause", [0.0, 0.02], ids=["back-to-back", "paced"])
async def test_300_pipelined_calls_written_in_700_byte_pieces_are_all_answered_and_delivered(tmp_path: Path, segment: RunningReceiver,
                                                                                           pause: float) -> None:
    """Back to back, the server reads several pieces at once, cut anywhere; paced, one piece per read, each
    arriving once the calls before it are answered and the next one waits for the rest of its body."""
    async with serving(tmp_path, segment) as splitter:
        client = await Client.open(splitter.ingress)
        ids = [f"piece-{i:03}" for i in range(300)]
        data = b"".join(request("/v1/track", track(message_id, f"u{i}")) for i, message_id in enumerate(ids))

        async def write_in_pieces() -> None:
            for start in range(0, len(data), 700):
                await client.send(data[start:start + 700])
                await asyncio.sleep(pause)

        writer = asyncio.ensure_future(write_in_pieces())
        statuses = [(await client.response(timeout=30))[0] for _ in ids]
        await writer
        assert statuses == [200] * 300
        assert await client.nothing_more()
        client.close()
        await segment.receiver.wait_for(300, timeout=30)  # every event delivered, and acknowledged by the receiver
        assert sorted(segment.receiver.message_ids()) == ids


async def test_a_head_and_part_of_its_body_arriving_with_the_previous_request_is_answered(tmp_path: Path, segment: RunningReceiver) -> None:
    async with serving(tmp_path, segment) as splitter:
        client = await Client.open(splitter.ingress)
        second = request("/v1/track", track("second", padding="p" * 300))
        cut = second.index(b"\r\n\r\n") + 4 + 40
        await client.send(request("/v1/track", track("first")) + second[:cut])
        assert (await client.response(timeout=10))[0] == 200
        await asyncio.sleep(0.3)  # the rest of the second body comes in a later read
        await client.send(second[cut:])
        status, _, body = await client.response(timeout=10)
        assert (status, orjson.loads(body)) == (200, {"success": True})
        client.close()
        await segment.receiver.wait_for(2, timeout=30)
        assert segment.receiver.message_ids() == ["first", "second"]


@pytest.mark.parametrize("cut", [1, 40, 200])
async def test_a_request_hidden_in_a_body_is_never_executed(tmp_path: Path, segment: RunningReceiver, cut: int) -> None:
    """The second request's head and part of its body arrive with the first; the third request's body
    hides a complete request where a parser that lost its place after the second would start reading."""
    async with serving(tmp_path, segment) as splitter:
        first = request("/v1/track", track("first"))
        second = request("/v1/track", track("carrier", padding="c" * 300))
        hidden = request("/v1/track", track("smuggled"))
        padding = 0
        while len(third := request("/v1/track", b" " * padding + hidden)) - len(hidden) < len(first):
            padding += 1  # the hidden request starts len(first) bytes into the third request
        assert third.index(hidden) == len(first)
        split = second.index(b"\r\n\r\n") + 4 + cut
        client = await Client.open(splitter.ingress)
        await client.send(first + second[:split])
        assert (await client.response(timeout=10))[0] == 200  # the first
        await asyncio.sleep(0.3)
        await client.send(second[split:] + third)
        answers = []
        with contextlib.suppress(TimeoutError, AssertionError, asyncio.IncompleteReadError):
            for _ in range(3):
                answers.append(await client.response(timeout=5))
        extra = await client.nothing_more(1.0)  # no fourth answer: nothing was read out of a body
        client.close()
        await segment.receiver.wait_for(2, timeout=30)
        await asyncio.sleep(0.5)
        assert "smuggled" not in segment.receiver.message_ids()
        assert [status for status, _, _ in answers] == [200, 400]  # the carrier; the third, whose body is not JSON
        assert orjson.loads(answers[1][2])["code"] == "invalid_request" and extra
        assert segment.receiver.message_ids() == ["first", "carrier"]


async def test_slow_bodies_cannot_shut_out_complete_requests(tmp_path: Path, segment: RunningReceiver) -> None:
    """200 clients send headers, then a body byte a second, against 100 in-flight slots: a normal call
    still gets 200, and a slow body gets 408 (JSON) at the body timeout, its slot freed."""
    async with serving(tmp_path, segment, "--max-in-flight", "100", SPLITTER_BODY_TIMEOUT="4") as splitter:
        slow = [await Client.open(splitter.ingress) for _ in range(200)]
        body = track("never-complete", padding="s" * 60)

        async def trickle(client: Client) -> None:
            data = request("/v1/track", body)
            cut = data.index(b"\r\n\r\n") + 5
            with contextlib.suppress(OSError):
                await client.send(data[:cut])
                for byte in data[cut:cut + 30]:  # at most 30 s, never the whole body
                    await asyncio.sleep(1)
                    await client.send(bytes([byte]))

        tricklers = [asyncio.ensure_future(trickle(client)) for client in slow]
        try:
            async with aiohttp.ClientSession() as session:
                async with asyncio.timeout(20):
                    while await in_flight(session, splitter) < 50:
                        await asyncio.sleep(0.1)
                answer = None
                async with asyncio.timeout(20):  # a bounded correctness wait: retried on 429, must succeed
                    while answer != 200:
                        async with session.post(splitter.ingress + "/v1/track", data=track("normal"),
                                                headers={"Authorization": basic(WEB_KEY), "Content-Type": "application/json"}) as response:
                            answer = response.status
                        if answer != 200:
                            await asyncio.sleep(0.25)
            statuses = []
            for client in slow:
                with contextlib.suppress(TimeoutError, AssertionError, OSError, asyncio.IncompleteReadError):
                    status, _, text = await client.response(timeout=20)
                    statuses.append(status)
                    if status == 408:
                        assert orjson.loads(text)["code"] == "body_timeout"
            assert 408 in statuses and set(statuses) <= {408, 429}
        finally:
            for task in tricklers:
                task.cancel()
            for client in slow:
                client.close()
        await segment.receiver.wait_for(1, timeout=30)
        assert segment.receiver.message_ids() == ["normal"]


async def test_a_head_that_never_completes_gets_408_and_the_connection_closes(tmp_path: Path, segment: RunningReceiver) -> None:
    async with serving(tmp_path, segment, SPLITTER_HEADER_TIMEOUT="2") as splitter:
        client = await Client.open(splitter.ingress)
        data = request("/v1/track", track("slow-head"))

        async def trickle() -> None:
            with contextlib.suppress(OSError):
                for byte in data[:60]:
                    await client.send(bytes([byte]))
                    await asyncio.sleep(0.5)

        sender = asyncio.ensure_future(trickle())
        status, headers, body = await client.response(timeout=15)
        sender.cancel()
        assert status == 408 and orjson.loads(body)["code"] == "header_timeout" and headers["connection"] == "close"
        assert await client.closed_by_server()
        client.close()


async def test_clients_that_never_read_their_answers_cannot_grow_splitter_s_memory(tmp_path: Path, segment: RunningReceiver) -> None:
    """4 connections pipeline up to 50 MB each of small calls (an unknown key: answered 401 at once)
    and never read: splitter stops reading them once their answers back up, so RSS stays bounded."""
    async with serving(tmp_path, segment) as splitter:
        assert splitter._reader is not None
        splitter._reader.cancel()  # a line per refused call: read and drop them rather than keep them

        async def discard() -> None:
            assert splitter.process.stdout is not None
            while await splitter.process.stdout.read(1 << 16):
                pass

        splitter._reader = asyncio.ensure_future(discard())
        call = request("/v1/t", b"{}", auth=basic("not-a-known-key"))
        chunk = call * (65536 // len(call))
        deadline = time.monotonic() + 20
        peak = 0.0

        async def flood() -> int:
            client = await Client.open(splitter.ingress)
            sent = 0
            try:
                while sent < 50 * 1024 * 1024 and time.monotonic() < deadline:
                    client.writer.write(chunk)
                    sent += len(chunk)
                    # blocked for 3 s: splitter has stopped reading this connection (what the test expects)
                    await asyncio.wait_for(client.writer.drain(), max(0.01, min(3.0, deadline - time.monotonic())))
            except (TimeoutError, OSError):
                pass  # splitter stopped reading (or closed): what this test expects of a client that never reads
            finally:
                client.reset()
            return sent

        floods = asyncio.gather(*(flood() for _ in range(4)))
        while not floods.done():
            peak = max(peak, rss_mb(splitter.process.pid))
            await asyncio.sleep(0.2)
        await floods
        assert 0 < peak < 150, f"splitter's RSS peaked at {peak:.0f} MB"
        async with aiohttp.ClientSession() as session, session.post(
                splitter.ingress + "/v1/track", data=track("after-flood"), headers={"Authorization": basic(WEB_KEY)}) as response:
            assert response.status == 200


async def test_accepted_connections_send_tcp_keepalive_probes_within_a_few_minutes(tmp_path: Path, segment: RunningReceiver) -> None:
    """The kernel's keepalive timer on splitter's side of an idle connection (from /proc/net/tcp) is
    at most a minute, not the default two hours: a client that vanished is noticed."""
    tcp = Path("/proc/net/tcp")
    if not tcp.exists():
        pytest.skip("needs Linux's /proc/net/tcp")
    async with serving(tmp_path, segment) as splitter:
        client = await Client.open(splitter.ingress)
        await client.send(request("/v1/track", track("keepalive")))
        assert (await client.response())[0] == 200
        port = int(splitter.ingress.rsplit(":", 1)[1])
        timers = []
        for line in tcp.read_text().splitlines()[1:]:
            fields = line.split()
            local_port, state, timer = int(fields[1].split(":")[1], 16), fields[3], fields[5]
            if local_port == port and state == "01":  # splitter's side of an established connection
                timers.append(timer)
        client.close()
        assert timers, "no established connection on splitter's port"
        active, remaining = timers[0].split(":")
        assert active == "02"  # the keepalive timer runs
        assert int(remaining, 16) <= 60 * os.sysconf("SC_CLK_TCK")  # first probe within KEEPIDLE (60 s)
