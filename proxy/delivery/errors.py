"""What can go wrong sending upstream, as one small tree, translated from aiohttp in one place.

    UpstreamError
    ├── UpstreamUnavailable    connection refused/reset, DNS, TLS: retry later
    │   └── UpstreamTimeout    no answer within the destination's timeout
    └── UpstreamRejected       an HTTP answer that is not 2xx: status and body kept
"""

from __future__ import annotations


class UpstreamError(Exception):
    def __init__(self, destination: str, detail: str) -> None:
        super().__init__(f"{destination}: {detail}")
        self.destination = destination
        self.detail = detail

    @property
    def retryable(self) -> bool:
        return True

    @property
    def metric_code(self) -> str:
        return "error"


class UpstreamUnavailable(UpstreamError):
    pass


class UpstreamTimeout(UpstreamUnavailable):
    @property
    def metric_code(self) -> str:
        return "timeout"


class UpstreamRejected(UpstreamError):
    def __init__(self, destination: str, status: int, body: bytes, retry_after: float | None = None) -> None:
        text = body.decode("utf-8", "replace").strip()[:500]
        super().__init__(destination, f"answered {status}: {text}" if text else f"answered {status}")
        self.status = status
        self.body = body
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.status >= 500 or self.status in (408, 429)

    @property
    def metric_code(self) -> str:
        return str(self.status)
