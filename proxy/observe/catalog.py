"""The live event catalog of one process: per source, every event name seen, how often, when, where
it was routed, and the shape of its properties.

**What costs what.** Counting must be nearly free: it runs for every event. `prepare()` already
counts each event under its routing key (rule, primary, mirror, type) for the metrics, and under
that by name, so a request arrives here as a small dict of counts, and `record()` keeps them per
routing key and name as they come (a dictionary update per name and request, no per-event work).
They are folded into the per-event entries when a 5-minute bucket ends, and whenever the catalog is
read or snapshotted; a name new to the catalog takes its place under the cap at once, so names are
admitted in the order they arrive. Reading property paths costs far more, so it is sampled: the
request's `sampler()` is asked for the first event of each name (and route) in a request, and says
yes until the name has `schema_samples` samples, then for one request in `sample_every` that
carries the name. The answer depends only on the order of the requests, so a replay samples the
same events. Samples are read in `prepare()` (where the parsed event still exists) and merged here.

**Bounds.** At most `max_events` names per source and `max_paths` paths per name; past them, counts
go to a visible `(other)` entry or path, never dropped. Volume windows are kept as 5-minute buckets
for the last hour and hourly buckets for the last day. No property value is kept, except one masked
payload per name when the rules ask for payload samples (proxy/engine/shapes.py masks it).

`snapshot()` and `load()` turn the catalog into the JSON kept in the state directory and back
(catalog_files.py); `catalog_view.py` turns that into what `/admin/catalog` shows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from proxy.engine import OTHER, CatalogSettings, Shape

FORMAT = 1  # of the snapshot; a file of another format is not loaded
FIVE_MINUTES = 300
BUCKETS_PER_HOUR = 12
HOURS_KEPT = 24

RouteKey = tuple[str, tuple[str, ...], tuple[str, ...], str]  # rule, primary, mirror, type: prepare()'s counting key (then by name)
Routed = Mapping[RouteKey, Mapping[str, int]]
Sampled = tuple[str, str, Shape, dict[str, Any] | None]  # type, name, its paths' types, a masked payload (if kept)
_OTHER_KEY = (OTHER, OTHER)


class EventEntry:
    """One (type, name) of one source. `paths`: path -> [events it was seen in, {JSON type: events}]."""

    __slots__ = ("by_5m", "by_hour", "event_type", "first_seen", "last_seen", "name", "paths", "routes", "sample", "sampled", "skipped", "total")

    def __init__(self, event_type: str, name: str) -> None:
        self.event_type = event_type
        self.name = name
        self.total = 0
        self.first_seen = 0.0  # epoch seconds; 0 until the first count is folded in
        self.last_seen = 0.0
        self.by_5m: dict[int, int] = {}  # 5-minute bucket index -> events, the last hour's
        self.by_hour: dict[int, int] = {}  # hour index -> events, the last day's
        self.routes: dict[tuple[tuple[str, ...], tuple[str, ...]], int] = {}  # (primary, mirror) -> events
        self.sampled = 0  # events whose paths were read
        self.skipped = 0  # requests with this name since the last sample, once past schema_samples
        self.paths: dict[str, list[Any]] = {}
        self.sample: dict[str, Any] | None = None

    def count(self, count: int, first: float, last: float, five: int) -> None:
        self.total += count
        if not self.first_seen or first < self.first_seen:
            self.first_seen = first
        self.last_seen = max(self.last_seen, last)
        _add(self.by_5m, five, count, five - BUCKETS_PER_HOUR)
        hour = five // BUCKETS_PER_HOUR
        _add(self.by_hour, hour, count, hour - HOURS_KEPT)

    def add_shape(self, shape: Shape, max_paths: int) -> None:
        """One sampled event's paths. Past `max_paths`, and for what the event's own walk put under
        `(other)`, the types go to the `(other)` path, counted once for the event."""
        self.sampled += 1
        paths = self.paths
        other: set[str] = set()
        for path, types in shape.items():
            cell = paths.get(path)
            if cell is None and path != OTHER and len(paths) - (OTHER in paths) < max_paths:
                cell = paths[path] = [0, {}]
            if cell is None or path == OTHER:
                other |= types
                continue
            cell[0] += 1
            _count_types(cell[1], types)
        if other:
            cell = paths.get(OTHER)
            if cell is None:
                cell = paths[OTHER] = [0, {}]
            cell[0] += 1
            _count_types(cell[1], other)

    def as_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "type": self.event_type, "name": self.name, "total": self.total, "first_seen": self.first_seen, "last_seen": self.last_seen,
            "by_5m": {str(k): v for k, v in self.by_5m.items()}, "by_hour": {str(k): v for k, v in self.by_hour.items()},
            "routes": [{"primary": list(primary), "mirror": list(mirror), "count": n} for (primary, mirror), n in self.routes.items()],
            "sampled": self.sampled, "paths": {path: {"seen": seen, "types": dict(types)} for path, (seen, types) in self.paths.items()},
        }
        if self.sample is not None:
            row["sample"] = self.sample
        return row

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> EventEntry:
        entry = cls(str(row["type"]), str(row["name"]))
        entry.total = int(row["total"])
        entry.first_seen, entry.last_seen = float(row["first_seen"]), float(row["last_seen"])
        entry.by_5m = {int(k): int(v) for k, v in row.get("by_5m", {}).items()}
        entry.by_hour = {int(k): int(v) for k, v in row.get("by_hour", {}).items()}
        entry.routes = {(tuple(r["primary"]), tuple(r["mirror"])): int(r["count"]) for r in row.get("routes", ())}
        entry.sampled = int(row.get("sampled", 0))
        entry.paths = {path: [int(cell["seen"]), {str(t): int(n) for t, n in cell["types"].items()}] for path, cell in row.get("paths", {}).items()}
        sample = row.get("sample")
        entry.sample = sample if isinstance(sample, dict) else None
        return entry


def _add(buckets: dict[int, int], index: int, count: int, oldest_gone: int) -> None:
    """Add to a bucket; when a bucket starts, the ones that left the window go."""
    found = buckets.get(index)
    if found is None:
        for old in [k for k in buckets if k <= oldest_gone]:
            del buckets[old]
        buckets[index] = count
    else:
        buckets[index] = found + count


def _count_types(counts: dict[str, int], types: Iterable[str]) -> None:
    for json_type in types:
        counts[json_type] = counts.get(json_type, 0) + 1


class Catalog:
    """One process's catalog. Not thread-safe: the event loop's thread is its only user."""

    def __init__(self) -> None:
        self._events: dict[str, dict[tuple[str, str], EventEntry]] = {}  # source -> (type, name) -> entry
        self._pending: dict[str, dict[RouteKey, dict[str, list[float]]]] = {}  # source -> routing key -> name -> [count, first, last], not folded yet
        self._five = 0  # the 5-minute bucket the pending counts belong to
        self._waiting = 0  # (route, name) cells pending
        self._max_events = CatalogSettings().max_events
        self.changed = False  # since the last snapshot

    def wants_sample(self, settings: CatalogSettings, source: str, event_type: str, name: str) -> bool:
        """Whether to read the paths of a request's first event of this name (see the module's docstring)."""
        return self.sampler(settings, source)(event_type, name)

    def sampler(self, settings: CatalogSettings, source: str) -> Callable[[str, str], bool]:
        """`wants_sample` for one request: `prepare()` asks it for nearly every event of a batch of many
        names, so the source's entries and the settings are looked up once, and the common answer (a
        known name past its first samples) is one counter step."""
        events = self._source(source)
        samples, every, room = settings.schema_samples, settings.sample_every, settings.max_events

        def wants(event_type: str, name: str) -> bool:
            entry = events.get((event_type, name))
            if entry is None:
                return samples > 0 and len(events) < room
            if entry.sampled < samples:
                return True
            skipped = entry.skipped + 1
            if skipped < every:
                entry.skipped = skipped
                return False
            entry.skipped = 0
            return True

        return wants

    def record(self, settings: CatalogSettings, source: str, routed: Routed, sampled: Iterable[Sampled] = (),
               now: float | None = None) -> None:
        """One accepted request's events: counts per routing key (prepare()'s), and the paths of those it sampled."""
        if not settings.enabled:
            return
        if now is None:
            now = time.time()
        self._max_events = settings.max_events
        five = int(now // FIVE_MINUTES)
        if five != self._five:
            self.fold()
            self._five = five
        pending = self._pending.get(source)
        if pending is None:
            pending = self._pending[source] = {}
        events = self._source(source)
        for key, names in routed.items():
            cells = pending.get(key)
            if cells is None:
                cells = pending[key] = {}
            for name, count in names.items():
                cell = cells.get(name)
                if cell is None:  # the name's first request on this route since the last fold: a new name takes its place under the cap now
                    cells[name] = [count, now, now]
                    self._waiting += 1
                    if (key[3], name) not in events:
                        self._entry(events, key[3], name, settings.max_events)
                else:
                    cell[0] += count
                    cell[2] = now
        self.changed = True
        if sampled:
            for event_type, name, shape, payload in sampled:
                entry = self._entry(events, event_type, name, settings.max_events)
                if (entry.event_type, entry.name) == _OTHER_KEY:  # past the cap: counted, not described
                    continue
                entry.add_shape(shape, settings.max_paths)
                if payload is not None:
                    entry.sample = payload
        if self._waiting > 2 * settings.max_events:  # many new names between folds: bound what waits
            self.fold()

    def fold(self) -> None:
        """Move the pending counts into the entries, in the current 5-minute bucket."""
        for source, pending in self._pending.items():
            events = self._source(source)
            for (_, primary, mirror, event_type), cells in pending.items():
                for name, (count, first, last) in cells.items():
                    entry = self._entry(events, event_type, name, self._max_events)
                    entry.count(int(count), first, last, self._five)
                    routes = entry.routes
                    routes[primary, mirror] = routes.get((primary, mirror), 0) + int(count)
        self._pending = {}
        self._waiting = 0

    def _source(self, source: str) -> dict[tuple[str, str], EventEntry]:
        events = self._events.get(source)
        if events is None:
            events = self._events[source] = {}
        return events

    @staticmethod
    def _entry(events: dict[tuple[str, str], EventEntry], event_type: str, name: str, max_events: int) -> EventEntry:
        """The entry of (type, name), created while the source has room; past `max_events`, the `(other)` entry."""
        entry = events.get((event_type, name))
        if entry is None:
            if len(events) - (_OTHER_KEY in events) >= max_events:
                entry = events.get(_OTHER_KEY)
                if entry is None:
                    entry = events[_OTHER_KEY] = EventEntry(OTHER, OTHER)
            else:
                entry = events[event_type, name] = EventEntry(event_type, name)
        return entry

    def snapshot(self, process: str | None, now: float | None = None) -> dict[str, Any]:
        """Everything, as JSON-ready data (the state directory's file); folds what is pending first."""
        self.fold()
        return {
            "kind": "splitter-catalog", "format": FORMAT, "process": process, "written_at": time.time() if now is None else now,
            "sources": {source: [entry.as_json() for entry in events.values()] for source, events in self._events.items() if events},
        }

    def load(self, snapshot: Mapping[str, Any]) -> None:
        """Start from a snapshot this process wrote before (a restart); ValueError if it is not one."""
        if snapshot.get("kind") != "splitter-catalog" or snapshot.get("format") != FORMAT:
            raise ValueError(f"not a catalog snapshot of format {FORMAT}")
        try:
            loaded = {str(source): {(entry.event_type, entry.name): entry for entry in map(EventEntry.from_json, rows)}
                      for source, rows in snapshot["sources"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"damaged catalog snapshot: {exc!r}") from None
        self._events = loaded
