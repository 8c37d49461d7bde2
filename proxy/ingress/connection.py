"""One client connection on the ingest port: framed by llhttp (httptools), answered in order.

aiohttp's own connection handler spent about 50 µs of CPU per request around its parser (a loop
task, a keep-alive timer, its request and response machinery) against 20 µs for the same
read-and-answer on httptools; in `splitter serve` that was a fifth of a single call's CPU. This
protocol replaces the connection: an ingest POST to one of the ingest paths exactly (no `Expect`) is
handed to its handler as a `LightRequest` (request.py) and its plain answer written here in one
`write`; every other request is an aiohttp `web.Request` for the application (router, middleware,
CDN streaming, HEAD, 100-continue), answered through aiohttp's `prepare` and `write_eof`. The
framing is llhttp's, strict, never splitter's: a request hidden in a body is a body.

Per connection:
- requests are dispatched when their head is complete (so the in-flight limit counts them from
  their headers) and answered one after the other, in the order they came, however many are
  pipelined; their bodies stream into the request's `StreamReader`, which pauses reading when it
  holds more than its limit;
- llhttp is fed `FEED_SLICE` bytes at a time, and while more than `MAX_QUEUED` requests wait the
  rest of a read is held and reading pauses, so a read full of tiny requests never queues thousands;
  reading also pauses while the transport's write buffer is above its high-water mark, so a client
  that never reads its answers cannot grow splitter's memory;
- a head that llhttp refuses, with a line or a field over `MAX_FIELD` bytes, more than `MAX_HEADERS`
  fields or more than `MAX_HEAD_BYTES` in all (httptools holds a field until it ends, so the bytes
  are counted as they arrive), or a body whose chunk framing passes `MAX_FRAMING_BYTES`, is answered
  400 (JSON, a write key in the request line masked) in its turn after the requests before it, and
  the connection closes; nothing of it is dispatched. A chunked body's trailer fields are dropped;
- the header clock (`head_since`) runs from a request's first byte to the end of its head, checked
  by the listener's sweeper (listener.py), as is the keep-alive idle time (`idle_since`);
- a half-close still gets its answers, then the connection closes; a request whose body the client
  cut short fails its read at once;
- after a last answer (a 413 or a 401 before the body was read, a refused head, `Connection: close`)
  the write side is shut and what the client still sends is read and dropped for up to
  `LINGER_SECONDS` or `LINGER_BYTES`, so that a reset does not destroy the answer on its way;
- a request asking to switch protocols (`Upgrade: h2c`, `CONNECT`) without a body is an ordinary
  HTTP/1.1 request, as aiohttp took it; with a body it is refused, since llhttp stops before such a
  body without checking its framing.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, cast

import httptools
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11, RawRequestMessage, StreamWriter
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.ingress import responses
from proxy.ingress.auth import mask_keys_in
from proxy.ingress.request import LightRequest
from proxy.ingress.responses import JSON, Answer
from proxy.log import get_logger

log = get_logger("splitter.ingress")

MAX_FIELD = 8190  # bytes of the request target, or of one header's name or value (aiohttp's limits)
MAX_HEADERS = 128  # header fields in one head
MAX_QUEUED = 32  # requests parsed ahead of the one being answered before parsing stops and reading pauses
FEED_SLICE = 16 * 1024  # llhttp is fed this much at a time, so a read full of tiny requests queues at most MAX_QUEUED of them
MAX_HEAD_BYTES = 1 << 20  # bytes fed while one head is incomplete (httptools buffers a field until it ends)
LINGER_SECONDS, LINGER_BYTES = 5.0, 8 << 20  # after a last answer: what the client still sends is read and dropped
MAX_FRAMING_BYTES = 1 << 20  # bytes of a body's framing (chunk sizes, trailers) beside the body itself
BODY_BUFFER = 2**16  # a body's StreamReader limit: reading pauses past twice this until the handler reads

Dispatch = Callable[[web.BaseRequest | LightRequest], Awaitable[web.StreamResponse | Answer]]
Pending = tuple[web.BaseRequest | LightRequest, StreamReader, bool, HttpVersion]  # a request, its body, keep-alive, version
RequestFactory = Callable[..., web.BaseRequest]


class _Refused(Exception):
    """A head that will not be dispatched: answered with `status` and `code`, then the connection closes."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


_date_cache: list[Any] = [0, ""]


def http_date() -> str:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0], _date_cache[1] = now, formatdate(now, usegmt=True)
    return cast(str, _date_cache[1])


