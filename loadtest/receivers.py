"""Stand-in Segment and RudderStack receivers for the tests, `make demo` and benchmarks.

The proxy's correctness depends on what the two upstreams accept on the wire, so each
receiver follows the documented contract of its upstream (the wire-contract notes
"segment-rudderstack-wire.md", sections 1 and 4) closely enough that a translation bug in
the proxy shows up as a 4xx here rather than in production:

* ``segment``: Basic auth *or* top-level ``writeKey`` in the body; batch envelope
  ``context``/``integrations`` merged into every item; 400 only for JSON, size and missing key.
* ``rudderstack``: Basic auth only (body ``writeKey`` ignored); only ``batch[]`` is read;
  one event without ``anonymousId``/``userId`` rejects the whole request; text/plain replies.

Events are recorded *as the upstream reads them, before its own enrichment* (no
``rudderId``/``receivedAt``/``messageId`` added) so tests see exactly what the proxy sent.

Faults (outage, error status, 429 + Retry-After, slowness, TCP resets, poison events,
transient failures) can be switched at runtime from Python (``receiver.faults``) or over
HTTP (``/_control/...``) so another process (demo, benchmarks) can steer a receiver.

Run both receivers in one process::

    python -m loadtest.receivers --segment-port 0 --rudder-port 0 [--no-record]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import dataclasses
import ipaddress
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType
from typing import Any, Literal

import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

Kind = Literal["segment", "rudderstack"]
KINDS: tuple[Kind, ...] = ("segment", "rudderstack")

KB = 1024
# Segment: 500 KB per batch request, 32 KB per event and per single-event request, 2500
# events per batch (over that: 200 but the events are dropped). KB = 1024 as in the SDKs.
SEGMENT_MAX_BATCH_BYTES = 500 * KB
SEGMENT_MAX_EVENT_BYTES = 32 * KB
SEGMENT_MAX_BATCH_EVENTS = 2500
# RudderStack: Gateway.maxReqSizeInKB=4000, checked on the decompressed body, answered 413.
RUDDER_MAX_BODY_BYTES = 4000 * KB

EVENT_TYPES = ("identify", "track", "page", "screen", "group", "alias")
# Segment also serves the analytics.js short paths (first letter of the type) and /v1/b.
SEGMENT_SINGLE_PATHS: dict[str, str] = {
    **{f"/v1/{t}": t for t in EVENT_TYPES},
    **{f"/v1/{t[0]}": t for t in EVENT_TYPES},
}
SEGMENT_BATCH_PATHS = frozenset({"/v1/batch", "/v1/b", "/v1/import"})
SEGMENT_METRICS_PATH = "/v1/m"
# RudderStack has no short paths: a proxy that forgets to map /v1/t gets a 404 here.
RUDDER_SINGLE_PATHS: dict[str, str] = {f"/v1/{t}": t for t in EVENT_TYPES}
RUDDER_BATCH_PATHS = frozenset({"/v1/batch", "/v1/import"})

SEGMENT_OK = b'{"success": true}'
JSON_TYPE = "application/json"
# rudder-server writes errors with Go's http.Error: this content type plus nosniff.
RUDDER_TEXT_HEADERS = {
    "Content-Type": "text/plain; charset=utf-8",
    "X-Content-Type-Options": "nosniff",
}
# Texts rudder-server (>= v1.46) sends for statuses a fault may inject.
RUDDER_STATUS_TEXT = {
    429: "max requests limit reached",
    500: "internal server error",
    503: "Service Unavailable",
    504: "gateway timeout",
}

Headers = Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Received:
    """One accepted event, as the upstream would see it (after Segment's envelope merge)."""

    event: dict[str, Any]
    write_key: str
    path: str
    # Case-insensitive read-only copy of the request headers (shared by a request's events).
    headers: Headers
    received_at: float


@dataclass(frozen=True, slots=True)
class Dropped:
    """An event Segment answers 200 for but silently discards (wrong type, no id, >2500)."""

    reason: str
    event: Any
    write_key: str
    path: str


@dataclass(slots=True)
class Faults:
    """Failure modes switched at runtime; every field's default means "healthy".

    Order of evaluation per event request: ``down``, ``delay``, ``reset_connections``,
    ``fail_next``/``status``, then the contract checks, then ``reject_message_ids``.
    """

    # Close the connection as soon as the request head arrives, never answering: a FIN
    # (aiohttp: ServerDisconnectedError), or an RST if body bytes are still unread.
    down: bool = False
    # Answer every request with this status (body in the kind's error format).
    status: int | None = None
    # Seconds sent as Retry-After (and X-RateLimit-Reset for Segment) on fault replies.
    retry_after: float | None = None
    # Seconds to sleep before answering ("slow upstream").
    delay: float = 0.0
    # Read the whole request, then abort the TCP connection with an RST (SO_LINGER 0;
    # aiohttp: ClientOSError ECONNRESET); never answer, nothing is recorded.
    reset_connections: bool = False
    # Answer 400 to a whole request carrying any of these messageIds ("poison" events).
    reject_message_ids: set[str] = field(default_factory=set)
    # The next N requests fail with ``status`` (or 500); when the count runs out,
    # ``status`` and ``retry_after`` are cleared too, so the receiver is healthy again.
    fail_next: int = 0

    def take_failure(self) -> tuple[int, float | None] | None:
        """Status and Retry-After to inject for this request, consuming ``fail_next``."""
        if self.fail_next > 0:
            self.fail_next -= 1
            failure = (self.status or 500, self.retry_after)
            if self.fail_next == 0:
                self.status = None
                self.retry_after = None
            return failure
        if self.status is not None:
            return self.status, self.retry_after
        return None

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply a partial JSON update; validates everything before changing anything."""
        parsed = {name: _parse_fault(name, value) for name, value in changes.items()}
        for name, value in parsed.items():
            setattr(self, name, value)

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly view for the control plane."""
        data = dataclasses.asdict(self)
        data["reject_message_ids"] = sorted(self.reject_message_ids)
        return data


def _parse_fault(name: str, value: Any) -> Any:
    """Validate one fault field from JSON, so a typo fails loudly instead of being ignored."""
    if name in ("down", "reset_connections"):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a boolean")
        return value
    if name == "status":
        if value is None or (type(value) is int and 100 <= value <= 599):
            return value
        raise ValueError("status must be null or an HTTP status code")
    if name in ("retry_after", "delay"):
        if value is None and name == "retry_after":
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"{name} must be a non-negative number")
        return float(value)
    if name == "fail_next":
        if type(value) is not int or value < 0:
            raise ValueError("fail_next must be a non-negative integer")
        return value
    if name == "reject_message_ids":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("reject_message_ids must be a list of strings")
        return set(value)
    raise ValueError(f"unknown fault field {name!r}")


