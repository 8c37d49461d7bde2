"""The event catalog on disk and on the admin port.

Each serving process (a single `serve`, or each worker of `serve --workers N`) keeps its catalog in
memory and owns one file in the state directory: `catalog.json`, or `catalog.worker-<i>.json`
(proxy/observe/files.py names them). `CatalogKeeper` loads that file at start, so a restart goes on
counting where the process stopped, and writes it atomically every `catalog.snapshot_interval`
(when anything changed) and once more at shutdown, after the last request. A crash loses at most
one interval of counts; a file that cannot be read is moved aside (`.damaged`) and logged, and the
process starts an empty catalog rather than not starting.

`catalog_document()` is what `/admin/catalog` answers: the process's live catalog, if it serves,
merged with every other process file in the state directory. For a supervisor, which serves no
events, that is its workers' files, each as fresh as its last write (at most one snapshot
interval old; each process's `written_at` is in the answer). For a single process, files other
than its own are what an earlier `--workers N` run left: history, still counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from proxy.background import BackgroundTask
from proxy.log import get_logger
from proxy.observe.catalog import Catalog
from proxy.observe.catalog_view import View, merge_views, only_source, view_of, when
from proxy.observe.files import process_file, read_process_files, write_atomically
from proxy.observe.tier_views import finished, gathered_views, tier_read

if TYPE_CHECKING:  # the CLIs read the files through this module: no redis (nor metrics) for them
    from proxy.observe.tier import Tier

log = get_logger("splitter.catalog")
KIND = "catalog"
NOT_ONE = "not a catalog snapshot"


class CatalogKeeper:
    """A serving process's catalog and its file: loaded at start, written periodically and at stop."""

    def __init__(self, catalog: Catalog, state_dir: str | Path, process: str | None, interval: Callable[[], float],
                 tier: Tier | None = None) -> None:
        self.catalog = catalog
        self.tier = tier
        self.state_dir = Path(state_dir)
        self.process = process
        self.path = process_file(self.state_dir, KIND, process)
        self._interval = interval  # read before each wait: a reload may change it
        self._task = BackgroundTask(self._run, "catalog-snapshots")
        self._written = False  # once by this process: a start writes the file it loaded (or an empty one) at the first interval

    def load(self) -> None:
        """At start-up, before the first request: this process's catalog as it last wrote it."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("catalog_unreadable", file=str(self.path), error=exc.strerror or str(exc), hint="starting an empty catalog")
            return
        try:
            self.catalog.load(orjson.loads(data))
        except (orjson.JSONDecodeError, ValueError) as exc:
            aside = self.path.with_name(self.path.name + ".damaged")
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            log.error("catalog_unreadable", file=str(self.path), moved_to=str(aside), error=str(exc), hint="starting an empty catalog")

    def start(self) -> None:
        self._task.start()

    async def stop(self) -> None:
        """Stop the periodic writes and write once more: called once no request is left to count."""
        await self._task.stop()
        payload = await self.write()
        if self.tier is not None and self.tier.answering:  # a store that is away does not hold up the stop
            await self.publish(payload)

    async def write(self) -> bytes | None:
        """Write the file if the catalog changed (or was never written by this process); the snapshot written, else None."""
        if not self.catalog.changed and self._written:
            return None
        self.catalog.changed, self._written = False, True
        payload = orjson.dumps(self.catalog.snapshot(self.process))
        try:
            await asyncio.to_thread(write_atomically, self.path, payload)
        except OSError as exc:
            self.catalog.changed = True  # try again at the next interval
            log.warning("catalog_snapshot_failed", file=str(self.path), error=exc.strerror or str(exc))
        return payload

    async def publish(self, payload: bytes | None) -> bool:
        """Publish the snapshot just written (`payload`), else refresh the one published, when the rules name a store;
        False when they do not or it did not answer."""
        if self.tier is None:
            return False
        return await self.tier.publish(KIND, self.process, payload if payload is not None else self._current, self.tier.period(self._interval()))

    def _current(self) -> bytes:
        return orjson.dumps(self.catalog.snapshot(self.process))

    def _period(self) -> float:
        return self.tier.period(self._interval()) if self.tier is not None and self.tier.active else self._interval()

    async def _run(self) -> None:
        if self.tier is not None and self.tier.active:  # at once: a new replica is in the tier view from its start
            await self.publish(await self.write())
        while True:
            await asyncio.sleep(self._period())
            await self.publish(await self.write())


async def catalog_document(state_dir: str | Path, keeper: CatalogKeeper | None = None, source: str | None = None,
                           tier: Tier | None = None) -> View:
    """What `/admin/catalog` answers: the live catalog (if this process serves) and every other process file, merged;
    with a `tier` whose store answers, also every other replica's published snapshots."""
    now = time.time()
    read, tier_snapshots = await asyncio.gather(asyncio.to_thread(_read_all, Path(state_dir), keeper.path if keeper is not None else None),
                                                tier_read(tier, KIND))
    own = [view_of(keeper.catalog.snapshot(keeper.process, now), now, live=True)] if keeper is not None else []
    views, unreadable = gathered_views(own, read, tier_snapshots, now, lambda snapshot: view_of(snapshot, now), _is_snapshot, NOT_ONE)
    document = merge_views(views)
    document["generated_at"] = when(now)
    finished(document, tier_snapshots, unreadable)
    return only_source(document, source) if source is not None else document


def _is_snapshot(snapshot: dict[str, Any]) -> bool:
    return snapshot.get("kind") == "splitter-catalog"


def _read_all(state_dir: Path, own: Path | None) -> list[tuple[Path, dict[str, Any] | str]]:
    """Each other process file's snapshot, or why it cannot be used."""
    return read_process_files(state_dir, KIND, own, _is_snapshot, NOT_ONE)
