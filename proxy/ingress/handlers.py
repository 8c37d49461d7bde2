"""The ingest handler: authenticate, read, prepare, deliver, answer. Thin on purpose.

One rules snapshot is read at the start and used to the end, so a reload mid-request cannot mix
two rule sets. The synchronous `_prepare_request` holds every parsed object; the handler itself
keeps only bytes across its awaits. Direct calls and the webhook intake meet in `deliver()`, whose
one door into delivery is `Delivery.accept(submission)` (de-duplication included).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from proxy.control.state import ActiveRules
from proxy.control.traffic import RecentTraffic
from proxy.delivery import Delivery
from proxy.engine import EventContext, RuleSet
from proxy.geoip import GeoIP
from proxy.ingress import responses
from proxy.ingress.auth import authenticate, request_key
from proxy.ingress.body import body_at_hand, parse_json, read_body
from proxy.ingress.client_ip import client_address
from proxy.ingress.implementation import CHOSEN
from proxy.ingress.plan_checks import PlanChecks
from proxy.ingress.prepare import CallShape, Prepared, single_call_error
from proxy.ingress.request import IngestRequest
from proxy.ingress.responses import Answer, IngressError
from proxy.log import get_logger
from proxy.metrics import Metrics
from proxy.observe.catalog import Catalog
from proxy.observe.recording import Pick, Recorder
from proxy.settings import IPNetwork

log = get_logger("splitter.ingress")
# The source a request authenticated as, for the error log. A plain str key warns on aiohttp >= 3.14.
SOURCE_KEY: Any = web.RequestKey("source", str) if hasattr(web, "RequestKey") else "source"


@dataclass(frozen=True, slots=True)
class IngressDeps:
    active: ActiveRules
    delivery: Delivery
    metrics: Metrics
    region: str | None
    trusted_proxies: tuple[IPNetwork, ...]
    catalog: Catalog | None = None  # the event catalog: samples chosen in prepare(), counts recorded once delivery accepted them
    plan_checks: PlanChecks = field(default_factory=PlanChecks)  # used only for sources with a tracking plan
    traffic: RecentTraffic | None = None  # recent events' routing inputs, replayed at a reload (proxy/control/traffic.py)
    geoip: GeoIP | None = None  # `serve --geoip-db`: the country of the client's address when no CDN header names one
    recorder: Recorder | None = None  # recorded traffic, while the rules' `record:` says so (proxy/observe/recording.py)


def _prepare_request(rules: RuleSet, data: bytes, presented: str | None, shape: CallShape, region: str | None, country: str | None,
                     client_ip: str | None, forwarded_for: str | None = None, traffic: RecentTraffic | None = None,
                     catalog: Catalog | None = None, pick: Pick | None = None) -> Prepared:
    body: Any = parse_json(data)
    source, key = authenticate(rules, presented, body)
    ctx = EventContext(source.name, region, country)
    prepared = CHOSEN.prepare(rules, body, shape, source, ctx, client_ip, presented_key=key, forwarded_for=forwarded_for, catalog=catalog)
    if traffic is not None and traffic.due():  # the events as routed: envelope merged, type implied
        traffic.record(rules, body.get("batch", ()) if shape.is_batch else (body,), ctx)
    if pick is not None:  # the events as routed, and their context, kept for the recorder until delivery accepts them
        pick.choose(body.get("batch", ()) if shape.is_batch else (body,), ctx, {r.index for r in prepared.rejected})
    return prepared


def ingest_handler(deps: IngressDeps, shape: CallShape):  # type: ignore[no-untyped-def]
    async def handle(request: IngestRequest) -> Answer:
        rules = deps.active.current
        presented = request_key(request)  # Authorization header, else ?writeKey= (the body's is read later)
        if presented is not None and rules.source_for_key(presented) is None:
            raise IngressError(401, "invalid_write_key", "unknown write key")  # before reading the body
        turn = deps.delivery.turn()  # while a sender is behind for lack of CPU, one request per pass (proxy/delivery/pacing.py)
        if turn is not None:
            await turn
        data = body_at_hand(request)
        if data is None:
            data = await read_body(request)
        client_ip, forwarded_for = client_address(request.remote, request.headers.get("X-Forwarded-For"), deps.trusted_proxies)
        country = rules.country_from_headers(request.headers)  # a CDN's header, then GeoIP; the event's own location is the engine's fallback
        if country is None and deps.geoip is not None:
            country = deps.geoip.country(client_ip)
        pick = Pick(rules.recording) if rules.recording is not None and deps.recorder is not None else None
        prepared = _prepare_request(rules, data, presented, shape, deps.region, country, client_ip, forwarded_for, deps.traffic,
                                    deps.catalog, pick)
        request[SOURCE_KEY] = prepared.submission.source.name
        response = await deliver(deps, rules, prepared, shape)
        if pick is not None and deps.recorder is not None:  # accepted (a 4xx or 503 raised above: the client's retry is recorded)
            deps.recorder.offer(pick)
        return response

    return handle


async def deliver(deps: IngressDeps, rules: RuleSet, prepared: Prepared, shape: CallShape) -> Answer:
    """Count rejections, hand the submission to delivery (which drops duplicates when de-duplication is on), answer."""
    metrics, submission = deps.metrics, prepared.submission
    source, key, rejected = submission.source, submission.presented_key, submission.rejected
    for rejection in rejected:
        metrics.child(metrics.events_rejected, source.name, rejection.code).inc()
    if prepared.violations:
        deps.plan_checks.record(source.name, prepared.violations, "block")
    if not shape.is_batch and rejected:
        raise single_call_error(rejected[0])
    outcome = await deps.delivery.accept(submission)
    if not outcome.ok:
        headers = {"Retry-After": str(max(1, round(outcome.retry_after)))} if outcome.retry_after else None
        log.warning("events_not_accepted", status=outcome.status, code=outcome.code, source=source.name, write_key=key, error=outcome.message)
        raise IngressError(outcome.status, outcome.code, outcome.message, headers)
    if prepared.observed:
        deps.plan_checks.submit(rules, source.name, prepared.observed)
    for labels, count in prepared.routed_labels(source.name):
        metrics.count(metrics.child(metrics.events, *labels), count)
    if deps.catalog is not None:
        deps.catalog.record(rules.catalog, source.name, prepared.routed, prepared.sampled)
    if rejected:
        log.info("events_rejected", source=source.name, write_key=key, count=len(rejected), codes=sorted({r.code for r in rejected}))
        return responses.accepted({"rejected": [r.as_json() for r in rejected]})
    return responses.accepted()


def telemetry_handler(deps: IngressDeps):  # type: ignore[no-untyped-def]
    async def handle(request: web.Request) -> web.Response:
        data = await read_body(request)
        deps.delivery.forward_telemetry(deps.active.current, data, request.headers.get("Content-Type", "text/plain"))
        return responses.success()

    return handle


def discard_handler() -> Callable[[web.Request], Awaitable[web.Response]]:
    """RudderStack's browser SDK's `/rsaMetrics` (its error reports, when the source config turns them
    on): read within the limits, answered 200, and dropped. It names the client's write key in its
    body, and RudderStack's data plane has no such route to forward it to."""
    async def handle(request: web.Request) -> web.Response:
        await read_body(request)
        return responses.success()

    return handle
