"""Recorded traffic on disk: the bounded queue the ingest handler appends to, and the files a background task writes.

What is recorded and each line's content are the engine's (proxy/engine/recording.py, the rules
file's `record:`); this module keeps the request path out of it:

- **The request pays a list append.** `_prepare_request` keeps the chosen events of a request in a
  `Pick` (a cohort hash per event, only while the rules record); once delivery has accepted the
  request, `Recorder.offer()` appends it to the queue, or, when the queue holds `record.queue`
  events already, counts its events as dropped (`queue_full`). Nothing waits and nothing is encoded
  there. The picked dicts live on until written: a few per request at a small percent, and never
  more than the queue's bound in all.
- **A background task writes.** It takes what is queued (at once when woken, at least once a
  second), and in a worker thread (file writes and compression must not stall the event loop)
  hashes the PII paths, encodes each line, compresses and writes, finishes files and keeps the
  directory under its cap.
- **Files.** `events-<UTC start>-<pid>-<n>.ndjson.gz.part` while written, renamed to
  `....ndjson.gz` when finished: at `file_mb` (compressed), at `file_minutes`, when recording is
  turned off or moved by a reload, and at shutdown. A file is sync-flushed at least once a second, so
  a crash loses at most that second: its `.part` (whose writer's lock is gone) is renamed by the next
  writer into that directory, and `simulate` reads such a cut-short file up to its last whole line.
  Files are created 0600 in a directory created 0700: they hold what users did.
- **Disk cap.** All recording files in the directory together, from any process (the workers of
  `--workers N` write into one directory, each its own files), are kept under `max_mb`: the oldest
  finished files are deleted first; a file being written is never deleted.

Counted in `splitter_recording_*` (metrics.py): events written, dropped (`queue_full`,
`write_error`), queued, and the directory's bytes and files.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gzip
import os
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from aiohttp import web

from proxy.engine import EventContext, RecordSettings, picked, recorded_line
from proxy.log import LogThrottle, get_logger
from proxy.metrics import Metrics

log = get_logger("splitter.recording")
PREFIX = "events-"
SUFFIX = ".ndjson.gz"
PART = ".part"  # a file still being written (or whose writer stopped without finishing it)
TICK = 1.0  # seconds: the longest the writer sleeps while recording is on (age rotation, flushes, the cap)
LINGER = 0.05  # seconds the writer waits after a wake-up, so a busy proxy writes batches, not single requests
COMPRESS_LEVEL = 5  # gzip: NDJSON of similar events compresses ~10x at level 5 for half the CPU of level 9
STOP_TIMEOUT = 5.0  # seconds for the last write at shutdown
_NO_CONTEXT = EventContext()


class Pick:
    """One request's events chosen for recording while it is prepared; offered once delivery accepted them."""

    __slots__ = ("ctx", "events", "settings")

    def __init__(self, settings: RecordSettings) -> None:
        self.settings = settings
        self.events: list[dict[str, Any]] = []
        self.ctx = _NO_CONTEXT

    def choose(self, events: Iterable[Any], ctx: EventContext, skip: set[int]) -> None:
        """Keep the events (as routed, after `prepare()`) whose user is recorded; `skip`: the rejected indices."""
        self.ctx = ctx
        self.events = picked(self.settings, events, skip)


