"""Serving the last good rules because the rules file was refused at start-up, until it is fixed.

proxy/control/start_rules.py decides at start-up; `FileStanding` follows what happens next, for the
`/readyz` detail and the gauge `splitter_config_file_refused`:

- a reload that installs a different rules text (the file accepted: fixed, or `reshuffle: true`
  added) ends it; a ramp step keeps the text, so it does not;
- a change of the file whose reload is `unchanged` or `success` (the file put back to the rules in
  effect) ends it; one refused again updates the reasons and the file's sha256.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

from proxy.control.reload import ReloadResult
from proxy.control.start_rules import FileRefused
from proxy.control.state import ActiveRules
from proxy.log import get_logger
from proxy.metrics import Metrics

log = get_logger(__name__)


def file_sha256(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


class FileStanding:
    """Whether the rules in effect are the file's or the last good ones the file was refused against."""

    def __init__(self, active: ActiveRules, metrics: Metrics, refused: FileRefused | None) -> None:
        self._active = active
        self._refused = refused
        # Read at every scrape (a worker of `--workers N` copies it to the shared files), so a reload
        # that installed the file shows at once.
        metrics.config_file_refused.set_function(lambda: 1.0 if self.refused is not None else 0.0)

    @property
    def refused(self) -> FileRefused | None:
        refused = self._refused
        if refused is not None and self._active.current.sha256 != refused.active_sha256:
            self._end(f"a reload installed rules {self._active.current.sha256[:12]}")  # a ramp step keeps the sha256: only the file does this
        return self._refused

    def detail(self) -> dict[str, Any] | None:
        refused = self.refused
        return refused.detail() if refused is not None else None

    async def file_changed(self, result: ReloadResult) -> None:
        """The reload the file watcher ran after the file's content changed."""
        refused = self.refused
        if refused is None:
            return
        if result.status in ("success", "unchanged"):
            self._end(f"the rules file now gives the rules in effect ({result.status})")
        elif result.status == "refused":
            digest = await asyncio.to_thread(file_sha256, refused.file)
            self._refused = replace(refused, reasons=result.errors, file_sha256=digest or refused.file_sha256)

    def _end(self, why: str) -> None:
        if self._refused is not None:
            log.info("config_file_refusal_ended", path=self._refused.file, reason=why)
        self._refused = None
