"""The ingest listener's limits on real sockets: draining on shutdown, the header and body timeouts,
and the share of in-flight slots that requests still receiving their body may hold.

A small application with splitter's observer (in-flight limit, metrics, JSON errors) stands in for
the ingress application, so a request can be held "being answered" for as long as a test needs.
The same limits against a real `splitter serve` with hostile clients are in test_ingest_abuse.py.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import orjson
import pytest
from aiohttp import web
from raw_http import Client, request, track

from proxy.ingress.app import Observer, observing
from proxy.ingress.body import read_body
from proxy.ingress.listener import IngressListener, listen
from proxy.ingress.responses import success
from proxy.metrics import Metrics
from proxy.settings import ServeSettings, SettingsError


class HeldRoute:
    """A route whose answer waits until the test says so: a request held "being answered"."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.outcome = ""

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.outcome = "cancelled"
            raise
        self.outcome = "answered"
        return success()


async def _read_and_succeed(request: web.Request) -> web.Response:
    await read_body(request)
    return success()


@asynccontextmanager
async def held_port(max_in_flight: int = 10, header_timeout: float = 10.0, body_timeout: float = 30.0
                    ) -> AsyncIterator[tuple[IngressListener, HeldRoute, Observer]]:
    """The ingest listener over a small application with splitter's observer (in-flight limit, JSON
    errors): /v1/track is held until released, /v1/batch and /v1/m read the body (read_body) and answer."""
    route = HeldRoute()
    observer = Observer(Metrics(), ("*",), max_in_flight)
    app = web.Application(middlewares=[observing(observer)], client_max_size=4 * 1024**2)
    app.router.add_post("/v1/track", route.__call__)
    app.router.add_post("/v1/batch", _read_and_succeed)
    app.router.add_post("/v1/m", _read_and_succeed)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    listener = await listen(runner, "127.0.0.1", 0, header_timeout=header_timeout, body_timeout=body_timeout)
    try:
        yield listener, route, observer
    finally:
        route.release.set()
        await listener.close(drain_timeout=1.0)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Until `condition()` holds (a bounded correctness wait, not a measurement)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_shutdown_waits_for_a_request_whose_client_went_away() -> None:
    async with held_port() as (listener, route, observer):
        client = await Client.open(listener.url)
        await client.send(request("/v1/track", track("orphan")))
        await until(lambda: observer.in_flight == 1)
        client.reset()
        await asyncio.sleep(0.1)
        asyncio.get_running_loop().call_later(0.3, route.release.set)
        started = time.monotonic()
        await listener.close(drain_timeout=5.0)
        assert time.monotonic() - started >= 0.25 and route.outcome == "answered"
        assert observer.in_flight == 0


async def test_shutdown_cancels_what_is_still_running_at_the_drain_timeout() -> None:
    async with held_port() as (listener, route, observer):
        client = await Client.open(listener.url)
        await client.send(request("/v1/track", track("too-slow")))
        await until(lambda: observer.in_flight == 1)
        await listener.close(drain_timeout=0.2)
        await until(lambda: route.outcome == "cancelled")
        assert observer.in_flight == 0
        assert await client.closed_by_server()
        client.close()


async def test_a_head_still_arriving_at_shutdown_gets_503_and_does_not_hold_the_drain() -> None:
    async with held_port(header_timeout=30.0) as (listener, route, observer):
        answered = await Client.open(listener.url)
        await answered.send(request("/v1/track", track("held")))
        await until(lambda: observer.in_flight == 1)
        slow = await Client.open(listener.url)
        await slow.send(request("/v1/batch", b"{}")[:25])  # a head that never ends
        started = time.monotonic()
        closing = asyncio.ensure_future(listener.close(drain_timeout=20.0))
        status, headers, body = await slow.response(timeout=5)
        assert status == 503 and headers["connection"] == "close" and orjson.loads(body)["code"] == "shutting_down"
        route.release.set()  # the request being answered still gets its answer
        assert (await answered.response())[0] == 200
        await asyncio.wait_for(closing, timeout=10)
        assert time.monotonic() - started < 10  # not the drain timeout
        answered.close()
        slow.close()


async def test_a_reset_while_pipelined_requests_wait_leaves_no_loop_errors() -> None:
    """Behind a held request, a large pipelined one (reading pauses); then a RST."""
    errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: errors.append(context))
    async with held_port() as (listener, route, observer):
        client = await Client.open(listener.url)
        await client.send(request("/v1/track", track("first")))
        await until(lambda: observer.in_flight == 1)
        client.writer.write(request("/v1/m", b"x" * (1536 * 1024)))
        await asyncio.sleep(0.2)
        client.reset()
        await asyncio.sleep(0.1)
        route.release.set()
        await asyncio.sleep(0.3)
    assert not errors, [(context.get("message"), repr(context.get("exception"))) for context in errors]