class Recorder:
    """The queue and its writer task: `register()` with the ingress app, `offer()` per accepted request."""

    def __init__(self, state_dir: str | Path, metrics: Metrics | None = None) -> None:
        self.state_dir = Path(state_dir)  # a relative `record.dir` is under it
        self._pending: list[Pick] = []
        self._queued = 0  # events in `_pending` and in the batch being written
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._current: Callable[[], RecordSettings | None] = lambda: None
        self._metrics = metrics
        self._writer: Writer | None = None

    def register(self, app: web.Application, metrics: Metrics, current: Callable[[], RecordSettings | None]) -> None:
        """Count into `metrics`, read the active rules' settings from `current`, and write for as long as `app` runs."""
        self._metrics = metrics
        self._current = current
        self._writer = Writer(self.state_dir, metrics)
        for reason in ("queue_full", "write_error"):
            metrics.child(metrics.recording_dropped, reason)
        metrics.recording_queued.set_function(lambda: self._queued)
        app.cleanup_ctx.append(self._lifetime)

    async def _lifetime(self, app: web.Application) -> AsyncIterator[None]:
        self.start()
        yield
        await self.stop()

    def start(self) -> None:
        if self._task is None:
            self._closing = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name="recording")

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Write what is queued, finish the open file, and end the task (cancelled after `timeout`)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._closing = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            log.error("recording_stop_timeout", timeout=timeout, queued=self._queued)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def offer(self, pick: Pick) -> None:
        """Queue a request's picked events, or count them as dropped when the queue is full. Never waits."""
        count = len(pick.events)
        if not count:
            return
        if self._queued + count > pick.settings.queue:
            metrics = self._metrics
            if metrics is not None:
                metrics.child(metrics.recording_dropped, "queue_full").inc(count)
            return
        self._pending.append(pick)
        self._queued += count
        if not self._wake.is_set():
            self._wake.set()

    @property
    def queued(self) -> int:
        return self._queued

    async def _run(self) -> None:
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), TICK)
                if not self._closing:
                    await asyncio.sleep(LINGER)
            except TimeoutError:
                pass
            self._wake.clear()
            await self._write(final=False)
        await self._write(final=True)

    async def _write(self, *, final: bool) -> None:
        writer, current = self._writer, self._current()
        batch, self._pending = self._pending, []
        try:
            if writer is not None and (batch or writer.is_open or final or current is not None):
                await asyncio.to_thread(writer.write, batch, current, final)
        except Exception:  # a bug here must cost this batch, never the writer task (and so every later batch)
            log.exception("recording_failed", events=sum(len(pick.events) for pick in batch))
        finally:
            self._queued -= sum(len(pick.events) for pick in batch)


@dataclass
class _OpenFile:
    directory: Path
    path: Path  # the .part name
    raw: BinaryIO  # holds the flock that tells other writers this file is in use
    gz: gzip.GzipFile
    opened: float  # monotonic
    events: int = 0
    unflushed: bool = False  # written to since the last sync flush