def _basic_user(header: str | None, *, require_colon: bool) -> str | None:
    """User name of a Basic Authorization header, or None.

    Segment tolerates ``base64(key)`` without the colon; Go's ``r.BasicAuth()`` (used by
    rudder-server) requires it, hence ``require_colon``.
    """
    if not header or len(header) < 6 or header[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("latin-1")
    except (binascii.Error, ValueError):
        return None
    user, colon, _ = decoded.partition(":")
    if require_colon and not colon:
        return None
    return user


def _has_id(value: Any) -> bool:
    """rudder-server's rule: gjson String() of the field, trimmed, must be non-empty."""
    if value is None:
        return False
    if isinstance(value, str):
        return bool(value.strip())
    return True


def _segment_error(status: int, code: str, message: str) -> web.Response:
    """Segment's JSON error shape; Python SDKs read ``code`` and ``message``."""
    body = orjson.dumps({"success": False, "code": code, "message": message})
    return web.Response(status=status, body=body, content_type=JSON_TYPE)


def _rudder_error(status: int, message: str) -> web.Response:
    """rudder-server's ``http.Error`` reply: text/plain, message plus newline."""
    return web.Response(status=status, text=message + "\n", headers=RUDDER_TEXT_HEADERS)


def _kill_connection(request: web.BaseRequest, *, reset: bool) -> web.Response:
    """Drop the connection without an answer; the returned response is never written.

    ``reset`` sets SO_LINGER 0 so close sends a TCP RST instead of a FIN.
    """
    transport = request.transport
    if transport is not None:
        if reset:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
            transport.abort()
        else:
            transport.close()
    # aiohttp swallows the ConnectionError from writing this to the closed transport.
    return web.Response(status=599)


def _copy_headers(request: web.BaseRequest) -> Headers:
    """Snapshot headers case-insensitively: proxies may send ``x-forwarded-for``."""
    return CIMultiDictProxy(CIMultiDict(request.headers))


class Receiver:
    """One fake upstream (``kind`` = "segment" or "rudderstack") as an aiohttp app.

    ``record=False`` keeps only counters (for benchmarks): no Received objects, and for
    Segment no per-event checks (size, type, ids); RudderStack still enforces its
    anonymousId/userId rule because a request failing it is rejected as a whole.
    """

    def __init__(
        self,
        kind: Kind,
        *,
        record: bool = True,
        valid_keys: Iterable[str] | None = None,
        faults: Faults | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        self.kind: Kind = kind
        self.record = record
        self.valid_keys: frozenset[str] | None = (
            None if valid_keys is None else frozenset(valid_keys)
        )
        self.faults = faults if faults is not None else Faults()
        self.events: list[Received] = []
        self.dropped: list[Dropped] = []
        self.count = 0  # events accepted
        self.requests = 0  # requests accepted (2xx)
        self.refused = 0  # requests refused by a fault
        self.rejected = 0  # requests refused by the upstream contract (4xx)
        self.dropped_count = 0  # events answered 200 but discarded (Segment)
        self._signal: asyncio.Event | None = None
        self._app: web.Application | None = None

    # ----------------------------------------------------------------- app
    @property
    def app(self) -> web.Application:
        """The aiohttp application, built once (an app can only be frozen once)."""
        if self._app is None:
            self._app = self._build_app()
        return self._app

    def _build_app(self) -> web.Application:
        """Routes of the upstream plus the ``/_control`` plane."""
        if self.kind == "segment":
            handler, max_body = self._segment, SEGMENT_MAX_BATCH_BYTES
            paths = [*SEGMENT_SINGLE_PATHS, *SEGMENT_BATCH_PATHS]
        else:
            handler, max_body = self._rudder, RUDDER_MAX_BODY_BYTES
            paths = [*RUDDER_SINGLE_PATHS, *RUDDER_BATCH_PATHS]
        app = web.Application(client_max_size=max_body)
        app.router.add_routes([web.post(p, handler) for p in paths])
        if self.kind == "segment":
            app.router.add_post(SEGMENT_METRICS_PATH, self._segment_metrics)
        app.router.add_get("/_control/stats", self._control_stats)
        app.router.add_get("/_control/events", self._control_events)
        app.router.add_get("/_control/faults", self._control_get_faults)
        app.router.add_post("/_control/faults", self._control_set_faults)
        app.router.add_post("/_control/reset", self._control_reset)
        return app

    # ---------------------------------------------------------- recordings
    def message_ids(self) -> list[str]:
        """messageIds of recorded events in arrival order (missing ones skipped)."""
        return [m for r in self.events if isinstance(m := r.event.get("messageId"), str)]

    def by_write_key(self) -> dict[str, list[Received]]:
        """Recorded events grouped by the credential that authenticated them."""
        groups: dict[str, list[Received]] = {}
        for rec in self.events:
            groups.setdefault(rec.write_key, []).append(rec)
        return groups

    def by_message_id(self) -> dict[str, list[Received]]:
        """Recorded events grouped by messageId: a list longer than 1 is a duplicate."""
        groups: dict[str, list[Received]] = {}
        for rec in self.events:
            groups.setdefault(str(rec.event.get("messageId")), []).append(rec)
        return groups

    def clear(self) -> None:
        """Forget recordings and zero the counters (faults are kept)."""
        self.events.clear()
        self.dropped.clear()
        self.count = self.requests = self.refused = self.rejected = 0
        self.dropped_count = 0

    def reset(self) -> None:
        """Back to a fresh, healthy receiver."""
        self.clear()
        self.faults = Faults()

    def stats(self) -> dict[str, Any]:
        """Counters (plus messageIds when recording) for the control plane."""
        data: dict[str, Any] = {
            "kind": self.kind,
            "count": self.count,
            "requests": self.requests,
            "refused": self.refused,
            "rejected": self.rejected,
            "dropped": self.dropped_count,
        }
        if self.record:
            data["message_ids"] = self.message_ids()
        return data

    async def wait_for(self, count: int, timeout: float = 5.0) -> None:
        """Wait until ``count`` events were accepted: the proxy may forward in background.

        Raises TimeoutError when it does not happen in time.
        """
        async with asyncio.timeout(timeout):
            while self.count < count:
                if self._signal is None:
                    self._signal = asyncio.Event()
                await self._signal.wait()

    def _accept(self, n_events: int) -> None:
        """Count an accepted request and wake ``wait_for`` callers."""
        self.count += n_events
        self.requests += 1
        signal_ = self._signal
        if signal_ is not None:
            self._signal = None
            signal_.set()

    def _store(self, request: web.Request, events: list[dict[str, Any]], key: str) -> None:
        """Record accepted events, sharing one header snapshot per request."""
        headers, path, now = _copy_headers(request), request.path, time.monotonic()
        self.events.extend(Received(ev, key, path, headers, now) for ev in events)

    def _drop(self, reason: str, event: Any, key: str, path: str) -> None:
        self.dropped_count += 1
        self.dropped.append(Dropped(reason, event, key, path))

    # --------------------------------------------------------------- faults
    async def _apply_faults(self, request: web.Request) -> web.StreamResponse | None:
        """A response if a fault decides this request, else None (the cheap common case)."""
        faults = self.faults
        if faults.down:
            self.refused += 1
            return _kill_connection(request, reset=False)
        if faults.delay > 0:
            await asyncio.sleep(faults.delay)
            faults = self.faults  # the control plane may have reset them meanwhile
        if faults.reset_connections:
            self.refused += 1
            with contextlib.suppress(Exception):
                await request.read()
            return _kill_connection(request, reset=True)
        failure = faults.take_failure()
        if failure is None:
            return None
        self.refused += 1
        status, retry_after = failure
        return self._fault_response(status, retry_after)

    def _fault_response(self, status: int, retry_after: float | None) -> web.Response:
        """An injected error in the kind's own format, with Retry-After when configured."""
        phrase = _phrase(status)
        if self.kind == "segment":
            resp = _segment_error(status, phrase.lower().replace(" ", "_"), phrase)
        else:
            resp = _rudder_error(status, RUDDER_STATUS_TEXT.get(status, phrase.lower()))
        if retry_after is not None:
            value = f"{retry_after:g}"
            resp.headers["Retry-After"] = value
            if self.kind == "segment":
                resp.headers["X-RateLimit-Reset"] = value
        return resp

    def _poisoned(self, events: list[Any]) -> str | None:
        """First poison messageId among the events, if any."""
        poison = self.faults.reject_message_ids
        if not poison:
            return None
        for ev in events:
            if isinstance(ev, dict) and isinstance(mid := ev.get("messageId"), str) and mid in poison:
                return mid
        return None

    async def _read_body(self, request: web.Request) -> bytes | None:
        """Decompressed body (aiohttp inflates gzip), or None if over client_max_size.

        Raises ``_BadBody`` when the payload cannot be read (e.g. corrupt gzip).
        """
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            return None
        except Exception as exc:  # aiohttp raises several types for bad encodings
            # Mark the stream finished so aiohttp does not re-raise while draining it
            # ("Unhandled exception"); the reply then closes the connection.
            request.content.feed_eof()
            raise _BadBody(str(exc)) from exc

    # -------------------------------------------------------------- segment
    async def _segment(self, request: web.Request) -> web.StreamResponse:
        """Segment Tracking API: single-event paths and batch paths."""
        if (injected := await self._apply_faults(request)) is not None:
            return injected
        batch_path = request.path in SEGMENT_BATCH_PATHS
        try:
            body = await self._read_body(request)
        except _BadBody:
            return _closing(self._seg_reject(400, "invalid_request", "cannot read body"))
        limit = SEGMENT_MAX_BATCH_BYTES if batch_path else SEGMENT_MAX_EVENT_BYTES
        if body is None or len(body) > limit:
            return self._seg_reject(400, "invalid_request", f"request exceeds {limit // KB} KB")
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return self._seg_reject(400, "invalid_request", "malformed JSON")
        if not isinstance(data, dict):
            return self._seg_reject(400, "invalid_request", "body must be a JSON object")
        key = _basic_user(request.headers.get("Authorization"), require_colon=False)
        if not key:
            key = data.get("writeKey")
        if not key or not isinstance(key, str):
            return self._seg_reject(400, "invalid_request", "missing write key")
        if self.valid_keys is not None and key not in self.valid_keys:
            return self._seg_reject(401, "invalid_write_key", "invalid write key")
        if batch_path:
            items = data.get("batch")
            if not isinstance(items, list):
                return self._seg_reject(400, "invalid_request", "batch must be an array")
        else:
            items = [data]
        if (mid := self._poisoned(items)) is not None:
            self.refused += 1
            return _segment_error(400, "invalid_request", f"rejected messageId {mid}")
        if not self.record:
            self._accept(len(items) if len(items) <= SEGMENT_MAX_BATCH_EVENTS else 0)
            return web.Response(body=SEGMENT_OK, content_type=JSON_TYPE)
        return self._segment_record(request, data, items, key, batch_path)

    def _segment_record(
        self,
        request: web.Request,
        data: dict[str, Any],
        items: list[Any],
        key: str,
        batch_path: bool,
    ) -> web.Response:
        """Validate and record the events of an accepted Segment request."""
        path = request.path
        if batch_path:
            for item in items:
                if len(orjson.dumps(item)) > SEGMENT_MAX_EVENT_BYTES:
                    return self._seg_reject(400, "invalid_request", "event exceeds 32 KB")
        if len(items) > SEGMENT_MAX_BATCH_EVENTS:
            # Documented: more than 2500 events -> 200, but the events are rejected.
            for item in items:
                self._drop("batch exceeds 2500 events", item, key, path)
            self._accept(0)
            return web.Response(body=SEGMENT_OK, content_type=JSON_TYPE)
        implied = SEGMENT_SINGLE_PATHS.get(path)
        kept: list[dict[str, Any]] = []
        for item in items:
            event = _segment_event(item, data, implied)
            reason = _segment_problem(event)
            if reason is None:
                kept.append(event)  # type: ignore[arg-type]
            else:
                self._drop(reason, item, key, path)
        self._store(request, kept, key)
        self._accept(len(kept))
        return web.Response(body=SEGMENT_OK, content_type=JSON_TYPE)

    def _seg_reject(self, status: int, code: str, message: str) -> web.Response:
        self.rejected += 1
        return _segment_error(status, code, message)

    async def _segment_metrics(self, request: web.Request) -> web.Response:
        """analytics.js telemetry (/v1/m): accepted and discarded, never counted."""
        await request.read()
        return web.Response(body=SEGMENT_OK, content_type=JSON_TYPE)

    # ---------------------------------------------------------- rudderstack
    async def _rudder(self, request: web.Request) -> web.StreamResponse:
        """rudder-server gateway: writeKeyAuth, then getJobDataFromRequest's checks."""
        if (injected := await self._apply_faults(request)) is not None:
            return injected
        key = _basic_user(request.headers.get("Authorization"), require_colon=True)
        if not key:
            return self._rudder_reject(401, "failed to read writekey from header")
        if self.valid_keys is not None and key not in self.valid_keys:
            return self._rudder_reject(401, "invalid write key")
        try:
            body = await self._read_body(request)
        except _BadBody:
            return _closing(self._rudder_reject(500, "failed to read body from request"))
        if body is None:
            return self._rudder_reject(413, "request size exceeds max limit")
        if not body:
            return self._rudder_reject(400, "request body is nil")
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return self._rudder_reject(400, "invalid json")
        events = _rudder_events(data, RUDDER_SINGLE_PATHS.get(request.path))
        if isinstance(events, str):
            return self._rudder_reject(400, events)
        if (mid := self._poisoned(events)) is not None:
            self.refused += 1
            return _rudder_error(400, f"rejected messageId {mid}")
        if self.record:
            self._store(request, events, key)
        self._accept(len(events))
        return web.Response(text="ok")

    def _rudder_reject(self, status: int, message: str) -> web.Response:
        self.rejected += 1
        return _rudder_error(status, message)

    # -------------------------------------------------------- control plane
    async def _control_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats(), dumps=_dumps)

    async def _control_events(self, request: web.Request) -> web.Response:
        """Recorded events for another process (demo): event, write_key, path, headers."""
        rows = [
            {
                "event": r.event,
                "write_key": r.write_key,
                "path": r.path,
                "headers": {str(k): v for k, v in r.headers.items()},  # keys are istr
                "received_at": r.received_at,
            }
            for r in self.events
        ]
        return web.json_response(rows, dumps=_dumps)

    async def _control_get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self.faults.to_json(), dumps=_dumps)

    async def _control_set_faults(self, request: web.Request) -> web.Response:
        """Partial update, e.g. ``{"status": 503, "fail_next": 2}``; replies the new state."""
        try:
            changes = orjson.loads(await request.read())
            if not isinstance(changes, dict):
                raise ValueError("body must be a JSON object")
            self.faults.update(changes)
        except (ValueError, orjson.JSONDecodeError) as exc:
            return web.json_response({"error": str(exc)}, status=400, dumps=_dumps)
        return web.json_response(self.faults.to_json(), dumps=_dumps)

    async def _control_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response(self.stats(), dumps=_dumps)


