"""The change history on disk: append-only NDJSON in the state directory, bounded by size.

`<state-dir>/history.ndjson` holds one JSON object per line, oldest first. An append writes one
whole line and fsyncs it before returning: changes are rare (a start, a reload, a ramp step), and
each one is what a team later matches a data anomaly against, so none may be lost to a crash that
follows it. When an append would take the file past `MAX_BYTES` (5 MiB, several thousand entries),
the file is first renamed to `history.1.ndjson`, replacing the previous one: at most one old file
is kept, so the history uses at most about twice `MAX_BYTES`, and the newest changes are always on disk.

A crash or a full disk can leave a line cut short. An append that fails truncates the file back
to where it began; a line cut by a crash is closed by the next append, and readers skip any line
that is not a JSON object, so one damaged line never hides the rest.

One process writes (a single `serve`, or the supervisor of `serve --workers N`); any may read,
`splitter history --state-dir` included. The file is created readable by its owner only, like
every file in the state directory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

FILE = "history.ndjson"
ROTATED = "history.1.ndjson"
MAX_BYTES = 5 * 1024 * 1024


class HistoryFile:
    def __init__(self, directory: str | Path, max_bytes: int = MAX_BYTES) -> None:
        self.directory = Path(directory)
        self.path = self.directory / FILE
        self.rotated = self.directory / ROTATED
        self.max_bytes = max_bytes

    def append(self, entry: Mapping[str, Any]) -> None:
        """Write `entry` as one line and fsync it; OSError (nothing half-written left) when it cannot be."""
        line = orjson.dumps(entry) + b"\n"
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(line) > self.max_bytes:
            os.replace(self.path, self.rotated)
            size = 0
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a line a crash cut short: end it, so this one stands alone
                line = b"\n" + line
            try:
                _write_all(fd, line)
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)  # a full disk wrote part of the line: take it back
                raise
        finally:
            os.close(fd)
        if size == 0:
            _fsync_directory(self.directory)  # a new file (or a rotation) survives a power loss too

    def read(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The newest `limit` entries (all when None), newest first; the older file is read only when needed."""
        entries: list[dict[str, Any]] = []
        for path in (self.path, self.rotated):
            if limit is not None and len(entries) >= limit:
                break
            entries.extend(reversed(_entries(path)))
        return entries if limit is None else entries[:limit]


def _entries(path: Path) -> list[dict[str, Any]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out: list[dict[str, Any]] = []
    for line in data.splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
