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

In `fsync`, up to `ROUNDS_IN_FLIGHT` rounds run at once: a request that arrives while a round syncs
starts the next one at once instead of waiting for it to end and then for a whole round of its own
(at half load on batches, that wait was most of the p99: 26-28 ms serial, 7-9 ms overlapped). Rounds
settle in the order they started: a round's requests hear success only once every earlier round has
synced, because its own fsyncs cover only the descriptors dirtied since the round before took its own
(a segment sealed in between is synced by that earlier round alone). A failed round fails every round
still in flight after it and every request waiting, as one serial round did: their records may sit
behind the hole the failure left. A sealed descriptor is closed only by a round that started after
every round using it was over (`release`), never under a running fsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.log import get_logger

log = get_logger("splitter.spool")
ROUNDS_IN_FLIGHT = 2  # `fsync`: rounds syncing at once (2 measured as well as 4 at half load, with fewer fsyncs)


class Syncable(Protocol):
    committed: int  # tickets up to this one are on stable storage
    appended: int  # the last ticket handed out

    # `dirty` is whatever the Syncable's own take_dirty returned, opaque here: Any, so that an
    # implementation may name its own type.
    def take_dirty(self) -> Any:
        """What must be synced to cover `appended` (taken: the next round starts clean)."""

    def sync(self, dirty: Any) -> None:
        """fsync what `take_dirty` returned; runs in a worker thread."""

    def close_sealed(self, dirty: Any) -> None:
        """Close the sealed descriptors `take_dirty` handed over (no round uses them); runs in the round's
        worker thread once its requests have their answer, whatever the fsyncs said."""

    def sync_failed(self, dirty: Any) -> None:
        """The round that took `dirty` failed; called in the event loop before its requests hear of it."""

    def release(self, dirty: Any) -> None:
        """The round that took `dirty` is over, whichever way; called in the event loop (a later round
        may now close the sealed descriptors it was syncing)."""


Tickets = Sequence[tuple[Syncable, int]]
Waiting = list[tuple[Tickets, "asyncio.Future[None]"]]


@dataclass(eq=False)
class _Round:
    """One `fsync` round: what it syncs (spool, the ticket it covers, what it took) and who waits on it."""

    plan: list[tuple[Syncable, int, Any]]
    requests: Waiting
    synced: asyncio.Future[BaseException | None]  # its fsyncs' outcome, from its thread
    finished: bool = False
    error: BaseException | None = None  # its own sync's failure
    behind: BaseException | None = None  # an earlier or overlapping round's failure, which fails this one too
    overlapped: list[_Round] = field(default_factory=list, repr=False)  # rounds whose fsyncs ran beside its own


