"""The ingest fast lane: plain, well-formed tracking calls answered without aiohttp's per-request machinery.

aiohttp's request handling costs about 120 µs of CPU per request on the benchmark machine before any
of splitter's work starts (`python -m loadtest.floor`): as much as preparing 20 events, and more than
a third of a single call's whole cost. The ingest port therefore listens with this protocol. It frames
each request itself and answers it through the same ingest handlers, metrics, CORS and JSON errors
as the aiohttp application, but only when the request is the common, unambiguous case:

    POST <an ingest path> HTTP/1.1, one Content-Length within Segment's limit, no Transfer-Encoding,
    no Expect, no Upgrade, CRLF line endings, header names that are tokens, no control characters,
    no folded header line and none longer than aiohttp allows.

Anything else (chunked bodies, `Expect: 100-continue`, CORS preflights, the CDN and webhook routes,
HTTP/1.0, a malformed request) is handed to aiohttp together with the connection, from the first byte
of that request: aiohttp answers it, and every later request on that connection, exactly as it would
without the fast lane. The lane never guesses at framing, so the two can never disagree about where a
request ends.

Requests on one connection are answered in order, one at a time; pipelined requests wait in the buffer
(reading pauses past PAUSE_ABOVE bytes). Idle keep-alive connections close after KEEPALIVE_TIMEOUT, as
aiohttp's do. A client that goes away mid-request does not cancel it: what was accepted is delivered.
On shutdown, requests in progress get the drain timeout to finish and are cancelled past it, as
aiohttp does with its own.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from email.utils import formatdate
from typing import Any

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.ingress import responses
from proxy.ingress.app import FastIngress
from proxy.log import get_logger
from proxy.tasks import BackgroundTask

log = get_logger("splitter.ingress")

MAX_HEAD = 16 * 1024  # header bytes; past it without an end, aiohttp gets the request (and refuses it)
KEEPALIVE_TIMEOUT = 75.0  # seconds an idle keep-alive connection stays open (aiohttp's default)
PAUSE_ABOVE = 1024 * 1024  # bytes of pipelined requests buffered behind the one being answered
SWEEP_INTERVAL = 5.0
MAX_LINE = 8190  # aiohttp's (llhttp's) longest header line: a longer one is refused there, so it goes there
MAX_LENGTH_DIGITS = 12  # a Content-Length longer than this is over any limit (and int() of thousands of digits raises)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 field names
_FORBIDDEN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n")  # controls but HTAB; a CR or LF not in a CRLF
_DELEGATE = object()  # _next_request: aiohttp must take this request and the connection
_REFUSED_HEADERS = frozenset({"transfer-encoding", "expect", "upgrade"})
_FRAMING_HEADERS = frozenset({"content-length", "connection", "date", "transfer-encoding"})  # written by the lane itself

class FastBody:
    """`request.content` of a request whose body the lane has already read: `read_body` works unchanged."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes) -> None:
        self._data = data

    async def iter_chunked(self, _size: int) -> AsyncIterator[bytes]:
        if self._data:
            yield self._data


class FastRequest:
    """The parts of an aiohttp request that the ingest path reads, for a request framed by the lane."""

    __slots__ = ("method", "path", "headers", "remote", "content", "content_length", "_values")

    def __init__(self, path: str, headers: CIMultiDict[str], remote: str | None, body: bytes) -> None:
        self.method = "POST"
        self.path = path
        self.headers = CIMultiDictProxy(headers)
        self.remote = remote
        self.content = FastBody(body)
        self.content_length = len(body)
        self._values: dict[Any, Any] = {}

    def __setitem__(self, key: Any, value: Any) -> None:
        self._values[key] = value

    def get(self, key: Any, default: Any = None) -> Any:
        return self._values.get(key, default)


class HttpDate:
    """The Date header, formatted once per second rather than per response."""

    def __init__(self) -> None:
        self._second = 0
        self._text = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._second, self._text = second, formatdate(second, usegmt=True)
        return self._text


