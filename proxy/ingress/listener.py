"""The ingest port: llhttp-framed connections (connection.py), with the guards a public port needs.

Every request on the port is framed by llhttp through httptools, strictly; splitter frames nothing
itself (a hand-written lane once did, for plain Content-Length POSTs, and a request hidden in a body
was executed). aiohttp's own connection handler used to sit around that parser and cost about 50 µs
of CPU per request over the same read-and-answer on httptools, most of it outside the parser: its
loop task, its keep-alive timer, its request and response machinery. connection.py replaces that
handler. An ingest POST (no `Expect`) comes as a light request (request.py) and is dispatched here
straight to its handler through the observer (in-flight limit counted from the
headers, metrics, CORS, JSON errors), skipping aiohttp's router and middleware chain, which would
find the same handler; everything else (CORS preflights, telemetry, webhooks, the CDN routes, 404s,
`Expect: 100-continue`) goes through the application. `python -m loadtest.floor` measures this
port's HTTP layer next to plain aiohttp's on every run.

What this module adds, per listener:

- a header timeout: a request whose head has started to arrive must be complete within
  `header_timeout`, or the client gets 408 (JSON, in its turn after the answers before it) and the
  connection closes. The clock stands still while splitter holds reading for its own answers to
  catch up (more than 32 pipelined requests waiting): that wait is not the client's;
- a body deadline: each request carries `BODY_DEADLINE` (now + `body_timeout`); `read_body` answers 408
  past it, which frees the request's in-flight slot (a client sending one byte a second holds a slot
  for at most `body_timeout`; app.py also keeps such requests to half of the slots);
- TCP keepalive probes after KEEPIDLE seconds of silence, so a phone that vanished mid-upload is
  noticed in about two minutes instead of the kernel's default two hours;
- idle keep-alive connections closed after `keepalive_timeout`;
- on shutdown, `Connection: close` on the answers still being written, and the drain timeout for them;
  a head still arriving a second into the drain gets 503 `shutting_down`, so one slow client cannot
  hold a shutdown for the whole drain timeout.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import cast

from aiohttp import web

from proxy.background import BackgroundTask
from proxy.ingress.app import FAST_INGRESS
from proxy.ingress.body import BODY_DEADLINE
from proxy.ingress.connection import IngestConnection
from proxy.ingress.request import LightRequest
from proxy.ingress.responses import Answer
from proxy.log import get_logger

log = get_logger("splitter.ingress")

KEEPALIVE_TIMEOUT = 75.0  # seconds an idle keep-alive connection stays open (aiohttp's default for web apps)
HEADER_TIMEOUT = 10.0  # seconds from a request's first byte to the end of its headers
BODY_TIMEOUT = 30.0  # seconds from a request's headers to the end of its body
KEEPIDLE, KEEPINTVL, KEEPCNT = 60, 10, 6  # TCP keepalive: first probe after 60 s of silence, gone after 6 unanswered
SWEEP_INTERVAL = 1.0  # how often header deadlines are checked (the timeout is honoured to within this)
SHUTDOWN_HEAD_GRACE = 1.0  # during the shutdown drain, a head incomplete for this long gets 503 and the connection closes


def _tune_keepalive(transport: asyncio.BaseTransport) -> None:
    """SO_KEEPALIVE (aiohttp sets it) with probes after a minute rather than the kernel's two hours."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", KEEPIDLE), ("TCP_KEEPINTVL", KEEPINTVL), ("TCP_KEEPCNT", KEEPCNT)):
        if hasattr(socket, option):  # Linux; macOS lacks some
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class Guards:
    """What every connection of one listener shares: the timeouts, the open connections, the closing flag."""

    def __init__(self, header_timeout: float, body_timeout: float, keepalive_timeout: float = KEEPALIVE_TIMEOUT) -> None:
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.keepalive_timeout = keepalive_timeout
        self.connections: set[IngestConnection] = set()
        self.closing = False
        self._sweeper = BackgroundTask(self._sweep, "ingest-header-timeouts")

    def start(self) -> None:
        self._sweeper.start()

    async def stop(self) -> None:
        self.closing = True
        for connection in self.connections:
            connection.closing_all = True
        await self._sweeper.stop()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(SWEEP_INTERVAL, self.header_timeout / 2, self.keepalive_timeout / 2))
            now = time.monotonic()
            for connection in list(self.connections):
                if connection.head_waiting(now, self.header_timeout):
                    refuse_slow_head(connection)
                elif connection.idle() and connection.idle_since is not None and connection.idle_since < now - self.keepalive_timeout:
                    connection.force_close()


