"""The ingest port: aiohttp's HTTP server, with the guards a public port needs and aiohttp leaves out.

Every request on the port is framed by aiohttp's parser (llhttp, maintained and fuzzed upstream).
splitter frames nothing itself: a hand-written "fast lane" used to, for plain Content-Length POSTs,
and mis-framed pipelined requests (a request hidden in a body was executed). What it saved was
aiohttp's per-request machinery above the parser; most of that comes back without framing by hand:
an ingest POST (no `Expect`) is dispatched here straight to its handler through the same observer
(in-flight limit counted from the headers, metrics, CORS, JSON errors), skipping only aiohttp's
router and middleware chain, which would find the same handler. Everything else (CORS preflights,
telemetry, webhooks, the CDN routes, 404s, `Expect: 100-continue`) goes through the application.
An A/B of `splitter serve` in one sitting (medians of 6 alternating runs, a noisy shared VM): CPU per
single call, the lane 0.84x plain aiohttp's and this listener 0.98x; per batch event, 0.99x and 1.05x.
`python -m loadtest.floor` compares the port's HTTP layer with plain aiohttp's on every run.

What this module adds to aiohttp, per connection:

- a header timeout: a request whose head has started to arrive must be complete within
  `header_timeout`, or the client gets 408 (JSON) and the connection closes. aiohttp itself closes
  only after its keep-alive timeout, and not at all on some versions;
- a body deadline: each request carries `BODY_DEADLINE` (now + `body_timeout`); `read_body` answers 408
  past it, which frees the request's in-flight slot (a client sending one byte a second holds a slot
  for at most `body_timeout`; app.py also keeps such requests to half of the slots);
- TCP keepalive probes after KEEPIDLE seconds of silence, so a phone that vanished mid-upload is
  noticed in about two minutes instead of the kernel's default two hours;
- write backpressure: reading stops while the transport's write buffer is above its high-water mark
  (`pause_writing`), so a client that pipelines requests and never reads the answers cannot grow
  splitter's memory; it resumes at the low-water mark unless aiohttp holds reading for its own reasons;
- on shutdown, `Connection: close` on the answers still being written, and the drain timeout for them.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import orjson
from aiohttp import StreamReader, web
from aiohttp.http_exceptions import HttpProcessingError

from proxy.background import BackgroundTask
from proxy.ingress import responses
from proxy.ingress.app import FAST_INGRESS
from proxy.ingress.auth import mask_keys_in
from proxy.ingress.body import BODY_DEADLINE
from proxy.log import get_logger

log = get_logger("splitter.ingress")

KEEPALIVE_TIMEOUT = 75.0  # seconds an idle keep-alive connection stays open (aiohttp's default for web apps)
HEADER_TIMEOUT = 10.0  # seconds from a request's first byte to the end of its headers
BODY_TIMEOUT = 30.0  # seconds from a request's headers to the end of its body
KEEPIDLE, KEEPINTVL, KEEPCNT = 60, 10, 6  # TCP keepalive: first probe after 60 s of silence, gone after 6 unanswered
SWEEP_INTERVAL = 1.0  # how often header deadlines are checked (the timeout is honoured to within this)
_HEADER_TIMEOUT_BODY = orjson.dumps({"success": False, "code": "header_timeout",
                                     "message": "the request headers did not arrive in time; the connection is closed"})
_HEADER_TIMEOUT_ANSWER = (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(_HEADER_TIMEOUT_BODY), _HEADER_TIMEOUT_BODY))


class IngestProtocol(web.RequestHandler):
    """aiohttp's connection handler, plus the header clock, TCP keepalive tuning and write backpressure."""

    __slots__ = ("_guards", "body", "eof", "head_since", "in_request")

    def __init__(self, manager: web.Server, guards: Guards, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guards = guards
        self.head_since: float | None = None  # when the first byte of a request not yet dispatched came
        self.in_request = False
        self.eof = False  # the client half-closed: answer what it sent, then close
        self.body: StreamReader | None = None  # the body of the request being answered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        _tune_keepalive(transport)
        self._guards.connections.add(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._guards.connections.discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and not self.in_request and self.head_since is None:
            self.head_since = time.monotonic()  # the header clock: stopped when the request is dispatched
        super().data_received(data)

    def eof_received(self) -> bool:  # type: ignore[override]  # asyncio's protocol returns bool; aiohttp narrowed it to None
        """The client will send nothing more (a half-close): what it sent is still answered, then the
        connection closes. (aiohttp lets the transport close at once, and the answers are lost.)"""
        self.eof = True
        if self.body is not None and not self.body.is_eof():  # a body cut short: its reader fails now, not at the body timeout
            self.body.set_exception(ConnectionResetError("the client closed its side of the connection mid-body"))
        self._close_when_idle()
        return True  # keep the write side open for the answers

    def _close_when_idle(self) -> None:
        if self.transport is None or self._force_close:
            return
        if self.idle():
            self.force_close()
        else:  # a request is being answered, or parsed and about to be: look again shortly
            self._loop.call_later(0.05, self._close_when_idle)

    def idle(self) -> bool:
        """Waiting for a request that has not begun to arrive: aiohttp's own test for its keep-alive
        close (its waiter), read defensively since it is private."""
        waiter = getattr(self, "_waiter", None)
        return not self.in_request and not self.pending() and waiter is not None and not waiter.done()

    def pending(self) -> bool:
        """Requests parsed and waiting to be dispatched (aiohttp's queue; private, so read defensively)."""
        return bool(getattr(self, "_messages", None))

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self, resume_parser: bool = True) -> None:
        """aiohttp resumes reading when a request body's buffer drains; not while answers back up."""
        super().resume_reading(resume_parser)
        if self.transport is not None and getattr(self, "_paused", False):  # writing paused (aiohttp's flag)
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        # aiohttp may hold reading itself (a payload buffer or its queue of pipelined requests is full):
        # its flags are private, so they are read defensively and reading stays paused while either is set.
        if self.transport is not None and not getattr(self, "_reading_paused", False) and not getattr(self, "_buffer_paused", False):
            self.transport.resume_reading()

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's answer to a request its parser refused (or to a crash outside the application), as JSON
        like every other error; aiohttp still logs it, and the connection still closes after it. A parse
        error quotes the request line: a write key in its URL is masked, in the answer and the log."""
        if isinstance(exc, HttpProcessingError):
            exc.message = mask_keys_in(exc.message)
            exc.args = tuple(mask_keys_in(arg) if isinstance(arg, str) else arg for arg in exc.args)
        message = mask_keys_in(message) if message else message
        super().handle_error(request, status, exc, message)  # logs; raises if an answer was already under way
        if status >= 500:
            response = responses.error(status, "internal_error", "splitter failed to handle the request; it is safe to retry")
        else:
            code = {413: "request_too_large", 431: "headers_too_large"}.get(status, "malformed_request")
            response = responses.error(status, code, f"the request could not be parsed: {message or 'malformed HTTP'}")
        response.force_close()
        return response

    def header_timed_out(self, deadline: float) -> bool:
        return not self.in_request and self.head_since is not None and self.head_since < deadline

    def refuse_slow_head(self) -> None:
        """408 and close: nothing of this connection is being answered, so the stream stays well formed."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            peer = transport.get_extra_info("peername")
            log.info("request_header_timeout", remote=peer[0] if isinstance(peer, tuple) else None)
            transport.write(_HEADER_TIMEOUT_ANSWER)
        self.force_close()  # closes the transport once the answer is flushed


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

    def __init__(self, header_timeout: float, body_timeout: float) -> None:
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.connections: set[IngestProtocol] = set()
        self.closing = False
        self._sweeper = BackgroundTask(self._sweep, "ingest-header-timeouts")

    def start(self) -> None:
        self._sweeper.start()

    async def stop(self) -> None:
        self.closing = True
        await self._sweeper.stop()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(SWEEP_INTERVAL, self.header_timeout / 2))
            deadline = time.monotonic() - self.header_timeout
            for connection in [c for c in self.connections if c.header_timed_out(deadline)]:
                connection.refuse_slow_head()


