"""The on-disk spool: a per-destination write-ahead log of events not yet accepted upstream.

Every event a client is told `200` for is in a spool first: appended to the active segment file and
covered by an fsync before the answer goes out. Concurrent requests share one fsync (group commit),
so durability costs one fsync per batch of requests, not one per request.

A record is one request's events for this destination (a chunk), so the cost of the spool is per
request, not per event. Segment files (`NNNNNNNNNNNN.seg`) start with an 8-byte format marker and
hold records

    u32 length | u32 crc32(payload) | payload
    payload = f64 appended_at | u16 len(credential) | u16 len(forwarded_for) | u32 n
              | credential | forwarded_for | n x u32 event length | events joined by ","

The events are stored comma-joined, exactly as they go between `{"batch":[` and `]}`: the sender
concatenates whole records into upstream bodies without looking at single events, and splits a
record into its events only to cut an oversized batch or to isolate a poison event.

Records are read back in order by the destination's sender, which acks what the upstream accepted.
A sealed segment whose records are all acked is deleted. The count of acked records at the head of
each segment is noted in `NNNNNNNNNNNN.ack` (best effort, not fsynced, at most every
`ACK_NOTE_INTERVAL` seconds): after a crash, at worst the records delivered in that last moment are
sent again (same messageId, so warehouses drop them), never fewer. At start-up every segment is
scanned; a torn or corrupt tail is truncated and reported, and the records before it survive.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from proxy.delivery.commit import GroupCommit

MAGIC = b"SPLSPL\x00\x02"  # format 2: chunk records. Format 1 (one event per record) had no marker.
HEADER = struct.Struct("<II")
PREFIX = struct.Struct("<dHHI")
LENGTH = struct.Struct("<I")
MAX_RECORD = 64 * 1024 * 1024  # anything longer is corruption, not a request's events
READ_SLACK = 64 * 1024  # read a little past max_bytes: the record that stops the read is framed in it
ACK_NOTE_INTERVAL = 0.25  # seconds between rewrites of a segment's .ack note
FRESH_LIMIT = 8 * 1024 * 1024  # bytes of just-written records kept for the reader, per spool


class SpoolFull(Exception):
    """The destination's spool is at its quota: primaries answer 503, mirrors are dropped."""


class SpoolFormatError(Exception):
    """A segment file this version cannot read: refusing to start beats silently dropping events."""


@dataclass(frozen=True, slots=True)
class Record:
    """One request's events for one destination, as spooled."""

    segment: int
    appended_at: float
    credential: str
    forwarded_for: str | None
    joined: bytes  # the events, comma-separated
    lengths: tuple[int, ...]  # of each event in `joined`
    encoded_size: int  # bytes the record takes in its segment file

    @property
    def count(self) -> int:
        return len(self.lengths)

    @property
    def size(self) -> int:
        return len(self.joined)

    def events(self) -> list[bytes]:
        events, start = [], 0
        for length in self.lengths:
            events.append(self.joined[start:start + length])
            start += length + 1
        return events


@dataclass(frozen=True, slots=True)
class Recovery:
    segments: int
    records: int  # pending records found (to be delivered)
    skipped: int  # records already acked before the stop, per the .ack notes
    truncated_bytes: int  # torn or corrupt tail bytes cut off
    truncated_segments: tuple[str, ...]


def encode(appended_at: float, credential: str, forwarded_for: str | None, events: list[bytes]) -> bytes:
    """One record holding `events` (at least one), ready to be written."""
    cred = credential.encode()
    forwarded = (forwarded_for or "").encode()
    head = PREFIX.pack(appended_at, len(cred), len(forwarded), len(events)) + cred + forwarded + struct.pack(f"<{len(events)}I", *map(len, events))
    joined = b",".join(events)
    return HEADER.pack(len(head) + len(joined), zlib.crc32(joined, zlib.crc32(head))) + head + joined


def decode(segment: int, payload: bytes) -> Record:
    appended_at, cred_len, fwd_len, count = PREFIX.unpack_from(payload)
    start = PREFIX.size
    credential = payload[start:start + cred_len].decode()
    start += cred_len
    forwarded = payload[start:start + fwd_len].decode() or None
    start += fwd_len
    lengths = struct.unpack_from(f"<{count}I", payload, start)
    return Record(segment, appended_at, credential, forwarded, payload[start + LENGTH.size * count:], lengths, HEADER.size + len(payload))