def serialize(response: web.StreamResponse, date: str, keep_alive: bool) -> bytes:
    """A complete HTTP/1.1 answer for a response the ingest handlers built (always a bytes body)."""
    body = getattr(response, "body", None)
    if not isinstance(body, (bytes, bytearray)):
        raise TypeError(f"fast lane answers need a bytes body, not {type(body).__name__}")
    head = [f"HTTP/1.1 {response.status} {response.reason}"]
    head += [f"{name}: {value}" for name, value in response.headers.items() if name.lower() not in _FRAMING_HEADERS]
    head.append(f"Content-Length: {len(body)}")
    head.append(f"Date: {date}")
    if not keep_alive:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class Lane:
    """What every connection of one listener shares: the routes it answers, aiohttp for the rest."""

    def __init__(self, fallback: Callable[[], asyncio.Protocol], ingress: FastIngress, max_body: int,
                 keepalive_timeout: float = KEEPALIVE_TIMEOUT) -> None:
        self.keepalive_timeout = keepalive_timeout
        self.fallback = fallback  # aiohttp's protocol factory (web.Server): one RequestHandler per handed-over connection
        self.routes = ingress.routes
        self.observer = ingress.observer
        self.max_body = max_body
        self.date = HttpDate()
        self.connections: set[FastLaneProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()  # requests being answered (held: the loop keeps only weak references)
        self.closing = False
        self._sweeper = BackgroundTask(self._sweep_idle, "fast-lane-idle-sweep")

    def protocol(self) -> FastLaneProtocol:
        if not self.closing:
            self._sweeper.start()  # once: later calls do nothing
        return FastLaneProtocol(self)

    def answer(self, connection: FastLaneProtocol, request: FastRequest, close_after: bool, started: float) -> None:
        task = asyncio.ensure_future(connection.answer(request, close_after, started))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _sweep_idle(self) -> None:
        while not self.closing:
            await asyncio.sleep(min(SWEEP_INTERVAL, self.keepalive_timeout / 2))
            deadline = time.monotonic() - self.keepalive_timeout
            for connection in [c for c in self.connections if c.idle_since(deadline)]:
                connection.close()

    async def shutdown(self, timeout: float) -> None:
        """Close idle connections now; let the requests in progress finish for up to `timeout` (their
        connections close after the answer), then cancel what is left, as aiohttp does with its own."""
        self.closing = True
        await self._sweeper.stop()
        for connection in list(self.connections):
            if not connection.active:
                connection.close()
        deadline = time.monotonic() + timeout
        while (self.tasks or any(c.active for c in self.connections)) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            connection.close()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


class FastLaneProtocol(asyncio.Protocol):
    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        # What has come and is not answered yet, from `start` on. Often one whole request, kept as it
        # came; consumed requests move `start` rather than being cut off (no copy per pipelined request).
        self.buffer: bytes | bytearray = b""
        self.start = 0
        self.busy = False  # a request is being answered; the ones behind it wait in the buffer
        self.last_active = time.monotonic()
        self._head: tuple[int, str, CIMultiDict[str], int, bool, float] | None = None  # admitted, waiting for its body
        self._paused = self._eof = self._closed = False

    # -- asyncio callbacks ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else None
        self.lane.connections.add(self)
        if self.lane.closing:
            self.close()

    def data_received(self, data: bytes) -> None:
        if self.start >= len(self.buffer):
            self.buffer, self.start = data, 0  # the common case: a whole request in one read, never copied
        elif type(self.buffer) is bytes or self.start:
            self.buffer, self.start = bytearray(memoryview(self.buffer)[self.start:]) + data, 0  # one copy per read, not per request
        else:
            self.buffer += data
        self.last_active = time.monotonic()
        if not self.busy:
            self._advance()
        elif len(self.buffer) - self.start > PAUSE_ABOVE and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        """The client will send nothing more: answer what is being answered, then close."""
        self._eof = True
        if not self.busy:
            self.close()
        return True  # keep the write side open for the answer in progress

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.lane.connections.discard(self)
        if self._head is not None:  # admitted at its headers, its body never came
            self._head = None
            self.lane.observer.release()

    # -- the lane --------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """In a request: admitted at its headers (its body may still be coming), or being answered."""
        return self.busy or self._head is not None

    def idle_since(self, deadline: float) -> bool:
        return not self.active and self.last_active < deadline

    def close(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.close()
        self._closed = True
        self.lane.connections.discard(self)

    def _gone(self) -> bool:
        return self._closed or self.transport is None or self.transport.is_closing()

    def _advance(self) -> None:
        """Answer the next complete request in the buffer, or hand the connection to aiohttp."""
        if self.busy or self._gone():
            return
        found = self._next_request()
        if found is None:
            if self._eof:
                self.close()
            return
        if found is _DELEGATE:
            self._hand_over()
            return
        request, close_after, started = found
        self.busy = True
        self.lane.answer(self, request, close_after, started)

    async def answer(self, request: FastRequest, close_after: bool, started: float) -> None:
        try:
            response = await self.lane.observer.answer_admitted(request, self.lane.routes[request.path], request.path, started)
            close_after = close_after or self.lane.closing or self._eof
            data = serialize(response, self.lane.date.now(), keep_alive=not close_after)
        except Exception:  # the routes answer their own errors; this is a bug: the client must still get an answer
            log.exception("request_failed", path=request.path)
            data = serialize(responses.error(500, "internal_error", "splitter failed to handle the request; it is safe to retry"),
                             self.lane.date.now(), keep_alive=False)
            close_after = True
        self.busy = False
        self.last_active = time.monotonic()
        if self._gone():
            return  # the client went away; what it sent was handled all the same
        assert self.transport is not None
        self.transport.write(data)
        if close_after or self.transport.is_closing():
            self.close()
            return
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        self._advance()

    def _hand_over(self) -> None:
        """aiohttp takes the connection from the first byte of the request at the head of the buffer."""
        assert self.transport is not None
        handler = self.lane.fallback()
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        self.lane.connections.discard(self)
        self._closed = True  # for this protocol: the connection is aiohttp's now
        pending = bytes(memoryview(self.buffer)[self.start:])
        self.buffer, self.start = b"", 0
        self.transport.set_protocol(handler)
        handler.connection_made(self.transport)
        if pending:
            handler.data_received(pending)
        if self._eof:
            handler.eof_received()

    def _next_request(self) -> tuple[FastRequest, bool, float] | object | None:
        """(request, close after it, when its head came) when a whole one is buffered; None to wait for
        more; _DELEGATE when aiohttp must take it (not the plain case, or over the in-flight limit: 429)."""
        buffer, start = self.buffer, self.start
        if self._head is None:
            end = buffer.find(b"\r\n\r\n", start)
            if end < 0 or end - start > MAX_HEAD:
                return _DELEGATE if _not_plain_so_far(buffer, start) else None
            parsed = self._parse_head(bytes(memoryview(buffer)[start:end]))
            if parsed is None or not self.lane.observer.admit():
                return _DELEGATE
            self._head = (end + 4, *parsed, time.perf_counter())
        body_start, path, headers, length, close_after, started = self._head
        total = body_start + length
        if len(buffer) < total:
            return None
        self._head = None
        body = bytes(memoryview(buffer)[body_start:total])
        if total < len(buffer):
            self.start = total  # pipelined requests behind it stay where they are
        else:
            self.buffer, self.start = b"", 0
        return FastRequest(path, headers, self.remote, body), close_after, started

    def _parse_head(self, head: bytes) -> tuple[str, CIMultiDict[str], int, bool] | None:
        """The request line and headers of the plain case, or None when aiohttp must take it: anything
        llhttp would refuse or read differently (control characters, names that are not tokens, lone CR
        or LF, lines over aiohttp's 8190-byte limit) is aiohttp's to refuse."""
        text = head.decode("latin-1")
        if _FORBIDDEN.search(text):
            return None
        lines = text.split("\r\n")
        method, _, rest = lines[0].partition(" ")
        target, _, version = rest.partition(" ")
        if method != "POST" or version != "HTTP/1.1" or target not in self.lane.routes:
            return None
        headers: CIMultiDict[str] = CIMultiDict()
        length: int | None = None
        close_after = False
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or len(line) > MAX_LINE or not _TOKEN.fullmatch(name):
                return None  # malformed, folded (a name starting with a space), or not a token: aiohttp decides
            value = value.strip(" \t")
            lowered = name.lower()
            if lowered == "content-length":
                if length is not None or not (value.isascii() and value.isdigit()) or len(value) > MAX_LENGTH_DIGITS:
                    return None
                length = int(value)
            elif lowered in _REFUSED_HEADERS:
                return None
            elif lowered == "connection":
                tokens = {token.strip().lower() for token in value.split(",")}
                if "upgrade" in tokens:
                    return None
                close_after = close_after or "close" in tokens
            headers.add(name, value)
        if length is None or length > self.lane.max_body:
            return None  # no length (aiohttp says 411/400 as it does) or over the limit (aiohttp answers 413)
        return target, headers, length, close_after


def _not_plain_so_far(buffer: bytes | bytearray, start: int) -> bool:
    """An unfinished head that can no longer become the plain case: too long, or a line ending that is
    not CRLF (a lone LF or CR), so it must not wait for a CRLFCRLF that may never come."""
    if len(buffer) - start > MAX_HEAD:
        return True
    crlf = buffer.count(b"\r\n", start)
    return buffer.count(b"\n", start) != crlf or buffer.count(b"\r", start) - buffer.endswith(b"\r") != crlf
