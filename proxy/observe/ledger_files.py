"""The ledger on disk: one snapshot per spool in the state directory, loaded at start, merged for reading.

A ledger accounts for one spool: its pending counts are that spool's records. So its file is named
after the spool (proxy/observe/files.py `process_file`): `ledger.json` for a single process's spool,
`ledger.worker-<i>.json` for worker i's under `serve --workers N`, which the drainer that later
empties that spool (N was lowered) also loads and goes on writing. The spool's lock makes each file
have one writer.

`LedgerKeeper` writes the file whole or not at all (files.py): right after a start has reconciled
the ledger with the spools (so the file never describes an earlier run than the spools on disk),
then every `interval` seconds while counts change (nothing while idle), and at the stop, marked
`clean`. The serialising is done on the event loop (a consistent copy), the fsync in a thread.

What "since start" means across restarts: the counts go on from the snapshot, so they are since the
ledger began on this state directory (`since`, the first start's time); `restarts` and
`unclean_restarts` say how many starts came after it, and how many of those followed a crash.
After a crash the last interval's counts may be missing: ledger.py says how `recovered()` keeps
every row's pending exact and accepted = delivered + dead-lettered + unrecorded + pending anyway.

Readers: `ledger_document()` answers `/admin/ledger`. A single process: its live ledger, merged
with any other ledger file in the state directory (an earlier `--workers N` run's, say). The
supervisor of `--workers N`: every worker's file, each as old as its last write, at most `interval`
seconds while it is busy (each process's `age_seconds` says how old).

With a `Tier` (the rules name a `dedup.store`, proxy/observe/tier.py), each snapshot is also
published there every interval (only a refresh of the published one while nothing changed), and
`ledger_document()` adds every other replica's published snapshots, saying in `tier` which answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from proxy.log import LogThrottle, get_logger
from proxy.observe.files import process_file, read_process_files, write_atomically
from proxy.observe.ledger import FORMAT, Ledger
from proxy.observe.ledger_view import merge, view_of
from proxy.observe.tier_views import finished, gathered_views, tier_read

if TYPE_CHECKING:  # the CLIs read the files through this module: no redis (nor metrics) for them
    from proxy.observe.tier import Tier

log = get_logger("splitter.ledger")
KIND = "ledger"
NOT_ONE = f"not a ledger snapshot of format {FORMAT}"
SNAPSHOT_INTERVAL = 5.0  # seconds between snapshots while counts change


class LedgerKeeper:
    def __init__(self, state_dir: str | Path, process: str | None, *, interval: float = SNAPSHOT_INTERVAL, ledger: Ledger | None = None,
                 tier: Tier | None = None) -> None:
        """`process`: the spool's name among the state directory's ledgers (None: a single process's)."""
        self.tier = tier
        self.state_dir = Path(state_dir)
        self.process = process
        self.path = process_file(self.state_dir, KIND, process)
        self.interval = interval
        self.ledger = ledger or Ledger()
        self._written = -1  # `ledger.changes` when the file was last written
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._log = LogThrottle()

    def load(self) -> None:
        """The previous run's counts, if its file is there; one that cannot be read is moved aside (logged)."""
        try:
            data = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, orjson.JSONDecodeError) as exc:
            self._set_aside(str(exc))
            return
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            self._set_aside(f"not a ledger snapshot of format {FORMAT}")
            return
        try:
            self.ledger.load(data)
        except (TypeError, ValueError, AttributeError) as exc:
            self.ledger = Ledger(max_names=self.ledger.names.cap, fanout_cap=self.ledger.fanout.cap, clock=self.ledger.clock)
            self._set_aside(f"damaged: {exc!r}")
            return
        self.ledger.restarts += 1
        if not data.get("clean"):
            self.ledger.unclean_restarts += 1

    def _set_aside(self, why: str) -> None:
        aside = self.path.with_name(self.path.name + ".unreadable")
        with contextlib.suppress(OSError):
            os.replace(self.path, aside)
        log.error("ledger_unreadable", path=str(self.path), error=why, moved_to=str(aside), hint="the ledger starts from zero")

    def start(self) -> None:
        """Once the spools are recovered (delivery calls it): settle the restored fan-out entries,
        write the reconciled ledger, and snapshot it every `interval` from now on."""
        self.ledger.fanout.resolve()
        self._write_now(clean=False)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ledger-snapshots")

    async def stop(self) -> None:
        """The last snapshot, marked clean: delivery has stopped, so nothing counts after it."""
        self._stop.set()
        if self._task is not None:
            await self._task
        payload = await self._write(clean=True)
        if self.tier is not None and self.tier.answering:  # a store that is away does not hold up the stop
            await self.publish(payload)

    async def _run(self) -> None:
        await self.publish(None)  # the snapshot start() just wrote: a new replica is in the tier view from its start
        while not self._stop.is_set():
            period = self.tier.period(self.interval) if self.tier is not None and self.tier.active else self.interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), period)
            if self._stop.is_set():
                break
            payload = await self._write(clean=False) if self.ledger.changes != self._written else None
            await self.publish(payload)

    async def publish(self, payload: bytes | None) -> bool:
        """Publish the snapshot just written (`payload`), else refresh the one published, when the rules name a store;
        False when they do not or it did not answer."""
        if self.tier is None:
            return False
        return await self.tier.publish(KIND, self.process, payload if payload is not None else self._current, self.tier.period(self.interval))

    def _current(self) -> bytes:
        return orjson.dumps(self.snapshot())

    def snapshot(self, *, clean: bool = False) -> dict[str, Any]:
        return {**self.ledger.to_json(), "process": self.process, "pid": os.getpid(), "written_at": time.time(), "clean": clean}

    def _write_now(self, clean: bool) -> None:
        changes = self.ledger.changes
        try:
            write_atomically(self.path, orjson.dumps(self.snapshot(clean=clean)))
        except OSError as exc:
            self._failed(exc)
            return
        self._written = changes

    async def _write(self, clean: bool) -> bytes:
        """Write the file; the snapshot (also when the disk refused it: the tier may still have it)."""
        async with self._lock:  # one write at a time: two would race to rename over the file
            changes = self.ledger.changes
            payload = orjson.dumps(self.snapshot(clean=clean))
            try:
                await asyncio.to_thread(write_atomically, self.path, payload)
            except OSError as exc:
                self._failed(exc)
                return payload
            self._written = changes
            return payload

    def _failed(self, exc: OSError) -> None:
        if (suppressed := self._log.allow("write")) is not None:
            log.error("ledger_snapshot_failed", path=str(self.path), error=str(exc), suppressed=suppressed,
                      hint="the counts go on in memory; the next snapshot tries again")



