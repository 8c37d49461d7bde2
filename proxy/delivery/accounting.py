"""Delivery's side of the ledger: tags for the records a request writes, and what becomes of them.

`Delivery._write` asks `request(submission)` for a `RequestAccount`, which gives each record its
tags (record_tags.py) and, once the records are written, counts them as accepted (mirror copies not
kept as dropped) and opens the request's fan-out groups. The senders report each upstream batch as
delivered or dead-lettered (`settled`), attributed from the tags of the records its parts came
from. At start each spool's pending records are attributed the same way (`Recovered`), so that the
ledger can make its pending agree with what the spool holds.

This runs for every request, so it keeps off the events: a request's counts per destination, role
and name, and its fan-out groups (its events that went to more than one destination, by how many),
come from prepare()'s per-request counts (`Submission.routed`, `RoutedAccount`): a few entries,
whatever the batch size. Only when those do not describe the chunks (a chunk built with `add()`:
transformed copies, which may be renamed; or de-duplication's filter, which drops `routed`) are the
chunks' `meta` counted instead (`MetaAccount`), and only a chunk that mixes fan-out events with
others, or events of several groups, has its groups' messageIds listed. A record delivered whole
is counted from its tags; its events are read one by one only when it is cut into single events or
a fan-out copy of it fails.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Iterator
from typing import Protocol

from proxy.delivery.batches import WHOLE, Batch
from proxy.delivery.record_tags import UNKNOWN, Fan, Members, Summary, describe, read_tags, tags_for
from proxy.delivery.spool_format import Record
from proxy.delivery.submission import Chunk, Routed, Submission
from proxy.observe.fanout import FanOut
from proxy.observe.ledger import ACCEPTED, DEAD, DELIVERED, DROPPED, Ledger

PRIMARY, MIRROR = "primary", "mirror"
Place = tuple[str, str]  # (destination, role): one record of a request
Written = list[tuple[str, str, Chunk]]  # (destination, role, chunk) of each record written (or dropped)


class Accounting:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        # Fan-out group ids: unique across this ledger's runs (this run's start in ms, base 36), then a serial.
        self._run = _base36(time.time_ns() // 1_000_000)
        self._serial = itertools.count()

    def request(self, submission: Submission) -> RequestAccount:
        routed = submission.routed
        if routed is not None and not any(chunk.itemized for chunks in (submission.primary, submission.mirror) for chunk in chunks.values()):
            return RoutedAccount(self, submission, routed)
        return MetaAccount(self, submission)

    def group_id(self) -> str:
        return f"{self._run}.{next(self._serial)}"

    def settled(self, destination: str, batch: Batch, reason: str | None) -> None:
        """An upstream batch was delivered (`reason` None) or dead-lettered for `reason`."""
        by_origin: dict[tuple[str, str], dict[tuple[str, str], int]] = {}
        fanout = self.ledger.fanout
        delivered = reason is None
        last: Record | None = None
        tags = None
        for part, record, index in zip(batch.parts, batch.records, batch.indexes):
            if record is not last:  # a record's single events come one after the other
                last, tags = record, read_tags(record)
            assert tags is not None
            counts = by_origin.get((tags.source, tags.role))
            if counts is None:
                counts = by_origin[tags.source, tags.role] = {}
            if index == WHOLE:
                for event_type, names, _ in tags.summary:
                    for name, events in names.items():
                        counts[event_type, name] = counts.get((event_type, name), 0) + events
                if not tags.fan:
                    continue
                if delivered:
                    for group, count in tags.fan:
                        fanout.settle(group, count, True)
                else:
                    for (group, count), members in zip(tags.fan, tags.members()):
                        fanout.settle(str(group), int(count), False, _described(record.events(), members))
                continue
            described = describe(part) if tags.known else ("", UNKNOWN, UNKNOWN)
            counts[described[1:]] = counts.get(described[1:], 0) + 1
            for (group, _), members in zip(tags.fan, tags.members() if tags.fan else ()):
                if members is None or described[0] in members:
                    fanout.settle(str(group), 1, delivered, () if delivered else (described,))
                    break
        for (source, role), counts in by_origin.items():
            if delivered:
                self.ledger.count(DELIVERED, source, destination, role, counts)
            else:
                self.ledger.count(DEAD, source, destination, role, counts, reason)

    def recovered(self, destination: str, found: Recovered) -> None:
        self.ledger.recovered(destination, found.counts)


class Recovered:
    """What a spool's open found pending, attributed: `Spool.open(visit=...)` calls it per record."""

    def __init__(self, ledger: Ledger) -> None:
        self.counts: dict[tuple[str, str, str, str], int] = {}  # (source, role, type, name) -> events
        self._fanout = ledger.fanout

    def __call__(self, record: Record) -> None:
        tags = read_tags(record)
        for (event_type, name), events in tags.counts():
            key = (tags.source, tags.role, event_type, name)
            self.counts[key] = self.counts.get(key, 0) + events
        for group, count in tags.fan:
            self._fanout.found(str(group), int(count))


