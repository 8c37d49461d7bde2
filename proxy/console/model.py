"""What the console shows, as plain JSON-ready data: one model for the server-rendered page and for the page's script.

Every part is built from what the admin port already serves, so the page can show nothing
`/admin/config` would mask: the rules from `describe()` (sources by name only: no write key, not
even masked; destination URLs as `public_url` shows them), the ramps from `ramp_views`, the numbers
from the metrics registry `/metrics` exports, the parity from `/admin/ledger`'s document, the change
history from `/admin/history`'s entries. The catalog is `/admin/catalog`'s document itself (the page
renders it, without its masked payload samples).

Rates are computed here, not in the browser: `RateWindow` keeps the event counters of the last
reads (each page load and each poll of `/admin/console`), so a page without JavaScript shows them too.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry

BREAKER_STATES = {0: "closed", 1: "half-open", 2: "open"}
RATE_SPAN = 15.0  # seconds: a rate is over (at most) the last 15 s of reads
RATE_MIN_SPAN = 0.5  # a rate needs two reads at least this far apart
RATE_SAMPLES = 64
HISTORY_SHOWN = 25
HEALTH_METRICS = {  # the page's field -> the sample's name in the registry
    "spool_records": "splitter_spool_records",
    "oldest_pending_seconds": "splitter_spool_oldest_event_age_seconds",
    "in_flight": "splitter_delivery_queue_depth",
    "breaker": "splitter_breaker_state",
    "delivered": "splitter_events_delivered_total",
    "dead_lettered": "splitter_events_dead_lettered_total",
    "dropped": "splitter_events_dropped_total",
}
EVENTS_TOTAL = "splitter_events_total"
LEDGER_COLUMNS = ("accepted", "delivered", "pending", "dead_lettered", "dropped")
FANOUT_COLUMNS = ("fanned_out", "reached_all", "reached_some", "reached_none", "in_flight_some", "in_flight_none")

Samples = dict[str, list[tuple[dict[str, str], float]]]


def read_samples(registry: CollectorRegistry, names: Iterable[str]) -> Samples:
    """The current samples of these names (counters as `<name>_total`), labels and values."""
    wanted = set(names)
    found: Samples = {name: [] for name in wanted}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name in wanted:
                found[sample.name].append((dict(sample.labels), float(sample.value)))
    return found


class RateWindow:
    """Events routed per (destination, role): totals as read, and per second over the last reads."""

    def __init__(self, span: float = RATE_SPAN, clock: Any = time.monotonic) -> None:
        self._span = span
        self._clock = clock
        self._reads: deque[tuple[float, dict[tuple[str, str], float]]] = deque(maxlen=RATE_SAMPLES)

    def read(self, samples: Samples) -> list[dict[str, Any]]:
        now = self._clock()
        totals: dict[tuple[str, str], float] = {}
        for labels, value in samples.get(EVENTS_TOTAL, ()):
            key = (labels.get("destination", ""), labels.get("role", ""))
            totals[key] = totals.get(key, 0.0) + value
        while self._reads and now - self._reads[0][0] > self._span:
            self._reads.popleft()
        base = self._reads[0] if self._reads and now - self._reads[0][0] >= RATE_MIN_SPAN else None
        if not self._reads or now - self._reads[-1][0] >= RATE_MIN_SPAN:
            self._reads.append((now, totals))
        rows = []
        for destination, role in sorted(totals):
            total = totals[destination, role]
            rate = None
            if base is not None:
                before = base[1].get((destination, role), 0.0)
                rate = round(max(0.0, total - before) / (now - base[0]), 2)  # a restart of a worker may lower a sum
            rows.append({"destination": destination, "role": role, "per_second": rate, "total": int(total)})
        return rows


def health(destinations: Sequence[str], samples: Samples) -> list[dict[str, Any]]:
    """Per destination: spool depth, oldest pending age, events in flight, breaker state, delivered, dead letters, dropped."""
    rows = []
    for destination in destinations:
        row: dict[str, Any] = {"destination": destination}
        for field, name in HEALTH_METRICS.items():
            values = [value for labels, value in samples.get(name, ()) if labels.get("destination") == destination]
            row[field] = (max(values) if field in ("breaker", "oldest_pending_seconds") else sum(values)) if values else 0.0
        for field in ("spool_records", "in_flight", "delivered", "dead_lettered", "dropped"):
            row[field] = int(row[field])
        row["oldest_pending_seconds"] = round(row["oldest_pending_seconds"], 1)
        row["breaker"] = BREAKER_STATES.get(int(row["breaker"]), "unknown")
        rows.append(row)
    return rows


def metric_names() -> list[str]:
    return [EVENTS_TOTAL, *HEALTH_METRICS.values()]


def rules_view(described: Mapping[str, Any], ramps: Sequence[Mapping[str, Any]], loaded_at: str) -> dict[str, Any]:
    """The active rules as the page shows them: `describe()`'s, without any key or credential, with each rule's ramp."""
    by_rule = {ramp["rule"]: ramp for ramp in ramps}
    rules = []
    for rule in described.get("rules", ()):
        route = rule["route"]
        ramp = by_rule.get(rule["name"])
        rules.append({
            "name": rule["name"],
            "when": _when_text(rule.get("when") or {}),
            "to": list(route.get("to") or ()),
            "split": dict(route.get("split") or {}),
            "mirror": list(route.get("mirror") or ()),
            "cohort": ", ".join(rule["cohort"]["key"]),
            "ramp": _ramp(ramp) if ramp is not None else None,
        })
    return {
        "sha256": described.get("sha256"),
        "file": described.get("file"),
        "loaded_at": loaded_at,
        "destinations": [{"name": name, "kind": dest["kind"], "url": dest["url"]} for name, dest in described.get("destinations", {}).items()],
        "sources": [source["name"] for source in described.get("sources", ())],  # names only: no write key, masked or not
        "rules": rules,
    }


def _when_text(when: Mapping[str, Any]) -> str:
    if not when:
        return "every event"
    parts = []
    for key, value in when.items():
        shown = ", ".join(str(v) for v in value) if isinstance(value, list | tuple) else str(value)
        parts.append(f"{key}: {shown}")
    return "; ".join(parts)


def _ramp(view: Mapping[str, Any]) -> dict[str, Any]:
    current = view.get("current_step")
    steps = [{"at": "before the first step", "split": dict(view["start"]), "now": current is None}]
    for index, step in enumerate(view.get("steps", ())):
        steps.append({"at": step["at"], "split": dict(step["split"]), "now": current == index})
    return {"steps": steps, "next_step_at": view.get("next_step_at")}


def parity(ledger: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Per event name (source, type, event): each destination's counts (roles added up) and the fan-out check."""
    if ledger is None:
        return None
    events: dict[tuple[str, str, str], dict[str, Any]] = {}
    destinations: set[str] = set()
    for row in ledger.get("rows", ()):
        key = (row["source"], row["type"], row["event"])
        entry = events.setdefault(key, {"source": key[0], "type": key[1], "event": key[2], "destinations": {}, "fanout": None})
        destination = row["destination"]
        destinations.add(destination)
        cell = entry["destinations"].setdefault(destination, dict.fromkeys(LEDGER_COLUMNS, 0) | {"roles": []})
        for column in LEDGER_COLUMNS:
            cell[column] += int(row.get(column, 0))
        if row["role"] not in cell["roles"]:
            cell["roles"].append(row["role"])
    for row in ledger.get("fanout", {}).get("rows", ()):
        key = (row["source"], row["type"], row["event"])
        entry = events.setdefault(key, {"source": key[0], "type": key[1], "event": key[2], "destinations": {}, "fanout": None})
        entry["fanout"] = {column: int(row.get(column, 0)) for column in FANOUT_COLUMNS}
    ordered = sorted(events.values(), key=lambda e: (-sum(c["accepted"] for c in e["destinations"].values()), e["source"], e["type"], e["event"]))
    return {"since": ledger.get("since"), "destinations": sorted(destinations), "events": ordered}


