"""Counts in time buckets, for the ledger's recent windows (the last hour, the last 24 hours).

A bucket holds, per row, the events counted in one stretch of `width` seconds, aligned to the clock
(a bucket of an hour starts on the hour, UTC), so the buckets of several processes or replicas line
up and add up. Only buckets that counted something exist, and only the last `keep` are kept: memory
grows with the rows that were busy in each bucket, not with time.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
COLUMNS = 4  # accepted, delivered, dead-lettered, dropped (see ledger.py)


class Buckets(Generic[K]):
    def __init__(self, width: int, keep: int) -> None:
        self.width = width
        self.keep = keep
        self.buckets: dict[int, dict[K, list[int]]] = {}
        self._start = -1  # the current bucket, cached: most counts land in it
        self._current: dict[K, list[int]] = {}

    def add(self, now: float, key: K, column: int, count: int) -> None:
        start = int(now) // self.width * self.width
        if start != self._start:
            self._rotate(start)
        counts = self._current.get(key)
        if counts is None:
            counts = self._current[key] = [0] * COLUMNS
        counts[column] += count

    def _rotate(self, start: int) -> None:
        self._start = start
        current = self.buckets.get(start)
        if current is None:
            current = self.buckets[start] = {}
            self.prune(start)
        self._current = current

    def prune(self, now: float) -> None:
        """Drop buckets older than the last `keep` (counting the one `now` falls in)."""
        oldest = int(now) // self.width * self.width - (self.keep - 1) * self.width
        for start in [s for s in self.buckets if s < oldest]:
            del self.buckets[start]

    def items(self) -> Iterator[tuple[int, K, list[int]]]:
        for start in sorted(self.buckets):
            for key, counts in self.buckets[start].items():
                yield start, key, counts

    def load(self, start: int, key: K, counts: list[int]) -> None:
        """A bucket's counts from a snapshot (added to what is there)."""
        rows = self.buckets.setdefault(start, {})
        into = rows.setdefault(key, [0] * COLUMNS)
        for i, count in enumerate(counts[:COLUMNS]):
            into[i] += int(count)
        if start == self._start:
            self._current = rows
