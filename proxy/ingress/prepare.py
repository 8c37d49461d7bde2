"""From a parsed request body to encoded events per destination: the per-event hot path.

Pure and synchronous on purpose. The parsed body (thousands of small dicts for a big batch) is
created and dropped inside `prepare()`, before the handler's first `await`: keeping it alive
across the upstream call makes the cyclic GC scan it over and over (see the performance notes),
so only encoded bytes survive.

Per event, in this order: reject what no upstream can take (not an object, no type in a batch,
neither userId nor anonymousId, over 32 KB), drop the client's `writeKey` (each destination gets
its own credential as a header), stamp a `messageId` if missing, set `context.ip` for browser and
app events that have none, decide, encode once, and file the bytes under every destination, with
the event's messageId, type and name beside them (a `Chunk` per destination and role).

What comes out is one `Submission` for delivery (everything a spool record and de-duplication
need, rejections included) and what only ingress needs: routing counts for the metrics and the
events for the tracking-plan checks.

`prepare()` has a compiled twin, proxy/ingress/_compiled.pyx, which splitter runs when it was built
(proxy/ingress/implementation.py chooses). The two must behave identically: change one, change the
other; tests/test_compiled_prepare.py gives both the same random requests and compares everything.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.delivery import Chunk, Rejection, Submission
from proxy.engine import (
    NAME_FIELDS,
    Decision,
    EventContext,
    RuleSet,
    Source,
    TrackingPlan,
    TransformTable,
    Violation,
    event_name,
    event_shape,
    has_envelope,
    masked_sample,
    merge_envelope,
    shared_decision,
    transformed_events,
)
from proxy.frozen import quick_init
from proxy.ingress.body import MAX_BATCH_EVENTS, MAX_EVENT_BYTES
from proxy.ingress.plan_checks import screen
from proxy.ingress.responses import IngressError
from proxy.metrics import bounded_type
from proxy.observe.catalog import Catalog, Sampled

CLIENT_CHANNELS = ("browser", "mobile", "client")  # context.channel of events from a browser or an app
EVENT_CLIENT_CHANNELS = ("web", "mobile")  # RudderStack's top-level `channel` of events from its browser and mobile SDKs
_NO_COPIES: dict[str, tuple[bytes, str]] = {}  # no destination has transforms: every one files the same bytes


@dataclass(frozen=True, slots=True)
class CallShape:
    """What the route says about the body: one event of a known type, or a batch."""

    is_batch: bool
    implied_type: str | None = None  # single calls: the type the path implies
    from_client: bool = False  # analytics.js / mobile routes: events from a browser or an app


# (rule, primary, mirror, type) -> name -> events. Plain dicts: `d[k] = d.get(k, 0) + 1` costs half of a Counter's `+= 1`.
# Two levels rather than the name in the tuple: a tuple's hash is computed at every look-up, a
# string's once, so an event costs one tuple hash and two cheap look-ups. The metrics add up the
# names; the event catalog keeps them (proxy/observe/catalog.py).
Routed = dict[tuple[str, tuple[str, ...], tuple[str, ...], str], dict[str, int]]


class _Filing:
    """What `prepare()` collects while it walks the events; the `Submission` is built from it at the end."""

    __slots__ = ("mirror", "observed", "primary", "rejected", "routed", "sampled", "violations")

    def __init__(self) -> None:
        self.primary: dict[str, Chunk] = {}
        self.mirror: dict[str, Chunk] = {}
        self.rejected: list[Rejection] = []
        self.routed: Routed = {}
        self.observed: list[bytes] = []
        self.violations: list[Violation] = []
        self.sampled: list[Sampled] = []


@quick_init
@dataclass(frozen=True, slots=True)
class Prepared:
    """One request, prepared: the submission for delivery, and what only ingress needs of it."""

    submission: Submission
    routed: Routed
    observed: list[bytes]  # events for the background tracking-plan check
    violations: list[Violation]  # of events a blocking tracking plan rejected
    sampled: list[Sampled]  # the event catalog's samples: names and property paths (and masked payloads) of a few events

    @property
    def rejected(self) -> tuple[Rejection, ...]:
        return self.submission.rejected

    def routed_labels(self, source: str) -> Iterator[tuple[tuple[str, str, str, str, str], int]]:
        """`splitter_events_total` labels (source, type, rule, destination, role) and counts.

        Counted per decision, raw type and name while preparing (one increment per event); here,
        once per request, the names are added up, the type is bounded and the count expanded per
        destination."""
        for (rule, primary, mirror, raw_type), names in self.routed.items():
            count = sum(names.values())
            event_type = bounded_type(raw_type)
            for destination in primary:
                yield (source, event_type, rule, destination, "primary"), count
            for destination in mirror:
                yield (source, event_type, rule, destination, "mirror"), count


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
    for name in ("anonymousId", "userId"):  # anonymousId first: nearly every event has one
        value = event.get(name)
        if type(value) is str:
            if value.strip():
                return True
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
    return False


def _reject(filing: _Filing, index: int, code: str, message: str) -> None:
    filing.rejected.append(Rejection(index, code, message))


@quick_init
@dataclass(frozen=True, slots=True)
class RequestScope:
    """What every event of one request shares, worked out once per request rather than per event."""

    rules: RuleSet
    source: Source
    ctx: EventContext
    envelope: dict[str, Any] | None  # a batch envelope with something to merge into each event
    implied_type: str | None  # single calls: the path's type, for an event that names none
    ip_for_all: str | None  # client routes: context.ip for every event that has none
    ip_for_client_channels: str | None  # other routes: only for events whose context.channel is a client's
    transforms: TransformTable
    plan: TrackingPlan | None
    wants_sample: Callable[[str, str], bool] | None  # the catalog's, for this request's source: sample this (type, name)? None: no samples

    @classmethod
    def of(cls, rules: RuleSet, shape: CallShape, source: Source, ctx: EventContext, client_ip: str | None,
           envelope: dict[str, Any] | None, catalog: Catalog | None) -> RequestScope:
        sampling = catalog.sampler(rules.catalog, source.name) if catalog is not None and rules.catalog.enabled and rules.catalog.schema_samples else None
        return cls(rules, source, ctx, envelope, None if shape.is_batch else shape.implied_type,
                   client_ip if shape.from_client else None, client_ip if not shape.from_client else None,
                   rules.transforms, rules.tracking_plans.get(source.name), sampling)


def prepare(
    rules: RuleSet, body: Any, shape: CallShape, source: Source, ctx: EventContext, client_ip: str | None, *,
    presented_key: str = "", forwarded_for: str | None = None, catalog: Catalog | None = None,
) -> Prepared:
    """`body` as parsed JSON, from `source` (which the client proved with `presented_key`; "" for a
    signed webhook). `forwarded_for` goes upstream with the events. `catalog`: the event catalog
    that decides which events to sample (the counts go to it after delivery accepted them)."""
    events = events_of(body, shape)
    filing = _Filing()
    scope = RequestScope.of(rules, shape, source, ctx, client_ip, body if shape.is_batch and has_envelope(body) else None, catalog)
    for index, event in enumerate(events):
        _prepare_event(filing, scope, index, event)
    submission = Submission(source, presented_key, forwarded_for, filing.primary, filing.mirror, tuple(filing.rejected), filing.routed)
    return Prepared(submission, filing.routed, filing.observed, filing.violations, filing.sampled)


def events_of(body: Any, shape: CallShape) -> list[Any]:
    """The request's events, or the error that refuses the whole body (shared with the compiled twin)."""
    if not isinstance(body, dict):
        raise IngressError(400, "invalid_request", f"body must be a JSON object, not {type(body).__name__}")
    if not shape.is_batch:
        return [body]
    events = body.get("batch")
    if not isinstance(events, list):
        raise IngressError(400, "invalid_request", "batch body needs a `batch` list of events")
    if len(events) > MAX_BATCH_EVENTS:
        raise IngressError(413, "too_many_events", f"batch has {len(events)} events; the limit is {MAX_BATCH_EVENTS} per request")
    return events


