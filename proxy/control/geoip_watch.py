"""Reload the GeoIP database (`serve --geoip-db`) when its file is replaced, keeping the old one on a bad file.

geoipupdate replaces the file about twice a week, by writing a temporary file and renaming it over
the old one; a Kubernetes volume filled by a geoipupdate sidecar does the same. So the file's
identity (device, inode, size, mtime, symlinks followed) is polled every `interval`, a cheap
`stat()` instead of hashing tens of megabytes. A change is acted on once two looks a short debounce
apart agree (a file still being written in place is not read half way), then the new file is read
and checked in a thread and swapped in whole (`GeoIP.swap`): the next request looks up in it, with
a fresh cache. A file that cannot be used is logged (`geoip_reload_failed`, naming the path and
why) and counted once (`splitter_geoip_reloads_total{result="error"}`); the database already in use
keeps serving, and the file is looked at again when it changes again. A file that disappears is
logged and counted the same way, once.

Each process that serves requests watches for itself: with `--workers N`, every worker reloads its
own copy and counts its own reloads (the counter is their sum).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from proxy.background import BackgroundTask
from proxy.geoip import CountryDB, FileIdentity, GeoIP, GeoIPError, file_identity, open_country_db
from proxy.log import get_logger
from proxy.metrics import GEOIP_RELOAD_RESULTS, Metrics

log = get_logger(__name__)


def described(db: CountryDB) -> dict[str, object]:
    """Log fields for an opened database: its path, type and build time."""
    info = db.description
    return {"path": info.path, "database_type": info.database_type,
            "built": datetime.fromtimestamp(info.build_epoch, UTC).isoformat().replace("+00:00", "Z")}


class GeoIPWatcher:
    """Swaps a new database into `geoip` whenever `geoip`'s file is replaced; never dies of an error."""

    def __init__(self, geoip: GeoIP, metrics: Metrics, interval: float = 1.0) -> None:
        self._geoip = geoip
        self._metrics = metrics
        self._path = geoip.current.description.path
        self._interval = interval
        self._debounce = min(interval / 2, 0.5)
        self._seen: FileIdentity | None = geoip.current.identity  # the file as the database in use was read
        self._background = BackgroundTask(self._run, "geoip-watcher")
        for result in GEOIP_RELOAD_RESULTS:
            metrics.geoip_reloads.labels(result)
        metrics.geoip_build_timestamp.set(geoip.current.description.build_epoch)

    def start(self) -> None:
        self._background.start()

    async def stop(self) -> None:
        await self._background.stop()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check()
            except Exception:
                log.exception("geoip_watch_failed", path=self._path)

    async def check(self) -> None:
        """One poll: if the file was replaced and holds still for the debounce, reload it."""
        identity = await self._identity()
        if identity is None or identity == self._seen:
            return
        await asyncio.sleep(self._debounce)
        if await self._identity() != identity:
            return  # still being written: the next poll looks again
        self._seen = identity
        try:
            db = await asyncio.to_thread(open_country_db, self._path)
        except GeoIPError as exc:
            self._failed(str(exc))
            return
        old = self._geoip.swap(db)
        old.close()  # on the event loop, like every lookup: none is half way through it
        self._metrics.geoip_reloads.labels("success").inc()
        self._metrics.geoip_build_timestamp.set(db.description.build_epoch)
        log.info("geoip_reloaded", **described(db), previous_built=described(old)["built"])

    async def _identity(self) -> FileIdentity | None:
        """The file's identity now; None (logged and counted once) while it cannot be read."""
        try:
            return await asyncio.to_thread(file_identity, self._path)
        except OSError as exc:
            if self._seen is not None:  # once per disappearance, not once per poll
                self._seen = None
                self._failed(f"{self._path}: cannot read the GeoIP database: {exc.strerror or exc}")
            return None

    def _failed(self, error: str) -> None:
        self._metrics.geoip_reloads.labels("error").inc()
        log.error("geoip_reload_failed", path=self._path, error=error, serving=described(self._geoip.current))