def event_count(payload: bytes) -> int:
    return int(PREFIX.unpack_from(payload)[3])


def scan(data: bytes, start: int = 0) -> tuple[list[bytes], int]:
    """Complete, valid record payloads in `data` from `start`, and the offset just past the last one."""
    payloads, offset, end = [], start, len(data)
    while offset + HEADER.size <= end:
        length, crc = HEADER.unpack_from(data, offset)
        body_start = offset + HEADER.size
        if length < PREFIX.size or length > MAX_RECORD or body_start + length > end:
            break
        payload = data[body_start:body_start + length]
        if zlib.crc32(payload) != crc or not _consistent(payload):
            break
        payloads.append(payload)
        offset = body_start + length
    return payloads, offset


def _consistent(payload: bytes) -> bool:
    """The framing inside a payload adds up (the crc guards the bytes, this guards a writer's bug)."""
    _, cred_len, fwd_len, count = PREFIX.unpack_from(payload)
    start = PREFIX.size + cred_len + fwd_len
    if count == 0 or start + LENGTH.size * count > len(payload):
        return False
    lengths = struct.unpack_from(f"<{count}I", payload, start)
    return sum(lengths) + count - 1 == len(payload) - start - LENGTH.size * count


def check_format(path: Path, data: bytes) -> int:
    """Where records start in a segment file's `data`; raises for a file of another format."""
    if data.startswith(MAGIC):
        return len(MAGIC)
    if len(data) < len(MAGIC) and MAGIC.startswith(data):
        return len(data)  # torn while being created: no records, the open truncates it to nothing
    raise SpoolFormatError(f"{path} is not a spool segment of format 2 (written by an older splitter?); "
                           "deliver it with the version that wrote it, or move it away to start")


class _Segment:
    __slots__ = ("id", "path", "records", "acked", "acked_offset", "size", "noted", "noted_at")

    def __init__(self, segment_id: int, path: Path, records: int = 0, acked: int = 0, size: int = 0, acked_offset: int = 0) -> None:
        self.id, self.path, self.records, self.acked, self.size = segment_id, path, records, acked, size
        self.acked_offset = acked_offset  # where the first unacked record starts
        self.noted, self.noted_at = acked, 0.0  # what its .ack note says, and when it was written


