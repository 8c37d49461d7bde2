"""The on-disk spool: a per-destination write-ahead log of events not yet accepted upstream.

Every event a client is told `200` for is in a spool first: appended to the active segment file and
covered by an fsync before the answer goes out. A request's records for one destination (its primary
copy, and its mirror copy when it has one) are appended with one `writev`, framing and events as they
are, never copied into one buffer first. Concurrent requests share one fsync (group commit).
With `--durability interval` the answer waits for the write only, and the group commit fsyncs on its
interval, when a segment is sealed and at shutdown (proxy/delivery/commit.py).
The record format is in `spool_format.py`, the files and descriptors in `segment_files.py`.

Records are read back in order by the destination's sender, which acks what the upstream accepted.
The steady state reads nothing back from disk: the latest records (up to `FRESH_LIMIT` bytes) are
kept in memory as the sender will use them, and only a sender further behind than that (an upstream
outage, a backlog at start-up, a core saturated by clients) reads the files, until it reaches the
records still in memory: each byte once (the records a read checked past its limits are kept for
the next one), one `pread` for most reads, the events copied out of the read's buffer once.
A sealed segment whose records are all acked is deleted, or its file kept (up to `REUSE_FILES`) and
written over by a later segment: freeing its blocks would hold up the fsyncs running meanwhile
(`_remove`; the records' segment tags keep an earlier segment's leftovers out of a scan). The count
of acked records at the head of each segment is noted in `NNNNNNNNNNNN.ack` (best effort, not
fsynced, at the first ack once
`ACK_NOTE_INTERVAL` seconds have passed): after a crash, at worst the records delivered since the
last note are sent again (same messageId, so warehouses drop them), never fewer. At start-up every
segment is scanned; a torn or corrupt tail is truncated and reported, and the records before it survive.

On a full disk (ENOSPC, EDQUOT) or a failing one (EIO) the spool stays consistent. A refused record,
even part-written, is cut back off its segment: nothing of it counts, and the request gets 503 with
Retry-After (cutting back rather than sealing leaves no trail of near-empty segments on a full disk).
A segment is sealed only when the cut fails (the next start cuts the tear) or its fsync failed. A
new segment is started after the old one is sealed (a delivered one deleted first, giving its room
back); until one can be created every write tries again, so the spool recovers by itself when space
returns, and starts on a full disk. A failed fsync fails its waiting requests (503) but its records
stay and are delivered: a retry duplicates them (same messageIds), nothing is lost. A record that
cannot be read back is reported and the rest of its segment skipped, instead of a silent stall.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from proxy.delivery.commit import GroupCommit
from proxy.delivery.segment_files import (
    Dirty,
    SegmentFiles,
    appended_at,
    forget_orphan_notes,
    read_note,
    read_records,
    recover_file,
    remove_segment,
    unlink,
    write_note,
)
from proxy.delivery.spool_format import FORMAT, HEADER, MAGIC, Frame, Record, SpoolFormatError, decode, encode, event_count, header_size, tag_of
from proxy.log import LogThrottle, get_logger

__all__ = ["FRESH_LIMIT", "HEADER", "MAGIC", "REUSE_FILES", "Frame", "Record", "Recovery", "Spool", "SpoolFormatError", "SpoolFull",
           "decode", "encode"]  # as before the split

log = get_logger("splitter.spool")
ACK_NOTE_INTERVAL = 1.0  # seconds between rewrites of a segment's .ack note (each a rename over the last: on ext4 a few ms of the event loop under load)
FRESH_LIMIT = 8 * 1024 * 1024  # bytes of just-written records kept for the reader, per spool
READ_RETRY = 1.0  # seconds before reading again after a read error (EIO): the data may come back
REUSE_FILES = 2  # delivered segment files kept, per spool, to be written over by the next segments


class SpoolFull(Exception):
    """The destination's spool is at its quota: primaries answer 503, mirrors are dropped."""


@dataclass(frozen=True, slots=True)
class Recovery:
    segments: int
    records: int  # pending records found (to be delivered)
    skipped: int  # records already acked before the stop, per the .ack notes
    truncated_bytes: int  # torn or corrupt tail bytes cut off
    truncated_segments: tuple[str, ...]