class IngestConnection(BaseProtocol):
    """An HTTP/1.1 connection: llhttp frames the requests, `dispatch` answers each, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, factory: RequestFactory, dispatch: Dispatch, fast_paths: frozenset[str],
                 on_open: Callable[[IngestConnection], None], on_close: Callable[[IngestConnection], None]) -> None:
        super().__init__(loop)
        self._factory = factory
        self._fast_paths = fast_paths  # POSTs to these (no Expect) are dispatched as a LightRequest
        self._dispatch = dispatch
        self._on_open = on_open
        self._on_close = on_close
        self._llhttp = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._payload: StreamReader | None = None  # the body of the request being parsed
        self._upgrading: StreamReader | None = None  # the (empty) body of a request llhttp stopped at: an upgrade
        self._unparsed = b""  # received, not yet fed to llhttp (the queue is full)
        self._head_bytes = 0  # fed while the current head is incomplete
        self._framing_bytes = 0  # fed during the current body beside the body's own bytes
        self._body_fed = 0  # body bytes of the slice being fed
        self._queue: deque[Pending | _Refused] = deque()
        self._answering: asyncio.Task[None] | None = None
        self._refused = False  # a head was refused: nothing after it is parsed
        self._closing = False  # close once the answers queued are written
        self._transport_paused = False
        self._lingering = False  # the last answer is written and the write side shut: reading only to drop
        self._discarded = 0
        self.peername: Any = None
        self.sockname: Any = None
        self.ssl_context = None
        self.max_field_size = MAX_FIELD  # what aiohttp's Request reads of its protocol (multipart bodies)
        self.max_headers = MAX_HEADERS
        self.head_since: float | None = None  # when the first byte of a request whose head is not complete came
        self.behind = False  # reading held until the answers catch up (more than MAX_QUEUED wait, or input is held)
        self._behind_since = 0.0
        self.idle_since: float | None = time.monotonic()  # since when nothing is being parsed or answered
        self.eof = False  # the client half-closed
        self.closing_all = False  # the listener is shutting down: answers say Connection: close

    # -- asyncio ------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.peername = transport.get_extra_info("peername")
        self.sockname = transport.get_extra_info("sockname")
        self._on_open(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if self._answering is None or self._answering.done():  # else once it is answered (a shutdown waits for it)
            self._on_close(self)
        if self._payload is not None and not self._payload.is_eof():
            self._payload.set_exception(ConnectionResetError("the client went away mid-body"))
            self._payload = None
        # Requests already dispatched run to the end (their events may be on their way to the spool);
        # those still waiting in line are dropped, nobody is there to read their answers.
        while len(self._queue) > (1 if self._answering is not None else 0):
            self._queue.pop()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._discarded += len(data)
            if self._discarded > LINGER_BYTES:
                self._end_linger()
            return
        if self._refused or self._closing:
            return
        self._unparsed = self._unparsed + data if self._unparsed else data  # a copy only when something was held
        self._parse()

    def _parse(self) -> None:
        """Feed llhttp what was received, a slice at a time, while fewer than MAX_QUEUED requests wait:
        the rest stays here (reading pauses) until the answers catch up."""
        unparsed, done = self._unparsed, 0
        view = memoryview(unparsed)  # slices of it are fed: nothing is copied
        while done < len(unparsed) and len(self._queue) <= MAX_QUEUED and self._reading_on():
            data = view[done:done + FEED_SLICE]
            done += len(data)
            self._body_fed = 0
            try:
                self._feed(data)
                self._count_framing(len(data))
            except httptools.HttpParserCallbackError as exc:
                self._refuse(exc.__context__ if isinstance(exc.__context__, _Refused) else _malformed(str(exc)))
            except httptools.HttpParserError as exc:
                self._refuse(_malformed(str(exc)))
            except _Refused as refusal:
                self._refuse(refusal)
        self._unparsed = unparsed[done:] if done < len(unparsed) and self._reading_on() else b""
        self._update_reading()

    def _reading_on(self) -> bool:
        """Whether what the client sent is still to be parsed: not after a refused head or a last answer
        (a half-close still has everything it sent before it answered)."""
        return not self._refused and (not self._closing or self.eof)

    def _count_framing(self, fed: int) -> None:
        """Bound what llhttp buffers outside a body: a head still incomplete after this slice counts the
        whole slice, and so do a body's chunk sizes and trailers beside the body's own bytes."""
        if self.head_since is not None:
            self._head_bytes += fed
            if self._head_bytes > MAX_HEAD_BYTES:
                raise _Refused(400, "malformed_request", f"the request could not be parsed: its head is longer than {MAX_HEAD_BYTES} bytes")
        else:
            self._head_bytes = 0
        if self._payload is not None:
            self._framing_bytes += fed - self._body_fed
            if self._framing_bytes > MAX_FRAMING_BYTES:
                raise _Refused(400, "malformed_request", "the request could not be parsed: its body's chunk framing is too long")

    def _feed(self, data: bytes | memoryview) -> None:
        try:
            self._llhttp.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._after_upgrade(data[int(upgrade.args[0]):] if upgrade.args else b"")

    def _after_upgrade(self, rest: bytes | memoryview) -> None:
        """llhttp stops at a request asking to switch protocols (`Upgrade: h2c`, `CONNECT`). splitter
        speaks HTTP/1.1 only, so the request is an ordinary one, as aiohttp took it; it has no body
        (one with a body was refused at its head: llhttp leaves such a body's framing unchecked), and
        a new parser takes the requests after it."""
        payload, self._upgrading = self._upgrading, None
        self._llhttp = httptools.HttpRequestParser(self)
        if payload is not None:
            payload.feed_eof()
        self._feed(rest)

    def eof_received(self) -> bool:
        """A half-close: what was sent is answered, then the connection closes."""
        if self._lingering:  # the client has sent everything: our answer is through
            self._end_linger()
            return True
        self.eof = True
        if self._payload is not None and not self._payload.is_eof():
            self._payload.set_exception(ConnectionResetError("the client closed its side of the connection mid-body"))
            self._payload = None
        self._closing = True
        if self._answering is None and not self._queue:
            self._close()
        return True

    # Reading is held while any of these holds: a body's buffer is full (its StreamReader calls
    # pause_reading and resume_reading, keeping `_reading_paused`), the transport's write buffer is
    # full, or too many requests wait to be answered. aiohttp's own versions of these methods drive
    # its parser, which this protocol does not have.
    def pause_reading(self) -> None:
        self._reading_paused = True
        self._update_reading()

    def resume_reading(self, resume_parser: bool = True) -> None:
        self._reading_paused = False
        self._update_reading()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._update_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._update_reading()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None:
            return
        behind = len(self._queue) > MAX_QUEUED or bool(self._unparsed)
        if behind != self.behind:
            self._behind_changed(behind)
        hold = not self._lingering and (self._reading_paused or self._paused or behind or self._refused or self._closing)
        if hold != self._transport_paused:
            self._transport_paused = hold
            if hold:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _behind_changed(self, behind: bool) -> None:
        """Reading held for the answers to catch up is splitter's wait, not the client's: the header
        clock of a head begun before it stands still meanwhile (`head_waiting` does not count while
        `behind`, and the time is given back here when it ends)."""
        now = time.monotonic()
        self.behind = behind
        if behind:
            self._behind_since = now
        elif self.head_since is not None and self.head_since < self._behind_since:
            self.head_since += now - self._behind_since

    # -- llhttp's callbacks -------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url, self._headers = b"", []
        if self.head_since is None:
            self.head_since = time.monotonic()
        self.idle_since = None

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_FIELD:
            raise _Refused(400, "malformed_request", f"the request could not be parsed: the request target is longer than {MAX_FIELD} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._payload is not None:  # a trailer field: dropped (never a header of this request or the next)
            return
        if len(name) > MAX_FIELD or len(value) > MAX_FIELD:
            raise _Refused(400, "malformed_request", f"the request could not be parsed: a header line is longer than {MAX_FIELD} bytes")
        if len(self._headers) >= MAX_HEADERS:
            raise _Refused(400, "malformed_request", f"the request could not be parsed: more than {MAX_HEADERS} header fields")
        self._headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        parser = self._llhttp
        target = self._url.decode("latin-1")
        headers = CIMultiDictProxy(CIMultiDict(self._headers))
        self._url, self._headers = b"", []
        version = HttpVersion10 if parser.get_http_version() == "1.0" else HttpVersion11  # anything else is answered as 1.1
        keep_alive = parser.should_keep_alive()
        method = parser.get_method().decode("latin-1")
        if parser.should_upgrade() and ("Transfer-Encoding" in headers or headers.get("Content-Length", "0").strip() not in ("", "0")):
            raise _Refused(400, "malformed_request", "the request could not be parsed: a request asking to switch protocols may not have a body")
        payload = StreamReader(self, BODY_BUFFER, loop=self._loop)
        path, _, query_string = target.partition("?")
        request: web.BaseRequest | LightRequest
        if method == "POST" and path in self._fast_paths and "Expect" not in headers and not parser.should_upgrade():
            request = LightRequest(method, target, path, query_string, headers, payload,
                                   self.peername[0] if isinstance(self.peername, tuple) else None)
        else:
            try:
                url = URL(target, encoded=True) if target.startswith("/") else URL(target)
            except ValueError:
                raise _Refused(400, "malformed_request", "the request could not be parsed: invalid request target") from None
            message = RawRequestMessage(method, target, version, headers, (), not keep_alive, None, parser.should_upgrade(),
                                        "chunked" in headers.get("Transfer-Encoding", "").lower(), url)
            request = self._factory(message, payload, self, StreamWriter(self, self._loop), cast("asyncio.Task[None]", None))
        self._payload = payload
        self._framing_bytes = 0
        self.head_since = None
        self._enqueue((request, payload, keep_alive, version))

    def on_body(self, body: bytes) -> None:
        self._body_fed += len(body)
        if self._payload is not None:
            self._payload.feed_data(body)

    def on_message_complete(self) -> None:
        self._url, self._headers = b"", []
        if self._payload is not None and self._llhttp.should_upgrade():  # no body; llhttp stops next (_after_upgrade)
            self._upgrading, self._payload = self._payload, None
            return
        if self._payload is not None:
            self._payload.feed_eof()
            self._payload = None

    # -- answering ----------------------------------------------------------------------------------
    def _refuse(self, refusal: _Refused) -> None:
        self._refused = True
        self.head_since = None
        self._update_reading()
        if self._payload is not None and not self._payload.is_eof():  # a body cut by a framing error
            self._payload.set_exception(ConnectionResetError("the request body could not be parsed"))
            self._payload = None
        self._enqueue(refusal)

    def _enqueue(self, item: Pending | _Refused) -> None:
        self._queue.append(item)
        if len(self._queue) > MAX_QUEUED:
            self._update_reading()
        if self._answering is None:
            self._answering = self._loop.create_task(self._answer_in_order())

    def refuse(self, status: int, code: str, message: str) -> None:
        """Answer `status` in its turn, after the requests before it, then close (the header timeout)."""
        if not self._refused and not self._closing:
            self._refuse(_Refused(status, code, message))

    def abort(self) -> None:
        """The drain timeout passed: stop answering and close."""
        self._closing = True
        if self._answering is not None:
            self._answering.cancel()
        if self.transport is not None:
            self.transport.abort()  # not close(): a client that reads nothing would hold the socket forever

    def head_waiting(self, now: float, seconds: float) -> bool:
        """A head has been incomplete for more than `seconds` of the client's time (not while splitter is `behind`)."""
        return self.head_since is not None and not self.behind and self.head_since < now - seconds

    def idle(self) -> bool:
        """Nothing being parsed, waiting or answered: the connection may be closed without losing anything."""
        return self._answering is None and not self._queue and self.head_since is None and self._payload is None

    def force_close(self) -> None:
        self._closing = True
        if self._answering is None:
            self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _linger(self) -> None:
        """Close after a last answer without losing it: shut the write side (the answer, then a FIN),
        then read and drop what the client is still sending (a body nobody read: after a 413, a 401,
        a refused head) for a while, so that its kernel gets no reset that would throw the answer away."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._lingering:
            return
        if self.eof or self.closing_all or not transport.can_write_eof():  # nothing more will come, or no time to wait
            transport.close()
            return
        self._lingering = True
        transport.write_eof()
        self._update_reading()
        self._loop.call_later(LINGER_SECONDS, self._end_linger)

    def _end_linger(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    async def _answer_in_order(self) -> None:
        try:
            while self._queue:
                item = self._queue[0]
                if isinstance(item, _Refused):
                    self._write_refusal(item)
                    self._queue.clear()
                    self._closing = True
                    break
                request, payload, keep_alive, version = item
                try:
                    response = await self._dispatch(request)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("request_failed", path=request.path)
                    response = responses.error(500, "internal_error", "splitter failed to handle the request; it is safe to retry")
                if self._queue and self._queue[0] is item:
                    self._queue.popleft()
                # The last answer on this connection: the client or the handler said so, the body was not
                # read to its end (the rest of the stream cannot be framed), the listener is closing, or the
                # client half-closed and this answers the last request it sent.
                unread = not payload.is_eof() or payload.exception() is not None
                keep = (keep_alive and response.keep_alive is not False and not unread and not self.closing_all
                        and not (self.eof and not self._queue and not self._unparsed))
                if not keep:
                    response.force_close()
                try:
                    await self._write(request, version, response, keep)
                except (ConnectionError, RuntimeError) as exc:  # the client went away while its answer was being written
                    log.info("answer_not_written", path=request.path, error=str(exc))
                    self._closing = True
                    break
                if not keep:
                    self._closing = True
                    break
                self._parse()  # what waited for the queue to shrink
        finally:
            self._answering = None
            self.idle_since = time.monotonic()
            if self.transport is None:  # the connection was lost meanwhile
                self._queue.clear()
                self._on_close(self)
            elif self._closing:
                self._linger()
            elif self._queue:  # a head arrived while the last answer was being written
                self._answering = self._loop.create_task(self._answer_in_order())

    async def _write(self, request: web.BaseRequest | LightRequest, version: HttpVersion, response: web.StreamResponse | Answer,
                     keep: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if isinstance(request, LightRequest):  # an ingest handler's answer, or a plain web.Response never prepared (an error)
            if type(response) is Answer:
                self.transport.write(_serialize_answer(version, response, keep))
                return
            if not (type(response) is web.Response and isinstance(response.body, bytes) and not response.prepared):
                log.error("request_failed", path=request.path, error=f"an ingest handler answered with a {type(response).__name__}")
                response = responses.error(500, "internal_error", "splitter failed to handle the request; it is safe to retry")
            self.transport.write(_serialize(version, response, keep))
            return
        if isinstance(response, Answer):  # an ingest handler's, for an ingest path aiohttp's request carries (percent escapes)
            response = response.as_response()
        await response.prepare(request)
        await response.write_eof()

    def _write_refusal(self, refusal: _Refused) -> None:
        response = responses.error(refusal.status, refusal.code, mask_keys_in(refusal.message))
        log.info("request_refused", code=refusal.code, status=refusal.status, error=mask_keys_in(refusal.message),
                 remote=self.peername[0] if isinstance(self.peername, tuple) else None)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_serialize(HttpVersion11, response, keep=False))


def _malformed(reason: str) -> _Refused:
    if "content-length" in reason.lower() and "duplicate" not in reason.lower():
        return _Refused(400, "invalid_request", f"Content-Length is not a valid length: {reason}")
    return _Refused(400, "malformed_request", f"the request could not be parsed: {reason}")


_STATUS_LINES: dict[tuple[HttpVersion, int], str] = {}
_FRAMING = ("content-length", "connection", "date", "transfer-encoding")  # the connection writes these itself


def _serialize_answer(version: HttpVersion, answer: Answer, keep: bool) -> bytes:
    """An `Answer`'s bytes, as `_serialize` writes the same answer made a `web.Response`."""
    head = _STATUS_LINES.get((version, answer.status))
    if head is None:
        head = _STATUS_LINES[version, answer.status] = (f"HTTP/{version.major}.{version.minor} {answer.status} "
                                                        f"{HTTPStatus(answer.status).phrase}\r\nContent-Type: {JSON}\r\n")
    return _framed(head + _header_lines(answer.headers.items()) if answer.headers else head, answer.body, version, keep)


def _serialize(version: HttpVersion, response: web.Response, keep: bool) -> bytes:
    """A plain response's bytes: status line, its headers, length, date, connection, body."""
    head = f"HTTP/{version.major}.{version.minor} {response.status} {response.reason}\r\n" + _header_lines(response.headers.items())
    return _framed(head, cast(bytes, response.body), version, keep)


def _header_lines(headers: Iterable[tuple[str, str]]) -> str:
    lines = []
    for name, value in headers:
        if name.lower() in _FRAMING:
            continue
        if "\r" in value or "\n" in value:
            raise ValueError(f"a header value with a line break: {name}")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines)


def _framed(head: str, body: bytes, version: HttpVersion, keep: bool) -> bytes:
    """`head` (status line and headers) with the length, date, server and connection headers, then `body`."""
    connection = "" if keep and version != HttpVersion10 else "Connection: keep-alive\r\n" if keep else "Connection: close\r\n"
    return f"{head}Content-Length: {len(body)}\r\nDate: {http_date()}\r\nServer: splitter\r\n{connection}\r\n".encode("latin-1") + body
