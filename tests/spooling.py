"""What the spool tests do with a request's events: encode one record, write it, wait for its fsync;
and one sync round run by hand, as the group commit runs it.

Production does the same in `Delivery.accept` (one `frame` per destination, `Spool.write`, one
group-commit wait for all of a request's tickets); these two keep the tests short without giving
`Spool` methods only tests call.
"""

from __future__ import annotations

import time

from proxy.delivery.spool import Spool
from proxy.delivery.spool_format import frame


def write_request(spool: Spool, credential: str, forwarded_for: str | None, events: list[bytes]) -> int:
    """Spool one request's `events` as one record; returns its commit ticket."""
    return spool.write(frame(time.time(), credential, forwarded_for, events))


async def synced(spool: Spool, ticket: int) -> None:
    """Return once everything written up to `ticket` is on stable storage."""
    await spool.group.wait(((spool, ticket),))


def sync_round(spool: Spool) -> None:
    """One whole sync round, as `GroupCommit` runs it (in this thread): take, sync, close, release."""
    dirty = spool.take_dirty()
    try:
        spool.sync(dirty)
    finally:
        spool.close_sealed(dirty)
        spool.release(dirty)
