"""CDN pass-through: splitter as a team's single custom domain for analytics.js.

`GET /v1/projects/{writeKey}/settings`, `/analytics.js/v1/...`, `/next-integrations/...` and
`/analytics-next/bundles/...` are forwarded to the configured CDN (default cdn.segment.com), as
segmentio/segment-proxy does. 200 answers are kept in a small in-memory cache. In the settings,
`integrations["Segment.io"].apiHost` (and `metrics.host`) are rewritten to splitter's public
address, so the browser sends its tracking calls (and telemetry) through splitter.

An answer is read into memory (to cache it and rewrite the settings), so at most
`MAX_ANSWER_BYTES` of it: real settings and bundles are a few hundred KB, and a CDN (or whatever
`--cdn-url` points at) answering more gets a 502 instead of growing the process by the size of
its answer. The settings URL carries a write key in its path, as does `/analytics.js/v1/KEY/...`;
wherever such a URL is logged the key is masked, in aiohttp's error text too.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
import orjson
from aiohttp import web

from proxy.delivery.upstream import public_url as shown_url
from proxy.delivery.upstream import read_bounded
from proxy.engine import mask
from proxy.ingress import responses
from proxy.log import get_logger

log = get_logger("splitter.cdn")

DEFAULT_CDN_URL = "https://cdn.segment.com"
SETTINGS_ROUTE = "/v1/projects/{write_key}/settings"
# Dynamic routes: the metrics label is the template, never the raw path.
TAIL_ROUTES = ("/analytics.js/v1/{tail:.*}", "/next-integrations/{tail:.*}", "/analytics-next/bundles/{tail:.*}")
PASSED_HEADERS = ("Content-Type", "Cache-Control", "ETag")
MAX_ENTRIES = 256
MAX_BYTES = 20 * 1024 * 1024
MAX_ANSWER_BYTES = 8 * 1024 * 1024  # of one CDN answer; analytics.js and its settings are well under 1 MB
KEY_PREFIXES = ("/v1/projects/", "/analytics.js/v1/")  # paths whose next segment is a write key


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...]
    expires: float


class CdnCache:
    """Path+query -> a 200 answer until it expires; bounded by entry count and total bytes (oldest out first)."""

    def __init__(self, ttl: float, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, CachedAnswer] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CachedAnswer | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= time.monotonic():
            self._drop(key)
            return None
        return entry

    def put(self, key: str, status: int, body: bytes, headers: tuple[tuple[str, str], ...]) -> None:
        if self.ttl <= 0 or status != 200 or len(body) > self.max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = CachedAnswer(status, body, headers, time.monotonic() + self.ttl)
        self._bytes += len(body)
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._bytes -= len(entry.body)


def _public_address(public_url: str | None) -> tuple[str, str] | None:
    """`https://analytics.example.com` -> (`analytics.example.com`, `https`)."""
    if not public_url:
        return None
    parts = urlsplit(public_url)
    return parts.netloc + parts.path.rstrip("/"), parts.scheme


def write_key_in(path: str) -> str | None:
    """The write key a CDN path carries (`/v1/projects/KEY/settings`, `/analytics.js/v1/KEY/...`), if any."""
    for prefix in KEY_PREFIXES:
        if path.startswith(prefix):
            return path[len(prefix):].split("/", 1)[0] or None
    return None


def masked(text: str, key: str | None) -> str:
    """`text` with `key` (as sent, and percent-decoded) shown only in its masked form."""
    if not key:
        return text
    for form in {key, unquote(key)}:
        if form:
            text = text.replace(form, mask(form))
    return text


def rewrite_settings(body: bytes, api_host: str, protocol: str) -> bytes:
    """Point analytics.js at splitter: Segment.io apiHost/protocol and metrics.host. Unparseable -> as is."""
    try:
        settings: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if not isinstance(settings, dict):
        return body
    integrations = settings.get("integrations")
    if isinstance(integrations, dict):
        segment = integrations.get("Segment.io")
        if isinstance(segment, dict):
            segment["apiHost"] = api_host
            segment["protocol"] = protocol
    metrics = settings.get("metrics")
    if isinstance(metrics, dict) and "host" in metrics:
        metrics["host"] = api_host
    return orjson.dumps(settings)


class CdnProxy:
    def __init__(self, cdn_url: str = DEFAULT_CDN_URL, *, public_url: str | None = None, cache_seconds: float = 300.0,
                 timeout: float = 10.0, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES,
                 max_answer_bytes: int = MAX_ANSWER_BYTES) -> None:
        self.cdn_url = cdn_url.rstrip("/")
        self._shown_cdn = shown_url(self.cdn_url)  # as printed: in logs and in answers to browsers
        self.max_answer_bytes = max_answer_bytes
        self.public = _public_address(public_url)
        self.cache = CdnCache(cache_seconds, max_entries, max_bytes)
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def register(self, app: web.Application) -> None:
        app.router.add_get(SETTINGS_ROUTE, self.settings_handler)
        for route in TAIL_ROUTES:
            app.router.add_get(route, self.passthrough_handler)
        app.on_cleanup.append(self._on_cleanup)

    async def _on_cleanup(self, _app: web.Application) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    async def _fetch(self, request: web.Request) -> CachedAnswer | web.Response:
        key = request.rel_url.raw_path_qs if hasattr(request.rel_url, "raw_path_qs") else str(request.rel_url)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        url = self.cdn_url + key
        write_key = write_key_in(request.rel_url.raw_path)
        shown = masked(self._shown_cdn + request.rel_url.raw_path, write_key)  # no userinfo, no query
        try:
            async with self._client().get(url, allow_redirects=True) as upstream:
                status = upstream.status
                declared = upstream.content_length
                body, complete = b"", False
                if declared is None or declared <= self.max_answer_bytes:
                    body, complete = await read_bounded(upstream, self.max_answer_bytes + 1)
                    complete = complete and len(body) <= self.max_answer_bytes
                if not complete:
                    upstream.close()  # drop the connection rather than read the rest
                    log.warning("cdn_answer_too_large", url=shown, status=status, limit=self.max_answer_bytes, content_length=declared)
                    return responses.error(502, "cdn_answer_too_large",
                                           f"the CDN ({self._shown_cdn}) answered with more than {self.max_answer_bytes} bytes")
                headers = tuple((name, upstream.headers[name]) for name in PASSED_HEADERS if name in upstream.headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("cdn_unavailable", url=shown, error=masked(str(exc) or type(exc).__name__, write_key))
            return responses.error(502, "cdn_unavailable", f"the CDN ({self._shown_cdn}) could not be reached; retry shortly")
        self.cache.put(key, status, body, headers)
        return CachedAnswer(status, body, headers, 0.0)

    @staticmethod
    def _respond(answer: CachedAnswer, body: bytes | None = None) -> web.Response:
        response = web.Response(status=answer.status, body=answer.body if body is None else body)
        for name, value in answer.headers:
            response.headers[name] = value
        return response

    async def passthrough_handler(self, request: web.Request) -> web.Response:
        answer = await self._fetch(request)
        if isinstance(answer, web.Response):
            return answer
        return self._respond(answer)

    async def settings_handler(self, request: web.Request) -> web.Response:
        answer = await self._fetch(request)
        if isinstance(answer, web.Response):
            return answer
        if answer.status != 200:
            return self._respond(answer)
        host, scheme = self.public or (request.host, request.scheme)
        rewritten = rewrite_settings(answer.body, f"{host}/v1", scheme)
        response = self._respond(answer, rewritten)
        if rewritten is not answer.body:
            response.headers.pop("ETag", None)  # the body differs from the CDN's
        return response
