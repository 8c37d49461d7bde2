"""The ingress application: Segment's routes (and RudderStack's beacon and telemetry), CORS for browsers, JSON errors, request metrics."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web
from aiohttp.typedefs import Middleware

from proxy.ingress import responses
from proxy.ingress.auth import request_key
from proxy.ingress.cdn import DEFAULT_CDN_URL, CdnProxy
from proxy.ingress.handlers import (
    SOURCE_KEY,
    IngressDeps,
    discard_handler,
    ingest_handler,
    telemetry_handler,
)
from proxy.ingress.prepare import CallShape
from proxy.ingress.request import IngestRequest
from proxy.ingress.responses import Answer, IngressError
from proxy.ingress.webhook import WEBHOOK_ROUTE, webhook_handler
from proxy.log import get_logger
from proxy.metrics import Metrics

log = get_logger("splitter.ingress")
R = TypeVar("R", bound=IngestRequest)  # a web.Request through the application, a LightRequest from the connection
Handler = Callable[[R], Awaitable[web.StreamResponse | Answer]]
AppHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SINGLE_PATHS = {"track": "track", "identify": "identify", "page": "page", "screen": "screen", "group": "group", "alias": "alias"}
SHORT_PATHS = {"t": "track", "i": "identify", "p": "page", "s": "screen", "g": "group", "a": "alias"}
BATCH_PATHS = {"batch": False, "import": True, "b": True}  # path -> events come from a client app
BEACON_PATH = "/beacon/v1/batch"  # RudderStack's analytics-js with useBeacon: text/plain, the key as ?writeKey=
RUDDERSTACK_TELEMETRY_PATH = "/rsaMetrics"  # RudderStack's analytics-js error reports: answered, dropped
CORS_ALLOW_HEADERS = "Authorization, Content-Type, X-Retry-Count"


def routes() -> dict[str, CallShape]:
    table = {f"/v1/{path}": CallShape(False, kind) for path, kind in SINGLE_PATHS.items()}
    table.update({f"/v1/{path}": CallShape(False, kind, from_client=True) for path, kind in SHORT_PATHS.items()})
    table.update({f"/v1/{path}": CallShape(True, from_client=client) for path, client in BATCH_PATHS.items()})
    table[BEACON_PATH] = CallShape(True, from_client=True)
    return table


_INGEST_PATHS = frozenset([*routes(), "/v1/m", RUDDERSTACK_TELEMETRY_PATH])


def _route_label(request: web.Request) -> str:
    """The route template: bounded. A CORS preflight to an ingest path counts under that path."""
    resource = request.match_info.route.resource
    if resource is not None:
        return resource.canonical
    if request.method == "OPTIONS" and request.path in _INGEST_PATHS:
        return request.path
    return "unmatched"


class Observer:
    """What every ingress request goes through: the in-flight limit, request metrics, JSON errors and CORS.

    A POST is admitted (counted in flight) when its headers have arrived, before its body is read:
    past `max_in_flight` it gets 429 at once, which bounds the bodies being read at a time. Requests
    whose body is still arriving when they are admitted may hold at most half of the slots
    (`max_arriving`): slow senders (or an attacker sending a byte a second) then cannot shut out the
    requests that came whole, and each of them holds its slot for at most the body timeout.
    """

    def __init__(self, metrics: Metrics, cors_origins: tuple[str, ...], max_in_flight: int) -> None:
        self.metrics = metrics
        self.cors_origins = cors_origins
        self.max_in_flight = max_in_flight
        self.max_arriving = max(1, max_in_flight // 2)
        self.in_flight = 0
        self.arriving = 0  # admitted while their body was still arriving, until answered
        metrics.requests_in_flight.set_function(lambda: self.in_flight)

    def admit(self, arriving: bool = False) -> bool:
        if self.in_flight >= self.max_in_flight or (arriving and self.arriving >= self.max_arriving):
            return False
        self.in_flight += 1
        self.arriving += arriving
        return True

    def release(self, arriving: bool = False) -> None:
        """An admitted request is done: answered, or never to be (its client went away mid-body)."""
        self.in_flight -= 1
        self.arriving -= arriving

    async def observe(self, request: R, handler: Handler[R], path: str) -> web.StreamResponse | Answer:
        """Admit, answer, release, count, add CORS headers: the application's middleware, and what the
        listener calls directly for an ingest POST (with its path: no route was resolved). An ingest
        handler's `Answer` is returned as it is: the middleware and the connection make it a
        `web.Response` where aiohttp writes the answer."""
        started = time.perf_counter()
        arriving = False
        if request.method == "POST":
            arriving = not request.content.is_eof()
            if not self.admit(arriving):
                response: web.StreamResponse | Answer = responses.error(429, "too_many_requests", "splitter is at capacity; retry shortly",
                                                                        {"Retry-After": "1"})
                return self.finish(request, response, path, started)
        else:
            self.in_flight += 1
        try:
            response = await _answer(request, handler)
        finally:
            self.release(arriving)
        return self.finish(request, response, path, started)

    def finish(self, request: IngestRequest, response: web.StreamResponse | Answer, path: str, started: float) -> web.StreamResponse | Answer:
        metrics = self.metrics
        metrics.count(metrics.child(metrics.requests, path, str(response.status)))
        metrics.observe(metrics.child(metrics.request_duration, path), time.perf_counter() - started)
        _cors(request, response.headers, self.cors_origins)
        return response


def observing(observer: Observer) -> Middleware:
    """The observer as the application's middleware (it runs once a request's headers are parsed)."""

    @web.middleware
    async def observe(request: web.Request, handler: AppHandler) -> web.StreamResponse:
        response = await observer.observe(request, handler, _route_label(request))
        return response.as_response() if isinstance(response, Answer) else response

    return observe


@dataclass(frozen=True, slots=True)
class FastIngress:
    """The ingest handlers by exact path and the observer: the listener hands an ingest POST straight
    to them, past aiohttp's router and middleware chain (the same observer, handlers and answers)."""

    routes: Mapping[str, Handler[IngestRequest]]
    observer: Observer


