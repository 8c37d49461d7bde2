"""What ingress hands delivery for one request, and what delivery answers: typed values, no handles.

`prepare()` builds one `Submission` per request: who sent it (the source, the key it presented, the
X-Forwarded-For to pass on) and, per destination and role, a `Chunk`: the encoded events bytes with
each event's messageId, type and name beside them. Delivery reads the ids from there instead of
parsing the bytes again (de-duplication does). The delivery ledger reads `routed` instead, prepare()'s
per-request counts (kept for the metrics and the catalog anyway): a chunk filed only by prepare()'s
own appends holds exactly what `routed` says of its destination and role, so a request's records
are counted per name without touching its events. A chunk built with `add()` (transformed copies,
which may be renamed) is `itemized`: the ledger counts its `meta` instead, as it does when `routed`
is None (de-duplication drops it: its filter changes the chunks).

A `Chunk` is the list of event bytes itself, with a flat `meta` list beside it (messageId, type,
name: three entries per event). Not an object per event (a batch of 500 would build 500 objects
per destination on the hot path), nor four lists: every container that lives across a request's
awaits counts towards the cyclic GC's next run, and a chunk of four lists made it run twice as
often as the one list per destination before it. A chunk is what the spool stores as one record
(spool_format.py calls it that too).

Named `Submission`, not `Accepted` or `Request`: delivery has not accepted it yet (the spool may be
full), and `request` is aiohttp's `web.Request` everywhere in ingress.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.engine import NAME_FIELDS as NAME_FIELDS  # an event's name: the engine's rule, shared with the event catalog
from proxy.engine import Source
from proxy.frozen import quick_init

# How prepare() counts the events it files: (rule, primary, mirror, type) -> name -> events.
Routed = Mapping[tuple[str, tuple[str, ...], tuple[str, ...], str], Mapping[str, int]]


class Chunk(list[bytes]):
    """One request's events for one destination and role: the bytes to send, in order, and in
    `meta` each one's messageId, type and name. Filled by `prepare()`, read-only once submitted."""

    __slots__ = ("itemized", "meta")

    def __init__(self) -> None:
        super().__init__()
        self.meta: list[str] = []  # event i: meta[3i] messageId, meta[3i + 1] type, meta[3i + 2] name
        self.itemized = False  # built with add(): `Submission.routed` does not describe it

    @property
    def events(self) -> list[bytes]:
        return self

    @property
    def message_ids(self) -> list[str]:
        return self.meta[0::3]

    @property
    def types(self) -> list[str]:
        return self.meta[1::3]

    @property
    def names(self) -> list[str]:
        return self.meta[2::3]

    def add(self, data: bytes, message_id: str, event_type: str, name: str) -> None:
        """Off the hot path (prepare() appends inline); for building chunks elsewhere."""
        self.itemized = True
        self.append(data)
        self.meta += (message_id, event_type, name)

    def __repr__(self) -> str:
        return f"Chunk({len(self)} events)"


@dataclass(frozen=True, slots=True)
class Rejection:
    """An event of the request that no destination gets, and why; the client sees it in `rejected`."""

    index: int  # in the request's batch
    code: str  # e.g. no_user_anon_id, event_too_large; a metric label
    message: str

    def as_json(self) -> dict[str, Any]:
        return {"index": self.index, "code": self.code, "message": self.message}


@quick_init
@dataclass(frozen=True, slots=True)
class Submission:
    """One request's events on their way to the spools: built once by `prepare()`, then only read."""

    source: Source
    presented_key: str  # the client's write key: a secret (never in the repr), passed on where a destination has no own credential
    forwarded_for: str | None  # X-Forwarded-For for the destinations
    primary: Mapping[str, Chunk]  # destination -> events; all must be spooled before the client hears 200
    mirror: Mapping[str, Chunk]  # destination -> events; copies, dropped (and counted) when their spool cannot take them
    rejected: tuple[Rejection, ...] = ()
    routed: Routed | None = None  # prepare()'s counts of the events filed, for the delivery ledger (None: count the chunks)

    def __repr__(self) -> str:  # the source by name: its repr lists its write keys
        return (f"Submission(source={self.source.name!r}, forwarded_for={self.forwarded_for!r}, primary={dict(self.primary)!r}, "
                f"mirror={dict(self.mirror)!r}, rejected={len(self.rejected)})")


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a request's events were taken: `ok`, or the status the client should see."""

    ok: bool
    status: int = 200
    code: str = ""
    message: str = ""
    retry_after: float | None = None
    dropped_mirrors: frozenset[str] = frozenset()  # mirror destinations whose copies were dropped (spool full or failing)


OK = Outcome(True)
