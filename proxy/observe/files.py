"""Files in the state directory, written whole or not at all.

A temporary file in the same directory, fsync, rename over the old file, fsync of the directory: a
crash (or a full disk) leaves the previous file or the new one, never half of one. Files are created
readable by their owner only: what splitter keeps there may hold write keys (the last good rules)
or what users did (the catalog).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

_TEMP_SUFFIX = ".tmp"


def write_atomically(path: Path, payload: bytes) -> None:
    """Replace `path` with `payload`; OSError (after removing the temporary file) if it cannot be written."""
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    for leftover in directory.glob(f"{prefix}*{_TEMP_SUFFIX}"):  # a crash mid-write left it; one writer per file
        with contextlib.suppress(OSError):
            leftover.unlink()
    fd, temp = tempfile.mkstemp(prefix=prefix, suffix=_TEMP_SUFFIX, dir=directory)  # created 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory_fd)  # the rename itself survives a power loss
    finally:
        os.close(directory_fd)


def process_file(state_dir: Path, kind: str, process: str | None) -> Path:
    """`catalog.json` for a single process, `catalog.worker-1.json` for a worker of `--workers N`."""
    return state_dir / (f"{kind}.{process}.json" if process else f"{kind}.json")


def process_files(state_dir: Path, kind: str) -> list[Path]:
    """Every process's file of `kind` in the state directory (a supervisor merges them)."""
    return sorted(p for p in state_dir.glob(f"{kind}*.json") if p.name == f"{kind}.json" or p.name.startswith(f"{kind}."))


def read_process_files(state_dir: Path, kind: str, own: Path | None, is_snapshot: Callable[[dict[str, Any]], bool],
                       not_one: str) -> list[tuple[Path, dict[str, Any] | str]]:
    """Every process file of `kind` but `own`, parsed, or why it cannot be used (`not_one` when it parses
    but `is_snapshot` refuses it). Files are replaced whole, never half written; one removed meanwhile is skipped."""
    found: list[tuple[Path, dict[str, Any] | str]] = []
    for path in process_files(state_dir, kind) if state_dir.is_dir() else ():
        if path == own:
            continue
        try:
            snapshot = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            continue
        except (OSError, orjson.JSONDecodeError) as exc:
            found.append((path, str(exc)))
            continue
        found.append((path, snapshot if isinstance(snapshot, dict) and is_snapshot(snapshot) else not_one))
    return found