async def ledger_document(state_dir: str | Path, keeper: LedgerKeeper | None = None, *, hourly: bool = False,
                          tier: Tier | None = None) -> dict[str, Any]:
    """What `/admin/ledger` answers: this process's live ledger (`keeper`, when it delivers), merged
    with every other ledger file in the state directory (a supervisor: its workers' files); with a
    `tier` whose store answers, also every other replica's published snapshots."""
    now = time.time()
    own = keeper.path if keeper is not None else None
    read, tier_snapshots = await asyncio.gather(asyncio.to_thread(read_files, Path(state_dir), own), tier_read(tier, KIND))
    live = [view_of({**keeper.snapshot(), "live": True}, now, hourly=hourly, fanout_rows=keeper.ledger.fanout.rows())] if keeper is not None else []
    views, unreadable = gathered_views(live, read, tier_snapshots, now, lambda snapshot: view_of(snapshot, now, hourly=hourly), _is_snapshot, NOT_ONE)
    return finished(merge(views), tier_snapshots, unreadable)


def _is_snapshot(snapshot: dict[str, Any]) -> bool:
    return snapshot.get("format") == FORMAT


def read_files(state_dir: Path, own: Path | None = None) -> list[tuple[Path, dict[str, Any] | str]]:
    """Each ledger file's snapshot in `state_dir` (but `own`), or why it cannot be used."""
    return read_process_files(state_dir, KIND, own, _is_snapshot, NOT_ONE)
