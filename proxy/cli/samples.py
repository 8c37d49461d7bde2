"""Reading sample events for `splitter explain` and `splitter simulate`.

Accepts what an operator has at hand: one event as JSON, a Segment batch body (`{"batch": [...]}`,
envelope merged as the proxy would), or NDJSON where each line is either. Bad lines are reported
with their line number rather than skipped, so a sample is never silently smaller than it looks.

Each event may also say what its request would have told the proxy, so one sample can mix sources
and countries (a warehouse export has a source name column, no write key):

- `"_splitter": {"source": "ios", "country": "DE", "region": "eu-west-1"}` on an event, or on a batch
  body for all of its items (an item's own `_splitter` keys win);
- the fields `--source-field` / `--country-field` name, such as a warehouse column `source_name`
  (`_splitter` wins over them).

For that event these win over the command line's `--source` / `--write-key` / `--header` / `--region`,
and a source name wins over the event's own `writeKey`. A null or empty value counts as not given.
With `--geoip-db`, an event whose country none of these names gets the country of its own
`context.ip`, as the proxy looks up the client's address: after a header, before the event's
`context.location.country` (which the engine reads when the context has no country).
The rules never see them: `_splitter` and the named fields are removed from the event, and so is
`writeKey`, as the proxy removes it (so `explain` never prints a write key).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.engine import EventContext, RuleSet, Sample, Source, events_of_body, mask

ANNOTATION = "_splitter"
ANNOTATION_KEYS = ("source", "country", "region")
# What a `country` condition accepts: ISO 3166 alpha-2, and the codes CDNs add (Cloudflare's T1, XX).
_COUNTRY = re.compile(r"[A-Za-z][A-Za-z0-9]")


class InputError(ValueError):
    """An input file that is not events; the message names the line."""


@dataclass(frozen=True, slots=True)
class SampleEvent:
    event: dict[str, Any]  # as the rules see it: without `_splitter`, the named fields or `writeKey`
    write_key: str | None  # the writeKey the body named, if any
    where: str  # "NAME:LINE" or "NAME:LINE[index]", for messages
    source: str | None = None  # per-event source name, country (upper case) and region; None: not given
    country: str | None = None
    region: str | None = None


@dataclass(frozen=True, slots=True)
class SampleFields:
    """The fields of each event that name its source and country (`--source-field`, `--country-field`)."""

    source: tuple[str, ...] | None = None
    country: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class SampleDefaults:
    """What the command line says about every event that does not say it itself."""

    write_key: str | None = None
    source: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    region: str | None = None
    geoip: Callable[[str | None], str | None] | None = None  # `--geoip-db`: the country of an address (proxy/geoip.py)


def field_path(text: str) -> tuple[str, ...]:
    """`context.source_name` -> ("context", "source_name"); ValueError for an empty name or part."""
    parts = tuple(part.strip() for part in text.split("."))
    if not all(parts):
        raise ValueError(f"{text!r} is not a field name or a dotted path such as context.source_name")
    return parts


def read_events(text: str, name: str, fields: SampleFields | None = None) -> list[SampleEvent]:
    fields = fields or SampleFields()
    stripped = text.strip()
    if not stripped:
        raise InputError(f"{name}: no events in input")
    try:
        bodies = [(1, orjson.loads(stripped))]
    except orjson.JSONDecodeError:
        bodies = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                bodies.append((number, orjson.loads(line)))
            except orjson.JSONDecodeError as exc:
                raise InputError(f"{name}:{number}: invalid JSON: {exc}") from None
    samples: list[SampleEvent] = []
    for number, body in bodies:
        if not isinstance(body, dict):
            raise InputError(f"{name}:{number}: expected a JSON object (an event or a batch), got {type(body).__name__}")
        is_batch = isinstance(body.get("batch"), list)
        # Off the body before its envelope is merged; for a single event the body is the event, below.
        for_all = _annotation(body, f"{name}:{number}") if is_batch else {}
        events, write_key = events_of_body(body)
        for index, event in enumerate(events):
            where = f"{name}:{number}[{index}]" if is_batch else f"{name}:{number}"
            if not isinstance(event, dict):
                raise InputError(f"{where}: event is not a JSON object")
            given = {**_fields(event, fields, where), **for_all, **_annotation(event, where)}
            event.pop("writeKey", None)
            samples.append(SampleEvent(event, write_key, where, given.get("source"), given.get("country"), given.get("region")))
    return samples


def contexts(rules: RuleSet, samples: Iterable[SampleEvent], defaults: SampleDefaults) -> list[Sample]:
    """Pair each event with the context the proxy would give it; unknown keys and sources are an InputError."""
    if defaults.write_key and defaults.source:
        raise InputError("give --write-key or --source, not both")
    fallback: Source | None = None
    if defaults.source is not None:
        fallback = _source_named(rules, defaults.source, "--source")
    elif defaults.write_key:
        fallback = _source_keyed(rules, defaults.write_key, "--write-key")
    country = rules.country_from_headers(defaults.headers)
    out: list[Sample] = []
    for sample in samples:
        if sample.source is not None:
            source = _source_named(rules, sample.source, f"{sample.where}: source")
        elif fallback is not None:
            source = fallback
        elif sample.write_key:
            source = _source_keyed(rules, sample.write_key, f"{sample.where}: writeKey")
        else:
            source = None
        given = sample.country or country
        if given is None and defaults.geoip is not None:
            given = defaults.geoip(_context_ip(sample.event))
        ctx = EventContext(source.name if source else None, sample.region or defaults.region, given)
        out.append((sample.event, ctx))
    return out


def _context_ip(event: Mapping[str, Any]) -> str | None:
    context = event.get("context")
    ip = context.get("ip") if isinstance(context, dict) else None
    return ip.strip() if isinstance(ip, str) else None


def _source_named(rules: RuleSet, name: str, label: str) -> Source:
    source = rules.sources.get(name)
    if source is not None:
        return source
    if (keyed := rules.source_for_key(name)) is not None:  # never echo a key, even one given where a name belongs
        raise InputError(f"{label} {mask(name)}: that is a write key of source {keyed.name!r}, not a source name")
    raise InputError(f"{label} {name!r}: no such source in {rules.filename} ({_known(rules)})")


def _source_keyed(rules: RuleSet, key: str, label: str) -> Source:
    source = rules.source_for_key(key)
    if source is None:
        raise InputError(f"{label} {mask(key)}: unknown write key (no source in {rules.filename} has it; {_known(rules)})")
    return source


def _known(rules: RuleSet) -> str:
    return f"sources: {', '.join(rules.sources)}" if rules.sources else "the file declares no sources"


def _annotation(holder: dict[str, Any], where: str) -> dict[str, str]:
    """The `_splitter` object of an event or batch body, checked, and taken off it."""
    raw = holder.pop(ANNOTATION, None)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InputError(f'{where}: {ANNOTATION} must be an object such as {{"source": "ios", "country": "DE"}}, got {type(raw).__name__}')
    unknown = sorted(set(raw) - set(ANNOTATION_KEYS))
    if unknown:
        raise InputError(f"{where}: {ANNOTATION}.{unknown[0]}: unknown key (known: {', '.join(ANNOTATION_KEYS)})")
    given = {key: _checked(key, raw.get(key), f"{where}: {ANNOTATION}.{key}") for key in ANNOTATION_KEYS}
    return {key: value for key, value in given.items() if value is not None}


def _fields(event: dict[str, Any], fields: SampleFields, where: str) -> dict[str, str]:
    """The values of the `--source-field` / `--country-field` fields of `event`, taken off it."""
    given: dict[str, str] = {}
    for key, path, option in (("source", fields.source, "--source-field"), ("country", fields.country, "--country-field")):
        if path is None:
            continue
        holder: Any = event
        for part in path[:-1]:
            holder = holder.get(part) if isinstance(holder, dict) else None
        if isinstance(holder, dict) and path[-1] in holder:
            value = _checked(key, holder.pop(path[-1]), f"{where}: {'.'.join(path)} ({option})")
            if value is not None:
                given[key] = value
    return given


def _checked(key: str, value: Any, label: str) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise InputError(f"{label}: expected a string, got {type(value).__name__} {orjson.dumps(value).decode()[:40]}")
    text: str = value.strip()
    if key == "country":
        if not _COUNTRY.fullmatch(text):
            raise InputError(f"{label}: {text!r} is not a two-letter country code (ISO 3166 alpha-2, such as DE)")
        return text.upper()
    return text
