"""The on-disk spool: a per-destination write-ahead log of events not yet accepted upstream.

Every event a client is told `200` for is in a spool first: appended to the active segment file and
covered by an fsync before the answer goes out. Concurrent requests share one fsync (group commit),
so durability costs one fsync per batch of requests, not one per request. The record format is in
`spool_format.py`; this module owns the files.

Records are read back in order by the destination's sender, which acks what the upstream accepted.
A sealed segment whose records are all acked is deleted. The count of acked records at the head of
each segment is noted in `NNNNNNNNNNNN.ack` (best effort, not fsynced, at most every
`ACK_NOTE_INTERVAL` seconds): after a crash, at worst the records delivered in that last moment are
sent again (same messageId, so warehouses drop them), never fewer. At start-up every segment is
scanned; a torn or corrupt tail is truncated and reported, and the records before it survive.

A full disk (ENOSPC, EDQUOT) or a failing one (EIO), at any write, leaves the spool consistent:

- A record is whole in the file or not in it. `os.write` may write part of a record without an
  error; the rest is written until done or refused, and a refused record is cut off again
  (`ftruncate` back to where it started, which needs no space): nothing of it counts, the request
  gets 503 and may retry, and later records go where it would have been. Cutting back rather than
  sealing keeps a full disk from leaving a trail of near-empty segments, one per refused request.
  Only when the cut itself fails is the segment sealed, with the torn bytes past its last record:
  nothing is ever appended after a tear, the reader stops at the last whole record it knows of,
  and the next start cuts the tear.
- A new segment is sealed-old-first, then created with its marker; a file whose marker could not be
  written is closed and removed at once, never kept. Until a new segment exists the spool has no
  active one and every write tries again, so it recovers by itself once there is room. A start-up
  on a full disk recovers and delivers the backlog without creating one.
- A failed fsync fails every request waiting on it (503), and the segment it was for is sealed: a
  later fsync of the same file may succeed although pages of the failed one were lost, and no 200
  may rest on a file with a hole before it. The records of the failed round stay and are delivered
  (the client's retry then duplicates them, with the same messageIds; nothing is lost).
- A descriptor is closed exactly once: a sealed segment's when no sync round can still use it (the
  round after the one that synced it), the active one's at close, a failed new one's at once.
- Ack notes are best effort: one that cannot be written is tried again at the next ack.
- A record the reader cannot read back (the file was damaged under it) is reported and the rest of
  its segment skipped, as a restart would cut it, instead of the sender stalling there silently.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from proxy.delivery.commit import GroupCommit
from proxy.delivery.spool_format import (HEADER, LENGTH, MAGIC, MAX_RECORD, PREFIX, Record, SpoolFormatError, check_format, decode, encode,
                                         event_count, scan)
from proxy.log import LogThrottle, get_logger

__all__ = ["ACK_NOTE_INTERVAL", "FRESH_LIMIT", "HEADER", "LENGTH", "MAGIC", "MAX_RECORD", "PREFIX", "Record", "Recovery", "Spool",
           "SpoolFormatError", "SpoolFull", "check_format", "decode", "encode", "event_count", "scan"]

log = get_logger("splitter.spool")
READ_SLACK = 64 * 1024  # read a little past max_bytes: the record that stops the read is framed in it
ACK_NOTE_INTERVAL = 0.25  # seconds between rewrites of a segment's .ack note
FRESH_LIMIT = 8 * 1024 * 1024  # bytes of just-written records kept for the reader, per spool
READ_RETRY = 1.0  # seconds before reading again after a read error (EIO): the data may come back


class SpoolFull(Exception):
    """The destination's spool is at its quota: primaries answer 503, mirrors are dropped."""


@dataclass(frozen=True, slots=True)
class Recovery:
    segments: int
    records: int  # pending records found (to be delivered)
    skipped: int  # records already acked before the stop, per the .ack notes
    truncated_bytes: int  # torn or corrupt tail bytes cut off
    truncated_segments: tuple[str, ...]