def _prepare_event(filing: _Filing, scope: RequestScope, index: int, event: Any) -> None:
    """One parsed event: validated, completed, encoded, routed and filed (or rejected)."""
    if type(event) is not dict:
        _reject(filing, index, "invalid_event", f"event is not a JSON object ({type(event).__name__})")
        return
    if scope.envelope is not None:
        merge_envelope(scope.envelope, event)
    elif scope.implied_type is not None and "type" not in event:
        event["type"] = scope.implied_type
    if "writeKey" in event:
        del event["writeKey"]
    event_type = event.get("type")
    if type(event_type) is not str or not event_type:
        _reject(filing, index, "missing_type", "event has no type (track, identify, page, screen, group or alias)")
        return
    if not _has_identity(event):
        _reject(filing, index, "no_user_anon_id", "event has neither userId nor anonymousId")
        return
    try:
        message_id = event.get("messageId")
        if type(message_id) is not str or not message_id.strip():
            message_id = event["messageId"] = message_id_for(scope.source.name, event, index)  # before context.ip: a retry from elsewhere gets the same id
        if scope.ip_for_all is not None:
            _set_ip(event, scope.ip_for_all)
        elif scope.ip_for_client_channels is not None and (event.get("channel") in EVENT_CLIENT_CHANNELS or _is_client_channel(event.get("context"))):
            _set_ip(event, scope.ip_for_client_channels)
        encoded = orjson.dumps(event)
    except orjson.JSONEncodeError as exc:  # parsed, but not encodable: nesting deeper than orjson writes (255 levels)
        _reject(filing, index, "invalid_event", f"event cannot be forwarded: {exc}")
        return
    _file_event(filing, scope, index, event, encoded, event_type, message_id)


