"""Turning request bodies into the events the engine decides on, the same way everywhere.

Both the proxy and `splitter explain` must see an event exactly as it will be delivered, or the
explanation would lie: so the Segment batch semantics (the envelope's `context` and `integrations`
merged into each event, its `sentAt` copied onto each) live here, in one pure function.
"""

from __future__ import annotations

from typing import Any

ENVELOPE_MERGED = ("context", "integrations")


def has_envelope(body: dict[str, Any]) -> bool:
    """Whether `merge_envelope(body, event)` would change an event: the same conditions, in one place."""
    return any(isinstance(body.get(name), dict) and body[name] for name in ENVELOPE_MERGED) or body.get("sentAt") is not None


def merge_envelope(envelope: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    """Segment's batch semantics, applied in place: the event's own values win over the envelope's."""
    for name in ENVELOPE_MERGED:
        outer = envelope.get(name)
        if isinstance(outer, dict) and outer:
            inner = event.get(name)
            event[name] = {**outer, **inner} if isinstance(inner, dict) else dict(outer)
    sent_at = envelope.get("sentAt")
    if sent_at is not None and "sentAt" not in event:
        event["sentAt"] = sent_at
    return event


def events_of_body(body: Any) -> tuple[list[Any], str | None]:
    """The events of one parsed JSON body and the write key it names, if any.

    A body with a `batch` list is a batch (its items get the envelope merged); any other object is one
    event. Items are returned as they are: callers decide what to do with non-objects.
    """
    if isinstance(body, dict) and isinstance(body.get("batch"), list):
        key = body.get("writeKey")
        return [merge_envelope(body, item) if isinstance(item, dict) else item for item in body["batch"]], key if isinstance(key, str) else None
    key = body.get("writeKey") if isinstance(body, dict) else None
    return [body], key if isinstance(key, str) else None