class IngressListener:
    def __init__(self, server: asyncio.AbstractServer, web_server: web.Server, guards: Guards, runner: web.AppRunner) -> None:
        self._server = server
        self._web_server = web_server
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
        (their bodies still read, their answers with `Connection: close`) and are cancelled past it; then
        the application's cleanup.

        aiohttp's own shutdown stops reading every connection at once, so a request whose body was
        still arriving could never finish: idle connections are closed here first, and aiohttp's
        shutdown only cancels what is left at the deadline."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        self._server.close()
        await self.guards.stop()
        while self.guards.connections and loop.time() < deadline:
            for connection in list(self.guards.connections):
                if connection.idle():  # nothing to answer (any more): the ones answering close after their answer
                    connection.force_close()
            await asyncio.sleep(0.02)
        await self._web_server.shutdown(max(0.01, deadline - loop.time()))  # aiohttp reads 0 as "no timeout"
        await self._runner.cleanup()


async def listen(runner: web.AppRunner, host: str, port: int, *, reuse_port: bool = False, backlog: int = 1024,
                 keepalive_timeout: float = KEEPALIVE_TIMEOUT, header_timeout: float = HEADER_TIMEOUT,
                 body_timeout: float = BODY_TIMEOUT) -> IngressListener:
    """Serve `runner` (set up, built by `build_ingress_app`) on host:port; raises OSError when it cannot bind.

    The runner's own server object supplies the application's handler and request factory; the
    connections are this module's IngestProtocol."""
    assert runner.server is not None, "set the runner up first"
    app_handler = runner.server.request_handler
    ingest = runner.app.get(FAST_INGRESS)
    routes = ingest.routes if ingest is not None else {}
    guards = Guards(header_timeout, body_timeout)
    loop = asyncio.get_running_loop()

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        protocol = request.protocol
        if isinstance(protocol, IngestProtocol):
            protocol.in_request, protocol.head_since, protocol.body = True, None, request.content
        request[BODY_DEADLINE] = loop.time() + guards.body_timeout
        path = request.path
        route = routes.get(path) if request.method == "POST" and "Expect" not in request.headers else None
        try:
            if route is not None and ingest is not None:  # the common call: straight to its handler (the router finds the same)
                response = await ingest.observer.observe(request, route, path)  # type: ignore[arg-type]  # the app's factory makes web.Request
            else:
                response = await app_handler(request)
        finally:
            if isinstance(protocol, IngestProtocol):
                protocol.in_request, protocol.body = False, None
        if guards.closing or (isinstance(protocol, IngestProtocol) and protocol.eof and not protocol.pending()):
            response.force_close()  # the last answer on this connection: say so, and close after it
        return response

    # auto_decompress off: body.py inflates gzip itself, with a cap (aiohttp's inflation has none).
    handler_args: dict[str, Any] = {"access_log": None, "keepalive_timeout": keepalive_timeout, "auto_decompress": False}
    web_server = web.Server(handle, request_factory=runner.server.request_factory, **handler_args)
    server = await loop.create_server(lambda: IngestProtocol(web_server, guards, loop=loop, **handler_args), host, port,
                                      reuse_port=reuse_port or None, backlog=backlog)
    guards.start()
    return IngressListener(server, web_server, guards, runner)