class _BadBody(Exception):
    """The request body could not be read (corrupt compression, truncated payload)."""


def _closing(resp: web.Response) -> web.Response:
    """Send ``Connection: close``: the rest of an unreadable body is still on the wire."""
    resp.force_close()
    return resp


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"status {status}"


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def _segment_event(
    item: Any, envelope: dict[str, Any], implied_type: str | None
) -> dict[str, Any] | None:
    """The event as Segment sees it: envelope context/integrations merged, type implied.

    The merge is per top-level key of ``context``/``integrations``; the event's own keys win.
    """
    if not isinstance(item, dict):
        return None
    if implied_type is not None:
        if "type" not in item:
            return {**item, "type": implied_type}
        return item
    event = item
    for name in ("context", "integrations"):
        outer = envelope.get(name)
        if isinstance(outer, dict) and outer:
            inner = event.get(name)
            merged = {**outer, **inner} if isinstance(inner, dict) else dict(outer)
            event = {**event, name: merged}
    return event


def _segment_problem(event: dict[str, Any] | None) -> str | None:
    """Why Segment would discard this event despite answering 200, or None."""
    if event is None:
        return "event is not an object"
    if event.get("type") not in EVENT_TYPES:
        return "missing or unknown type"
    if not (_has_id(event.get("userId")) or _has_id(event.get("anonymousId"))):
        return "no_user_anon_id"
    return None


