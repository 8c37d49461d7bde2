"""A compiled tracking plan and the check of one event against it.

A plan says which track events a source may send and what their properties look like (the simple
form: `required`, a `type` per property, maybe an `enum`), or gives a JSON Schema per event name
that the whole event must satisfy. `tracking_schema.py` builds these frozen objects once per rules
file; `TrackingPlan.violations(event)` is all that runs per event, in the proxy's background checker,
in `prepare()` for `mode: block`, and in `splitter simulate`.

Violation kinds are a fixed set because they become a metric label.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

Mode = Literal["observe", "block"]
Kind = Literal["unplanned_event", "missing_property", "wrong_type", "not_allowed_value", "schema"]
KINDS: tuple[Kind, ...] = ("unplanned_event", "missing_property", "wrong_type", "not_allowed_value", "schema")
TYPE_NAMES = ("string", "number", "integer", "boolean", "object", "array", "null")
MAX_SCHEMA_ERRORS = 10  # per event: a badly broken event must not produce an unbounded report
# JSON Schema validation of a recursive schema costs far more than linear time in the event's depth
# (250 nested arrays against a recursive $ref took over a minute of CPU, on the event loop in block
# mode): an event nested deeper than this is not checked against a JSON Schema at all.
MAX_SCHEMA_DEPTH = 32


class TooDeepToCheck(ValueError):
    """An event nested deeper than MAX_SCHEMA_DEPTH: its check fails (counted, logged), the event goes on."""


def _deeper_than(value: object, limit: int) -> bool:
    """Whether `value` nests dicts and lists more than `limit` levels deep; stops at the first such path."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[object] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth >= limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False
_SHOWN_VALUE_CHARS = 40  # values are quoted in messages (and logs) only this far: they may hold user data
_NO_NAME = "(no event name)"


@dataclass(frozen=True, slots=True)
class Violation:
    """One way an event departs from its plan: `kind` is bounded, `message` is for people."""

    kind: Kind
    event: str  # the track event name, or `identify`
    message: str


class EventCheck(Protocol):
    def violations(self, subject: str, event: Mapping[str, Any]) -> list[Violation]: ...


def type_of(value: object) -> str:
    """The JSON type name of a parsed JSON value (an integral float counts as an integer, as in JSON Schema)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def type_allowed(actual: str, types: frozenset[str]) -> bool:
    """Whether a value of JSON type `actual` passes a declared type set (empty: any); an integer is a number too."""
    return not types or actual in types or (actual == "integer" and "number" in types)


def enum_key(value: object) -> tuple[bool, object]:
    """Hashable identity for enum membership that keeps `true` apart from `1` (Python says they are equal)."""
    return isinstance(value, bool), value


def shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_VALUE_CHARS else text[: _SHOWN_VALUE_CHARS - 3] + "..."


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One planned property (or trait): the JSON types it may have and, optionally, its allowed values."""

    name: str
    types: frozenset[str]  # empty: any type
    enum: frozenset[tuple[bool, object]] | None = None
    enum_text: str = ""  # the allowed values as written, for messages

    def violations(self, subject: str, noun: str, value: object) -> list[Violation]:
        """`noun` is `property` or `trait`, for the message."""
        actual = type_of(value)
        where = f"{subject!r} {noun} {self.name!r}"
        if not type_allowed(actual, self.types):
            return [Violation("wrong_type", subject, f"{where} is {_a(actual)}, expected {' or '.join(sorted(self.types))}")]
        if self.enum is None:
            return []
        if isinstance(value, (list, dict)):
            return [Violation("not_allowed_value", subject, f"{where} is {_a(actual)}, expected one of {self.enum_text}")]
        if enum_key(value) not in self.enum:
            return [Violation("not_allowed_value", subject, f"{where} is {shown(value)}, expected one of {self.enum_text}")]
        return []