def refuse_slow_head(connection: IngestConnection) -> None:
    """408 and close, in its turn after the answers being written."""
    peer = connection.peername
    log.info("request_header_timeout", remote=peer[0] if isinstance(peer, tuple) else None)
    connection.refuse(408, "header_timeout", "the request headers did not arrive in time; the connection is closed")


class IngressListener:
    def __init__(self, server: asyncio.AbstractServer, guards: Guards, runner: web.AppRunner) -> None:
        self._server = server
        self.guards = guards
        self._runner = runner
        self._closed = False

    @property
    def addresses(self) -> list[str]:
        sockets = getattr(self._server, "sockets", None) or ()
        return [f"{host}:{port}" for host, port, *_ in (sock.getsockname() for sock in sockets)]

    @property
    def url(self) -> str:
        return f"http://{self.addresses[0]}"

    async def close(self, drain_timeout: float) -> None:
        """Stop accepting and close idle connections; requests in progress get `drain_timeout` to finish
        (their bodies still read, their answers with `Connection: close`) and are cancelled past it; a
        head still incomplete after SHUTDOWN_HEAD_GRACE gets 503; then the application's cleanup."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        self._server.close()
        await self.guards.stop()
        while self.guards.connections and loop.time() < deadline:
            now = time.monotonic()
            for connection in list(self.guards.connections):
                if connection.idle():  # nothing to answer (any more): the ones answering close after their answer
                    connection.force_close()
                elif connection.head_waiting(now, SHUTDOWN_HEAD_GRACE):
                    # A head still arriving: nothing of it was taken, so it gets 503 (in its turn) rather than
                    # holding the shutdown for the whole drain timeout.
                    connection.refuse(503, "shutting_down", "splitter is shutting down; send the request again")
            await asyncio.sleep(0.02)
        for connection in list(self.guards.connections):
            connection.abort()
        await asyncio.sleep(0)  # the cancelled answers unwind
        await self._runner.cleanup()


async def listen(runner: web.AppRunner, host: str, port: int, *, reuse_port: bool = False, backlog: int = 1024,
                 keepalive_timeout: float = KEEPALIVE_TIMEOUT, header_timeout: float = HEADER_TIMEOUT,
                 body_timeout: float = BODY_TIMEOUT) -> IngressListener:
    """Serve `runner` (set up, built by `build_ingress_app`) on host:port; raises OSError when it cannot bind.

    The runner's application answers every request but the ingest POSTs, which go straight to their
    handler through the same observer; the connections are connection.py's."""
    assert runner.server is not None, "set the runner up first"
    app_handler = runner.server.request_handler
    factory = runner.server.request_factory
    ingest = runner.app.get(FAST_INGRESS)
    routes = ingest.routes if ingest is not None else {}
    guards = Guards(header_timeout, body_timeout, keepalive_timeout)
    loop = asyncio.get_running_loop()

    async def handle(request: web.BaseRequest | LightRequest) -> web.StreamResponse | Answer:
        request[BODY_DEADLINE] = loop.time() + guards.body_timeout
        if isinstance(request, LightRequest) and ingest is not None:  # the common call: straight to its handler
            return await ingest.observer.observe(request, routes[request.path], request.path)
        path = request.path
        route = routes.get(path) if request.method == "POST" and "Expect" not in request.headers else None
        if route is not None and ingest is not None:  # an ingest path spelt otherwise (the router finds the same handler)
            return await ingest.observer.observe(request, route, path)
        try:
            return await app_handler(cast(web.BaseRequest, request))
        except web.HTTPException as exc:  # what aiohttp's connection handler did with one raised past the middleware
            return exc

    def opened(connection: IngestConnection) -> None:
        if connection.transport is not None:
            _tune_keepalive(connection.transport)
        guards.connections.add(connection)
        if guards.closing:
            connection.closing_all = True

    server = await loop.create_server(lambda: IngestConnection(loop, factory, handle, frozenset(routes), opened, guards.connections.discard), host, port,
                                      reuse_port=reuse_port or None, backlog=backlog)
    guards.start()
    return IngressListener(server, guards, runner)