def _rudder_events(data: Any, route_type: str | None) -> list[dict[str, Any]] | str:
    """Events rudder-server reads from a body, or the 400 message rejecting the request."""
    if route_type is not None:
        if isinstance(data, dict):
            data["type"] = route_type  # the gateway overwrites type with the route name
        batch: Any = [data]
    else:
        # Only batch[] is read; gjson's Array() turns a lone value into a 1-item array.
        batch = data.get("batch") if isinstance(data, dict) else None
        if batch is None:
            batch = []
        elif not isinstance(batch, list):
            batch = [batch]
    if not batch:
        return "empty batch payload"
    for event in batch:
        if not isinstance(event, dict):
            return "event is not a valid rudder event"
        if not (_has_id(event.get("anonymousId")) or _has_id(event.get("userId"))):
            return "request neither has anonymousId nor userId"
    return batch


# ------------------------------------------------------------------ running on a socket
@dataclass
class RunningReceiver:
    """A receiver listening on a real loopback socket; ``await close()`` when done."""

    receiver: Receiver
    url: str
    runner: web.AppRunner

    @property
    def kind(self) -> Kind:
        return self.receiver.kind

    async def close(self) -> None:
        await self.runner.cleanup()

    async def __aenter__(self) -> RunningReceiver:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _require_loopback(host: str) -> None:
    """Stand-ins accept any key and expose a control plane: never bind them publicly."""
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"receivers only bind loopback addresses, not {host!r}")


