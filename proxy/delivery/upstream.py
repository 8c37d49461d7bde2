"""One keep-alive HTTP client per destination; `send()` is the only network call in delivery.

An upstream's answer is evidence, not data: splitter needs its status and, for an error, enough of
its body to explain it. So at most `MAX_ANSWER_BYTES` of it are read; a longer answer is cut off by
closing the connection (draining gigabytes to reuse one keep-alive connection is not worth it).
Redirects are never followed: a client following a 301/302 re-sends a POST as a body-less GET, so
the target's 200 would count events as delivered that nobody received. A 3xx is an
`UpstreamRedirected` failure instead, carrying where it pointed (without credentials).
"""

from __future__ import annotations

import base64
import time

import aiohttp
from yarl import URL

from proxy.delivery.errors import (
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.engine import MASK, Destination
from proxy.metrics import Metrics

USER_AGENT = "splitter/0.1"
MAX_ANSWER_BYTES = 64 * 1024  # of an upstream's answer: enough for any error message
MAX_SHOWN_URL = 300  # characters of a Location kept for logs and dead letters


def basic_auth(write_key: str) -> str:
    return "Basic " + base64.b64encode(f"{write_key}:".encode()).decode()


def public_url(url: str | URL) -> str:
    """`url` without `user:pass@`, query or fragment: where credentials ride along in a URL.
    Unparseable text is not shown at all (it could be anything, a key included)."""
    try:
        parsed = url if isinstance(url, URL) else URL(url)
        shown = str(parsed.with_user(None).with_password(None).with_query(None).with_fragment(None))
    except (ValueError, TypeError):
        return "(unparseable)"
    return shown if len(shown) <= MAX_SHOWN_URL else shown[:MAX_SHOWN_URL] + "…"


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: rare from these upstreams; fall back to backoff


def _location(response: aiohttp.ClientResponse) -> str:
    """The redirect's target, resolved against the request URL, credentials removed."""
    raw = response.headers.get("Location")
    if not raw:
        return "(no Location header)"
    try:
        return public_url(response.url.join(URL(raw)))
    except (ValueError, TypeError):
        return "(unparseable)"


async def read_bounded(response: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """At most `limit` bytes of the answer, and whether that was all of it. Never buffers more:
    aiohttp's stream pauses the socket while its small buffer is full."""
    parts: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await response.content.read(limit - size)
        if not chunk:
            return b"".join(parts), True
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts), response.content.at_eof()


class UpstreamRedirected(UpstreamRejected):
    """A 3xx: the configured URL is not where the upstream takes events (http:// behind a balancer
    that sends it to https://, a moved host). Retried within a budget, as the redirect may be a
    passing maintenance page; then dead-lettered with reason `redirected`."""

    def __init__(self, destination: str, status: int, location: str) -> None:
        super().__init__(destination, status, b"")
        self.location = location
        self.detail = f"answered {status} redirect to {location} (not followed)"
        self.args = (f"{destination}: {self.detail}",)

    @property
    def retryable(self) -> bool:
        return True


class Upstream:
    def __init__(self, destination: Destination, metrics: Metrics, *, pool_size: int = 100) -> None:
        self.destination = destination
        self.metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self._pool_size = pool_size
        self._duration = metrics.child(metrics.upstream_duration, destination.name)

    @property
    def public_url(self) -> str:
        """The destination's URL as it may be printed."""
        return public_url(self.destination.url)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._pool_size, keepalive_timeout=30, ttl_dns_cache=60)
            self._session = aiohttp.ClientSession(
                connector=connector,
                # total: connecting, waiting in the pool, sending and reading the answer; a hang ends here
                timeout=aiohttp.ClientTimeout(total=self.destination.timeout),
                headers={"User-Agent": USER_AGENT},
                skip_auto_headers=("Accept-Encoding",),
            )
        return self._session

    async def send(self, body: bytes, write_key: str | None, forwarded_for: str | None = None, path: str = "/v1/batch",
                   content_type: str = "application/json") -> None:
        """POST `body`; returns on a 2xx whose answer arrived intact, raises an `UpstreamError` otherwise.

        A 2xx cut short (the connection closed before the announced length, broken chunking) is an
        `UpstreamUnavailable`: it is retried, since a duplicate (dropped downstream by messageId) is
        harmless and a loss is not. A 2xx longer than `MAX_ANSWER_BYTES` is a success: the status is
        the upstream's verdict, the body is not needed.
        """
        name = self.destination.name
        headers = {"Content-Type": content_type}
        if write_key:
            headers["Authorization"] = basic_auth(write_key)
        if forwarded_for:
            headers["X-Forwarded-For"] = forwarded_for
        started = time.perf_counter()
        try:
            async with self._client().post(self.destination.url + path, data=body, headers=headers, allow_redirects=False) as response:
                status = response.status
                retry_after = _retry_after(response.headers.get("Retry-After"))
                location = _location(response) if 300 <= status < 400 else ""
                answer, complete = await read_bounded(response, MAX_ANSWER_BYTES)
                if not complete:
                    response.close()  # drop the connection rather than read the rest
        except TimeoutError:
            self._count("timeout", started)
            raise UpstreamTimeout(name, f"no answer within {self.destination.timeout:g}s") from None
        except aiohttp.ClientError as exc:
            self._count("error", started)
            raise UpstreamUnavailable(name, self._scrub(f"{type(exc).__name__}: {exc}")) from None
        self._count(str(status), started)
        if 300 <= status < 400:
            raise UpstreamRedirected(name, status, location)
        if not 200 <= status < 300:
            raise UpstreamRejected(name, status, answer, retry_after)

    def _scrub(self, text: str) -> str:
        """aiohttp's messages may quote the URL; the destination's userinfo and query must not reach a log."""
        try:
            url = URL(self.destination.url)
        except (ValueError, TypeError):
            return text
        for secret in (url.raw_password, url.password, url.raw_query_string, url.query_string):
            if secret:
                text = text.replace(secret, MASK)
        return text

    def _count(self, code: str, started: float) -> None:
        self._duration.observe(time.perf_counter() - started)
        self.metrics.child(self.metrics.upstream_requests, self.destination.name, code).inc()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


__all__ = ["MAX_ANSWER_BYTES", "Upstream", "UpstreamError", "UpstreamRedirected", "basic_auth", "public_url"]
