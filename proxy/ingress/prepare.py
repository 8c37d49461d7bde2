"""From a parsed request body to encoded events per destination: the per-event hot path.

Pure and synchronous on purpose. The parsed body (thousands of small dicts for a big batch) is
created and dropped inside `prepare()`, before the handler's first `await`: keeping it alive
across the upstream call makes the cyclic GC scan it over and over (see the performance notes),
so only encoded bytes survive.

Per event, in this order: reject what no upstream can take (not an object, no type in a batch,
neither userId nor anonymousId, over 32 KB), drop the client's `writeKey` (each destination gets
its own credential as a header), stamp a `messageId` if missing, set `context.ip` for browser and
app events that have none, decide, encode once, and file the bytes under every destination.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.engine import Decision, EventContext, RuleSet, Source, decide, merge_envelope
from proxy.ingress.body import MAX_BATCH_EVENTS, MAX_EVENT_BYTES
from proxy.ingress.responses import IngressError
from proxy.metrics import bounded_type


@dataclass(frozen=True, slots=True)
class CallShape:
    """What the route says about the body: one event of a known type, or a batch."""

    is_batch: bool
    implied_type: str | None = None  # single calls: the type the path implies
    from_client: bool = False  # analytics.js / mobile routes: events from a browser or an app


@dataclass
class Prepared:
    primary: dict[str, list[bytes]] = field(default_factory=dict)
    mirror: dict[str, list[bytes]] = field(default_factory=dict)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    routed: Counter[tuple[str, str, str, str, str]] = field(default_factory=Counter)  # metric labels -> events
    accepted: int = 0


def message_id_for(source: str, event: dict[str, Any], index: int = 0) -> str:
    """A UUID derived from the event's content and its place in the request: a client retry of the
    same request gets the same ids, while two identical events in one batch still get two.

    A random id would differ between the first attempt and the SDK's retry, and warehouses
    de-duplicate on messageId, so a retried event would be counted twice.
    """
    if "sentAt" in event:  # when the request was sent: a retry carries a new one, so it is not the event's identity
        event = {name: value for name, value in event.items() if name != "sentAt"}
    digest = hashlib.sha256(f"{source}\0{index}\0".encode() + orjson.dumps(event, option=orjson.OPT_SORT_KEYS)).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def _has_identity(event: dict[str, Any]) -> bool:
    for name in ("userId", "anonymousId"):
        value = event.get(name)
        if (isinstance(value, str) and value.strip()) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return True
    return False


def _reject(prepared: Prepared, index: int, code: str, message: str) -> None:
    prepared.rejected.append({"index": index, "code": code, "message": message})


def prepare(
    rules: RuleSet, body: Any, shape: CallShape, source: Source, ctx: EventContext, client_ip: str | None
) -> Prepared:
    if not isinstance(body, dict):
        raise IngressError(400, "invalid_request", f"body must be a JSON object, not {type(body).__name__}")
    if shape.is_batch:
        events = body.get("batch")
        if not isinstance(events, list):
            raise IngressError(400, "invalid_request", "batch body needs a `batch` list of events")
        if len(events) > MAX_BATCH_EVENTS:
            raise IngressError(413, "too_many_events", f"batch has {len(events)} events; the limit is {MAX_BATCH_EVENTS} per request")
    else:
        events = [body]
    prepared = Prepared()
    for index, event in enumerate(events):
        if not isinstance(event, dict):
            _reject(prepared, index, "invalid_event", f"event is not a JSON object ({type(event).__name__})")
            continue
        if shape.is_batch:
            merge_envelope(body, event)
        else:
            event.setdefault("type", shape.implied_type)
        event.pop("writeKey", None)
        if not isinstance(event.get("type"), str) or not event["type"]:
            _reject(prepared, index, "missing_type", "event has no type (track, identify, page, screen, group or alias)")
            continue
        if not _has_identity(event):
            _reject(prepared, index, "no_user_anon_id", "event has neither userId nor anonymousId")
            continue
        message_id = event.get("messageId")
        if not isinstance(message_id, str) or not message_id.strip():
            event["messageId"] = message_id_for(source.name, event, index)
        if client_ip is not None and (shape.from_client or _channel_is_client(event)):
            _set_ip(event, client_ip)
        encoded = orjson.dumps(event)
        if len(encoded) > MAX_EVENT_BYTES:
            _reject(prepared, index, "event_too_large", f"event is {len(encoded)} bytes; the limit is 32 KB per event")
            continue
        _file(prepared, decide(rules, event, ctx), encoded, source.name, bounded_type(event["type"]))
    return prepared


def single_call_error(rejection: dict[str, Any]) -> IngressError:
    """The error for a single-event call whose event was rejected (the handler counts it first)."""
    status = 413 if rejection["code"] == "event_too_large" else 400
    return IngressError(status, rejection["code"], rejection["message"])


def _channel_is_client(event: dict[str, Any]) -> bool:
    context = event.get("context")
    return isinstance(context, dict) and context.get("channel") in ("browser", "mobile", "client")


def _set_ip(event: dict[str, Any], client_ip: str) -> None:
    context = event.get("context")
    if not isinstance(context, dict):
        if context is not None:
            return  # a malformed context is forwarded as it came
        context = event["context"] = {}
    if not context.get("ip"):
        context["ip"] = client_ip


def _file(prepared: Prepared, decision: Decision, encoded: bytes, source: str, event_type: str) -> None:
    prepared.accepted += 1
    for destination in decision.primary:
        prepared.primary.setdefault(destination, []).append(encoded)
        prepared.routed[(source, event_type, decision.rule, destination, "primary")] += 1
    for destination in decision.mirror:
        prepared.mirror.setdefault(destination, []).append(encoded)
        prepared.routed[(source, event_type, decision.rule, destination, "mirror")] += 1