async def start_receiver(
    kind: Kind, host: str = "127.0.0.1", port: int = 0, **opts: Any
) -> RunningReceiver:
    """Start a Receiver(kind, **opts) on host:port (0 = any free port)."""
    _require_loopback(host)
    receiver = Receiver(kind, **opts)
    # Short shutdown timeout: a `delay` fault must not hold a test teardown for a minute.
    runner = web.AppRunner(
        receiver.app, access_log=None, handle_signals=False, shutdown_timeout=1.0
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return RunningReceiver(receiver, f"http://{shown}:{bound_port}", runner)


# -------------------------------------------------------------------------------- CLI
def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.receivers",
        description="Run stand-in Segment and RudderStack receivers on loopback.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--segment-port", type=int, default=0)
    parser.add_argument("--rudder-port", type=int, default=0)
    parser.add_argument("--no-record", action="store_true", help="count events only")
    parser.add_argument("--rudder-keys", default="", help="comma-separated valid keys")
    parser.add_argument("--segment-keys", default="", help="comma-separated valid keys")
    return parser.parse_args(argv)


def _keys(csv: str) -> frozenset[str] | None:
    keys = frozenset(k.strip() for k in csv.split(",") if k.strip())
    return keys or None


async def _serve(args: argparse.Namespace) -> None:
    """Start both receivers, announce their URLs on stdout, serve until SIGTERM/SIGINT."""
    record = not args.no_record
    segment = await start_receiver(
        "segment", args.host, args.segment_port,
        record=record, valid_keys=_keys(args.segment_keys),
    )  # fmt: skip
    try:
        rudder = await start_receiver(
            "rudderstack", args.host, args.rudder_port,
            record=record, valid_keys=_keys(args.rudder_keys),
        )  # fmt: skip
    except BaseException:
        await segment.close()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        line = orjson.dumps({"segment": segment.url, "rudderstack": rudder.url})
        sys.stdout.write(line.decode() + "\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        await rudder.close()
        await segment.close()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; uses uvloop when installed (benchmarks measure the proxy, not us)."""
    args = _parse_args(argv)
    try:
        _require_loopback(args.host)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