def _file_event(filing: _Filing, scope: RequestScope, index: int, event: dict[str, Any], encoded: bytes, event_type: str, message_id: str) -> None:
    """Size check, tracking plan, decision, and the event's bytes filed under each destination.

    Without transformed copies (the common case) the filing loops are written out here rather than
    shared through a helper: this runs for every event."""
    if len(encoded) > MAX_EVENT_BYTES:
        _reject(filing, index, "event_too_large", f"event is {len(encoded)} bytes; the limit is 32 KB per event")
        return
    if scope.plan is not None and (refusal := screen(scope.plan, event, encoded, filing.observed, filing.violations)) is not None:
        _reject(filing, index, "tracking_plan_violation", refusal)
        return
    decision = shared_decision(scope.rules, event, scope.ctx)
    copies = _NO_COPIES
    if scope.transforms:
        try:
            copies = _encode_transformed(scope.transforms, decision, event)
        except orjson.JSONEncodeError as exc:  # a transform nested it past what orjson writes: never send the untransformed copy
            _reject(filing, index, "invalid_event", f"event cannot be forwarded once transformed: {exc}")
            return
    name_field = NAME_FIELDS.get(event_type)  # event_name() written out: a call per event costs more than these lines
    name = event.get(name_field, event_type) if name_field is not None else event_type
    if type(name) is not str:
        name = event_type
    key = (decision.rule, decision.primary, decision.mirror, event_type)
    names = filing.routed.get(key)
    if names is None:
        names = filing.routed[key] = {}
    seen = names.get(name, 0)
    names[name] = seen + 1
    if not seen and scope.wants_sample is not None and scope.wants_sample(event_type, name):
        _sample(filing, scope, event, event_type, name)  # the catalog asks for this request's first event of the name (and route)
    if copies:
        _file_copies(filing, decision, copies, encoded, message_id, event_type, name)
        return
    _file(filing.primary, decision.primary, encoded, message_id, event_type, name)
    if decision.mirror:
        _file(filing.mirror, decision.mirror, encoded, message_id, event_type, name)


def _file(chunks: dict[str, Chunk], destinations: tuple[str, ...], encoded: bytes, message_id: str, event_type: str, name: str) -> None:
    """Add one event to each destination's chunk of a role (no tuple per event: appends only)."""
    for destination in destinations:
        chunk = chunks.get(destination)
        if chunk is None:
            chunk = chunks[destination] = Chunk()
        chunk.append(encoded)
        meta = chunk.meta
        meta.append(message_id)
        meta.append(event_type)
        meta.append(name)


def _file_copies(filing: _Filing, decision: Decision, copies: dict[str, tuple[bytes, str]], encoded: bytes, message_id: str, event_type: str,
                 name: str) -> None:
    """Filing when some destinations get a transformed copy: its own bytes and, after a rename_event,
    its own name (transforms never change messageId or type)."""
    for chunks, destinations in ((filing.primary, decision.primary), (filing.mirror, decision.mirror)):
        for destination in destinations:
            chunk = chunks.get(destination)
            if chunk is None:
                chunk = chunks[destination] = Chunk()
            data, filed_name = copies.get(destination, (encoded, name))
            chunk.add(data, message_id, event_type, filed_name)


def _sample(filing: _Filing, scope: RequestScope, event: dict[str, Any], event_type: str, name: str) -> None:
    """The event's property paths (and masked payload) for the catalog, which asked for this name.

    The event as the client sent it, with splitter's stamping (messageId, context.ip) and before any
    destination's transforms, as the tracking plan checks it."""
    settings = scope.rules.catalog
    for taken_type, taken_name, _, _ in filing.sampled:  # a name split over two routes: one sample per request
        if taken_name == name and taken_type == event_type:
            return
    payload = masked_sample(event, settings.unmasked_paths, scope.rules.secrets) if settings.payload_samples else None
    filing.sampled.append((event_type, name, event_shape(event, settings.max_depth, settings.max_paths), payload))


def _is_client_channel(context: Any) -> bool:
    return type(context) is dict and context.get("channel") in CLIENT_CHANNELS


def single_call_error(rejection: Rejection) -> IngressError:
    """The error for a single-event call whose event was rejected (the handler counts it first)."""
    status = 413 if rejection.code == "event_too_large" else 400
    return IngressError(status, rejection.code, rejection.message)


def _set_ip(event: dict[str, Any], client_ip: str) -> None:
    context = event.get("context")
    if not isinstance(context, dict):
        if context is not None:
            return  # a malformed context is forwarded as it came
        context = event["context"] = {}
    if not context.get("ip"):
        context["ip"] = client_ip


def _encode_transformed(transforms: TransformTable, decision: Decision, event: dict[str, Any]) -> dict[str, tuple[bytes, str]]:
    """Each transformed destination's own bytes and name; the event itself (shared by the others) is left as it is."""
    event_type = event["type"]
    return {destination: (orjson.dumps(copy), event_name(copy, event_type)) for destination, copy in transformed_events(transforms, decision, event).items()}
