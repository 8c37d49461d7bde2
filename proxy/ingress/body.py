"""Request bodies to parsed JSON, within Segment's limits and without trusting Content-Length.

Limits apply after decompression (500 KB per request, as Segment's API), and gzip is inflated
incrementally with a cap, so a small gzip bomb is refused after reading at most the cap plus one
byte instead of being expanded in memory. `text/plain` bodies are JSON too: analytics.js sends
them that way to avoid a CORS preflight.

A body must arrive by the request's BODY_DEADLINE (set by the listener from `--body-timeout`), or
the answer is 408 and the request's in-flight slot is freed: a client sending a byte a second, or a
phone that vanished mid-upload, cannot hold a slot for longer.

A lone UTF-16 surrogate escape (`"\\ud83d"`: a browser cutting a string inside an emoji) is replaced
by U+FFFD, as Go's JSON decoder does, instead of failing the whole batch: orjson refuses such
strings, so only then is the body decoded again by the standard library and repaired.
"""

from __future__ import annotations

import asyncio
import json
import re
import zlib
from typing import Any

import orjson
from aiohttp import web

from proxy.ingress.request import IngestRequest
from proxy.ingress.responses import IngressError

MAX_REQUEST_BYTES = 500 * 1024
MAX_EVENT_BYTES = 32 * 1024
MAX_BATCH_EVENTS = 2500
MAX_WIRE_BYTES = MAX_REQUEST_BYTES + 64 * 1024  # compressed bodies of incompressible data grow a little
_GZIP_WBITS = 16 + zlib.MAX_WBITS
# When the request's body must have arrived (loop time), set by the listener. A plain str key warns on aiohttp >= 3.14.
BODY_DEADLINE: Any = web.RequestKey("body_deadline", float) if hasattr(web, "RequestKey") else "body_deadline"
_LONE_SURROGATE = re.compile("[\\ud800-\\udfff]")  # after json.loads, a valid pair is one code point: only lone halves remain


def too_large(limit: str) -> IngressError:
    return IngressError(413, "request_too_large", f"request body exceeds {limit} (Segment's limit, after decompression)")


def body_at_hand(request: IngestRequest) -> bytes | None:
    """The decompressed body when it has all arrived (the common call: read without a coroutine or a
    timeout), refused past the limits; None while it is still arriving (`read_body` waits for it)."""
    encoding, wire_limit = _limits(request)
    if not request.content.is_eof():
        return None
    try:
        raw = request.content.read_nowait()
    except (OSError, web.RequestPayloadError) as exc:  # the client went away, or sent a malformed chunked body
        raise _incomplete(exc) from None
    if len(raw) > wire_limit:
        raise too_large("500 KB")
    return gunzip(raw) if encoding == "gzip" else raw


async def read_body(request: IngestRequest) -> bytes:
    """The decompressed body, refused past the limits before it is all in memory."""
    at_hand = body_at_hand(request)
    if at_hand is not None:
        return at_hand
    encoding, wire_limit = _limits(request)
    try:
        async with asyncio.timeout_at(request.get(BODY_DEADLINE)):
            raw = await _read(request, wire_limit)
    except TimeoutError:
        raise IngressError(408, "body_timeout", "the request body did not arrive in time; send it again") from None
    except (OSError, web.RequestPayloadError) as exc:
        raise _incomplete(exc) from None
    return gunzip(raw) if encoding == "gzip" else raw


def _limits(request: IngestRequest) -> tuple[str, int]:
    """The body's encoding and the most bytes it may take on the wire; refuses an encoding splitter
    does not inflate, and a declared length past that or not a number."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", ""):
        raise IngressError(415, "unsupported_encoding", f"Content-Encoding {encoding!r} is not supported (use gzip or none)")
    wire_limit = MAX_WIRE_BYTES if encoding == "gzip" else MAX_REQUEST_BYTES
    try:
        declared = request.content_length
    except ValueError:  # digits, but more of them than int() takes
        raise IngressError(400, "invalid_request", "Content-Length is not a valid length") from None
    if declared is not None and declared > wire_limit:
        raise too_large("500 KB")
    return encoding, wire_limit


def _incomplete(exc: Exception) -> IngressError:
    return IngressError(400, "incomplete_body", f"the request body ended before it was complete: {exc}")


async def _read(request: IngestRequest, wire_limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > wire_limit:
            raise too_large("500 KB")
        chunks.append(chunk)
    return b"".join(chunks)


def gunzip(raw: bytes) -> bytes:
    inflater = zlib.decompressobj(_GZIP_WBITS)
    try:
        data = inflater.decompress(raw, MAX_REQUEST_BYTES + 1)
    except zlib.error as exc:
        raise IngressError(400, "invalid_gzip", f"body is not valid gzip: {exc}") from None
    if len(data) > MAX_REQUEST_BYTES or inflater.unconsumed_tail:
        raise too_large("500 KB")
    if not inflater.eof:
        raise IngressError(400, "invalid_gzip", "body is not valid gzip: the stream is truncated")
    return data


def parse_json(data: bytes) -> Any:
    if not data.strip():
        raise IngressError(400, "invalid_request", "empty body: expected a JSON object")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if "surrogate" not in str(exc):
            raise IngressError(400, "invalid_request", f"malformed JSON: {exc}") from None
        try:
            return _without_lone_surrogates(json.loads(data, parse_constant=_refuse_constant))
        except (ValueError, RecursionError) as again:  # what orjson would refuse besides the surrogate
            raise IngressError(400, "invalid_request", f"malformed JSON: {again}") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # the standard library accepts NaN and Infinity; orjson (and JSON) do not


def _without_lone_surrogates(value: Any) -> Any:
    """Every string, keys included, with lone surrogates replaced by U+FFFD (the slow path only)."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_without_lone_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_without_lone_surrogates(key): _without_lone_surrogates(item) for key, item in value.items()}
    return value
