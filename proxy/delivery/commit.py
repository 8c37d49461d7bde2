"""Group commit across spools: one fsync round, in one worker-thread hop, for every request waiting.

A request routed to two destinations has appended to two spools; it may be answered once both
are on stable storage. Concurrent requests share the rounds: while one round syncs, the next one
gathers everything appended meanwhile, whatever the spool. So durability costs one thread hop and
one fsync per dirty file per round, not per request or per spool, and a request waits on a single
future rather than one per destination.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol


class Syncable(Protocol):
    committed: int  # tickets up to this one are on stable storage
    appended: int  # the last ticket handed out

    # `dirty` is whatever the Syncable's own take_dirty returned, opaque here: Any, so that an
    # implementation may name its own type.
    def take_dirty(self) -> Any:
        """What must be synced to cover `appended` (taken: the next round starts clean)."""

    def sync(self, dirty: Any) -> None:
        """fsync what `take_dirty` returned; runs in a worker thread."""

    def sync_failed(self, dirty: Any) -> None:
        """The round that took `dirty` failed; called in the event loop before its requests hear of it."""


Tickets = Sequence[tuple[Syncable, int]]


class GroupCommit:
    def __init__(self) -> None:
        self._waiting: list[tuple[Tickets, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def wait(self, tickets: Tickets) -> None:
        """Return once every (spool, ticket) is on stable storage; raises the OSError of a failed sync."""
        pending = [(spool, ticket) for spool, ticket in tickets if ticket > spool.committed]
        if not pending:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((pending, future))
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._rounds())
        await future

    async def idle(self) -> None:
        """Wait for the round in progress, if any (before closing the files it syncs)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _rounds(self) -> None:
        while self._waiting:
            spools = {id(spool): spool for pending, _ in self._waiting for spool, _ in pending}.values()
            plan = [(spool, spool.appended, spool.take_dirty()) for spool in spools]
            try:
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
            still = []
            for pending, future in self._waiting:
                if all(ticket <= spool.committed for spool, ticket in pending):
                    if not future.done():
                        future.set_result(None)
                else:
                    still.append((pending, future))
            self._waiting = still


def _sync_all(plan: list[tuple[Syncable, int, Any]]) -> None:
    for spool, _, dirty in plan:
        spool.sync(dirty)