class Spool:
    def __init__(self, directory: Path, *, quota_bytes: int, segment_bytes: int = 16 * 1024 * 1024, group: GroupCommit | None = None,
                 fresh_limit: int = FRESH_LIMIT) -> None:
        self.directory = directory
        self.quota_bytes = quota_bytes
        self.segment_bytes = segment_bytes
        self._segments: dict[int, _Segment] = {}
        self._order: deque[int] = deque()
        self._active: _Segment | None = None
        self._fd: int | None = None
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
        self.disk_bytes = 0
        self.pending = 0  # events appended and not yet acked

    # -- start-up ---------------------------------------------------------------------------------
    def open(self) -> Recovery:
        self.directory.mkdir(parents=True, exist_ok=True)
        truncated, truncated_names, pending, skipped = 0, [], 0, 0
        ids = sorted(int(p.stem) for p in self.directory.glob("*.seg") if p.stem.isdigit())
        for segment_id in ids:
            path = self._path(segment_id)
            data = path.read_bytes()
            payloads, valid = scan(data, check_format(path, data))
            if valid < len(data):
                truncated += len(data) - valid
                truncated_names.append(path.name)
                with open(path, "r+b") as handle:
                    handle.truncate(valid)
                    os.fsync(handle.fileno())
            acked = min(self._read_ack(segment_id), len(payloads))
            acked_events = sum(map(event_count, payloads[:acked]))
            skipped += acked_events
            if acked == len(payloads):
                self._remove_files(segment_id)
                continue
            acked_offset = len(MAGIC) + sum(HEADER.size + len(p) for p in payloads[:acked])
            segment = _Segment(segment_id, path, len(payloads), acked, valid, acked_offset)
            self._segments[segment_id] = segment
            self._order.append(segment_id)
            self.disk_bytes += valid
            pending += sum(map(event_count, payloads[acked:]))
            self._unread += len(payloads) - acked
        self.pending = self._unread_events = pending
        self._fresh_on = pending == 0
        first = next((self._segments[i] for i in self._order if self._segments[i].acked < self._segments[i].records), None)
        if first is not None:
            self._cursor = (first.id, first.acked_offset)
            self._readable.set()
        self._new_segment((ids[-1] + 1) if ids else 1)
        return Recovery(len(ids), pending, skipped, truncated, tuple(truncated_names))

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

        Raises SpoolFull, writing nothing, when it would not fit the quota.
        """
        if not self.has_room(len(data)):
            raise SpoolFull(f"spool at {self.directory} is at its quota of {self.quota_bytes} bytes")
        assert self._active is not None and self._fd is not None
        if self._active.records and (self._active.size + len(data) > self.segment_bytes or self.disk_bytes + len(data) > self.quota_bytes):
            self._new_segment(self._active.id + 1)  # full, or at the quota with everything in it delivered (deleted then)
        assert self._active is not None and self._fd is not None
        os.write(self._fd, data)
        self._dirty.add(self._fd)
        segment = self._active
        if self._cursor is None:
            self._cursor = (segment.id, segment.size)
        if self._fresh_on:
            self._keep_fresh(segment.id, segment.size, data)
        segment.size += len(data)
        segment.records += 1
        self.disk_bytes += len(data)
        self.pending += events
        self._unread += 1
        self._unread_events += events
        self.appended += 1
        self._readable.set()
        return self.appended

    async def commit(self, ticket: int) -> None:
        """Return once everything appended up to `ticket` is on stable storage."""
        await self._group.wait(((self, ticket),))

    def take_dirty(self) -> tuple[set[int], bool]:
        """Called as a sync round starts, when the previous round's thread is done: the time to close
        sealed segments' descriptors (closed under a running fsync, their numbers could be reused)."""
        self._close_sealed()
        fds, self._dirty = self._dirty, set()
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

    def _new_segment(self, segment_id: int) -> None:
        if self._active is not None and self._fd is not None:
            os.fsync(self._fd)  # sealing: what the old segment holds is durable before it closes
            self._dirty.discard(self._fd)
            self._sealed_fds.append(self._fd)  # a sync round in a worker thread may hold it still
            if self._active.acked >= self._active.records:  # everything in it was delivered before it filled up
                self._remove(self._active.id)
        path = self._path(segment_id)  # always a new file: recovered segments are sealed, never appended to
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        os.write(self._fd, MAGIC)
        self._dirty.add(self._fd)
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
        while self._unread <= 0:
            self._readable.clear()
            await self._readable.wait()
        if linger > 0 and self._unread_events < max_events:
            await asyncio.sleep(linger)
        return self._read_now(max_events, max_bytes)

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
            data = handle.read(max(wanted, min(budget + READ_SLACK, segment.size - offset)))  # not more than is wanted: scan() checks every crc it reads
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
                break  # cannot happen for appended data; a later append will wake the reader again
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
            self._cursor = (segment_id, offset)
            if full:
                break
        self._unread -= len(records)
        self._unread_events -= events
        if self._unread == 0 and not self._fresh_on:
            self._fresh_on = True  # caught up: what is written next is read from memory
        return records

    def ack(self, records: list[Record]) -> None:
        """Mark `records` (handed out by `read`, acked in read order) as delivered."""
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
        for suffix in (".seg", ".ack"):
            try:
                os.unlink(self._path(segment_id).with_suffix(suffix))
            except FileNotFoundError:
                pass

    def _write_ack(self, segment: _Segment, now: float) -> None:
        temporary = segment.path.with_suffix(".ack.tmp")
        temporary.write_text(str(segment.acked))
        os.replace(temporary, segment.path.with_suffix(".ack"))
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
                with open(segment.path, "rb") as handle:
                    handle.seek(segment.acked_offset + HEADER.size)
                    prefix = handle.read(PREFIX.size)
                if len(prefix) == PREFIX.size:
                    return max(0.0, (now or time.time()) - PREFIX.unpack(prefix)[0])
        return 0.0

    def _close_sealed(self) -> None:
        for fd in self._sealed_fds:
            os.close(fd)
        self._sealed_fds.clear()

    async def close(self) -> None:
        await self._group.idle()
        self._close_sealed()
        for segment in self._segments.values():
            if segment.acked != segment.noted:
                self._write_ack(segment, time.monotonic())
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