class RequestAccount(Protocol):
    """One request's records: the tags of each, then what was written counted (`accepted`)."""

    def tags(self, destination: str, role: str, chunk: Chunk) -> bytes: ...

    def accepted(self, written: Written, dropped: Written) -> None: ...


class RoutedAccount:
    """A request whose chunks prepare() filed itself: everything is read from its per-route counts,
    record by record when asked, a few entries whatever the number of events."""

    __slots__ = ("_accounting", "_groups", "_routed", "_source", "_submission")

    def __init__(self, accounting: Accounting, submission: Submission, routed: Routed) -> None:
        self._accounting = accounting
        self._submission = submission
        self._source = submission.source.name
        self._routed = routed
        self._groups: dict[int, str] | None = None  # copies -> fan-out group, once a record holds fan-out events

    def _summary(self, destination: str, role: str) -> tuple[Summary, dict[int, int] | None]:
        """What the record for `destination` in `role` holds, and its fan-out events by copies."""
        summary: Summary = []
        fan: dict[int, int] | None = None
        primary_role = role == PRIMARY
        for (_, primary, mirror, event_type), names in self._routed.items():
            if destination not in (primary if primary_role else mirror):
                continue
            copies = len(primary) + len(mirror)  # a decision never mirrors to one of its primaries
            summary.append((event_type, names, copies))
            if copies > 1:
                if fan is None:
                    fan = {}
                fan[copies] = fan.get(copies, 0) + sum(names.values())
        return summary, fan

    def _fan(self, chunk: Chunk, fan: dict[int, int]) -> tuple[Fan, Members]:
        groups = self._groups
        if groups is None:
            groups = self._groups = {}
        pairs = []
        for copies, count in fan.items():
            group = groups.get(copies)
            if group is None:
                group = groups[copies] = self._accounting.group_id()
            pairs.append((group, count))
        if len(pairs) == 1 and pairs[0][1] == len(chunk):  # every event of the record in one group
            return pairs, None
        return pairs, _members(self._submission, chunk, fan)

    def tags(self, destination: str, role: str, chunk: Chunk) -> bytes:
        summary, fan = self._summary(destination, role)
        if fan is None:
            return tags_for(self._source, role, summary, _NO_FAN[0])
        return tags_for(self._source, role, summary, *self._fan(chunk, fan))

    def accepted(self, written: Written, dropped: Written) -> None:
        ledger, source = self._accounting.ledger, self._source
        ledger.accept_routes(source, self._routed.items())
        for destination, role, _ in dropped:  # the routes count them as accepted: they were not
            counts = _counts(self._summary(destination, role)[0])
            ledger.count(ACCEPTED, source, destination, role, {pair: -events for pair, events in counts.items()})
            ledger.count(DROPPED, source, destination, role, counts)
        groups = self._groups
        if groups is None:
            return
        fanout = ledger.fanout
        for copies, group in groups.items():
            events: dict[tuple[str, str], int] = {}
            for (_, primary, mirror, event_type), names in self._routed.items():
                if len(primary) + len(mirror) == copies:
                    for name, count in names.items():
                        events[event_type, name] = events.get((event_type, name), 0) + count
            fanout.open(group, source, copies, events)
        for destination, role, chunk in dropped:
            _, fan = self._summary(destination, role)
            if fan is not None:
                _dropped_copies(fanout, chunk, *self._fan(chunk, fan))


