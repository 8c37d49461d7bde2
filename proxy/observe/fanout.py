"""The fan-out consistency check: did each event sent to several destinations reach all of them?

Mirrors and `to: [a, b]` send one event to several destinations, each through its own spool and
sender. The check counts, per (source, type, name), the events that fanned out and, once all their
copies have settled, how many reached all of their destinations, only some, or none; while copies
are still out, how many have a copy delivered so far and how many none yet.

Counted by groups, not by event: a group is one request's events that went to the same number of
destinations (`copies`, usually 2). The records a request writes say which group's events they
hold and how many (their tags), so a record delivered whole settles that many copies at once, with
no work per event. Only a failed copy (dead-lettered, or a mirror copy dropped at the quota) is
remembered by its messageId, so that an event is known to have failed on every destination (none)
or not (some). When a group's last copy settles its counts are added up and the group goes.

Bounded: groups in flight hold at most `cap` events (during a long outage of one destination, a
day of traffic could be in flight); past it, new fan-out events are counted as `untracked`.

Across restarts (the groups are in the ledger's snapshot): a start counts, per group, the copies
its recovered spools still hold. After a clean stop those are exactly the copies the group still
waits for, and it goes on. After a crash, more copies than that are replays (kept: they can add
deliveries, not take any away); fewer means copies settled after the last snapshot, delivered or
dead-lettered, which is not known: the group's events are counted `unresolved` rather than
guessed. Fan-out events accepted after the last snapshot were never counted and are not tracked.
A request is served by one process, so all copies of an event are tracked by one process, and the
counts of several processes or replicas add up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from proxy.observe.names import Names

FanKey = tuple[str, str, str]  # source, type, name
ACCEPTED, ALL, SOME, NONE, UNTRACKED, UNRESOLVED = range(6)
TOTALS = ("fanned_out", "reached_all", "reached_some", "reached_none", "untracked", "unresolved")
FANOUT_CAP = 1_000_000  # events in flight in tracked groups (a group of a 500-event batch is a few hundred bytes)


class Group:
    __slots__ = ("copies", "delivered", "events", "failed", "left")

    def __init__(self, events: dict[int, int], copies: int, left: int, delivered: int = 0) -> None:
        self.events = events  # key index -> events of this group under it
        self.copies = copies  # destinations each of its events went to
        self.left = left  # copies not settled yet
        self.delivered = delivered  # copies delivered so far
        self.failed: dict[str, list[int]] = {}  # messageId -> [key index, failed copies], for the few that failed

    @property
    def size(self) -> int:
        return sum(self.events.values())


class FanOut:
    def __init__(self, names: Names, cap: int = FANOUT_CAP) -> None:
        self.names = names
        self.cap = cap
        self.keys: list[FanKey] = []
        self._index: dict[FanKey, int] = {}
        self.totals: list[list[int]] = []  # per key index, the TOTALS columns
        self.groups: dict[str, Group] = {}
        self.tracked = 0  # events in self.groups
        self._found: dict[str, int] | None = None  # while a start checks restored groups: copies seen in the spools

    def key(self, source: str, event_type: str, name: str) -> int:
        index = self._index.get((source, event_type, name))  # a kept name: its own key
        if index is not None:
            return index
        key = (source, *self.names.key(source, event_type, name))
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = len(self.keys)
            self.keys.append(key)
            self.totals.append([0] * len(TOTALS))
        return index

    def open(self, group_id: str, source: str, copies: int, events: Mapping[tuple[str, str], int]) -> None:
        """A request's events that went to `copies` destinations each: `events` per (type, name)."""
        by_key: dict[int, int] = {}
        for (event_type, name), count in events.items():
            index = self.key(source, event_type, name)
            by_key[index] = by_key.get(index, 0) + count
            self.totals[index][ACCEPTED] += count
        size = sum(by_key.values())
        if self.tracked + size > self.cap:
            for index, count in by_key.items():
                self.totals[index][UNTRACKED] += count
            return
        self.groups[group_id] = Group(by_key, copies, size * copies)
        self.tracked += size

    def settle(self, group_id: str, copies: int, delivered: bool, failed: Iterable[tuple[str, str, str]] = ()) -> None:
        """`copies` copies of a group's events settled: delivered, or failed, then `failed` names each
        failed event (messageId, type, name) as this destination had it."""
        group = self.groups.get(group_id)
        if group is None:  # untracked, unresolved, or a replay of a group already counted
            return
        if delivered:
            group.delivered += copies
        else:
            source = self.keys[next(iter(group.events))][0]
            for message_id, event_type, name in failed:
                entry = group.failed.get(message_id)
                if entry is None:
                    entry = group.failed[message_id] = [self.key(source, event_type, name), 0]
                entry[1] += 1
        group.left -= copies
        if group.left <= 0:
            self._close(group_id, group)

    def _close(self, group_id: str, group: Group) -> None:
        del self.groups[group_id]
        self.tracked -= group.size
        reached_all = dict(group.events)
        for index, failures in group.failed.values():
            self.totals[index][NONE if failures >= group.copies else SOME] += 1
            if reached_all.get(index, 0) > 0:
                reached_all[index] -= 1
            else:  # named differently on the failing destination (a renaming transform): taken from the largest name
                largest = max(reached_all, key=reached_all.__getitem__)
                reached_all[largest] = max(0, reached_all[largest] - 1)
        for index, count in reached_all.items():
            self.totals[index][ALL] += count

    # -- restarts ---------------------------------------------------------------------------------------
    def found(self, group_id: str, copies: int) -> None:
        """Pending copies of a group a start found in a spool."""
        if self._found is not None and group_id in self.groups:
            self._found[group_id] = self._found.get(group_id, 0) + copies

    def resolve(self) -> None:
        """Every spool has been recovered: keep the restored groups whose copies are all there."""
        found, self._found = self._found, None
        if found is None:
            return
        for group_id, group in list(self.groups.items()):
            there = found.get(group_id, 0)
            if there >= group.left:
                group.left = there
                if not there:
                    self._close(group_id, group)
                continue
            del self.groups[group_id]
            self.tracked -= group.size
            for index, count in group.events.items():
                self.totals[index][UNRESOLVED] += count

    # -- reading and persistence --------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """Per (source, type, name): the totals, and the events in flight (a copy delivered so far, or none yet)."""
        some_so_far = [0] * len(self.keys)
        none_yet = [0] * len(self.keys)
        for group in self.groups.values():
            for index, count in group.events.items():
                (some_so_far if group.delivered else none_yet)[index] += count
        return [{"source": source, "type": event_type, "event": name, **dict(zip(TOTALS, totals)),
                 "in_flight_some": some_so_far[i], "in_flight_none": none_yet[i]}
                for i, ((source, event_type, name), totals) in enumerate(zip(self.keys, self.totals))]

    def to_json(self) -> dict[str, Any]:
        return {"cap": self.cap, "keys": [[*key, *totals] for key, totals in zip(self.keys, self.totals)],
                "groups": [[group_id, group.copies, group.left, group.delivered, [[i, n] for i, n in group.events.items()],
                            [[message_id, *entry] for message_id, entry in group.failed.items()]]
                           for group_id, group in self.groups.items()]}

    def load(self, data: Mapping[str, Any]) -> None:
        """A snapshot's totals and groups; the groups wait for `found()` and `resolve()`."""
        indexes = []
        for row in data.get("keys", []):
            source, event_type, name = str(row[0]), str(row[1]), str(row[2])
            self.names.keep(source, event_type, name)
            index = self.key(source, event_type, name)
            indexes.append(index)
            for i, count in enumerate(row[3:3 + len(TOTALS)]):
                self.totals[index][i] += int(count)
        for group_id, copies, left, delivered, events, failed in data.get("groups", []):
            by_key = {indexes[i]: int(n) for i, n in events if 0 <= i < len(indexes)}
            if not by_key:
                continue
            group = self.groups[str(group_id)] = Group(by_key, int(copies), int(left), int(delivered))
            group.failed = {str(m): [indexes[i], int(f)] for m, i, f in failed if 0 <= i < len(indexes)}
            self.tracked += group.size
        self._found = {}