class GroupCommit:
    def __init__(self, interval: float | None = None, on_round: Callable[[], None] | None = None) -> None:
        self.interval = interval  # None: the `fsync` mode; else `interval`'s seconds between rounds
        self._on_round = on_round  # called after every successful round (splitter_spool_syncs_total)
        self._waiting: Waiting = []  # `fsync`: requests no round has taken yet
        self._rounds: deque[_Round] = deque()  # `fsync`: rounds started and not yet settled, oldest first
        self._threads: set[asyncio.Future[None]] = set()  # `fsync`: rounds' thread work, closes included
        self._task: asyncio.Task[None] | None = None  # `interval`: the ticking task
        self._unsynced: dict[int, Syncable] = {}  # `interval`: spools written since the last round
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    async def wait(self, tickets: Tickets) -> None:
        """Return once every (spool, ticket) is on stable storage (`fsync`) or written (`interval`);
        raises the OSError of a failed sync (`fsync` only: in `interval` the answer does not wait for it)."""
        waiting = self.commit(tickets)
        if waiting is not None:
            await waiting

    def commit(self, tickets: Tickets) -> asyncio.Future[None] | None:
        """`wait` without a coroutine for the request path: None when there is nothing to wait for
        (`interval`, or already synced), else the future to await."""
        pending = [(spool, ticket) for spool, ticket in tickets if ticket > spool.committed]
        if not pending:
            return None
        if self.interval is not None:
            for spool, _ in pending:
                self._unsynced[id(spool)] = spool
            if self._task is None or self._task.done():
                self._task = asyncio.ensure_future(self._ticks(self.interval))
            return None
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((pending, future))
        self._start_round()
        return future

    def soon(self, spool: Syncable) -> None:
        """`spool` sealed a segment: in `interval`, sync it now rather than at the next tick."""
        if self.interval is not None and spool.appended > spool.committed:
            self._unsynced[id(spool)] = spool
            self._wake.set()
            if self._task is None or self._task.done():
                self._task = asyncio.ensure_future(self._ticks(self.interval))

    async def idle(self) -> None:
        """Wait for the rounds in progress, if any (before closing the files they sync); in `interval`,
        also sync now what is unsynced (the shutdown's round)."""
        if self.interval is not None:
            self._wake.set()
            await self._sync_unsynced()
        else:
            while self._rounds or self._threads:  # settling one may start another, for requests that waited
                await asyncio.gather(*(r.synced for r in self._rounds), *self._threads, return_exceptions=True)
                await asyncio.sleep(0)  # the rounds' settling callbacks

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
                await asyncio.to_thread(_round, plan, None)
            except Exception as exc:  # no request waits on it: each spool seals its segment and says so
                for spool, _, dirty in plan:
                    spool.sync_failed(dirty)
                log.error("spool_sync_failed", error=str(exc), durability="interval")
                return
            finally:
                for spool, _, dirty in plan:
                    spool.release(dirty)
            for spool, target, _ in plan:
                spool.committed = max(spool.committed, target)
            if self._on_round is not None:
                self._on_round()

    def _start_round(self) -> None:
        """`fsync`: a round for every request waiting, unless `ROUNDS_IN_FLIGHT` are not settled yet
        (then the first to settle starts it, for everyone who waited meanwhile).

        The round is a thread's work and two futures, no task: nothing can cancel it halfway (a task
        is cancelled at the loop's teardown), so its descriptors are released only once its thread
        has reported, and it always settles. The thread reports its fsyncs' outcome before it
        closes the descriptors it was handed: closing the last descriptor of a delivered, unlinked
        segment frees its blocks on the spot (ext4: tens of ms), which no answer waits for."""
        if not self._waiting or len(self._rounds) >= ROUNDS_IN_FLIGHT:
            return
        loop = asyncio.get_running_loop()
        requests, self._waiting = self._waiting, []
        spools = {id(spool): spool for pending, _ in requests for spool, _ in pending}.values()
        one = _Round([(spool, spool.appended, spool.take_dirty()) for spool in spools], requests, loop.create_future())
        for running in self._rounds:
            if not running.finished:  # their fsyncs and this one's run at once
                running.overlapped.append(one)
                one.overlapped.append(running)
        self._rounds.append(one)

        def report(error: BaseException | None) -> None:  # in the worker thread
            with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nobody is waiting
                loop.call_soon_threadsafe(_set_result, one.synced, error)

        one.synced.add_done_callback(lambda done: self._finished(one, done.result()))
        try:
            work = loop.run_in_executor(None, _round, one.plan, report)
        except RuntimeError as exc:  # the executor is shut down (the process is stopping)
            _set_result(one.synced, OSError(errno.ECANCELED, f"no thread left to sync the spool: {exc}"))
            return
        self._threads.add(work)  # until its closes are done too (`idle` waits for them)
        work.add_done_callback(self._threads.discard)
        work.add_done_callback(lambda done: _set_result(one.synced, _ended_silently(done)))  # never waits forever

    def _finished(self, one: _Round, error: BaseException | None) -> None:
        one.finished, one.error = True, error
        self._settle()
        self._start_round()

    def _settle(self) -> None:
        """Answer the requests of finished rounds, in the order the rounds started.

        Rounds that ran at once fail together: Linux reports a writeback error to one fsync of an open
        file only, so when two rounds fsync the same descriptor at once, the error of the first one's
        records may be returned to the second. A round is therefore answered only once every round
        that ran beside it is over, and fails if any of them failed."""
        while self._rounds and self._rounds[0].finished and all(other.finished for other in self._rounds[0].overlapped):
            one = self._rounds.popleft()
            for spool, _, dirty in one.plan:
                spool.release(dirty)
            if one.error is not None:
                # Every request waiting or in a later round fails, not only this round's: one that
                # appended meanwhile may sit behind a hole the failed fsync left in the same file.
                for spool, _, dirty in one.plan:
                    spool.sync_failed(dirty)
                for later in self._rounds:
                    later.behind = later.behind or one.error
                waiting, self._waiting = self._waiting, []
                _fail(one.requests + waiting, one.error)
                continue
            error = one.behind or next((other.error for other in one.overlapped if other.error is not None), None)
            if error is not None:
                _fail(one.requests, error)
                continue
            for spool, target, _ in one.plan:
                spool.committed = max(spool.committed, target)
            if self._on_round is not None:
                self._on_round()
            for _, future in one.requests:
                if not future.done():
                    future.set_result(None)


def _fail(requests: Waiting, error: BaseException) -> None:
    for _, future in requests:
        if future.done():
            continue
        if isinstance(error, Exception):
            future.set_exception(error)
        else:
            future.cancel()


def _round(plan: list[tuple[Syncable, int, Any]], report: Callable[[BaseException | None], None] | None) -> None:
    """A round's work in its worker thread. Every spool's sync runs even after one failed; the round
    fails with the first error, reported to `report` (or raised, without one) before the sealed
    descriptors are closed, which happens either way (nobody else would ever close them)."""
    failure: BaseException | None = None
    for spool, _, dirty in plan:
        try:
            spool.sync(dirty)
        except Exception as exc:
            failure = failure or exc
    if report is not None:
        report(failure)
    for spool, _, dirty in plan:
        spool.close_sealed(dirty)
    if failure is not None and report is None:
        raise failure


def _ended_silently(work: asyncio.Future[None]) -> BaseException:
    """Why a round's thread ended without reporting (it always reports first, so this only answers
    the requests if that ever breaks)."""
    if work.cancelled():
        return asyncio.CancelledError()
    return work.exception() or RuntimeError("the sync round's thread ended without reporting")


def _set_result(future: asyncio.Future[BaseException | None], error: BaseException | None) -> None:
    if not future.done():
        future.set_result(error)
