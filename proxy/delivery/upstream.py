"""One keep-alive HTTP client per destination; `send()` is the only network call in delivery."""

from __future__ import annotations

import asyncio
import base64
import time

import aiohttp

from proxy.delivery.errors import UpstreamError, UpstreamRejected, UpstreamTimeout, UpstreamUnavailable
from proxy.engine import Destination
from proxy.metrics import Metrics

USER_AGENT = "splitter/0.1"


def basic_auth(write_key: str) -> str:
    return "Basic " + base64.b64encode(f"{write_key}:".encode()).decode()


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: rare from these upstreams; fall back to backoff


class Upstream:
    def __init__(self, destination: Destination, metrics: Metrics, *, pool_size: int = 100) -> None:
        self.destination = destination
        self.metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self._pool_size = pool_size
        self._duration = metrics.child(metrics.upstream_duration, destination.name)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._pool_size, keepalive_timeout=30, ttl_dns_cache=60)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.destination.timeout),
                headers={"User-Agent": USER_AGENT},
                skip_auto_headers=("Accept-Encoding",),
            )
        return self._session

    async def send(self, body: bytes, write_key: str | None, forwarded_for: str | None = None, path: str = "/v1/batch",
                   content_type: str = "application/json") -> None:
        """POST `body`; returns on any 2xx, raises an `UpstreamError` otherwise."""
        name = self.destination.name
        headers = {"Content-Type": content_type}
        if write_key:
            headers["Authorization"] = basic_auth(write_key)
        if forwarded_for:
            headers["X-Forwarded-For"] = forwarded_for
        started = time.perf_counter()
        try:
            async with self._client().post(self.destination.url + path, data=body, headers=headers) as response:
                answer = await response.read()
                status = response.status
                retry_after = _retry_after(response.headers.get("Retry-After"))
        except asyncio.TimeoutError:
            self._count("timeout", started)
            raise UpstreamTimeout(name, f"no answer within {self.destination.timeout:g}s") from None
        except aiohttp.ClientError as exc:
            self._count("error", started)
            raise UpstreamUnavailable(name, f"{type(exc).__name__}: {exc}") from None
        self._count(str(status), started)
        if not 200 <= status < 300:
            raise UpstreamRejected(name, status, answer, retry_after)

    def _count(self, code: str, started: float) -> None:
        self._duration.observe(time.perf_counter() - started)
        self.metrics.child(self.metrics.upstream_requests, self.destination.name, code).inc()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


__all__ = ["Upstream", "UpstreamError", "basic_auth"]