async def test_a_body_that_does_not_arrive_in_time_gets_408_json_and_frees_its_slot() -> None:
    async with held_port(body_timeout=0.5) as (listener, _, observer):
        client = await Client.open(listener.url)
        data = request("/v1/batch", orjson.dumps({"batch": []}))
        await client.send(data[:-4])
        await until(lambda: observer.in_flight == 1)
        status, headers, body = await client.response(timeout=5)
        assert status == 408 and headers["connection"] == "close"
        assert orjson.loads(body)["code"] == "body_timeout"
        await until(lambda: observer.in_flight == 0)
        assert await client.closed_by_server(timeout=15)  # after at most aiohttp's lingering read of the rest
        client.close()


async def test_a_head_that_does_not_arrive_in_time_gets_408_and_the_connection_closes() -> None:
    async with held_port(header_timeout=0.5) as (listener, _, observer):
        client = await Client.open(listener.url)
        data = request("/v1/batch", b"{}")

        async def trickle() -> None:
            for byte in data[:40]:
                client.writer.write(bytes([byte]))
                await asyncio.sleep(0.1)

        sender = asyncio.ensure_future(trickle())
        status, headers, body = await client.response(timeout=5)
        sender.cancel()
        assert status == 408 and headers["connection"] == "close" and orjson.loads(body)["code"] == "header_timeout"
        assert await client.closed_by_server()
        assert observer.in_flight == 0
        client.close()


async def test_a_head_waiting_behind_pipelined_answers_is_not_timed_out() -> None:
    """More than 32 pipelined requests wait for their answers, so splitter stops reading; the head
    begun after them waits on splitter, not on the client, so its header clock stands still."""
    async with held_port(header_timeout=0.5) as (listener, route, observer):
        client = await Client.open(listener.url)
        last = request("/v1/track", track("m-33"))
        await client.send(b"".join(request("/v1/track", track(f"m-{i}")) for i in range(33)) + last[:30])
        await until(lambda: observer.in_flight == 1)
        await asyncio.sleep(1.5)  # three header timeouts, and the sweeper's passes
        route.release.set()
        answers = [await client.response() for _ in range(33)]
        assert [status for status, _, _ in answers] == [200] * 33
        await client.send(last[30:])
        status, _, body = await client.response()
        assert status == 200, body
        client.close()


async def test_the_header_clock_runs_again_once_the_answers_caught_up() -> None:
    async with held_port(header_timeout=0.5) as (listener, route, observer):
        client = await Client.open(listener.url)
        last = request("/v1/track", track("m-33"))
        await client.send(b"".join(request("/v1/track", track(f"m-{i}")) for i in range(33)) + last[:30])
        await until(lambda: observer.in_flight == 1)
        await asyncio.sleep(1.0)
        route.release.set()
        assert [(await client.response())[0] for _ in range(33)] == [200] * 33
        started = time.monotonic()
        status, headers, body = await client.response(timeout=5)  # the rest of the head never comes
        assert status == 408 and orjson.loads(body)["code"] == "header_timeout" and headers["connection"] == "close"
        assert time.monotonic() - started < 3
        client.close()


async def test_an_idle_keepalive_connection_is_not_cut_by_the_header_timeout() -> None:
    """The header clock runs from a request's first byte, not while a connection waits for its next request."""
    async with held_port(header_timeout=0.3) as (listener, _, _observer):
        client = await Client.open(listener.url)
        await client.send(request("/v1/batch", b"{}"))
        assert (await client.response())[0] == 200
        await asyncio.sleep(1.0)  # idle for longer than the header timeout
        await client.send(request("/v1/batch", b"{}"))
        assert (await client.response())[0] == 200
        client.close()


async def test_requests_whose_body_is_still_arriving_hold_at_most_half_the_slots() -> None:
    async with held_port(max_in_flight=4) as (listener, _, observer):
        slow = [await Client.open(listener.url) for _ in range(3)]
        data = request("/v1/batch", orjson.dumps({"batch": []}))
        await slow[0].send(data[:-3])
        await until(lambda: observer.arriving == 1)
        await slow[1].send(data[:-3])
        await until(lambda: observer.arriving == 2)
        await slow[2].send(data[:-3])
        status, _, body = await slow[2].response()
        assert status == 429 and orjson.loads(body)["code"] == "too_many_requests"
        whole = await Client.open(listener.url)
        await whole.send(data)
        assert (await whole.response())[0] == 200  # two slots are left for requests that came whole
        for client in slow[:2]:
            await client.send(data[-3:])
            assert (await client.response())[0] == 200
        assert observer.in_flight == 0 and observer.arriving == 0
        for client in [*slow, whole]:
            client.close()


@pytest.mark.parametrize(("field", "flag"), [("header_timeout", "--header-timeout (SPLITTER_HEADER_TIMEOUT)"),
                                             ("body_timeout", "--body-timeout (SPLITTER_BODY_TIMEOUT)")])
def test_a_timeout_of_zero_is_refused_naming_its_flag(field: str, flag: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(flag)):
        ServeSettings(config="rules.yaml", **{field: 0.0})  # type: ignore[arg-type]
