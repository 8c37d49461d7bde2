"""The console's explain box: where an event would go under the active rules, as `splitter explain` says it.

`POST /admin/explain` takes what an operator has at hand: an event pasted as JSON (one event, or a
Segment batch body), or just an id, which becomes a track event carrying that id in the cohort key
field chosen. It answers, per event, the line `splitter explain` prints (`rule`, `primary`, `mirror`,
`bucket`, `cohort_key`, and `transformed` when the rules declare transforms), under the rules this
process routes by now (ramp steps in effect included).

An event's source, country and region are settled as `splitter explain` settles them: the event's
own `_splitter` object (`{"source": ..., "country": ..., "region": ...}`, also on a batch body for
all its items) wins over the box's fields (source by name, country, region), the region defaults to
this replica's own, and a `writeKey` in the body picks its source when nothing else names one (a
key is never echoed back, only its source's name). It reads, never writes: nothing is counted,
recorded or delivered.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from proxy.engine import EventContext, RuleSet, decide, events_of_body, mask, transformed_events

MAX_EVENTS = 100
MAX_BODY = 256 * 1024
ANNOTATION = "_splitter"
ANNOTATION_KEYS = ("source", "country", "region")
ID_FIELDS = ("anonymousId", "userId")
_COUNTRY = re.compile(r"[A-Za-z][A-Za-z0-9]")


class ExplainError(ValueError):
    """What is wrong with the question, said so that the box can show it."""


def explain(rules: RuleSet, question: Mapping[str, Any], region: str | None) -> dict[str, Any]:
    """`question`: {"event": JSON text or object} or {"user": id, "key": "anonymousId" | "userId"}, with optional
    "source", "country" and "region" for events that do not name their own."""
    defaults = {
        "source": _text(question.get("source"), "source"),
        "country": _country(_text(question.get("country"), "country"), "country"),
        "region": _text(question.get("region"), "region") or region,
    }
    if defaults["source"] is not None and defaults["source"] not in rules.sources:
        raise ExplainError(_unknown_source(rules, defaults["source"], "source"))
    events, write_key, for_all = _events(question, rules)
    if len(events) > MAX_EVENTS:
        raise ExplainError(f"{len(events)} events: the box explains at most {MAX_EVENTS} at a time")
    results = []
    for index, event in enumerate(events):
        where = f"event {index + 1}" if len(events) > 1 else "the event"
        if not isinstance(event, dict):
            raise ExplainError(f"{where} is not a JSON object")
        given = {**for_all, **_annotation(event, where)}
        event.pop("writeKey", None)
        source = given.get("source") or defaults["source"]
        if source is not None and source not in rules.sources:
            raise ExplainError(_unknown_source(rules, source, f"{where}: {ANNOTATION}.source"))
        if source is None and write_key:
            keyed = rules.source_for_key(write_key)
            if keyed is None:
                raise ExplainError(f"writeKey {mask(write_key)}: unknown write key (no source of the rules has it)")
            source = keyed.name
        ctx = EventContext(source, given.get("region") or defaults["region"], given.get("country") or defaults["country"])
        decision = decide(rules, event, ctx)
        row: dict[str, Any] = decision.as_dict()
        if rules.transforms:
            row["transformed"] = transformed_events(rules.transforms, decision, event)
        results.append({"context": {"source": ctx.source, "country": ctx.country, "region": ctx.region}, "event": event, "decision": row})
    return {"sha256": rules.sha256, "results": results}


def _events(question: Mapping[str, Any], rules: RuleSet) -> tuple[list[Any], str | None, dict[str, str]]:
    raw = question.get("event")
    if isinstance(raw, str) and raw.strip():
        try:
            raw = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ExplainError(f"the event is not JSON: {exc}") from None
    if raw is not None and raw != "":
        if not isinstance(raw, dict):
            raise ExplainError(f"expected a JSON object (an event or a batch body), got {type(raw).__name__}")
        body = dict(raw)
        for_all = _annotation(body, "the batch") if isinstance(body.get("batch"), list) else {}
        events, write_key = events_of_body(body)
        return events, write_key, for_all
    user = _text(question.get("user"), "user")
    if user is None:
        raise ExplainError("paste an event (JSON) or type a user id")
    field = _text(question.get("key"), "key") or id_fields(rules)[0]
    if field not in ID_FIELDS:
        raise ExplainError(f"key {field!r}: choose one of {', '.join(ID_FIELDS)}")
    return [{"type": "track", field: user}], None, {}


def id_fields(rules: RuleSet) -> list[str]:
    """The id fields the box offers for a bare id: the default cohort key's first, then the other."""
    first = [f for f in rules.cohort.fields if f in ID_FIELDS]
    return list(dict.fromkeys([*first, *ID_FIELDS]))


def _annotation(holder: dict[str, Any], where: str) -> dict[str, str]:
    raw = holder.pop(ANNOTATION, None)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ExplainError(f'{where}: {ANNOTATION} must be an object such as {{"source": "ios", "country": "DE"}}')
    unknown = sorted(set(raw) - set(ANNOTATION_KEYS))
    if unknown:
        raise ExplainError(f"{where}: {ANNOTATION}.{unknown[0]}: unknown key (known: {', '.join(ANNOTATION_KEYS)})")
    given = {key: _text(raw.get(key), f"{where}: {ANNOTATION}.{key}") for key in ANNOTATION_KEYS}
    given["country"] = _country(given["country"], f"{where}: {ANNOTATION}.country")
    return {key: value for key, value in given.items() if value is not None}


def _text(value: Any, label: str) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise ExplainError(f"{label}: expected a string, got {type(value).__name__}")
    return value.strip()


def _country(value: str | None, label: str) -> str | None:
    if value is None:
        return None
    if not _COUNTRY.fullmatch(value):
        raise ExplainError(f"{label}: {value[:20]!r} is not a two-letter country code (ISO 3166 alpha-2, such as DE)")
    return value.upper()


def _unknown_source(rules: RuleSet, name: str, label: str) -> str:
    if rules.source_for_key(name) is not None:  # a key typed where a name belongs: never echo it
        return f"{label} {mask(name)}: that is a write key, not a source name"
    return f"{label} {name[:60]!r}: no such source (sources: {', '.join(rules.sources) or 'none'})"
