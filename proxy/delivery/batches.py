"""Upstream batches from spooled records: joined, never re-serialised.

Events were encoded once at ingress and spooled comma-joined per request; here whole records are
only concatenated into `{"batch":[...]}` bodies, cut so that none exceeds the upstream's limits
(Segment: 500 KB per request). A record is split into its events only when it alone would break a
limit, or when a rejected batch has to be bisected to find a poison event. Every part remembers
the record it came from (and, for a single event, its index there), so that whatever becomes of
it can be attributed from the record's tags (record_tags.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from proxy.delivery.spool import Record

MAX_UPSTREAM_BODY = 500 * 1024 - 1024  # headroom under Segment's 500 KB for the envelope
_OPEN, _CLOSE, _COMMA = b'{"batch":[', b"]}", b","
WHOLE = -1  # the part is its record's whole `joined`


@dataclass(frozen=True, slots=True)
class Batch:
    """Events for one upstream request: parts that are whole records (comma-joined events) or
    single events, with the record each part comes from and, for a single event, its index in it."""

    credential: str
    forwarded_for: str | None  # None when the events came from different clients
    parts: tuple[bytes, ...]
    records: tuple[Record, ...]
    indexes: tuple[int, ...]  # WHOLE, or the single event's index in its record
    count: int

    def body(self) -> bytes:
        return _OPEN + _COMMA.join(self.parts) + _CLOSE

    def events(self) -> list[bytes]:
        return [event for part, record, index in zip(self.parts, self.records, self.indexes)
                for event in (record.events() if index == WHOLE else (part,))]

    def halves(self) -> tuple[Batch, Batch]:
        events: list[bytes] = []
        records: list[Record] = []
        indexes: list[int] = []
        for part, record, index in zip(self.parts, self.records, self.indexes):
            if index == WHOLE:
                events += record.events()
                records += [record] * record.count
                indexes += range(record.count)
            else:
                events.append(part)
                records.append(record)
                indexes.append(index)
        middle = len(events) // 2
        return self._of(events[:middle], records[:middle], indexes[:middle]), self._of(events[middle:], records[middle:], indexes[middle:])

    def _of(self, events: list[bytes], records: list[Record], indexes: list[int]) -> Batch:
        return Batch(self.credential, self.forwarded_for, tuple(events), tuple(records), tuple(indexes), len(events))


def upstream_batches(records: Sequence[Record], max_events: int, max_bytes: int = MAX_UPSTREAM_BODY) -> Iterator[Batch]:
    """Batches for `records` (all with one credential), in order, each within both limits."""
    builder = _Builder(records[0].credential, max_events, max_bytes)
    for record in records:
        if builder.fits_alone(record.size, record.count):
            if not builder.fits(record.size, record.count):
                yield builder.take()
            builder.add(record.joined, record, WHOLE, record.count, record.forwarded_for)
            continue
        for index, event in enumerate(record.events()):  # alone it breaks a limit: event by event (an event always fits an empty batch)
            if not builder.fits(len(event), 1) and builder.count:
                yield builder.take()
            builder.add(event, record, index, 1, record.forwarded_for)
    if builder.count:
        yield builder.take()


class _Builder:
    def __init__(self, credential: str, max_events: int, max_bytes: int) -> None:
        self.credential, self.max_events, self.max_bytes = credential, max_events, max_bytes
        self._reset()

    def _reset(self) -> None:
        self.parts: list[bytes] = []
        self.records: list[Record] = []
        self.indexes: list[int] = []
        self.count = 0
        self.size = len(_OPEN) + len(_CLOSE)
        self.forwarded: set[str | None] = set()

    def fits(self, size: int, count: int) -> bool:
        return self.count + count <= self.max_events and self.size + size + (1 if self.parts else 0) <= self.max_bytes

    def fits_alone(self, size: int, count: int) -> bool:
        return count <= self.max_events and len(_OPEN) + len(_CLOSE) + size <= self.max_bytes

    def add(self, part: bytes, record: Record, index: int, count: int, forwarded_for: str | None) -> None:
        self.size += len(part) + (1 if self.parts else 0)
        self.parts.append(part)
        self.records.append(record)
        self.indexes.append(index)
        self.count += count
        self.forwarded.add(forwarded_for)

    def take(self) -> Batch:
        forwarded = next(iter(self.forwarded)) if len(self.forwarded) == 1 else None
        batch = Batch(self.credential, forwarded, tuple(self.parts), tuple(self.records), tuple(self.indexes), self.count)
        self._reset()
        return batch