class MetaAccount:
    """A request prepare()'s counts do not describe (transformed or de-duplicated copies): each
    chunk's events are counted from their `meta`; a fan-out event is one whose messageId is in
    several records."""

    __slots__ = ("_accounting", "_fan", "_groups", "_places", "_source")

    def __init__(self, accounting: Accounting, submission: Submission) -> None:
        self._accounting = accounting
        self._source = submission.source.name
        self._places: dict[Place, Summary] = {}  # what each record holds, per type and name
        self._groups: dict[int, tuple[str, dict[tuple[str, str], int]]] = {}  # copies -> (fan-out group, its events by (type, name))
        self._fan: dict[Place, tuple[Fan, Members]] = {}
        chunks = _chunks(submission)
        copies_of = Counter(m for chunk in chunks.values() for m in chunk.meta[0::3]) if len(chunks) > 1 else Counter[str]()
        seen: set[str] = set()
        for place, chunk in chunks.items():
            meta = chunk.meta
            by_route: dict[tuple[str, int], dict[str, int]] = {}
            fan: dict[int, int] = {}
            for i in range(0, len(meta), 3):
                message_id, event_type, name = meta[i], meta[i + 1], meta[i + 2]
                copies = copies_of.get(message_id, 1)
                names = by_route.setdefault((event_type, copies), {})
                names[name] = names.get(name, 0) + 1
                if copies > 1:
                    fan[copies] = fan.get(copies, 0) + 1
                    if message_id not in seen:  # named as the first record holding it has it
                        seen.add(message_id)
                        group = self._groups.get(copies)
                        if group is None:
                            group = self._groups[copies] = (accounting.group_id(), {})
                        group[1][event_type, name] = group[1].get((event_type, name), 0) + 1
            self._places[place] = [(event_type, names, copies) for (event_type, copies), names in by_route.items()]
            if fan:
                pairs = [(self._groups[copies][0], count) for copies, count in fan.items()]
                whole = len(pairs) == 1 and pairs[0][1] == len(chunk)
                self._fan[place] = (pairs, None if whole else [[m for m in meta[0::3] if copies_of[m] == copies] for copies in fan])

    def tags(self, destination: str, role: str, chunk: Chunk) -> bytes:
        fan, members = self._fan.get((destination, role), _NO_FAN)
        return tags_for(self._source, role, self._places[destination, role], fan, members)

    def accepted(self, written: Written, dropped: Written) -> None:
        ledger, source = self._accounting.ledger, self._source
        for destination, role, _ in written:
            ledger.count(ACCEPTED, source, destination, role, _counts(self._places[destination, role]))
        for destination, role, _ in dropped:
            ledger.count(DROPPED, source, destination, role, _counts(self._places[destination, role]))
        if not self._groups:
            return
        fanout = ledger.fanout
        for copies, (group, events) in self._groups.items():
            fanout.open(group, source, copies, events)
        for destination, role, chunk in dropped:
            fan, members = self._fan.get((destination, role), _NO_FAN)
            _dropped_copies(fanout, chunk, fan, members)


def _counts(summary: Summary) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for event_type, names, _ in summary:
        for name, events in names.items():
            counts[event_type, name] = counts.get((event_type, name), 0) + events
    return counts


def _members(submission: Submission, chunk: Chunk, fan: dict[int, int]) -> Members:
    """Per fan-out group of `chunk` (by copies), the messageIds of its events in it: a chunk that mixes them."""
    copies_of = Counter(m for c in _chunks(submission).values() for m in c.meta[0::3])
    message_ids = chunk.meta[0::3]
    return [[m for m in message_ids if copies_of[m] == copies] for copies in fan]


def _dropped_copies(fanout: FanOut, chunk: Chunk, fan: Fan, members: Members) -> None:
    """A mirror copy not kept: each of its fan-out events has a copy that failed."""
    meta = chunk.meta
    for (group, count), listed in zip(fan, members or [None] * len(fan)):
        failed = [(meta[i], meta[i + 1], meta[i + 2]) for i in range(0, len(meta), 3) if listed is None or meta[i] in listed]
        fanout.settle(group, count, False, failed)


_NO_FAN: tuple[Fan, Members] = ([], None)


def _chunks(submission: Submission) -> dict[Place, Chunk]:
    return {(destination, role): chunk for role, chunks in ((PRIMARY, submission.primary), (MIRROR, submission.mirror))
            for destination, chunk in chunks.items() if chunk}


def _described(events: list[bytes], members: set[str] | None) -> Iterator[tuple[str, str, str]]:
    """The events (of a group: `members`, or all) of a failed record, each as it describes itself."""
    for event in events:
        described = describe(event)
        if members is None or described[0] in members:
            yield described


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while True:
        number, digit = divmod(number, 36)
        text = digits[digit] + text
        if not number:
            return text