class _Segment:
    __slots__ = ("acked", "acked_offset", "events", "fmt", "handed", "handed_events", "id", "noted", "noted_at", "path", "records", "reusable",
                 "size", "tag")

    def __init__(self, segment_id: int, path: Path, acked: int = 0, acked_events: int = 0, acked_offset: int = len(MAGIC), fmt: int = FORMAT) -> None:
        self.id, self.path, self.size, self.fmt = segment_id, path, 0, fmt  # fmt: 2 for a segment the previous release wrote
        self.records, self.events = acked, acked_events  # counted up from here by Spool._count
        self.acked, self.acked_offset = acked, acked_offset  # records delivered at its head, and where the first one not yet starts
        self.handed, self.handed_events = acked, acked_events  # records (events) read out so far, acked or not
        self.noted, self.noted_at = acked, 0.0  # what its .ack note says, and when it was written
        self.tag = tag_of(segment_id)  # on each of its records (format 4)
        self.reusable = fmt == FORMAT  # its file may be written over by a later segment once delivered


class Spool:
    def __init__(self, directory: Path, *, quota_bytes: int, segment_bytes: int = 16 * 1024 * 1024, group: GroupCommit | None = None,
                 fresh_limit: int = FRESH_LIMIT) -> None:
        self.directory = directory
        self.quota_bytes = quota_bytes
        self.segment_bytes = segment_bytes
        self._segments: dict[int, _Segment] = {}
        self._order: deque[int] = deque()
        self._active: _Segment | None = None  # None until a segment could be created (a full disk)
        self._files = SegmentFiles(directory)  # the active segment's descriptor and sealed ones a sync round may still use
        self._next_id = 1
        self._closed = False
        self._last: tuple[int, _Segment, int, int, int] | None = None  # (ticket, segment, offset, records, events) of the last write
        self.appended = 0  # records ever appended (tickets)
        self.committed = 0  # tickets covered by an fsync
        self.group = group or GroupCommit()
        self._readable = asyncio.Event()
        self._cursor: tuple[int, int] | None = None  # (segment id, offset) of the next record to read
        self._unread = 0  # records appended (or recovered) and not yet handed out by read()
        self._unread_events = 0
        # The records written last, as (segment id, offset, record), for the reader to take from here
        # rather than read them back: always an unbroken run of the latest writes, at most `fresh_limit`
        # bytes of them (the oldest make room for the newest). A reader behind them reads the files
        # until it reaches the first one kept.
        self._fresh: deque[tuple[int, int, Record]] = deque()
        self._fresh_bytes = 0
        self._fresh_limit = fresh_limit
        # What the last read got beyond its limits (records from memory, or payloads read from a file
        # with their crc checked), as (segment id, offset, items): the next read starts there and takes
        # them, rather than read and check them again. A sender behind the fresh records reads each
        # byte of the files once.
        self._ahead: tuple[int, int, list[Record | memoryview]] | None = None
        self._log = LogThrottle()  # a full disk fails every request: one line a second, with a count
        # Delivered segments' files, kept to be written over by the next segments (see `_remove`), with
        # their sizes; counted in disk_bytes, and given up first when room is needed.
        self._reuse: deque[tuple[Path, int]] = deque()
        self.disk_bytes = 0
        self.pending = 0  # events appended and not yet acked
        self.read_back = 0  # bytes of records read back from the files (behind the fresh ones, or after a restart)

    # -- start-up ---------------------------------------------------------------------------------
    def open(self, visit: Callable[[Record], None] | None = None) -> Recovery:
        """Recover what earlier runs left; repairs torn tails and half-created segments, never refuses them.

        `visit` sees every record still to be delivered, in order (the delivery ledger attributes
        what a restart found pending, from the records' tags)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        truncated, truncated_names, skipped = 0, [], 0
        ids = sorted(int(p.stem) for p in self.directory.glob("*.seg") if p.stem.isdigit())
        forget_orphan_notes(self.directory, set(ids))  # a stale note would claim records of a new segment with its id
        for kept in self.directory.glob("*.free"):  # files an earlier run kept for reuse: their ids may come again
            unlink(kept)
        for segment_id in ids:
            path = self._path(segment_id)
            start, payloads, cut, fmt = recover_file(path, segment_id)
            if cut:
                truncated += cut
                truncated_names.append(path.name)
            acked = min(read_note(path), len(payloads))
            counts = list(map(event_count, payloads))
            acked_events = sum(counts[:acked])
            skipped += acked_events
            if acked == len(payloads):
                remove_segment(path)
                continue
            framing = header_size(fmt)
            acked_offset = start + sum(framing + len(p) for p in payloads[:acked])
            segment = self._segments[segment_id] = _Segment(segment_id, path, acked, acked_events, acked_offset, fmt)
            if visit is not None:
                for payload in payloads[acked:]:
                    visit(decode(segment_id, payload, fmt))
            self._order.append(segment_id)
            self._count(segment, len(payloads) - acked, sum(counts[acked:]), start + sum(framing + len(p) for p in payloads))
        first = next((self._segments[i] for i in self._order if self._segments[i].acked < self._segments[i].records), None)
        if first is not None:
            self._cursor = (first.id, first.acked_offset)
            self._readable.set()
        self._next_id = (ids[-1] + 1) if ids else 1
        try:
            self._start_segment()
        except OSError as exc:  # a full disk: the backlog is delivered all the same, and frees room
            log.warning("spool_segment_not_started", directory=str(self.directory), error=str(exc), hint="the first write tries again")
        return Recovery(len(ids), self.pending, skipped, truncated, tuple(truncated_names))

    # -- writing ----------------------------------------------------------------------------------
    def has_room(self, size: int) -> bool:
        return self.disk_bytes - self._reclaimable() + size <= self.quota_bytes

    def _reclaimable(self) -> int:
        """Bytes of an active segment whose records are all delivered (a new segment frees them), and of
        the files kept for reuse (given up when room is needed)."""
        active = self._active
        kept = sum(size for _, size in self._reuse)
        return kept + (active.size - len(MAGIC) if active is not None and active.records and active.acked >= active.records else 0)

    def starts_segment(self, size: int) -> bool:
        """Whether a write of `size` bytes seals the active segment and starts a new one first."""
        active = self._active
        return active is None or self._files.broken or bool(active.records and (active.size + size > self.segment_bytes
                                                                                or self.disk_bytes + size > self.quota_bytes))

    def write(self, frames: Frame | Sequence[Frame]) -> int:
        """Write a record made by `frame()`, or several at once (one request's primary and mirror
        copies for this destination) with one `writev`; returns a commit ticket for all of them.
        Raises SpoolFull when they would not fit the quota, and OSError (ENOSPC, EDQUOT, EIO...) when
        the disk refuses them: either way nothing of them is left in the spool."""
        if isinstance(frames, Frame):
            frames = (frames,)
        size = sum(one.size for one in frames)
        events = sum(len(one.lengths) for one in frames)
        if self._closed:
            raise OSError(errno.EBADF, f"the spool at {self.directory} is closed")
        if not self.has_room(size):
            raise SpoolFull(f"spool at {self.directory} is at its quota of {self.quota_bytes} bytes")
        while self._reuse and self.disk_bytes + size > self.quota_bytes:
            self._give_up_kept()  # room for these records within the quota
        active = self._active
        if self.starts_segment(size):
            self._seal()  # full, at the quota with everything in it delivered (deleted then), or not to be appended to
            self._start_segment()
            active = self._active
        assert active is not None
        offset = active.size
        try:
            self._files.append([part for one in frames for part in one.parts(active.tag)], offset)
        except OSError as exc:
            if self._log.allow(("write", exc.errno)) is not None:
                log.error("spool_write_refused", directory=str(self.directory), error=str(exc), errno=exc.errno)
            while self._reuse:
                self._give_up_kept()  # their room back on a full disk
            if active.records and active.acked >= active.records:
                active.reusable = False
                self._seal()  # all delivered: deleting it gives its room back on a full disk
            raise
        if self._cursor is None:
            self._cursor = (active.id, offset)
        if self._fresh_limit:
            at = offset
            for one in frames:
                self._keep_fresh(active.id, at, one.record(active.id))
                at += one.size
        self._count(active, len(frames), events, size)
        self.appended += 1
        self._last = (self.appended, active, offset, len(frames), events)
        self._readable.set()
        return self.appended

    def retract(self, ticket: int) -> bool:
        """Take back the records `write` just returned `ticket` for, before anything awaited: a request
        whose copy for another destination was refused is answered 503, and must not be delivered here.
        False when it cannot be (not the last write, or the cut failed): it stays and is delivered, and
        a retry of the request duplicates it (same messageIds)."""
        last, self._last = self._last, None
        if last is None or last[0] != ticket or last[1] is not self._active or not self._files.cut(last[2]):
            return False
        _, segment, offset, records, events = last
        fresh = self._fresh
        while fresh and fresh[-1][0] == segment.id and fresh[-1][1] >= offset:
            self._fresh_bytes -= fresh.pop()[2].encoded_size
        self._count(segment, -records, -events, offset - segment.size)
        return True

    def _count(self, segment: _Segment, records: int, events: int, size: int) -> None:
        """Add records (or, negative, take them off) to `segment` and to the spool's totals."""
        segment.records, segment.events, segment.size = segment.records + records, segment.events + events, segment.size + size
        self.disk_bytes += size
        self.pending += events
        self._unread += records
        self._unread_events += events

    def take_dirty(self) -> Dirty:
        """As a sync round starts: what it must fsync, and sealed descriptors its `sync` closes (see SegmentFiles.take_dirty)."""
        return self._files.take_dirty()

    def sync(self, dirty: Dirty) -> None:
        self._files.sync(dirty)

    def close_sealed(self, dirty: Dirty) -> None:
        self._files.close_sealed(dirty)

    def release(self, dirty: Dirty) -> None:
        """The round that took `dirty` is over: the sealed descriptors it synced may be closed by a later one."""
        self._files.release(dirty)

    def sync_failed(self, dirty: Dirty) -> None:
        """A round with `dirty` failed (its requests get 503): the active segment is sealed if it was in it."""
        self._files.sync_failed(dirty)
        if self._log.allow("sync") is not None:
            log.error("spool_sync_failed", directory=str(self.directory), hint="the segment is sealed; the next write starts a new one")

    def _seal(self) -> None:
        """No more appends to the active segment; deleted (or kept for reuse) at once if everything in
        it was delivered."""
        segment, self._active = self._active, None
        if segment is not None and self._files.broken:
            segment.reusable = False  # a tear or a failed fsync past its last record: not written over
        self._files.seal()
        self.group.soon(self)  # `interval`: a sealed segment is synced now, not at the next tick
        if segment is not None and segment.acked >= segment.records:
            self._remove(segment.id)

    def _start_segment(self) -> None:
        """Create the next segment with its marker, or raise (then there is no active segment)."""
        segment_id = self._next_id
        self._next_id += 1  # a file that could not be removed is skipped, not hit again (EEXIST)
        path = self._path(segment_id)
        unlink(path.with_suffix(".ack"))  # a stale note would claim this segment's records
        try:
            if self._reuse:
                kept, kept_size = self._reuse.popleft()
                self.disk_bytes -= kept_size  # counted from its marker on, as a new file is
                self._files.reuse(kept, path)
            else:
                self._files.create(path)
        except OSError as exc:
            if self._log.allow(("create", exc.errno)) is not None:
                log.error("spool_segment_not_started", directory=str(self.directory), error=str(exc), hint="the next write tries again")
            raise
        segment = self._active = self._segments[segment_id] = _Segment(segment_id, path)
        self._order.append(segment_id)
        self._count(segment, 0, 0, len(MAGIC))

    # -- reading and acking ------------------------------------------------------------------------
    async def read(self, max_events: int, max_bytes: int, linger: float = 0.0) -> list[Record]:
        """The next records in order (at least one; waits for them), up to the limits in events and bytes
        (a record over a limit comes alone: never split here). With `linger`, a short wait for more when
        fewer than `max_events` are ready: larger upstream batches for a few milliseconds of delay."""
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
            self._readable.clear()  # counted but not readable (cannot happen): wait for a write rather than spin
            await self._readable.wait()

    @property
    def lagging(self) -> bool:
        """Whether the reader is more than half the records kept in memory behind the writes: a sign
        for intake to take turns with the sender (proxy/delivery/pacing.py). Counted in file bytes
        from the cursor to the end of the active segment; a few segments looked at at most."""
        if self._unread <= 0 or self._cursor is None:
            return False
        limit = self._fresh_limit // 2
        cursor_id, offset = self._cursor
        behind = 0
        for segment_id in reversed(self._order):
            if segment_id < cursor_id:
                break  # the cursor's segment is gone (delivered): the unread records start after it
            size = self._segments[segment_id].size
            if segment_id == cursor_id:
                return behind + size - offset > limit
            behind += size
            if behind > limit:
                return True
        return behind > limit

    def _keep_fresh(self, segment_id: int, offset: int, record: Record) -> None:
        fresh, size = self._fresh, record.encoded_size
        while fresh and self._fresh_bytes + size > self._fresh_limit:
            self._fresh_bytes -= fresh.popleft()[2].encoded_size  # the reader is that far behind: it reads those from the file
        if size <= self._fresh_limit:
            fresh.append((segment_id, offset, record))
            self._fresh_bytes += size

    def _records_at(self, segment: _Segment, offset: int, budget: int) -> Sequence[Record | memoryview]:
        """What is in `segment` from `offset` on: what the last read scanned past its limits, records
        still in memory, else record payloads read from the file (about `budget` bytes of them)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == segment.id and ahead[1] == offset:
            return ahead[2]
        fresh = self._fresh
        while fresh and (fresh[0][0], fresh[0][1]) < (segment.id, offset):  # read from the file meanwhile
            self._fresh_bytes -= fresh.popleft()[2].encoded_size
        if fresh and fresh[0][0] == segment.id and fresh[0][1] == offset:
            records, size = list[Record](), 0
            for segment_id, _, record in fresh:  # an unbroken run from `offset`, as they were written
                if segment_id != segment.id or (records and size > budget):
                    break
                records.append(record)
                size += record.size
            return records
        found = read_records(segment.path, segment.id, offset, segment.size, budget, segment.fmt)
        self.read_back += sum(map(len, found))
        return found

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
            try:
                found = self._records_at(segment, offset, max_bytes - size)
            except OSError:
                if records:  # handed out already (the cursor is past them): they go now, the next read meets the error
                    break
                raise
            if not found:
                self._skip_unreadable(segment, offset)
                continue
            full = False
            for at, item in enumerate(found):
                record = item if isinstance(item, Record) else decode(segment_id, item, segment.fmt)
                count = record.count
                if records and (events + count > max_events or size + record.size > max_bytes):
                    full = True  # the limits are reached: stop here, the rest is for the next read
                    self._ahead = (segment_id, offset, [record, *found[at + 1:]])  # for the next read: a file is not read twice
                    break
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
        return records

    def _skip_unreadable(self, segment: _Segment, offset: int) -> None:
        """No whole record where one was written (the file was damaged under the spool): cut the segment
        there as the next start would, and say so, rather than stall the sender silently."""
        lost_records, lost_events = segment.records - segment.handed, segment.events - segment.handed_events
        log.error("spool_records_unreadable", directory=str(self.directory), segment=segment.path.name, offset=offset,
                  records_lost=lost_records, events_lost=lost_events)
        self._count(segment, -lost_records, -lost_events, offset - segment.size)
        segment.reusable = False  # damaged under the spool: not written over
        if segment is self._active:
            self._files.broken = True  # the file goes on past `offset`: never append there
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
        """A delivered segment goes; its file is kept to be written over by a later segment when it
        can be (`REUSE_FILES`): deleting it frees its blocks, which on ext4 (worse with `discard`)
        holds up every fsync running meanwhile for tens of ms, the p99 of `--durability fsync`."""
        segment = self._segments.pop(segment_id)
        self._order.remove(segment_id)
        if segment.reusable and len(self._reuse) < REUSE_FILES and segment.size > len(MAGIC):
            kept = segment.path.with_suffix(".free")
            unlink(segment.path.with_suffix(".ack"))  # the note first, as remove_segment does
            try:
                os.rename(segment.path, kept)
            except OSError as exc:
                log.warning("spool_file_not_kept", path=str(segment.path), error=str(exc))
            else:
                self._reuse.append((kept, segment.size))
                return
        self.disk_bytes -= segment.size
        remove_segment(segment.path)

    def _give_up_kept(self) -> None:
        kept, size = self._reuse.pop()
        self.disk_bytes -= size
        unlink(kept)

    def _write_ack(self, segment: _Segment, now: float) -> None:
        if write_note(segment.path, segment.acked):
            segment.noted, segment.noted_at = segment.acked, now
        elif self._log.allow("note") is not None:  # best effort: tried again at the next ack
            log.warning("spool_ack_note_failed", directory=str(self.directory), segment=segment.path.name)

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
                at = appended_at(segment.path, segment.acked_offset, segment.fmt)
                return 0.0 if at is None else max(0.0, (now or time.time()) - at)
        return 0.0

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ahead = None
        await self.group.idle()
        for segment in self._segments.values():
            if segment.acked != segment.noted:
                self._write_ack(segment, time.monotonic())
        if self._active is not None and self._files.active is not None:
            self._files.cut(self._active.size)  # a reused file's earlier records go: a clean stop leaves none
        while self._reuse:
            self._give_up_kept()
        self._active = None
        self._files.close()