FAST_INGRESS: web.AppKey[FastIngress] = web.AppKey("fast_ingress", FastIngress)


def build_ingress_app(deps: IngressDeps, *, cors_origins: tuple[str, ...] = ("*",), max_in_flight: int = 2000,
                      cdn_url: str = DEFAULT_CDN_URL, public_url: str | None = None, cdn_cache_seconds: float = 300.0) -> web.Application:
    """The aiohttp application (served by listener.py); under FAST_INGRESS, its ingest handlers and observer."""
    observer = Observer(deps.metrics, cors_origins, max_in_flight)
    observe = observing(observer)
    # auto_decompress off (listener.py sets it too): body.py inflates gzip itself, with a cap; aiohttp's own
    # inflation would hand it already-inflated bytes (every gzip body then fails as invalid_gzip) with no cap.
    app = web.Application(middlewares=[observe], client_max_size=1024**2, handler_args={"auto_decompress": False})
    ingest = {path: ingest_handler(deps, shape) for path, shape in routes().items()}
    for path, handler in ingest.items():
        app.router.add_post(path, handler)
    app[FAST_INGRESS] = FastIngress(ingest, observer)
    app.router.add_post("/v1/m", telemetry_handler(deps))
    app.router.add_post(RUDDERSTACK_TELEMETRY_PATH, discard_handler())
    app.router.add_post(WEBHOOK_ROUTE, webhook_handler(deps))  # Segment's Webhooks destination; labelled by the template
    CdnProxy(cdn_url, public_url=public_url, cache_seconds=cdn_cache_seconds).register(app)  # GET: settings, analytics.js
    deps.plan_checks.register(app, metrics=deps.metrics)  # the background tracking-plan checker runs as long as the app
    if deps.recorder is not None:  # so does the recording writer, which reads `record:` from the active rules
        deps.recorder.register(app, deps.metrics, lambda: deps.active.current.recording)
    return app


async def _answer(request: R, handler: Handler[R]) -> web.StreamResponse | Answer:
    if request.method == "OPTIONS":
        return web.Response(status=204)  # CORS preflight; headers added by the caller
    try:
        return await handler(request)
    except IngressError as exc:
        if exc.status != 429 and exc.status < 500:
            log.info("request_rejected", path=request.path, code=exc.code, status=exc.status, source=request.get(SOURCE_KEY),
                     write_key=_presented_key(request))
        return responses.from_exception(exc)
    except web.HTTPException as exc:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status, "http_error")
        return responses.error(exc.status, code, exc.reason)
    except Exception:
        log.exception("request_failed", path=request.path)
        return responses.error(500, "internal_error", "splitter failed to handle the request; it is safe to retry")


def _presented_key(request: IngestRequest) -> str | None:
    """For the log (masked there, under `write_key`)."""
    try:
        return request_key(request)
    except IngressError:
        return None


def _cors(request: IngestRequest, headers: MutableMapping[str, str], allowed: tuple[str, ...]) -> None:
    """CORS's headers into an answer's `headers`, for a browser's call (it sends Origin)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return
    if "*" in allowed:
        headers["Access-Control-Allow-Origin"] = "*"
    elif origin in allowed:
        headers["Access-Control-Allow-Origin"] = origin
        headers["Vary"] = "Origin"
    else:
        return
    if request.method == "OPTIONS":
        headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        requested = request.headers.get("Access-Control-Request-Headers", "")
        # Echo what the browser asks for too: analytics.js lets sites add headers (deliveryStrategy.config.headers).
        names = {h.lower(): h for h in (h.strip() for h in requested.split(",")) if h}
        names.update({h.lower(): h for h in CORS_ALLOW_HEADERS.split(", ")})
        headers["Access-Control-Allow-Headers"] = ", ".join(names.values())
        headers["Access-Control-Max-Age"] = "86400"