def history_rows(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The newest change history entries, each with its changes said in a few lines."""
    return [{"time": entry.get("time"), "trigger": entry.get("trigger"), "status": entry.get("status"),
             "sha256": (entry.get("sha256") or "")[:12], "lines": change_lines(entry)} for entry in entries[:HISTORY_SHOWN]]


def change_lines(entry: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    changes = entry.get("changes") or {}
    for split in changes.get("splits", ()):
        before = percents_text(split.get("before") or {})
        after = percents_text(split.get("after") or {})
        lines.append(f"{split['rule']}: {before} -> {after} ({split.get('buckets_forward', 0)} buckets forward, {split.get('buckets_back', 0)} back)")
    rules = changes.get("rules") or {}
    for verb in ("added", "removed"):
        if rules.get(verb):
            lines.append(f"rules {verb}: {', '.join(rules[verb])}")
    for edited in rules.get("edited", ()):
        lines.append(f"rule {edited['rule']} edited: {', '.join(edited.get('what', ()))}")
    destinations = changes.get("destinations") or {}
    for verb in ("added", "removed", "edited"):
        if destinations.get(verb):
            lines.append(f"destinations {verb}: {', '.join(destinations[verb])}")
    if entry.get("serving") == "last_good":
        lines.append("serving the last good rules")
    lines.extend(str(error) for error in (entry.get("errors") or ())[:5])
    return lines


def percents_text(percents: Mapping[str, Any]) -> str:
    return ", ".join(f"{name} {float(value):g} %" for name, value in percents.items())


def catalog_events(document: Mapping[str, Any] | None, query: str = "", sort: str = "volume") -> list[dict[str, Any]]:
    """The catalog's events of every source as rows (no payload samples), filtered by `query` (in a name or a
    property path, case-insensitive) and sorted by volume (busiest first) or by name."""
    rows: list[dict[str, Any]] = []
    needle = query.strip().casefold()
    for source, body in (document or {}).get("sources", {}).items():
        for event in body.get("events", ()):
            paths = event.get("paths", {})
            if needle and needle not in event["name"].casefold() and not any(needle in path.casefold() for path in paths):
                continue
            rows.append({
                "source": source, "type": event["type"], "name": event["name"], "total": event["total"],
                "last_hour": event.get("last_hour", 0), "last_24h": event.get("last_24h", 0), "last_seen": event.get("last_seen"),
                "routed": routed_text(event.get("routed", {})),
                "paths": [{"path": path, "types": ", ".join(f"{t} {n}" for t, n in cell["types"].items()), "mixed": cell.get("mixed", False),
                           "seen": cell["seen"]} for path, cell in paths.items()],
            })
    if sort == "name":
        rows.sort(key=lambda r: (r["name"].casefold(), r["source"], r["type"]))
    else:
        rows.sort(key=lambda r: (-r["total"], r["source"], r["type"], r["name"]))
    return rows


def routed_text(routed: Mapping[str, Mapping[str, int]]) -> str:
    return "; ".join(f"{destination} " + ", ".join(f"{role} {count}" for role, count in sorted(roles.items()))
                     for destination, roles in sorted(routed.items())) or "not routed"
