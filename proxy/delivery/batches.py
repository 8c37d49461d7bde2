"""Upstream request bodies from already-encoded events: joined, never re-serialised.

Events were encoded once at ingress; here they are only concatenated into `{"batch":[...]}`
bodies, cut so that none exceeds the upstream's request limit (Segment: 500 KB).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

MAX_UPSTREAM_BODY = 500 * 1024 - 1024  # headroom under Segment's 500 KB for the envelope
_OPEN, _CLOSE, _COMMA = b'{"batch":[', b"]}", b","


def batch_bodies(events: Sequence[bytes], limit: int = MAX_UPSTREAM_BODY) -> Iterator[tuple[bytes, int]]:
    """(body, number of events) for consecutive runs of `events`, each body within `limit`."""
    start, size = 0, len(_OPEN) + len(_CLOSE)
    for index, event in enumerate(events):
        added = len(event) + (1 if index > start else 0)
        if index > start and size + added > limit:
            yield _join(events[start:index]), index - start
            start, size = index, len(_OPEN) + len(_CLOSE) + len(event)
        else:
            size += added
    if start < len(events):
        yield _join(events[start:]), len(events) - start


def _join(events: Sequence[bytes]) -> bytes:
    return _OPEN + _COMMA.join(events) + _CLOSE
