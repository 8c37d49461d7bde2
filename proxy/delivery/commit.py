"""Group commit across spools: one fsync round, in one worker-thread hop, for every request waiting.

A request routed to two destinations has appended to two spools; it may be answered once both
are on stable storage. Concurrent requests share the rounds: while one round syncs, the next one
gathers everything appended meanwhile, whatever the spool. So durability costs one thread hop and
one fsync per dirty file per round, not per request or per spool, and a request waits on a single
future rather than one per destination.

The durability mode is a parameter of this step (`--durability`), not a second spool:
- `fsync` (`interval=None`): `wait` returns once a round has fsynced the request's records.
- `interval`: `wait` returns at once (write() has returned: the kernel has the records, and a crash
  or SIGKILL of splitter alone loses nothing, the page cache outlives the process); a round runs
  every `interval` seconds while anything is unsynced, at once when a segment is sealed (`soon`),
  and at shutdown (`idle`). A kernel crash or power loss can lose at most the last interval.
Rounds never overlap (one lock): a round closes sealed descriptors another round may be syncing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from proxy.log import get_logger

log = get_logger("splitter.spool")


class Syncable(Protocol):
    committed: int  # tickets up to this one are on stable storage
    appended: int  # the last ticket handed out

    # `dirty` is whatever the Syncable's own take_dirty returned, opaque here: Any, so that an
    # implementation may name its own type.
    def take_dirty(self) -> Any:
        """What must be synced to cover `appended` (taken: the next round starts clean)."""

    def sync(self, dirty: Any) -> None:
        """fsync what `take_dirty` returned (and close what it handed over to be closed); runs in a worker thread."""

    def sync_failed(self, dirty: Any) -> None:
        """The round that took `dirty` failed; called in the event loop before its requests hear of it."""


Tickets = Sequence[tuple[Syncable, int]]


class GroupCommit:
    def __init__(self, interval: float | None = None, on_round: Callable[[], None] | None = None) -> None:
        self.interval = interval  # None: the `fsync` mode; else `interval`'s seconds between rounds
        self._on_round = on_round  # called after every successful round (splitter_spool_syncs_total)
        self._waiting: list[tuple[Tickets, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._unsynced: dict[int, Syncable] = {}  # `interval`: spools written since the last round
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    async def wait(self, tickets: Tickets) -> None:
        """Return once every (spool, ticket) is on stable storage (`fsync`) or written (`interval`);
        raises the OSError of a failed sync (`fsync` only: in `interval` the answer does not wait for it)."""
        pending = [(spool, ticket) for spool, ticket in tickets if ticket > spool.committed]
        if not pending:
            return
        if self.interval is not None:
            for spool, _ in pending:
                self._unsynced[id(spool)] = spool
            if self._task is None or self._task.done():
                self._task = asyncio.ensure_future(self._ticks(self.interval))
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((pending, future))
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._rounds())
        await future

    def soon(self, spool: Syncable) -> None:
        """`spool` sealed a segment: in `interval`, sync it now rather than at the next tick."""
        if self.interval is not None and spool.appended > spool.committed:
            self._unsynced[id(spool)] = spool
            self._wake.set()
            if self._task is None or self._task.done():
                self._task = asyncio.ensure_future(self._ticks(self.interval))

    async def idle(self) -> None:
        """Wait for the round in progress, if any (before closing the files it syncs); in `interval`,
        also sync now what is unsynced (the shutdown's round)."""
        if self.interval is not None:
            self._wake.set()
            await self._sync_unsynced()
        elif self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _ticks(self, interval: float) -> None:
        while self._unsynced:
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
            except TimeoutError:
                pass
            self._wake.clear()
            await self._sync_unsynced()

    async def _sync_unsynced(self) -> None:
        async with self._lock:
            spools, self._unsynced = list(self._unsynced.values()), {}
            if not spools:
                return
            plan = [(spool, spool.appended, spool.take_dirty()) for spool in spools]
            try:
                await asyncio.to_thread(_sync_all, plan)
            except Exception as exc:  # no request waits on it: each spool seals its segment and says so
                for spool, _, dirty in plan:
                    spool.sync_failed(dirty)
                log.error("spool_sync_failed", error=str(exc), durability="interval")
                return
            for spool, target, _ in plan:
                spool.committed = max(spool.committed, target)
            if self._on_round is not None:
                self._on_round()

    async def _rounds(self) -> None:
        while self._waiting:
            spools = {id(spool): spool for pending, _ in self._waiting for spool, _ in pending}.values()
            plan = [(spool, spool.appended, spool.take_dirty()) for spool in spools]
            try:
                async with self._lock:
                    await asyncio.to_thread(_sync_all, plan)
            except Exception as exc:
                # Every request waiting fails, not only those of this round: a request that appended
                # meanwhile may sit behind a hole the failed fsync left in the same file.
                for spool, _, dirty in plan:
                    spool.sync_failed(dirty)
                waiting, self._waiting = self._waiting, []
                for _, future in waiting:
                    if not future.done():
                        future.set_exception(exc)
                return
            for spool, target, _ in plan:
                spool.committed = max(spool.committed, target)
            if self._on_round is not None:
                self._on_round()
            still = []
            for pending, future in self._waiting:
                if all(ticket <= spool.committed for spool, ticket in pending):
                    if not future.done():
                        future.set_result(None)
                else:
                    still.append((pending, future))
            self._waiting = still


def _sync_all(plan: list[tuple[Syncable, int, Any]]) -> None:
    """Every spool's sync runs even after one failed (each also closes the sealed descriptors handed
    to it); the round fails with the first error."""
    failure: BaseException | None = None
    for spool, _, dirty in plan:
        try:
            spool.sync(dirty)
        except Exception as exc:
            failure = failure or exc
    if failure is not None:
        raise failure
