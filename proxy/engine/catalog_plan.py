"""The event catalog against a tracking plan: what was sent that the plan does not know, what the
plan knows that nobody sent, and which properties arrive with types the plan does not allow.

Pure: the catalog's events in (as `SeenEvent`s, whatever process or replica counted them), a
`TrackingPlan` in, findings out. A plan covers track events by name and, when it has `identify`,
identify calls; the other types (page, screen, group, alias) are outside any plan and are left out
of the comparison rather than reported as unplanned.

Types are judged as the plan's own check judges an event (`tracking.type_allowed`: an integer is a
number too, null breaks a plan that does not list it). The expected types come from the simple form
(`properties.P.type`, `traits.P.type`) or, for a JSON Schema plan, from the schema's
`properties.properties.properties.P.type` (`...traits...` for identify), where it says one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.engine.shapes import OTHER
from proxy.engine.tracking import TYPE_NAMES, EventCheck, FieldsCheck, SchemaCheck, TrackingPlan, type_allowed


@dataclass(frozen=True, slots=True)
class SeenPath:
    seen: int  # sampled events that had the path
    types: Mapping[str, int]  # JSON type -> sampled events with the path of that type


@dataclass(frozen=True, slots=True)
class SeenEvent:
    """One event name of one source as the catalog saw it."""

    type: str
    name: str
    total: int
    sampled: int = 0
    paths: Mapping[str, SeenPath] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TypeBreak:
    """A planned property seen with types the plan does not allow."""

    event: str
    path: str  # e.g. properties.price
    expected: tuple[str, ...]
    observed: Mapping[str, int]  # only the breaking types, with the sampled events that had them
    sampled: int  # of the event: the denominator of `observed`


@dataclass(frozen=True, slots=True)
class MissingRequired:
    """A property the plan requires that some sampled events did not have."""

    event: str
    path: str
    seen: int
    sampled: int


@dataclass(frozen=True, slots=True)
class PlanComparison:
    unplanned: tuple[SeenEvent, ...]  # seen, not in the plan
    unseen: tuple[str, ...]  # in the plan, never seen (event names; `identify` for a planned identify)
    type_breaks: tuple[TypeBreak, ...]
    missing_required: tuple[MissingRequired, ...]
    planned: frozenset[tuple[str, str]] = frozenset()  # (type, name) of what the plan lists: its track events, and identify if it has one

    def status(self, event_type: str, name: str) -> str:
        """`planned`, `not planned` (a track event the plan does not list) or `not covered` (a type plans do not check)."""
        if (event_type, name) in self.planned:
            return "planned"
        return "not planned" if event_type == "track" else "not covered"

    def as_dict(self) -> dict[str, Any]:
        return {
            "unplanned": [{"type": e.type, "name": e.name, "total": e.total} for e in self.unplanned],
            "never_seen": list(self.unseen),
            "type_breaks": [{"event": b.event, "path": b.path, "expected": list(b.expected), "observed": dict(b.observed), "sampled": b.sampled}
                            for b in self.type_breaks],
            "missing_required": [{"event": m.event, "path": m.path, "seen": m.seen, "sampled": m.sampled} for m in self.missing_required],
        }


def compare_with_plan(events: list[SeenEvent], plan: TrackingPlan) -> PlanComparison:
    """Findings for one source's events against its plan, in the events' order (busiest first)."""
    planned: dict[tuple[str, str], EventCheck] = {("track", name): check for name, check in plan.events.items()}
    if plan.identify is not None:
        planned["identify", "identify"] = plan.identify
    seen = {(e.type, e.name) for e in events}
    unplanned = tuple(e for e in events if e.type == "track" and (e.type, e.name) not in planned)
    unseen = tuple(name for (event_type, name) in planned if (event_type, name) not in seen)
    breaks: list[TypeBreak] = []
    missing: list[MissingRequired] = []
    for event in events:
        check = planned.get((event.type, event.name))
        if check is None:
            continue
        expected, required = expectations(check)
        for path, types in expected.items():
            found = event.paths.get(path)
            if found is None or not types:
                continue
            wrong = {t: n for t, n in found.types.items() if not type_allowed(t, types)}
            if wrong:
                breaks.append(TypeBreak(event.name, path, tuple(sorted(types)), wrong, event.sampled))
        for path in required:
            had = event.paths.get(path)
            count = had.seen - had.types.get("null", 0) if had is not None else 0  # null counts as missing, as in the plan's check
            if event.sampled and count < event.sampled:
                missing.append(MissingRequired(event.name, path, count, event.sampled))
    return PlanComparison(unplanned, unseen, tuple(breaks), tuple(missing), frozenset(planned))


def expectations(check: EventCheck) -> tuple[dict[str, frozenset[str]], tuple[str, ...]]:
    """The catalog paths a planned event's check types ({path: allowed types}, empty: any) and requires."""
    if isinstance(check, FieldsCheck):
        return ({f"{check.container}.{spec.name}": spec.types for spec in check.fields},
                tuple(f"{check.container}.{name}" for name in check.required))
    if isinstance(check, SchemaCheck):
        return _from_schema(getattr(check.validator, "schema", None))
    return {}, ()


def _from_schema(schema: Any) -> tuple[dict[str, frozenset[str]], tuple[str, ...]]:
    expected: dict[str, frozenset[str]] = {}
    required: list[str] = []
    members = schema.get("properties") if isinstance(schema, dict) else None
    for container in ("properties", "traits"):
        inner = members.get(container) if isinstance(members, dict) else None
        if not isinstance(inner, dict):
            continue
        for name, spec in (inner.get("properties") or {}).items():
            written = spec.get("type") if isinstance(spec, dict) else None
            types = [written] if isinstance(written, str) else written if isinstance(written, list) else []
            if types and all(t in TYPE_NAMES for t in types) and name != OTHER:
                expected[f"{container}.{name}"] = frozenset(types)
        required += [f"{container}.{name}" for name in inner.get("required") or () if isinstance(name, str)]
    return expected, tuple(required)
