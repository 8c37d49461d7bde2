"""Notice when the rules file's content changes, by polling its sha256.

Polling the *content* rather than inotify or mtime is what catches a Kubernetes ConfigMap update:
kubelet writes the new files into a fresh `..2026_...` directory and atomically swaps the `..data`
symlink, so the path we were given is never written in place and its own mtime never moves. `open()`
follows the links, so hashing what it reads sees the swap. A change is acted on only once two reads a
short debounce apart agree, so an editor saving in several writes triggers one reload, not a burst.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable

from proxy.background import BackgroundTask
from proxy.log import get_logger

log = get_logger(__name__)


class RulesWatcher:
    """Calls `on_change()` once per stable change of the file at `path`; never dies of an error."""

    def __init__(
        self, path: str, on_change: Callable[[], Awaitable[object]], interval: float = 1.0, *, baseline: str | None = None
    ) -> None:
        # `baseline` is the sha256 already loaded, so a change between load and the first poll is
        # not mistaken for the starting point; without it the first successful read is the baseline.
        self._path = path
        self._on_change = on_change
        self._interval = interval
        self._debounce = min(interval / 2, 0.5)
        self._seen = baseline
        self._error: str | None = None  # the last read error logged: each distinct one is logged once
        self._background = BackgroundTask(self._run, "rules-watcher")

    def start(self) -> None:
        self._background.start()

    async def stop(self) -> None:
        await self._background.stop()

    async def _run(self) -> None:
        while True:
            await self._check()
            await asyncio.sleep(self._interval)

    async def _check(self) -> None:
        """One poll: read, and if the content changed and holds still for the debounce, notify."""
        digest = await self._digest()
        if digest is None or digest == self._seen:
            return
        if self._seen is None:
            self._seen = digest
            return
        await asyncio.sleep(self._debounce)
        if await self._digest() != digest:
            return  # still being written: the next poll looks again
        self._seen = digest
        try:
            await self._on_change()
        except Exception:
            log.exception("rules_watch_callback_failed", path=self._path)

    async def _digest(self) -> str | None:
        try:
            data = await asyncio.to_thread(_read_bytes, self._path)
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc.strerror or exc}"
            if error != self._error:
                self._error = error
                log.warning("rules_watch_unreadable", path=self._path, error=error)
            return None
        if self._error is not None:
            self._error = None
            log.info("rules_watch_readable", path=self._path)
        return hashlib.sha256(data).hexdigest()


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()
