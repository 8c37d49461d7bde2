"""What the ingest handlers read of a request, and the light request the connection makes for them.

An ingest POST (connection.py) is handed to its handler as a `LightRequest`: the head llhttp parsed,
the body's `StreamReader`, the peer's address and a small state dictionary, built in a few
microseconds. aiohttp's `web.Request` resolves its URL, its host and its match info for every
request, which the ingest handlers never read; in `splitter serve` that was about a tenth of a
single call's CPU. Every other request (and an ingest path spelt another way, with `Expect`, or
through the application) is a `web.Request`; both satisfy `IngestRequest`, so the handlers, the
observer and the body reader take either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, overload

from aiohttp import StreamReader
from multidict import CIMultiDictProxy
from yarl import URL


class IngestRequest(Protocol):
    """The part of aiohttp's `web.Request` that the ingest handlers, the observer and the body reader use."""

    @property
    def method(self) -> str: ...

    @property
    def path(self) -> str: ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def remote(self) -> str | None: ...

    @property
    def content(self) -> StreamReader: ...

    @property
    def content_length(self) -> int | None: ...

    @property
    def rel_url(self) -> URL: ...

    @property
    def query(self) -> Mapping[str, str]: ...

    def __getitem__(self, key: Any, /) -> Any: ...

    def __setitem__(self, key: Any, value: Any, /) -> None: ...

    @overload
    def get(self, key: Any, /) -> Any: ...

    @overload
    def get(self, key: Any, default: Any, /) -> Any: ...


class LightRequest:
    """An ingest POST as llhttp parsed it: `path` is the target's path exactly as sent (the connection
    takes this path only when it is one of the ingest routes, so nothing needs decoding)."""

    __slots__ = ("_query_string", "_state", "_url", "content", "headers", "method", "path", "remote", "target")

    def __init__(self, method: str, target: str, path: str, query_string: str, headers: CIMultiDictProxy[str], content: StreamReader,
                 remote: str | None) -> None:
        self.method = method
        self.target = target
        self.path = path
        self._query_string = query_string
        self.headers = headers
        self.content = content
        self.remote = remote
        self._state: dict[Any, Any] = {}
        self._url: URL | None = None

    @property
    def content_length(self) -> int | None:
        """As aiohttp reads it: None without the header; ValueError for digits int() will not take."""
        value = self.headers.get("Content-Length")
        return int(value) if value is not None else None

    @property
    def rel_url(self) -> URL:
        if self._url is None:
            self._url = URL(self.target, encoded=True)
        return self._url

    @property
    def query(self) -> Mapping[str, str]:
        return self.rel_url.query if self._query_string else {}

    def __getitem__(self, key: Any, /) -> Any:
        return self._state[key]

    def __setitem__(self, key: Any, value: Any, /) -> None:
        self._state[key] = value

    def get(self, key: Any, default: Any = None, /) -> Any:
        return self._state.get(key, default)
