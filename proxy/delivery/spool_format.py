"""The spool's on-disk format, pure: records encoded and decoded, segment files scanned and checked.

Segment files (`NNNNNNNNNNNN.seg`) start with an 8-byte format marker and hold records

    u32 length | u32 crc32(payload) | u32 tag | payload
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

`tag` is the segment's id (its low 32 bits): a file whose records were all delivered is reused for a
later segment rather than deleted (`spool.py`: deleting it frees its blocks, which on ext4 stalls
every concurrent fsync for tens of ms), and is overwritten from the start, not emptied first. What
follows the last record written is then the previous segment's records, whole and with valid crcs,
and the tag is what ends the scan there: a record whose tag is not its file's is not this segment's.
Ids only grow (a new one is past every file present), so no reused file holds its own id's records.
A reused file's marker is `REUSED`: past its last record, bytes that do not start with one of its
own records' headers are what the earlier segment left, not a tear, and are cut without a report.

Format 4 added the tag, format 3 the `tags`. Format 3 and 2 segments (format 2 is format 3 without
`u32 len(tags) | tags`) are still read, so that a spool left by an earlier release is delivered
after an upgrade; they are never reused. New segments are always written in format 4.

No I/O here: `spool.py` owns the files; this module only says what their bytes mean, so that the
format can be tested, and changed, apart from the writing and its failure handling.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from proxy.frozen import quick_init

# Format 4's markers start with what a release reading format 3 takes for the length of an 8-byte
# frame that is no record: it refuses such a file by name (SpoolFormatError), as it should, rather
# than cutting it off as a marker torn while being created ("SPLS" read as a length is 1.4 GB).
MAGIC = b"\x08\x00\x00\x00SPL4"  # format 4: records tagged with their segment's id; every new segment
REUSED = b"\x08\x00\x00\x00SPLR"  # format 4 in a reused file: an earlier segment's records follow this one's
MAGIC_3 = b"SPLSPL\x00\x03"  # format 3: chunk records with tags, still read
MAGIC_2 = b"SPLSPL\x00\x02"  # format 2: chunk records without tags, still read. Format 1 (one event per record) had no marker.
FORMATS = {MAGIC: 4, REUSED: 4, MAGIC_3: 3, MAGIC_2: 2}
FORMAT = 4
HEADER = struct.Struct("<II")  # length, crc: formats 2 and 3
TAGGED = struct.Struct("<III")  # length, crc, tag: format 4
TAG = struct.Struct("<I")
PREFIX = struct.Struct("<dHHI")
LENGTH = struct.Struct("<I")
BytesLike = TypeVar("BytesLike", bytes, memoryview)  # what scan() reads: a file's bytes, or a view of a read's buffer
MAX_RECORD = 64 * 1024 * 1024  # anything longer is corruption, not a request's events


class SpoolFormatError(Exception):
    """A segment file this version cannot read: refusing to start beats silently dropping events."""


@quick_init
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


def header_size(fmt: int) -> int:
    """Bytes before a record's payload in a segment of format `fmt`."""
    return TAGGED.size if fmt >= 4 else HEADER.size


def tag_of(segment: int) -> bytes:
    """The tag every record of segment `segment` carries (format 4)."""
    return TAG.pack(segment & 0xFFFFFFFF)


@quick_init
@dataclass(frozen=True, slots=True)
class Frame:
    """A record ready to be written, in parts: its length and crc (`header`), the segment's tag, the
    fields before the events (`head`) and the joined events. The spool writes them with one `writev`
    once it knows the segment, so the events are never copied into one buffer with their framing,
    and keeps what the reader needs (`record()`) so that a record read back while still in memory is
    never decoded again."""

    header: bytes
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
        return TAGGED.size + len(self.head) + len(self.joined)

    def parts(self, tag: bytes) -> tuple[bytes, bytes, bytes, bytes]:
        """The record's bytes in a segment whose tag is `tag` (`tag_of`)."""
        return self.header, tag, self.head, self.joined

    def record(self, segment: int) -> Record:
        return Record(segment, self.appended_at, self.credential, self.forwarded_for, self.joined, self.lengths, self.size, self.tags)