class Writer:
    """The files of one process: synchronous, called from a worker thread one batch at a time (a lock makes sure)."""

    def __init__(self, state_dir: Path, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.state_dir = state_dir
        self.metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._file: _OpenFile | None = None
        self._settings: RecordSettings | None = None  # of the last batch: the open file's limits
        self._flushed = 0.0
        self._tidied = 0.0
        self._serial = 0
        self._errors = LogThrottle(10.0)

    @property
    def is_open(self) -> bool:
        return self._file is not None

    def directory(self, settings: RecordSettings) -> Path:
        path = Path(settings.directory)
        return path if path.is_absolute() else self.state_dir / path

    def write(self, batch: list[Pick], current: RecordSettings | None, final: bool = False) -> None:
        """Write `batch`; then, with `current` the active rules' settings (None: recording is off),
        finish the open file when it is full, old, moved or no longer recorded (or `final`), flush it
        once a second, and keep the directory under its cap."""
        with self._lock:
            for pick in batch:
                self._write_pick(pick)
            now = self._clock()
            file, settings = self._file, current or self._settings
            if file is not None and (final or current is None or self.directory(current) != file.directory or settings is None
                                     or now - file.opened >= settings.file_seconds):
                self._finish()
            elif file is not None and file.unflushed and now - self._flushed >= TICK:
                self._flush(file)
            if settings is not None and (now - self._tidied >= TICK or final):
                self._tidy(self.directory(settings), settings.max_bytes)

    def _write_pick(self, pick: Pick) -> None:
        settings = self._settings = pick.settings
        lines: list[bytes] = []
        for event in pick.events:
            try:
                lines.append(orjson.dumps(recorded_line(settings, event, pick.ctx)))
            except (TypeError, orjson.JSONEncodeError):  # prepare() encoded it already: not expected
                self._failed("encode", "event cannot be encoded", 1)
        if not lines:
            return
        directory = self.directory(settings)
        file = self._file
        if file is not None and file.directory != directory:
            self._finish()
            file = None
        try:
            if file is None:
                file = self._open(directory)
            file.gz.write(b"\n".join(lines) + b"\n")
        except OSError as exc:
            self._failed(str(directory), f"{exc.strerror or exc}", len(lines))
            self._abandon()
            return
        file.events += len(lines)
        file.unflushed = True
        self.metrics.recorded_events.inc(len(lines))
        if file.raw.tell() >= settings.file_bytes:
            self._finish()
            self._tidy(directory, settings.max_bytes)

    def _open(self, directory: Path) -> _OpenFile:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._serial += 1
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        path = directory / f"{PREFIX}{stamp}-{os.getpid()}-{self._serial}{SUFFIX}{PART}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            raw = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            raise
        now = self._clock()
        self._flushed = now
        self._file = _OpenFile(directory, path, raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=COMPRESS_LEVEL), now)
        return self._file

    def _flush(self, file: _OpenFile) -> None:
        try:
            file.gz.flush(zlib.Z_SYNC_FLUSH)  # what is written so far can be read, and survives a crash of this process
            file.unflushed = False
        except OSError as exc:
            self._failed(str(file.directory), f"{exc.strerror or exc}", 0)
            self._abandon()
        self._flushed = self._clock()

    def _finish(self) -> None:
        """Close the open file whole (gzip trailer) and give it its finished name."""
        file, self._file = self._file, None
        if file is None:
            return
        try:
            file.gz.close()  # the trailer; the raw file stays open, and locked, until renamed
            file.raw.flush()
            final = file.path.with_name(file.path.name.removesuffix(PART))
            os.rename(file.path, final)
            log.info("recording_file_finished", file=str(final), events=file.events, bytes=file.raw.tell())
        except OSError as exc:
            self._failed(str(file.directory), f"{exc.strerror or exc}", 0)
        finally:
            with contextlib.suppress(OSError):
                file.raw.close()

    def _abandon(self) -> None:
        """After a failed write: drop the open file as it is (its .part is adopted, cut short, at the next tidy)."""
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError, ValueError):
                file.raw.close()

    def _tidy(self, directory: Path, max_bytes: int) -> None:
        """Finish the files no process writes any more (adopt them), delete the oldest finished files while the
        directory's recording files exceed `max_bytes`, and publish its bytes and files."""
        self._tidied = self._clock()
        own = self._file.path if self._file is not None else None
        try:
            files = recording_files(directory)
            if any(path.name.endswith(PART) and path != own for path, _ in files) and adopt_orphans(files, own):
                files = recording_files(directory)
        except OSError:  # no directory yet (nothing recorded), or it cannot be read: the next tidy tries again
            return
        total = sum(size for _, size in files)
        deleted = []
        for path, size in files:  # oldest first
            if total <= max_bytes:
                break
            if path.name.endswith(PART):
                continue  # being written (by this process or another): never deleted
            with contextlib.suppress(FileNotFoundError):  # another worker's cap may have got there first
                path.unlink()
            total -= size
            deleted.append(path.name)
        if deleted:
            log.info("recording_files_deleted", directory=str(directory), files=len(deleted), oldest=deleted[0], max_bytes=max_bytes)
        self.metrics.recording_bytes.set(total)
        self.metrics.recording_files.set(len(files) - len(deleted))

    def _failed(self, where: str, error: str, events: int) -> None:
        if events:
            self.metrics.child(self.metrics.recording_dropped, "write_error").inc(events)
        held_back = self._errors.allow(where)
        if held_back is not None:
            log.error("recording_write_failed", directory=where, error=error, events=events, held_back=held_back)


def recording_files(directory: Path) -> list[tuple[Path, int]]:
    """The recording files in `directory` (finished and being written), oldest first (their names start with their UTC start time), with sizes."""
    found = []
    for entry in os.scandir(directory):
        if entry.name.startswith(PREFIX) and (entry.name.endswith(SUFFIX) or entry.name.endswith(SUFFIX + PART)):
            with contextlib.suppress(FileNotFoundError):
                found.append((Path(entry.path), entry.stat(follow_symlinks=False).st_size))
    return sorted(found)


def adopt_orphans(files: list[tuple[Path, int]], own: Path | None) -> int:
    """Give the finished name to the `.part` files no process holds (their writer was killed); remove empty ones. How many."""
    adopted = 0
    for path, size in files:
        if not path.name.endswith(PART) or path == own:
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # a live writer's
        try:
            if size == 0:
                path.unlink()
            else:
                os.rename(path, path.with_name(path.name.removesuffix(PART)))
                log.warning("recording_file_recovered", file=str(path.with_name(path.name.removesuffix(PART))), bytes=size,
                            hint="its writer stopped without finishing it; simulate reads it up to its last whole line")
            adopted += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return adopted
