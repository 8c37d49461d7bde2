"""Intake for Segment's Webhooks destination: legacy apps' events, forwarded by Segment, routed on.

Segment's Webhooks destination (classic, and Webhooks (Actions) with the default `data` mapping
and batching off) POSTs one Segment event per request as `application/json`, and with a Shared
Secret set signs it: `X-Signature` is the hex HMAC-SHA1 of the body under that secret. The
signature is checked over the body bytes as received, before anything parses them.

A signed event then takes the same path as a direct single call (`prepare()` and `deliver()`,
de-duplication against direct traffic included), as an event of the source named in the URL,
with that source's credentials for every destination (no key was presented).
The IP and geo headers of the request are Segment's servers, not the user's: neither is used.
"""

from __future__ import annotations

import hashlib
import hmac

from aiohttp import web

from proxy.engine import EVENT_TYPES, EventContext, RuleSet, Source
from proxy.ingress import responses
from proxy.ingress.body import parse_json, read_body
from proxy.ingress.handlers import SOURCE_KEY, IngressDeps, deliver
from proxy.ingress.implementation import CHOSEN
from proxy.ingress.prepare import CallShape, Prepared
from proxy.ingress.responses import IngressError
from proxy.log import get_logger
from proxy.observe.catalog import Catalog

log = get_logger("splitter.webhook")
WEBHOOK_ROUTE = "/v1/webhook/segment/{source}"
SIGNATURE_HEADER = "X-Signature"
IGNORED_TYPE = "delete"  # the classic destination's notice of a user deletion request: not an event
_SHAPES = {event_type: CallShape(False, event_type) for event_type in EVENT_TYPES}


def verify_signature(secret: str, body: bytes, signature: str | None) -> None:
    """Constant-time check of `X-Signature` (hex HMAC-SHA1 of `body`); a 401 when missing or wrong."""
    if not signature:
        raise IngressError(401, "missing_signature", f"no {SIGNATURE_HEADER} header: set the Shared Secret in Segment's Webhooks destination")
    expected = hmac.new(secret.encode("utf-8"), body, hashlib.sha1).hexdigest().encode("ascii")
    if not hmac.compare_digest(expected, signature.strip().lower().encode("utf-8", "surrogateescape")):
        hint = " (Webhooks (Actions) signs only the first event of a batch: turn batching off)" if body.lstrip().startswith(b"[") else ""
        raise IngressError(401, "invalid_signature", f"{SIGNATURE_HEADER} does not match the body signed with this source's secret{hint}")


def _event_type(body: object) -> str | None:
    """The event's type; None for a notice to ignore. Anything that is not one Segment event is a 400."""
    if isinstance(body, list):
        raise IngressError(400, "batch_not_supported", "one event per request: turn batching off in Segment's Webhooks (Actions) mapping")
    if not isinstance(body, dict):
        raise IngressError(400, "invalid_request", f"body must be a Segment event (a JSON object), not {type(body).__name__}")
    event_type = body.get("type")
    if event_type == IGNORED_TYPE:
        return None
    if not isinstance(event_type, str) or event_type not in _SHAPES:
        raise IngressError(400, "invalid_event", f"body is not a Segment event: type {event_type!r} is not one of {', '.join(EVENT_TYPES)}")
    return event_type


def _prepare_event(rules: RuleSet, data: bytes, source: Source, region: str | None, catalog: Catalog | None) -> tuple[Prepared, CallShape] | None:
    """Synchronous, so the parsed body is gone before the first await (see prepare.py)."""
    body = parse_json(data)
    event_type = _event_type(body)
    if event_type is None:
        return None
    shape = _SHAPES[event_type]
    return CHOSEN.prepare(rules, body, shape, source, EventContext(source.name, region), None, presented_key="", forwarded_for=None,
                   catalog=catalog), shape


def webhook_handler(deps: IngressDeps):  # type: ignore[no-untyped-def]
    async def handle(request: web.Request) -> responses.Answer:
        rules = deps.active.current
        source = rules.sources.get(request.match_info["source"])
        if source is None or source.webhook_secret is None:
            raise IngressError(401, "unknown_source", "no source with a webhook has this name (the URL ends in the source's name)")
        turn = deps.delivery.turn()  # as the ingest routes: a sender behind gets its turns (proxy/delivery/pacing.py)
        if turn is not None:
            await turn
        data = await read_body(request)
        verify_signature(source.webhook_secret, data, request.headers.get(SIGNATURE_HEADER))
        request[SOURCE_KEY] = source.name
        found = _prepare_event(rules, data, source, deps.region, deps.catalog)
        if found is None:
            log.info("webhook_notice_ignored", source=source.name, type=IGNORED_TYPE)
            return responses.accepted({"ignored": IGNORED_TYPE})
        prepared, shape = found
        return await deliver(deps, rules, prepared, shape)

    return handle
