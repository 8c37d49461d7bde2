"""A spool record's tags: whose events it holds, so that the delivery ledger can attribute them.

A record is written at ingest but delivered or dead-lettered later, maybe after a crash and a
restart: by then only the spool knows which source sent its events, in which role they went to the
destination, what they were called and which of them also went elsewhere. So each record carries
that, written once with it:

    [source, role, summary, fan, members]                       (JSON)
    summary = [[type, {name: count, ...}, copies], ...]          its events per type and name, as prepare()
                                                                 counted them per route (copies: destinations)
    fan     = [[group, count], ...]                              its events that also went elsewhere, by
                                                                 fan-out group (proxy/observe/fanout.py)
    members = null, or per fan group [messageId, ...] or null    which of its events are in that group, only
                                                                 when that is not simply all of them

A whole record is counted from its tags: a few strings, nothing per event. The rare paths read
more: a record cut into single events (an oversized record, a batch bisected to find a poison
event) and a failed copy of a fan-out event: such an event describes itself (`describe`: its own
messageId, type and name, read from its bytes, which are the ones this destination got, so a
renamed event has its new name, as prepare() filed it), and `members` says which group it is in.

Empty tags (a format-2 record from the previous release, or a spool written without a ledger) read
as `(unknown)` source, role, type and name, so every event is still counted once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import orjson

from proxy.delivery.spool_format import Record
from proxy.engine import event_name

UNKNOWN = "(unknown)"
Summary = list[tuple[str, Mapping[str, int], int]]  # (type, name -> events, copies)
Fan = list[tuple[str, int]]  # (group, events of the record in it)
Members = list[list[str] | None] | None  # per fan group its events' messageIds (None: all); None when all are None


def tags_for(source: str, role: str, summary: Summary, fan: Fan, members: Members = None) -> bytes:
    """The tags of a record whose events are `summary`, with its fan-out groups."""
    try:
        return orjson.dumps([source, role, summary, fan, members])
    except orjson.JSONEncodeError:  # a string orjson will not write (prepare() already replaced lone surrogates): counted unknown
        return b""


class Tags:
    """A record's tags as read (a plain class: one is made per record delivered, and a frozen dataclass costs more to make)."""

    __slots__ = ("fan", "members_read", "role", "source", "summary")

    def __init__(self, source: str, role: str, summary: list[Any], fan: list[Any], members_read: list[Any] | None = None) -> None:
        self.source = source
        self.role = role
        self.summary = summary  # [[type, {name: count}, copies], ...]
        self.fan = fan  # [[group, count], ...]
        self.members_read = members_read

    @property
    def known(self) -> bool:
        return self.source != UNKNOWN

    def counts(self) -> Iterator[tuple[tuple[str, str], int]]:
        for event_type, names, _ in self.summary:
            for name, count in names.items():
                yield (event_type, name), count

    def members(self) -> list[set[str] | None]:
        """Per fan group, the messageIds of the record's events in it (None: all of them)."""
        found = self.members_read
        if isinstance(found, list) and len(found) == len(self.fan):
            return [set(m) if isinstance(m, list) else None for m in found]
        return [None] * len(self.fan)


def read_tags(record: Record) -> Tags:
    fields = _loads(record.tags)
    if isinstance(fields, list) and len(fields) == 5:
        source, role, summary, fan, members = fields
        if isinstance(source, str) and isinstance(role, str) and isinstance(summary, list) and isinstance(fan, list):
            return Tags(source, role, summary, fan, members)
    return Tags(UNKNOWN, UNKNOWN, [[UNKNOWN, {UNKNOWN: record.count}, 1]], [])


def describe(event: bytes) -> tuple[str, str, str]:
    """An event's messageId, type and name (as prepare() names it), from its bytes: for the rare paths only."""
    parsed = _loads(event)
    if not isinstance(parsed, dict) or not isinstance(parsed.get("type"), str):
        return "", UNKNOWN, UNKNOWN
    message_id, event_type = parsed.get("messageId"), parsed["type"]
    return message_id if isinstance(message_id, str) else "", event_type, event_name(parsed, event_type)


def _loads(data: bytes) -> object:
    if not data:
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:  # the crc guards the bytes; this guards a writer's bug
        return None