@dataclass(frozen=True, slots=True)
class FieldsCheck:
    """The simple form: required names and per-field specs over one object of the event."""

    container: str  # "properties" (track) or "traits" (identify)
    required: tuple[str, ...]
    fields: tuple[FieldSpec, ...]

    def violations(self, subject: str, event: Mapping[str, Any]) -> list[Violation]:
        values = event.get(self.container)
        if values is None:
            values = {}
        if not isinstance(values, dict):
            return [Violation("wrong_type", subject, f"{subject!r} {self.container} is {_a(type_of(values))}, expected object")]
        noun = "property" if self.container == "properties" else "trait"
        missing = [name for name in self.required if values.get(name) is None]  # null counts as missing: SDKs send null for unset
        found = [Violation("missing_property", subject, f"{subject!r} is missing required {noun} {name!r}") for name in missing]
        for spec in self.fields:
            if spec.name in values and spec.name not in missing:
                found.extend(spec.violations(subject, noun, values[spec.name]))
        return found


@dataclass(frozen=True, slots=True)
class SchemaCheck:
    """The JSON Schema form: the whole event is the instance, validated by a validator compiled once."""

    validator: Any  # a jsonschema Validator; typed loosely so the engine's model carries no jsonschema types

    def violations(self, subject: str, event: Mapping[str, Any]) -> list[Violation]:
        if _deeper_than(event, MAX_SCHEMA_DEPTH):
            raise TooDeepToCheck(f"{subject!r} nests more than {MAX_SCHEMA_DEPTH} levels deep: not checked against its JSON Schema")
        found = []
        for error in self.validator.iter_errors(event):
            where = _clipped(".".join(str(part) for part in error.absolute_path), 100) or "(event)"  # may hold client keys
            found.append(Violation("schema", subject, f"{subject!r} fails its JSON Schema at {where}: {_clipped(error.message)}"))
            if len(found) == MAX_SCHEMA_ERRORS:
                break
        return found


@dataclass(frozen=True, slots=True)
class TrackingPlan:
    """One source's plan. `digest` identifies the plan file's bytes, so a reload notices an edited plan."""

    mode: Mode
    allow_unplanned_events: bool
    events: Mapping[str, EventCheck]
    identify: EventCheck | None
    origin: str  # the plan file, or the rules file for an inline plan
    digest: str = ""

    @property
    def blocks(self) -> bool:
        return self.mode == "block"

    def checks(self, event: Mapping[str, Any]) -> bool:
        """Whether `violations(event)` can find anything: observe mode queues only these events."""
        kind = event.get("type")
        if kind == "identify":
            return self.identify is not None
        if kind != "track":
            return False
        name = event.get("event")
        return not self.allow_unplanned_events or (isinstance(name, str) and name in self.events)

    def violations(self, event: Mapping[str, Any]) -> tuple[Violation, ...]:
        """Every departure of `event` from the plan; empty when it conforms or is of a type the plan does not cover."""
        kind = event.get("type")
        if kind == "identify":
            return tuple(self.identify.violations("identify", event)) if self.identify is not None else ()
        if kind != "track":
            return ()
        name = event.get("event")
        if not isinstance(name, str) or not name:
            return () if self.allow_unplanned_events else (Violation("unplanned_event", _NO_NAME, "track event has no event name"),)
        check = self.events.get(name)
        if check is None:
            if self.allow_unplanned_events:
                return ()
            return (Violation("unplanned_event", name, f"event {_clipped(repr(name), 100)} is not in the tracking plan"),)
        return tuple(check.violations(name, event))


def plan_files(plans: Mapping[str, TrackingPlan]) -> frozenset[tuple[str, str]]:
    """(plan file, sha256) of each plan read from a file of its own: a reload that finds the rules
    file unchanged compares these too, so an edited plan file is not mistaken for no change."""
    return frozenset((plan.origin, plan.digest) for plan in plans.values() if plan.digest)


def _a(type_name: str) -> str:
    return f"an {type_name}" if type_name[0] in "aeiou" else f"a {type_name}"


def _clipped(message: str, limit: int = 200) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."
