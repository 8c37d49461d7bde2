"""JSON answers in the shape every Segment SDK understands.

Success is `200 {"success": true}` (the Python SDKs accept nothing else). Every error carries
`success: false`, a `code` and a `message`: analytics-python reads `code` and `message` from any
non-200 JSON body and, if either is missing, raises KeyError and retries even a permanent 4xx.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

JSON = "application/json"
SUCCESS_BODY = b'{"success":true}'


class IngressError(Exception):
    """A request splitter refuses; rendered as JSON by the error middleware."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


class Answer:
    """An ingest call's JSON answer, as light as a status, a body and a few headers: the connection
    writes it in one piece (connection.py); where aiohttp writes the answer (the application's
    routes, an ingest path spelt with escapes) it becomes a `web.Response` (`as_response`). A `web.Response` resolves its headers into a multidict on
    the way; for the 200 of a single call that was about a fiftieth of the request's CPU."""

    __slots__ = ("body", "headers", "keep_alive", "status")

    def __init__(self, body: bytes = SUCCESS_BODY, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.body = body
        self.status = status
        self.headers: dict[str, str] = {} if headers is None else headers  # beside Content-Type: CORS's, for instance
        self.keep_alive: bool | None = None  # False: the connection closes after this answer

    def force_close(self) -> None:
        self.keep_alive = False

    def as_response(self) -> web.Response:
        response = web.Response(status=self.status, body=self.body, content_type=JSON)
        response.headers.extend(self.headers)  # after Content-Type, as the connection writes them
        if self.keep_alive is False:
            response.force_close()
        return response


def accepted(extra: Mapping[str, Any] | None = None) -> Answer:
    """200: the events were taken (`extra`: what else the client should read, e.g. `rejected`)."""
    return Answer() if not extra else Answer(orjson.dumps({"success": True, **extra}))


def success(extra: Mapping[str, Any] | None = None) -> web.Response:
    if not extra:
        return web.Response(body=SUCCESS_BODY, content_type=JSON)
    return web.Response(body=orjson.dumps({"success": True, **extra}), content_type=JSON)


def error(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    body = orjson.dumps({"success": False, "code": code, "message": message})
    return web.Response(status=status, body=body, content_type=JSON, headers=headers)


def from_exception(exc: IngressError) -> web.Response:
    response = error(exc.status, exc.code, exc.message, exc.headers)
    if exc.status == 408:  # the body is still arriving (slowly, if at all): close rather than read the rest
        response.force_close()
    return response
