"""The last good rules: a copy, in the state directory, of the rules file this process last put into effect.

A file that a reload refuses (a reshuffle without `reshuffle: true`) stays on disk, and without this
copy the next start (a pod restart, a new replica) would serve it without a word. At start-up
proxy/control/start_rules.py judges the file against the copy the way a reload judges it against
the active rules. This module only keeps the copy: one record, `<state-dir>/last-good.json`,

    {"format": 1, "sha256": "...", "file": "/etc/splitter/rules.yaml", "saved_at": "...", "text": "..."}

- `save(rules)` stores the file as read (`RuleSet.text`; a ramp step's effective rules have the
  same text, so a step writes nothing, nor does a start on the rules already recorded), atomically
  (proxy/observe/files.py): a crash leaves the old record or the new one.
- `load()` returns the record, None when there is none, or raises `LastGoodUnreadable` when it
  cannot be trusted (not a record, or its sha256 is not its text's).

The text may hold literal write keys: the record is created readable by its owner only. One process
writes it: a single `serve`, or the supervisor of `serve --workers N` (its workers only read it).
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson

from proxy.engine import RuleSet
from proxy.observe.files import write_atomically

RECORD = "last-good.json"
FORMAT = 1


class LastGoodUnreadable(Exception):
    """The record exists but cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class LastGood:
    text: str
    sha256: str  # of the text's UTF-8 bytes, which is the rules file's own sha256
    file: str  # the rules file it was read from
    saved_at: str


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class LastGoodStore:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / RECORD
        self._saved: str | None = None  # the sha256 known to be on disk: saving it again writes nothing

    def load(self) -> LastGood | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LastGoodUnreadable(f"cannot read {self.path}: {exc.strerror or exc}") from None
        try:
            record = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise LastGoodUnreadable(f"{self.path} is not a last-good record (not JSON)") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise LastGoodUnreadable(f"{self.path} is not a last-good record of format {FORMAT}")
        text, digest = record.get("text"), record.get("sha256")
        if not isinstance(text, str) or not isinstance(digest, str):
            raise LastGoodUnreadable(f"{self.path} has no text or sha256")
        if text_sha256(text) != digest:
            raise LastGoodUnreadable(f"{self.path}: the sha256 recorded is not its text's (edited or damaged)")
        self._saved = digest
        return LastGood(text, digest, str(record.get("file", "")), str(record.get("saved_at", "")))

    def save(self, rules: RuleSet) -> bool:
        """Keep `rules.text` as the last good rules; False when that text is already the record. OSError if it cannot be written."""
        digest = text_sha256(rules.text)
        if self._saved is None:  # a process's first save: the record may already hold these rules (a restart)
            with contextlib.suppress(LastGoodUnreadable):
                self.load()
        if digest == self._saved:
            return False
        payload = orjson.dumps({"format": FORMAT, "sha256": digest, "file": rules.filename,
                                "saved_at": datetime.now(UTC).isoformat(timespec="seconds"), "text": rules.text},
                               option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
        write_atomically(self.path, payload)
        self._saved = digest
        return True
