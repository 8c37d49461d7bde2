"""What `/admin/catalog` and `splitter catalog` show: a catalog snapshot made readable, and views merged.

A snapshot (catalog.py) keeps buckets and epoch seconds, so that a process can go on counting where
it stopped. A view is for people and for merging: per source, per event, the totals over the last
hour and day worked out at one moment, times in ISO 8601, routes per destination and role, and per
property path the events it was seen in and its JSON types. Views merge by adding: the processes of
one `--workers N` supervisor, the replicas behind a Service. Each process computes its windows at
its own moment, so merged windows are as exact as the processes' clocks agree.

A path's types are `mixed` when more than one kind was seen, counting `integer` as a `number`
(`3` and `3.5` are both prices; `"3.5"` is not).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from proxy.engine import SeenEvent, SeenPath, iso
from proxy.observe.catalog import BUCKETS_PER_HOUR, FIVE_MINUTES, HOURS_KEPT
from proxy.observe.tier_views import covering

View = dict[str, Any]


def when(epoch: float) -> str:
    return iso(datetime.fromtimestamp(epoch, UTC).replace(microsecond=0))


def view_of(snapshot: Mapping[str, Any], now: float, *, live: bool = False) -> View:
    """One process's snapshot as a view at `now`; `live`: from its memory rather than its file."""
    five, hour = int(now // FIVE_MINUTES), int(now // (FIVE_MINUTES * BUCKETS_PER_HOUR))
    sources: dict[str, Any] = {}
    for source, rows in snapshot.get("sources", {}).items():
        events = []
        for row in rows:
            routed: dict[str, dict[str, int]] = {}
            for route in row.get("routes", ()):
                for role, destinations in (("primary", route["primary"]), ("mirror", route["mirror"])):
                    for destination in destinations:
                        by_role = routed.setdefault(destination, {})
                        by_role[role] = by_role.get(role, 0) + int(route["count"])
            events.append({
                "type": row["type"], "name": row["name"], "total": row["total"],
                "last_hour": sum(n for k, n in row.get("by_5m", {}).items() if five - BUCKETS_PER_HOUR < int(k) <= five),
                "last_24h": sum(n for k, n in row.get("by_hour", {}).items() if hour - HOURS_KEPT < int(k) <= hour),
                "first_seen": when(row["first_seen"]) if row["first_seen"] else None,
                "last_seen": when(row["last_seen"]) if row["last_seen"] else None,
                "routed": routed, "sampled": row.get("sampled", 0),
                "paths": {path: _path(cell["seen"], cell["types"]) for path, cell in sorted(row.get("paths", {}).items())},
                **({"sample": row["sample"]} if row.get("sample") is not None else {}),
            })
        sources[source] = {"events": _ordered(events)}
    written = snapshot.get("written_at")
    process = {"process": snapshot.get("process") or "main", "written_at": when(written) if written else None, "live": live}
    return {"generated_at": when(now), "processes": [process], "sources": sources}


def _path(seen: int, types: Mapping[str, int]) -> dict[str, Any]:
    kinds = {"number" if t == "integer" else t for t in types}
    return {"seen": seen, "types": dict(sorted(types.items(), key=lambda item: (-item[1], item[0]))), "mixed": len(kinds) > 1}


def _ordered(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Busiest first, then by type and name, so that equal counts list the same way everywhere."""
    return sorted(events, key=lambda e: (-e["total"], e["type"], e["name"]))


def merge_views(views: Iterable[Mapping[str, Any]]) -> View:
    """Several views as one: counts added, first seen the earliest, last seen the latest, one sample kept.
    Answers of replicas that each cover the whole tier are taken once (tier_views.py)."""
    merged: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    processes: list[Any] = []
    generated = ""
    for view in covering(views):
        generated = max(generated, view.get("generated_at") or "")
        processes.extend(view.get("processes", ()))
        for source, body in view.get("sources", {}).items():
            events = merged.setdefault(source, {})
            for event in body.get("events", ()):
                key = (event["type"], event["name"])
                found = events.get(key)
                events[key] = _copy(event) if found is None else _merge_event(found, event)
    for events in merged.values():
        for event in events.values():
            event["paths"] = dict(sorted(event["paths"].items()))
    return {"generated_at": generated or None, "processes": processes,
            "sources": {source: {"events": _ordered(list(events.values()))} for source, events in sorted(merged.items())}}


def _copy(event: Mapping[str, Any]) -> dict[str, Any]:
    return {**event, "routed": {d: dict(roles) for d, roles in event.get("routed", {}).items()},
            "paths": {p: {**cell, "types": dict(cell["types"])} for p, cell in event.get("paths", {}).items()}}


def _merge_event(into: dict[str, Any], event: Mapping[str, Any]) -> dict[str, Any]:
    for field in ("total", "last_hour", "last_24h", "sampled"):
        into[field] = into.get(field, 0) + event.get(field, 0)
    firsts = [t for t in (into.get("first_seen"), event.get("first_seen")) if t]
    lasts = [t for t in (into.get("last_seen"), event.get("last_seen")) if t]
    into["first_seen"], into["last_seen"] = min(firsts, default=None), max(lasts, default=None)
    for destination, roles in event.get("routed", {}).items():
        mine = into["routed"].setdefault(destination, {})
        for role, count in roles.items():
            mine[role] = mine.get(role, 0) + count
    for path, cell in event.get("paths", {}).items():
        mine = into["paths"].get(path)
        if mine is None:
            into["paths"][path] = {**cell, "types": dict(cell["types"])}
            continue
        types = mine["types"]
        for json_type, count in cell["types"].items():
            types[json_type] = types.get(json_type, 0) + count
        into["paths"][path] = _path(mine["seen"] + cell["seen"], types)
    if "sample" not in into and "sample" in event:
        into["sample"] = event["sample"]
    return into


def only_source(view: Mapping[str, Any], source: str) -> View:
    """The view with one source's events (none if it has not been seen)."""
    return {**view, "sources": {name: body for name, body in view.get("sources", {}).items() if name == source}}


def seen_events(body: Mapping[str, Any]) -> list[SeenEvent]:
    """One source's events of a view, as the engine's plan comparison reads them."""
    return [
        SeenEvent(event["type"], event["name"], event["total"], event.get("sampled", 0),
                  {path: SeenPath(cell["seen"], dict(cell["types"])) for path, cell in event.get("paths", {}).items()})
        for event in body.get("events", ())
    ]
