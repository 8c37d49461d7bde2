"""The event names the ledger keeps apart, per source, up to a cap; the rest are counted as `(other)`.

Event names come from clients: a bug that puts a user id or a timestamp into `event` would make one
name per call, and every name is a row per destination and role, with its time buckets. So each
source keeps the first `cap` (type, name) pairs it sees by name; later ones are counted under their
type and the name `(other)`. A name once kept stays kept (also across restarts: the snapshot's rows
bring their names back), so every count of an event, accepted or settled, lands on the same row.
"""

from __future__ import annotations

OTHER = "(other)"
MAX_NAMES_PER_SOURCE = 1000


class Names:
    def __init__(self, cap: int = MAX_NAMES_PER_SOURCE) -> None:
        self.cap = cap
        self._kept: dict[str, set[tuple[str, str]]] = {}

    def key(self, source: str, event_type: str, name: str) -> tuple[str, str]:
        """(type, name) as counted: itself when kept (or when there is still room), else (type, `(other)`)."""
        kept = self._kept.get(source)
        if kept is None:
            kept = self._kept[source] = set()
        pair = (event_type, name)
        if pair in kept:
            return pair
        if len(kept) < self.cap or name == OTHER:
            kept.add(pair)
            return pair
        return event_type, OTHER

    def keep(self, source: str, event_type: str, name: str) -> None:
        """A name a snapshot had a row for: kept again, even past the cap (it already has its row)."""
        self._kept.setdefault(source, set()).add((event_type, name))
