"""The delivery ledger: what became of the events, per source, event, destination and role.

Per row (source, type, event name, destination, role) it counts events

- accepted: written to the destination's spool (what a 200 promises to deliver);
- delivered: accepted by the upstream (2xx);
- dead-lettered, by reason (`rejected`, `credential_refused`, `redirected`): refused for good;
- dropped: mirror copies not spooled because the spool was at its quota or failing;
- unrecorded: settled (delivered or dead-lettered) between the last snapshot and a crash: they
  left the spool, but which of the two is not known (see `recovered`);

and pending = accepted - delivered - dead-lettered - unrecorded, the events still in the spool. The
counts are since the ledger began (`since`, kept across restarts in the snapshot), and, for the
recent windows, per time bucket (buckets.py). Event names are capped per source (names.py), and the
fan-out consistency check (fanout.py) lives beside the rows. Names never reach Prometheus labels.

Delivery counts into it (proxy/delivery/accounting.py): accepted per request, settled per
upstream batch, from each record's tags. Nothing is counted per event: a request's accepted events
arrive as prepare()'s counts per route ((primary, mirror, type) -> name -> events), kept as they
come (`accept_routes`) and spread over the destinations' rows later; settled ones per (type,
name) per batch, added to rows found in one small table per (source, destination, role). The time
buckets are not touched then either: `fold()` spreads the routes and moves what the rows gained
since the last fold into the current bucket. It runs when the snapshot writer does (every few
seconds) and before every read, so the windows are as exact as that interval.

Restarts. The snapshot holds the counts as of its writing (ledger_files.py). At start every spool
is read and its pending records attributed from their tags; `recovered()` then sets each row's
pending to what the spool holds: more than the snapshot said (events accepted after it, or
delivered before it but replayed because their ack note was not written yet) is added to accepted,
less (events settled after it) is counted unrecorded. So accepted = delivered + dead-lettered +
unrecorded + pending holds for every row at every moment, crash or not, and pending is exact.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from proxy.observe.buckets import Buckets
from proxy.observe.fanout import FANOUT_CAP, FanOut
from proxy.observe.names import MAX_NAMES_PER_SOURCE, Names

RowKey = tuple[str, str, str, str, str]  # source, type, event name, destination, role
Table = dict[tuple[str, str], list[int]]  # (type, name) -> the row's COLUMNS
ACCEPTED, DELIVERED, DEAD, DROPPED, UNRECORDED = range(5)
COLUMNS = ("accepted", "delivered", "dead_lettered", "dropped", "unrecorded")
WINDOWED = 4  # the first four columns have time buckets; unrecorded has none (it is found at a start, not seen happening)
RECENT = (300, 12)  # five-minute buckets, the current one and the eleven before it: the last hour
HOURLY = (3600, 24)  # hourly buckets, the current hour and the 23 before it: the last 24 hours
FORMAT = 1


class Ledger:
    def __init__(self, *, max_names: int = MAX_NAMES_PER_SOURCE, fanout_cap: int = FANOUT_CAP, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.names = Names(max_names)
        self.tables: dict[tuple[str, str, str], Table] = {}  # (source, destination, role) -> its rows
        self.reasons: dict[RowKey, dict[str, int]] = {}  # dead-lettered events by reason
        self.recent: Buckets[RowKey] = Buckets(*RECENT)
        self.hourly: Buckets[RowKey] = Buckets(*HOURLY)
        self._folded: dict[RowKey, list[int]] = {}  # each row's windowed columns when last folded into the buckets
        self._routes: dict[tuple[str, tuple[str, ...], tuple[str, ...], str], dict[str, int]] = {}  # accepted, not yet spread over the rows
        self.fanout = FanOut(self.names, fanout_cap)
        self.since = clock()
        self.restarts = 0  # starts on this ledger after the first
        self.unclean_restarts = 0  # of which after a crash (the last snapshot was not a clean stop's)
        self.changes = 0  # counts added; the snapshot writer skips a write when nothing changed

    # -- counting ----------------------------------------------------------------------------------------
    def count(self, column: int, source: str, destination: str, role: str, counts: Mapping[tuple[str, str], int], reason: str | None = None) -> None:
        """Add `counts` ((type, name) -> events) to a column of the rows of (source, destination, role)."""
        table = self.tables.get((source, destination, role))
        if table is None:
            table = self.tables[source, destination, role] = {}
        for pair, events in counts.items():
            row = table.get(pair)
            if row is None:
                row = self._row(table, source, pair)
            row[column] += events
            if reason is not None:
                key = (source, *self.names.key(source, *pair), destination, role)
                by_reason = self.reasons.setdefault(key, {})
                by_reason[reason] = by_reason.get(reason, 0) + events
        self.changes += 1

    def accept_routes(self, source: str, routes: Iterable[tuple[tuple[str, tuple[str, ...], tuple[str, ...], str], Mapping[str, int]]]) -> None:
        """Accepted events by route: ((rule, primary destinations, mirror destinations, type), name -> events)."""
        pending = self._routes
        for (_, primary, mirror, event_type), names in routes:
            key = (source, primary, mirror, event_type)
            found = pending.get(key)
            if found is None:
                pending[key] = dict(names)
                continue
            for name, events in names.items():
                found[name] = found.get(name, 0) + events
        self.changes += 1

    def _spread_routes(self) -> None:
        routes, self._routes = self._routes, {}
        for (source, primary, mirror, event_type), names in routes.items():
            counts = {(event_type, name): events for name, events in names.items()}
            for role, destinations in (("primary", primary), ("mirror", mirror)):
                for destination in destinations:
                    self.count(ACCEPTED, source, destination, role, counts)

    def _row(self, table: Table, source: str, pair: tuple[str, str]) -> list[int]:
        """The row `pair` is counted in: its own, or (type, `(other)`) past the cap (not stored under `pair`)."""
        kept = self.names.key(source, *pair)
        row = table.get(kept)
        if row is None:
            row = table[kept] = [0] * len(COLUMNS)
        return row

    def rows(self) -> Iterator[tuple[RowKey, list[int]]]:
        """Every row (after spreading the accepted routes: a row read here is up to date)."""
        self._spread_routes()
        for (source, destination, role), table in self.tables.items():
            for (event_type, name), row in table.items():
                yield (source, event_type, name, destination, role), row

    def fold(self) -> None:
        """Move what every row gained since the last fold into the current time buckets."""
        now = self.clock()
        folded, recent, hourly = self._folded, self.recent, self.hourly
        for key, row in self.rows():
            before = folded.get(key)
            if before is None:
                before = folded[key] = [0] * WINDOWED
            for column in range(WINDOWED):
                gained = row[column] - before[column]
                if gained:
                    recent.add(now, key, column, gained)
                    hourly.add(now, key, column, gained)
                    before[column] = row[column]
        recent.prune(now)
        hourly.prune(now)

    def recovered(self, destination: str, found: Mapping[tuple[str, str, str, str], int]) -> None:
        """A start found `found` ((source, role, type, name) -> events) pending in `destination`'s
        spool: make every row of that destination's pending agree (see the module docstring). What
        is added to accepted here is not in the time buckets: when it was accepted is not known."""
        self.fold()
        spool: dict[RowKey, int] = {}
        for (source, role, event_type, name), events in found.items():
            self._row(self.tables.setdefault((source, destination, role), {}), source, (event_type, name))
            key = (source, *self.names.key(source, event_type, name), destination, role)
            spool[key] = spool.get(key, 0) + events
        for key, row in list(self.rows()):
            if key[3] != destination:
                continue
            gap = spool.get(key, 0) - pending(row)
            if gap > 0:
                row[ACCEPTED] += gap
                self._folded.setdefault(key, [0] * WINDOWED)[ACCEPTED] += gap
            elif gap < 0:
                row[UNRECORDED] -= gap
        self.changes += 1

    # -- persistence --------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """Everything, as JSON-ready data (the snapshot's body; ledger_view.py reads it)."""
        self.fold()
        rows = list(self.rows())
        index = {key: i for i, (key, _) in enumerate(rows)}
        windows = {name: {"width": buckets.width, "buckets": [[start, index[key], *counts] for start, key, counts in buckets.items() if key in index]}
                   for name, buckets in (("recent", self.recent), ("hourly", self.hourly))}
        return {
            "format": FORMAT,
            "since": self.since,
            "restarts": self.restarts,
            "unclean_restarts": self.unclean_restarts,
            "rows": [[*key, *row, self.reasons.get(key, {})] for key, row in rows],
            "windows": windows,
            "fanout": self.fanout.to_json(),
        }

    def load(self, data: Mapping[str, Any]) -> None:
        """Counts from a snapshot written by `to_json()` (of this spool's previous run)."""
        self.since = float(data.get("since", self.since))
        self.restarts = int(data.get("restarts", 0))
        self.unclean_restarts = int(data.get("unclean_restarts", 0))
        keys: list[RowKey] = []
        for raw in data.get("rows", []):
            key: RowKey = (str(raw[0]), str(raw[1]), str(raw[2]), str(raw[3]), str(raw[4]))
            source, event_type, name, destination, role = key
            self.names.keep(source, event_type, name)
            keys.append(key)
            row = self.tables.setdefault((source, destination, role), {}).setdefault((event_type, name), [0] * len(COLUMNS))
            for i, count in enumerate(raw[5:5 + len(COLUMNS)]):
                row[i] += int(count)
            self._folded[key] = row[:WINDOWED]  # in the buckets already, or from before them
            reasons = raw[5 + len(COLUMNS)] if len(raw) > 5 + len(COLUMNS) else {}
            for reason, count in reasons.items():
                by_reason = self.reasons.setdefault(key, {})
                by_reason[str(reason)] = by_reason.get(str(reason), 0) + int(count)
        windows = data.get("windows", {})
        for name, buckets in (("recent", self.recent), ("hourly", self.hourly)):
            for start, key_index, *counts in windows.get(name, {}).get("buckets", []):
                if 0 <= key_index < len(keys):
                    buckets.load(int(start), keys[key_index], counts)
        self.fanout.load(data.get("fanout", {}))


def pending(row: list[int]) -> int:
    return row[ACCEPTED] - row[DELIVERED] - row[DEAD] - row[UNRECORDED]
