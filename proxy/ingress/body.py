"""Request bodies to parsed JSON, within Segment's limits and without trusting Content-Length.

Limits apply after decompression (500 KB per request, as Segment's API), and gzip is inflated
incrementally with a cap, so a small gzip bomb is refused after reading at most the cap plus one
byte instead of being expanded in memory. `text/plain` bodies are JSON too: analytics.js sends
them that way to avoid a CORS preflight.
"""

from __future__ import annotations

import zlib
from typing import Any

import orjson
from aiohttp import web

from proxy.ingress.responses import IngressError

MAX_REQUEST_BYTES = 500 * 1024
MAX_EVENT_BYTES = 32 * 1024
MAX_BATCH_EVENTS = 2500
MAX_WIRE_BYTES = MAX_REQUEST_BYTES + 64 * 1024  # compressed bodies of incompressible data grow a little
_GZIP_WBITS = 16 + zlib.MAX_WBITS


def too_large(limit: str) -> IngressError:
    return IngressError(413, "request_too_large", f"request body exceeds {limit} (Segment's limit, after decompression)")


async def read_body(request: web.Request) -> bytes:
    """The decompressed body, refused past the limits before it is all in memory."""
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
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > wire_limit:
            raise too_large("500 KB")
        chunks.append(chunk)
    raw = b"".join(chunks)
    return gunzip(raw) if encoding == "gzip" else raw


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
        raise IngressError(400, "invalid_request", f"malformed JSON: {exc}") from None
