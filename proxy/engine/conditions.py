"""`when` conditions compiled into predicates, once per rules file.

Each builder validates what was written (raising ValueError with a message for the schema to locate)
and returns a closure over precompiled data: sets, one regex for all globs of a condition, parsed
version ranges. The hot path only does dictionary look-ups and set membership.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from proxy.engine.model import EVENT_TYPES, EventContext, Predicate
from proxy.engine.versions import VersionRange, parse_range, parse_version

_COUNTRY = re.compile(r"^[A-Za-z][A-Za-z0-9]$")


def _context_field(event: Mapping[str, Any], section: str, name: str) -> Any:
    context = event.get("context")
    if type(context) is not dict:
        return None
    inner = context.get(section)
    if type(inner) is not dict:
        return None
    return inner.get(name)


def source_condition(values: list[str], known_sources: set[str]) -> Predicate:
    unknown = [v for v in values if v not in known_sources]
    if unknown:
        raise ValueError(f"unknown source {unknown[0]!r} (sources: {', '.join(sorted(known_sources)) or 'none'})")
    names = frozenset(values)
    return lambda event, ctx: ctx.source in names


def type_condition(values: list[str]) -> Predicate:
    bad = [v for v in values if v not in EVENT_TYPES]
    if bad:
        raise ValueError(f"unknown event type {bad[0]!r} (expected one of: {', '.join(EVENT_TYPES)})")
    types = frozenset(values)

    def matches(event: Mapping[str, Any], ctx: EventContext) -> bool:
        value = event.get("type")
        return type(value) is str and value in types

    return matches


def glob_to_regex(pattern: str) -> str:
    """`*` matches any run of characters, `?` one character; everything else is literal.

    Brackets are literal too (event names contain them: `Product Viewed [v2]`), which makes every
    non-empty pattern valid except ones that could never be meant, rejected by `event_condition`.
    """
    return "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)


def event_condition(values: list[str]) -> Predicate:
    for value in values:
        if not value.strip():
            raise ValueError("empty event name pattern")
        if value != value.strip():
            raise ValueError(f"event pattern {value!r} has leading or trailing spaces")
        if "**" in value:
            raise ValueError(f"event pattern {value!r}: '**' is not a glob here, use a single '*'")
    exact = frozenset(v for v in values if "*" not in v and "?" not in v)
    globs = [v for v in values if v not in exact]
    if not globs:

        def is_exact(event: Mapping[str, Any], ctx: EventContext) -> bool:
            name = event.get("event")
            return type(name) is str and name in exact

        return is_exact
    matcher = re.compile("|".join(f"(?:{glob_to_regex(g)})" for g in globs), re.DOTALL).fullmatch

    def matches(event: Mapping[str, Any], ctx: EventContext) -> bool:
        name = event.get("event")
        return isinstance(name, str) and (name in exact or matcher(name) is not None)

    return matches


def region_condition(values: list[str]) -> Predicate:
    regions = frozenset(v.strip().casefold() for v in values)
    return lambda event, ctx: ctx.region is not None and ctx.region.casefold() in regions


def country_condition(values: list[str]) -> Predicate:
    bad = [v for v in values if not _COUNTRY.match(v)]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a two-letter ISO 3166 country code")
    countries = frozenset(v.upper() for v in values)

    def matches(event: Mapping[str, Any], ctx: EventContext) -> bool:
        country = ctx.country
        if country is None:
            value = _context_field(event, "location", "country")
            country = value.upper() if isinstance(value, str) else None
        return country in countries

    return matches


def app_version_condition(values: list[str]) -> Predicate:
    ranges: list[VersionRange] = [parse_range(v) for v in values]

    def matches(event: Mapping[str, Any], ctx: EventContext) -> bool:
        version = parse_version(_context_field(event, "app", "version"))
        if version is None:
            return False
        for version_range in ranges:
            if version_range.contains(version):
                return True
        return False

    return matches


def os_condition(values: list[str]) -> Predicate:
    names = frozenset(v.casefold() for v in values)

    def matches(event: Mapping[str, Any], ctx: EventContext) -> bool:
        name = _context_field(event, "os", "name")
        return isinstance(name, str) and name.casefold() in names

    return matches


def library_condition(values: list[str]) -> Predicate:
    names = frozenset(values)

    def matches(event: Mapping[str, Any], ctx: EventContext) -> bool:
        name = _context_field(event, "library", "name")
        return type(name) is str and name in names

    return matches


Builder = Callable[[list[str]], Predicate]
BUILDERS: dict[str, Builder] = {
    "type": type_condition,
    "event": event_condition,
    "region": region_condition,
    "country": country_condition,
    "app_version": app_version_condition,
    "os": os_condition,
    "library": library_condition,
}
CONDITION_NAMES = ("source", *BUILDERS)
# Cheapest first: a rule stops at its first failing condition, so reading the request context
# (source, region) and top-level fields before nested ones and version parsing saves work per event.
EVALUATION_ORDER = ("source", "region", "type", "event", "country", "library", "os", "app_version")
CONTEXT_ONLY = frozenset({"source", "region"})  # depend on the request, never on the event