def frame(appended_at: float, credential: str, forwarded_for: str | None, events: list[bytes], tags: bytes = b"") -> Frame:
    """One format-4 record holding `events` (at least one), ready to be written."""
    cred = credential.encode()
    forwarded = (forwarded_for or "").encode()
    lengths = tuple(map(len, events))
    head = (PREFIX.pack(appended_at, len(cred), len(forwarded), len(events)) + cred + forwarded
            + struct.pack(f"<{len(events) + 1}I", *lengths, len(tags)) + tags)
    joined = b",".join(events)
    header = HEADER.pack(len(head) + len(joined), zlib.crc32(joined, zlib.crc32(head)))
    return Frame(header, head, joined, appended_at, credential, forwarded_for or None, lengths, tags)


def encode(appended_at: float, credential: str, forwarded_for: str | None, events: list[bytes], tags: bytes = b"", *,
           segment: int = 1) -> bytes:
    """One format-4 record holding `events` (at least one), as the bytes of segment `segment`'s file."""
    return b"".join(frame(appended_at, credential, forwarded_for, events, tags).parts(tag_of(segment)))


def decode(segment: int, payload: bytes | memoryview, fmt: int = FORMAT) -> Record:
    """The record in `payload` (a view of a read's buffer is copied once, into the record's events),
    from a segment of format `fmt`."""
    appended_at, cred_len, fwd_len, count = PREFIX.unpack_from(payload)
    start = PREFIX.size
    credential = str(payload[start:start + cred_len], "utf-8")
    start += cred_len
    forwarded = str(payload[start:start + fwd_len], "utf-8") or None
    start += fwd_len
    lengths = struct.unpack_from(f"<{count}I", payload, start)
    start += LENGTH.size * count
    tags = b""
    if fmt >= 3:
        tags_len = LENGTH.unpack_from(payload, start)[0]
        tags = bytes(payload[start + LENGTH.size:start + LENGTH.size + tags_len])
        start += LENGTH.size + tags_len
    return Record(segment, appended_at, credential, forwarded, bytes(payload[start:]), lengths, header_size(fmt) + len(payload), tags)


def event_count(payload: bytes | memoryview) -> int:
    return int(PREFIX.unpack_from(payload)[3])


def scan(data: BytesLike, start: int = 0, fmt: int = FORMAT, segment: int = 0) -> tuple[list[BytesLike], int]:
    """Complete, valid record payloads (of format `fmt`; of segment `segment` in format 4) in `data`
    from `start`, and the offset just past the last one; views of it when it is a view (not copied)."""
    payloads: list[BytesLike] = []
    offset, end = start, len(data)
    size, tag = header_size(fmt), segment & 0xFFFFFFFF
    while offset + size <= end:
        length, crc = HEADER.unpack_from(data, offset)
        body_start = offset + size
        if length < PREFIX.size or length > MAX_RECORD or body_start + length > end:
            break
        if fmt >= 4 and TAG.unpack_from(data, offset + HEADER.size)[0] != tag:
            break  # the end of this segment's records: what follows is an earlier segment's, in a reused file
        payload = data[body_start:body_start + length]
        if zlib.crc32(payload) != crc or not _consistent(payload, fmt):
            break
        payloads.append(payload)
        offset = body_start + length
    return payloads, offset


def _consistent(payload: bytes | memoryview, fmt: int) -> bool:
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


def ours_at(data: bytes, offset: int, segment: int) -> bool:
    """Whether a format-4 file's `data` has, at `offset`, the header of one of segment `segment`'s
    records: past the last whole record, that is a record torn while being written, not what an
    earlier segment left in a reused file."""
    if offset + TAGGED.size > len(data):
        return False
    return bool(TAG.unpack_from(data, offset + HEADER.size)[0] == segment & 0xFFFFFFFF)


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
    for fmt in (3, 2):  # a format-4 file always has its marker first: these shapes are older releases'
        if scan(data, 0, fmt)[0]:
            return 0, fmt
    if not _first_frame_is_whole(data):
        return 0, FORMAT
    raise SpoolFormatError(f"{path} is not a spool segment of format 2, 3 or 4 (written by an older splitter?); "
                           "deliver it with the version that wrote it, or move it away to start")
