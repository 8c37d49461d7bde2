"""The spool's on-disk format, pure: records encoded and decoded, segment files scanned and checked.

Segment files (`NNNNNNNNNNNN.seg`) start with an 8-byte format marker and hold records

    u32 length | u32 crc32(payload) | payload
    payload = f64 appended_at | u16 len(credential) | u16 len(forwarded_for) | u32 n
              | credential | forwarded_for | n x u32 event length | u32 len(tags) | tags
              | events joined by ","

A record is one request's events for one destination (a chunk). The events are stored comma-joined,
exactly as they go between `{"batch":[` and `]}`: the sender concatenates whole records into upstream
bodies without looking at single events, and splits a record into its events only to cut an
oversized batch or to isolate a poison event.

`tags` say whose events these are, for the delivery ledger (`record_tags.py` writes and reads
them; empty when nobody asked): the spool is the one place that still knows, when a record is
delivered or dead-lettered after a crash and a restart, which source, role and event names it held.

Format 3 added the tags. Format 2 segments (the same records without `u32 len(tags) | tags`) are
still read, so that a spool left by the previous release is delivered after an upgrade; their
records carry no tags. New segments are always written in format 3.

No I/O here: `spool.py` owns the files; this module only says what their bytes mean, so that the
format can be tested, and changed, apart from the writing and its failure handling.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"SPLSPL\x00\x03"  # format 3: chunk records with tags; every new segment
MAGIC_2 = b"SPLSPL\x00\x02"  # format 2: chunk records without tags, still read. Format 1 (one event per record) had no marker.
FORMATS = {MAGIC: 3, MAGIC_2: 2}
FORMAT = 3
HEADER = struct.Struct("<II")
PREFIX = struct.Struct("<dHHI")
LENGTH = struct.Struct("<I")
MAX_RECORD = 64 * 1024 * 1024  # anything longer is corruption, not a request's events


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
    tags: bytes = b""  # whose events these are (record_tags.py); empty in format 2 and when not tagged

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
class Frame:
    """A record ready to be written, in two parts: its framing (`head`: length, crc and the fields
    before the events) and the joined events. The spool writes both with one `writev`, so the events
    are never copied into one buffer with their framing, and keeps what the reader needs (`record()`)
    so that a record read back while still in memory is never decoded again."""

    head: bytes
    joined: bytes
    appended_at: float
    credential: str
    forwarded_for: str | None
    lengths: tuple[int, ...]
    tags: bytes

    @property
    def size(self) -> int:
        """Bytes the record takes in its segment file."""
        return len(self.head) + len(self.joined)

    @property
    def parts(self) -> tuple[bytes, bytes]:
        return self.head, self.joined

    def record(self, segment: int) -> Record:
        return Record(segment, self.appended_at, self.credential, self.forwarded_for, self.joined, self.lengths, self.size, self.tags)


def frame(appended_at: float, credential: str, forwarded_for: str | None, events: list[bytes], tags: bytes = b"") -> Frame:
    """One format-3 record holding `events` (at least one), ready to be written."""
    cred = credential.encode()
    forwarded = (forwarded_for or "").encode()
    lengths = tuple(map(len, events))
    head = (PREFIX.pack(appended_at, len(cred), len(forwarded), len(events)) + cred + forwarded
            + struct.pack(f"<{len(events) + 1}I", *lengths, len(tags)) + tags)
    joined = b",".join(events)
    framed = HEADER.pack(len(head) + len(joined), zlib.crc32(joined, zlib.crc32(head))) + head
    return Frame(framed, joined, appended_at, credential, forwarded_for or None, lengths, tags)


def encode(appended_at: float, credential: str, forwarded_for: str | None, events: list[bytes], tags: bytes = b"") -> bytes:
    """One format-3 record holding `events` (at least one), as the bytes of its segment file."""
    return b"".join(frame(appended_at, credential, forwarded_for, events, tags).parts)


def decode(segment: int, payload: bytes, fmt: int = FORMAT) -> Record:
    """The record in `payload`, from a segment of format `fmt`."""
    appended_at, cred_len, fwd_len, count = PREFIX.unpack_from(payload)
    start = PREFIX.size
    credential = payload[start:start + cred_len].decode()
    start += cred_len
    forwarded = payload[start:start + fwd_len].decode() or None
    start += fwd_len
    lengths = struct.unpack_from(f"<{count}I", payload, start)
    start += LENGTH.size * count
    tags = b""
    if fmt >= 3:
        tags_len = LENGTH.unpack_from(payload, start)[0]
        tags = payload[start + LENGTH.size:start + LENGTH.size + tags_len]
        start += LENGTH.size + tags_len
    return Record(segment, appended_at, credential, forwarded, payload[start:], lengths, HEADER.size + len(payload), tags)


def event_count(payload: bytes) -> int:
    return int(PREFIX.unpack_from(payload)[3])


def scan(data: bytes, start: int = 0, fmt: int = FORMAT) -> tuple[list[bytes], int]:
    """Complete, valid record payloads (of format `fmt`) in `data` from `start`, and the offset just past the last one."""
    payloads, offset, end = [], start, len(data)
    while offset + HEADER.size <= end:
        length, crc = HEADER.unpack_from(data, offset)
        body_start = offset + HEADER.size
        if length < PREFIX.size or length > MAX_RECORD or body_start + length > end:
            break
        payload = data[body_start:body_start + length]
        if zlib.crc32(payload) != crc or not _consistent(payload, fmt):
            break
        payloads.append(payload)
        offset = body_start + length
    return payloads, offset


def _consistent(payload: bytes, fmt: int) -> bool:
    """The framing inside a payload adds up (the crc guards the bytes, this guards a writer's bug)."""
    _, cred_len, fwd_len, count = PREFIX.unpack_from(payload)
    start = PREFIX.size + cred_len + fwd_len
    if count == 0 or start + LENGTH.size * count > len(payload):
        return False
    lengths: tuple[int, ...] = struct.unpack_from(f"<{count}I", payload, start)
    start += LENGTH.size * count
    if fmt >= 3:
        if start + LENGTH.size > len(payload):
            return False
        start += LENGTH.size + LENGTH.unpack_from(payload, start)[0]
    return bool(sum(lengths) + count - 1 == len(payload) - start)


def _first_frame_is_whole(data: bytes) -> bool:
    """Whether `data` starts with a whole `length | crc | payload` frame (valid or not)."""
    if len(data) < HEADER.size:
        return False
    length: int = HEADER.unpack_from(data)[0]
    return HEADER.size + length <= len(data)


def check_format(path: Path, data: bytes) -> tuple[int, int]:
    """Where records start in a segment file's `data`, and their format (3, or 2 for a segment the
    previous release wrote); raises SpoolFormatError for another format's file.

    Besides a whole marker, three shapes are a segment whose creation was cut short, and a start-up
    repairs them (the records found are kept, the rest is cut) instead of refusing:
    - a prefix of the marker, or nothing: a crash between creating the file and writing its marker;
    - no marker, then whole records of format 2 (or 3): splitter before the disk-full fix kept a new
      segment's descriptor when its marker write failed (ENOSPC) and appended records to the file.
      Those records were answered 200: they are kept and delivered;
    - no marker and no whole frame (a first record cut short): nothing in it was ever whole.
    A file that starts with a whole frame that is a record of neither format is refused: that is
    another format's file (format 1 had no marker), and cutting it as if torn would drop its events.
    (A record of one format never passes for the other's: the crc and the lengths inside must add up.)
    """
    for magic, fmt in FORMATS.items():
        if data.startswith(magic):
            return len(magic), fmt
    if len(data) < len(MAGIC) and any(magic.startswith(data) for magic in FORMATS):
        return len(data), FORMAT  # torn while being created: no records, the open removes it
    for fmt in sorted(FORMATS.values(), reverse=True):
        if scan(data, 0, fmt)[0]:
            return 0, fmt
    if not _first_frame_is_whole(data):
        return 0, FORMAT
    raise SpoolFormatError(f"{path} is not a spool segment of format 2 or 3 (written by an older splitter?); "
                           "deliver it with the version that wrote it, or move it away to start")