def _write_all(fd: int, data: bytes) -> None:
    """Write all of `data`, or raise: `os.write` on a nearly full disk writes part without an error."""
    view = memoryview(data)
    done = 0
    while done < len(data):
        written = os.write(fd, view[done:])
        if written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        done += written


class _Segment:
    __slots__ = ("id", "path", "records", "events", "acked", "acked_offset", "handed", "handed_events", "size", "noted", "noted_at")

    def __init__(self, segment_id: int, path: Path, records: int = 0, events: int = 0, acked: int = 0, acked_events: int = 0, size: int = 0,
                 acked_offset: int = 0) -> None:
        self.id, self.path, self.records, self.events, self.acked, self.size = segment_id, path, records, events, acked, size
        self.acked_offset = acked_offset  # where the first unacked record starts
        self.handed, self.handed_events = acked, acked_events  # records (events) read out so far, acked or not
        self.noted, self.noted_at = acked, 0.0  # what its .ack note says, and when it was written


class Spool:
    def __init__(self, directory: Path, *, quota_bytes: int, segment_bytes: int = 16 * 1024 * 1024, group: GroupCommit | None = None,
                 fresh_limit: int = FRESH_LIMIT) -> None:
        self.directory = directory
        self.quota_bytes = quota_bytes
        self.segment_bytes = segment_bytes
        self._segments: dict[int, _Segment] = {}
        self._order: deque[int] = deque()
        self._active: _Segment | None = None  # None until a segment could be created (a full disk)
        self._fd: int | None = None  # the active segment's; only ever written while it is the active one
        self._seal_pending = False  # the active segment may hold a tear or a failed fsync: never append to it again
        self._next_id = 1
        self._closed = False
        self._last: tuple[int, _Segment, int, int] | None = None  # (ticket, segment, offset, events) of the last write
        self._dirty: set[int] = set()  # fds written since the last fsync
        self._sealed_fds: list[int] = []  # of sealed segments: closed when no sync round can be using them
        self._dir_dirty = False
        self.appended = 0  # records ever appended (tickets)
        self.committed = 0  # tickets covered by an fsync
        self._group = group or GroupCommit()
        self._readable = asyncio.Event()
        self._cursor: tuple[int, int] | None = None  # (segment id, offset) of the next record to read
        self._unread = 0  # records appended (or recovered) and not yet handed out by read()
        self._unread_events = 0
        # Records written while the reader is caught up, as (segment id, offset, payload): the reader
        # takes them from here instead of reading back what was just written. Bounded: past
        # FRESH_LIMIT (the reader is behind, e.g. the upstream is down) they are dropped and the
        # reader goes to the files until it has caught up again.
        self._fresh: deque[tuple[int, int, bytes]] = deque()
        self._fresh_bytes = 0
        self._fresh_on = False
        self._fresh_limit = fresh_limit
        self._log = LogThrottle()  # a full disk fails every request: one line a second, with a count
        self.disk_bytes = 0
        self.pending = 0  # events appended and not yet acked

    # -- start-up ---------------------------------------------------------------------------------
    def open(self) -> Recovery:
        """Recover what earlier runs left; repairs torn tails and half-created segments, never refuses them."""
        self.directory.mkdir(parents=True, exist_ok=True)
        truncated, truncated_names, pending, skipped = 0, [], 0, 0
        ids = sorted(int(p.stem) for p in self.directory.glob("*.seg") if p.stem.isdigit())
        self._forget_orphan_notes(set(ids))
        for segment_id in ids:
            path = self._path(segment_id)
            data = path.read_bytes()
            start = check_format(path, data)
            payloads, valid = scan(data, start)
            if valid < len(data):
                truncated += len(data) - valid
                truncated_names.append(path.name)
                with open(path, "r+b") as handle:
                    handle.truncate(valid)
                    os.fsync(handle.fileno())
            acked = min(self._read_ack(segment_id), len(payloads))
            counts = list(map(event_count, payloads))
            acked_events = sum(counts[:acked])
            skipped += acked_events
            if acked == len(payloads):
                self._remove_files(segment_id)
                continue
            acked_offset = start + sum(HEADER.size + len(p) for p in payloads[:acked])
            segment = _Segment(segment_id, path, len(payloads), sum(counts), acked, acked_events, valid, acked_offset)
            self._segments[segment_id] = segment
            self._order.append(segment_id)
            self.disk_bytes += valid
            pending += sum(counts[acked:])
            self._unread += len(payloads) - acked
        self.pending = self._unread_events = pending
        self._fresh_on = pending == 0
        first = next((self._segments[i] for i in self._order if self._segments[i].acked < self._segments[i].records), None)
        if first is not None:
            self._cursor = (first.id, first.acked_offset)
            self._readable.set()
        self._next_id = (ids[-1] + 1) if ids else 1
        try:
            self._start_segment()
        except OSError as exc:  # a full disk: the backlog is delivered all the same, and frees room
            log.warning("spool_segment_not_started", directory=str(self.directory), error=str(exc), hint="the first write tries again")
        return Recovery(len(ids), pending, skipped, truncated, tuple(truncated_names))

    def _forget_orphan_notes(self, ids: set[int]) -> None:
        """Ack notes without their segment (a stop between the two unlinks), and notes' temporary files:
        a stale note would claim records of a new segment with the same id as delivered."""
        for path in [*self.directory.glob("*.ack"), *self.directory.glob("*.ack.tmp")]:
            stem = path.name.split(".", 1)[0]
            if path.name.endswith(".tmp") or not stem.isdigit() or int(stem) not in ids:
                try:
                    path.unlink()
                except OSError as exc:
                    log.warning("spool_note_not_removed", path=str(path), error=str(exc))

    # -- writing ----------------------------------------------------------------------------------
    def has_room(self, size: int) -> bool:
        return self.disk_bytes - self._reclaimable() + size <= self.quota_bytes

    def _reclaimable(self) -> int:
        """Bytes of an active segment whose records are all delivered: a new segment frees them."""
        active = self._active
        return active.size - len(MAGIC) if active is not None and active.records and active.acked >= active.records else 0

    def append(self, credential: str, forwarded_for: str | None, events: list[bytes]) -> int:
        """Spool one request's `events` (at least one) as one record; returns a commit ticket."""
        return self.write(encode(time.time(), credential, forwarded_for, events), len(events))

    def write(self, data: bytes, events: int) -> int:
        """Write a record made by `encode()` holding `events` events; returns a commit ticket.

        Raises SpoolFull, writing nothing, when it would not fit the quota, and OSError (ENOSPC,
        EDQUOT, EIO...), leaving nothing of the record in the spool, when the disk refuses it.
        """
        if self._closed:
            raise OSError(errno.EBADF, f"the spool at {self.directory} is closed")
        if not self.has_room(len(data)):
            raise SpoolFull(f"spool at {self.directory} is at its quota of {self.quota_bytes} bytes")
        active = self._active
        if active is None or self._seal_pending or (active.records and (active.size + len(data) > self.segment_bytes
                                                                        or self.disk_bytes + len(data) > self.quota_bytes)):
            self._seal()  # full, at the quota with everything in it delivered (deleted then), or not to be appended to
            self._start_segment()
            active = self._active
        assert active is not None and self._fd is not None
        offset = active.size
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            self._cut_back(active, offset, exc)
            raise
        self._dirty.add(self._fd)
        if self._cursor is None:
            self._cursor = (active.id, offset)
        if self._fresh_on:
            self._keep_fresh(active.id, offset, data)
        active.size += len(data)
        active.records += 1
        active.events += events
        self.disk_bytes += len(data)
        self.pending += events
        self._unread += 1
        self._unread_events += events
        self.appended += 1
        self._last = (self.appended, active, offset, events)
        self._readable.set()
        return self.appended

    def _cut_back(self, segment: _Segment, offset: int, exc: OSError) -> None:
        """A write was refused, maybe after part of it was written: take that part off again."""
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, offset)  # shrinking needs no space
        except OSError as cut_failed:
            self._seal_pending = True  # the tear stays past the last record: never append after it
            log.error("spool_tear_kept", directory=str(self.directory), segment=segment.path.name, offset=offset, error=str(cut_failed),
                      hint="the segment is sealed; the next start cuts the tear")
        if self._log.allow(("write", exc.errno)) is not None:
            log.error("spool_write_refused", directory=str(self.directory), error=str(exc), errno=exc.errno)
        if segment.records and segment.acked >= segment.records:
            self._seal()  # all delivered: deleting it gives its room back on a full disk

    def retract(self, ticket: int) -> bool:
        """Take back the record `write` just returned `ticket` for, before anything awaited: a request
        whose copy for another destination was refused is answered 503, and must not be delivered here.

        False when it cannot be taken back (not the last write, or the cut failed): it then stays and
        is delivered, and a retry of the request duplicates it (same messageIds).
        """
        last, self._last = self._last, None
        if last is None or last[0] != ticket or last[1] is not self._active or self._fd is None:
            return False
        _, segment, offset, events = last
        try:
            os.ftruncate(self._fd, offset)
        except OSError as exc:
            log.error("spool_retract_failed", directory=str(self.directory), error=str(exc))
            return False
        size = segment.size - offset
        if self._fresh and self._fresh[-1][:2] == (segment.id, offset):
            self._fresh_bytes -= HEADER.size + len(self._fresh.pop()[2])
        segment.size = offset
        segment.records -= 1
        segment.events -= events
        self.disk_bytes -= size
        self.pending -= events
        self._unread -= 1
        self._unread_events -= events
        return True

    async def commit(self, ticket: int) -> None:
        """Return once everything appended up to `ticket` is on stable storage."""
        await self._group.wait(((self, ticket),))

    def take_dirty(self) -> tuple[set[int], bool]:
        """Called as a sync round starts, when the previous round's thread is done: the time to close
        sealed segments' descriptors that no round needs any more (closed under a running fsync, their
        numbers could be reused). One still to be synced is closed at the round after."""
        fds, self._dirty = self._dirty, set()
        self._close_sealed(keep=fds)
        sync_dir, self._dir_dirty = self._dir_dirty, False
        return fds, sync_dir

    def sync(self, dirty: tuple[set[int], bool]) -> None:
        fds, sync_dir = dirty
        for fd in fds:
            os.fsync(fd)
        if sync_dir:
            directory = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

    def sync_failed(self, dirty: tuple[set[int], bool]) -> None:
        """A round with `dirty` failed (its requests get 503): seal the active segment if it was in it,
        since a later fsync could succeed over pages the failed one lost; sync the directory again."""
        fds, sync_dir = dirty
        if self._fd is not None and self._fd in fds:
            self._seal_pending = True
        self._dir_dirty = self._dir_dirty or sync_dir
        if self._log.allow("sync") is not None:
            log.error("spool_sync_failed", directory=str(self.directory), hint="the segment is sealed; the next write starts a new one")

    def _seal(self) -> None:
        """No more appends to the active segment; its descriptor is closed once no sync round needs it."""
        segment, fd = self._active, self._fd
        self._active, self._fd, self._seal_pending = None, None, False
        if fd is not None:
            self._sealed_fds.append(fd)
        if segment is not None and segment.acked >= segment.records:  # everything in it was delivered
            self._remove(segment.id)

    def _start_segment(self) -> None:
        """Create the next segment with its marker, or raise leaving no file and no descriptor."""
        segment_id = self._next_id
        self._next_id += 1  # a file that could not be removed is skipped, not hit again (EEXIST)
        path = self._path(segment_id)
        self._unlink(path.with_suffix(".ack"))  # a stale note would claim this segment's records
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            _write_all(fd, MAGIC)
        except OSError:
            os.close(fd)  # never kept: closed here, once
            self._unlink(path)  # else the next start removes it (no whole record in it)
            raise
        self._fd = fd
        self._dirty.add(fd)
        self.disk_bytes += len(MAGIC)
        segment = _Segment(segment_id, path, size=len(MAGIC), acked_offset=len(MAGIC))
        self._segments[segment_id] = segment
        self._order.append(segment_id)
        self._active = segment
        self._dir_dirty = True

    # -- reading and acking ------------------------------------------------------------------------
    async def read(self, max_events: int, max_bytes: int, linger: float = 0.0) -> list[Record]:
        """The next records in order (at least one; waits for them), up to the limits in events and
        bytes (a record over a limit comes alone: records are never split here).

        With `linger`, a short wait for more when fewer than `max_events` are ready: larger upstream
        batches for a few milliseconds of delay, the trade every batching client makes.
        """
        while True:
            while self._unread <= 0:
                self._readable.clear()
                await self._readable.wait()
            if linger > 0 and self._unread_events < max_events:
                await asyncio.sleep(linger)
            try:
                records = self._read_now(max_events, max_bytes)
            except OSError as exc:  # EIO reading back: try again, loudly, rather than lose or stall silently
                log.error("spool_read_failed", directory=str(self.directory), error=str(exc), retry_in=READ_RETRY)
                await asyncio.sleep(READ_RETRY)
                continue
            if records:
                return records

    def _keep_fresh(self, segment_id: int, offset: int, data: bytes) -> None:
        if self._fresh_bytes + len(data) > self._fresh_limit:
            self._fresh.clear()
            self._fresh_bytes = 0
            self._fresh_on = False  # until the reader has caught up with the files
            return
        self._fresh.append((segment_id, offset, data[HEADER.size:]))
        self._fresh_bytes += len(data)

    def _payloads_at(self, segment: _Segment, offset: int, budget: int) -> list[bytes]:
        """Record payloads from `offset` on: from memory when they were just written, else from the file."""
        fresh = self._fresh
        while fresh and (fresh[0][0], fresh[0][1]) < (segment.id, offset):  # read from the file meanwhile
            self._fresh_bytes -= HEADER.size + len(fresh.popleft()[2])
        if fresh and fresh[0][0] == segment.id and fresh[0][1] == offset:
            payloads, size = [], 0
            for segment_id, _, payload in fresh:  # contiguous from `offset`, as they were written
                if segment_id != segment.id or (payloads and size > budget):
                    break
                payloads.append(payload)
                size += len(payload)
            return payloads
        with open(segment.path, "rb") as handle:
            handle.seek(offset)
            header = handle.read(HEADER.size)
            wanted = HEADER.size + HEADER.unpack(header)[0] if len(header) == HEADER.size else 0
            handle.seek(offset)
            # not more than is wanted (scan() checks every crc it reads), nor past the last whole record
            data = handle.read(min(segment.size - offset, max(wanted, budget + READ_SLACK)))
        return scan(data)[0]

    def _read_now(self, max_events: int, max_bytes: int) -> list[Record]:
        records: list[Record] = []
        size = events = 0
        while self._cursor is not None and self._unread > 0 and events < max_events and size < max_bytes:
            segment_id, offset = self._cursor
            segment = self._segments.get(segment_id)  # gone if it was fully acked and deleted meanwhile
            if segment is None or offset >= segment.size:
                later = [i for i in self._order if i > segment_id]
                if not later:
                    break
                self._cursor = (later[0], self._segments[later[0]].acked_offset)  # its acked head is not re-read
                continue
            payloads = self._payloads_at(segment, offset, max_bytes - size)
            if not payloads:
                self._skip_unreadable(segment, offset)
                continue
            full = False
            for payload in payloads:
                count = event_count(payload)
                if records and (events + count > max_events or size + len(payload) > max_bytes):
                    full = True  # the limits are reached: stop here, the rest is for the next read
                    break
                record = decode(segment_id, payload)
                records.append(record)
                size += record.size
                events += count
                offset += record.encoded_size
                segment.handed += 1
                segment.handed_events += count
            self._cursor = (segment_id, offset)
            if full:
                break
        self._unread -= len(records)
        self._unread_events -= events
        if self._unread == 0 and not self._fresh_on:
            self._fresh_on = True  # caught up: what is written next is read from memory
        return records

    def _skip_unreadable(self, segment: _Segment, offset: int) -> None:
        """No whole record where one was written: the file was damaged under the spool. Do what the
        next start would do (cut the segment there), and say so, rather than stall the sender."""
        lost_records, lost_events = segment.records - segment.handed, segment.events - segment.handed_events
        log.error("spool_records_unreadable", directory=str(self.directory), segment=segment.path.name, offset=offset,
                  records_lost=lost_records, events_lost=lost_events)
        segment.records, segment.events, segment.size = segment.handed, segment.handed_events, offset
        self._unread -= lost_records
        self._unread_events -= lost_events
        self.pending -= lost_events
        if segment is self._active:
            self._seal_pending = True  # the file goes on past `offset`: appending would mislead the reader
        elif segment.acked >= segment.records:
            self._remove(segment.id)

    def ack(self, records: list[Record]) -> None:
        """Mark `records` (handed out by `read`, acked in read order) as delivered. Never raises for a
        full disk: the notes are best effort, and an ack lost here would hold back every later one."""
        touched: dict[int, list[Record]] = {}
        for record in records:
            touched.setdefault(record.segment, []).append(record)
        now = time.monotonic()
        for segment_id, acked in touched.items():
            self.pending -= sum(r.count for r in acked)
            segment = self._segments.get(segment_id)
            if segment is None:
                continue
            segment.acked += len(acked)
            segment.acked_offset += sum(r.encoded_size for r in acked)
            if segment.acked >= segment.records and segment is not self._active:
                self._remove(segment_id)
            elif now - segment.noted_at >= ACK_NOTE_INTERVAL:
                self._write_ack(segment, now)

    def _remove(self, segment_id: int) -> None:
        segment = self._segments.pop(segment_id)
        self._order.remove(segment_id)
        self.disk_bytes -= segment.size
        self._remove_files(segment_id)

    def _remove_files(self, segment_id: int) -> None:
        """The note first: a segment left without its note is replayed in full (duplicates), a note
        left without its segment could claim the records of a later segment with the same id."""
        for suffix in (".ack", ".seg"):
            self._unlink(self._path(segment_id).with_suffix(suffix))

    def _unlink(self, path: Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("spool_file_not_removed", path=str(path), error=str(exc))

    def _write_ack(self, segment: _Segment, now: float) -> None:
        """Best effort: a note that cannot be written (full disk) is tried again at the next ack."""
        temporary = segment.path.with_suffix(".ack.tmp")
        try:
            temporary.write_text(str(segment.acked))
            os.replace(temporary, segment.path.with_suffix(".ack"))
        except OSError as exc:
            self._unlink(temporary)
            if self._log.allow("note") is not None:
                log.warning("spool_ack_note_failed", directory=str(self.directory), segment=segment.path.name, error=str(exc))
            return
        segment.noted, segment.noted_at = segment.acked, now

    def _read_ack(self, segment_id: int) -> int:
        try:
            return int(self._path(segment_id).with_suffix(".ack").read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _path(self, segment_id: int) -> Path:
        return self.directory / f"{segment_id:012d}.seg"

    # -- observation and shutdown ---------------------------------------------------------------------
    def oldest_age(self, now: float | None = None) -> float:
        """Seconds since the oldest unacked record was spooled (0 when nothing is pending)."""
        if self.pending <= 0:
            return 0.0
        for segment_id in self._order:
            segment = self._segments[segment_id]
            if segment.acked < segment.records:
                try:
                    with open(segment.path, "rb") as handle:
                        handle.seek(segment.acked_offset + HEADER.size)
                        prefix = handle.read(PREFIX.size)
                except OSError:
                    return 0.0  # a gauge: the reader reports the error
                if len(prefix) == PREFIX.size:
                    return max(0.0, (now or time.time()) - PREFIX.unpack(prefix)[0])
        return 0.0

    def _close_sealed(self, keep: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        still = [fd for fd in self._sealed_fds if fd in keep]
        for fd in self._sealed_fds:
            if fd not in keep:
                os.close(fd)
        self._sealed_fds = still

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._group.idle()
        for segment in self._segments.values():
            if segment.acked != segment.noted:
                self._write_ack(segment, time.monotonic())
        fds, _ = self.take_dirty()
        try:
            self.sync((fds, False))
        except OSError as exc:
            log.error("spool_sync_failed", directory=str(self.directory), error=str(exc), at="close")
        self._close_sealed()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
