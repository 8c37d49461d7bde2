"""Dead letters: events an upstream refused for good, kept with the reason instead of retried forever.

One NDJSON file per destination (`<dir>/<destination>.ndjson`), one line per event:
`{"time", "destination", "status", "reason", "response", "event"}`. The event is embedded verbatim,
so a fixed copy can be replayed with `splitter`'s own ingest (or any Segment SDK) after the cause is
fixed. `reason` says which cause, because the status alone does not: `rejected` (the upstream
refused these events, 400/413 and other permanent 4xx), `credential_refused` (401/403: the write
key, not the events), `redirected` (a 3xx, never followed, kept answering after the retries: the
destination's URL is wrong). A caller that gives no reason writes no `reason` key.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import orjson


class DeadLetters:
    def __init__(self, directory: Path, destination: str) -> None:
        self.path = directory / f"{destination}.ndjson"
        self.destination = destination

    async def add(self, events: Sequence[bytes], status: int, response: bytes, reason: str | None = None) -> None:
        now = datetime.now(UTC).isoformat()
        text = response.decode("utf-8", "replace").strip()[:2000]
        common: dict[str, object] = {"time": now, "destination": self.destination, "status": status}
        if reason is not None:
            common["reason"] = reason
        common["response"] = text
        lines = b"".join(orjson.dumps({**common, "event": orjson.Fragment(event)}) + b"\n" for event in events)
        await asyncio.to_thread(self._append, lines)

    def _append(self, lines: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, lines)
            os.fsync(fd)
        finally:
            os.close(fd)
