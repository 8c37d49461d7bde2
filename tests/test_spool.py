"""The spool on real files: order, acks, rotation, crash recovery, torn tails, quota, group commit."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.delivery import Delivery, SpoolLocked
from proxy.delivery.commit import GroupCommit
from proxy.delivery.spool import FRESH_LIMIT, MAGIC, REUSE_FILES, Record, Recovery, Spool, SpoolFormatError, SpoolFull
from proxy.delivery.spool_format import check_format, encode, frame, scan
from proxy.engine import compile_rules
from proxy.metrics import Metrics
from tests.spooling import synced, write_request

BIG = 1 << 30
Entry = tuple[str, "str | None", bytes]


def opened(directory: Path, *, quota_bytes: int = BIG, segment_bytes: int = 16 * 1024 * 1024, fresh_limit: int = FRESH_LIMIT) -> tuple[Spool, Recovery]:
    spool = Spool(directory, quota_bytes=quota_bytes, segment_bytes=segment_bytes, fresh_limit=fresh_limit)
    return spool, spool.open()


def append(spool: Spool, entries: list[Entry]) -> int:
    """One record per run of entries with the same credential and forwarded-for (as one request's)."""
    ticket = 0
    for (credential, forwarded), run in itertools.groupby(entries, key=lambda e: (e[0], e[1])):
        ticket = write_request(spool, credential, forwarded, [event for _, _, event in run])
    return ticket


async def put(spool: Spool, entries: list[Entry]) -> int:
    ticket = append(spool, entries)
    await synced(spool, ticket)
    return ticket


async def put_each(spool: Spool, entries: list[Entry]) -> None:
    """One record per event, as from one single-event request each."""
    for entry in entries:
        await put(spool, [entry])


async def read(spool: Spool, max_events: int = 1000, max_bytes: int = BIG, linger: float = 0.0, timeout: float = 2.0) -> list[Record]:
    async with asyncio.timeout(timeout):
        return await spool.read(max_events, max_bytes, linger)


async def read_n(spool: Spool, count: int, max_events: int = 1000) -> list[Record]:
    records: list[Record] = []
    while sum(r.count for r in records) < count:
        records += await read(spool, max_events)
    return records


def triples(records: list[Record]) -> list[Entry]:
    return [(r.credential, r.forwarded_for, event) for r in records for event in r.events()]


def events_of(records: list[Record]) -> list[bytes]:
    return [event for r in records for event in r.events()]


def seg_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix in (".seg", ".ack"))


def records_end(path: Path) -> int:
    """Where a segment file's own records end: its size, unless it is a reused file (then an earlier
    segment's records follow)."""
    data = path.read_bytes()
    start, fmt = check_format(path, data)
    return scan(data, start, fmt, int(path.stem))[1]


def kept_files(directory: Path) -> list[str]:
    """Delivered segments' files kept for reuse."""
    return sorted(p.name for p in directory.glob("*.free"))


def ev(i: int, pad: int = 0) -> bytes:
    return b'{"messageId":"m-%d","pad":"%s"}' % (i, b"p" * pad)


# -- append, commit, read ----------------------------------------------------------------------------------


async def test_appended_records_are_read_back_in_order_with_their_fields(tmp_path: Path) -> None:
    spool, recovery = opened(tmp_path)
    assert recovery == Recovery(0, 0, 0, 0, ())
    before = time.time()
    entries = [("seg-key", "203.0.113.9", ev(0)), ("clé-ünïcode-🔑", None, ev(1)), ("k", "2001:db8::1", b"")]
    await put(spool, entries[:2])
    await put(spool, entries[2:])
    after = time.time()
    assert spool.pending == 3
    records = await read(spool)
    assert triples(records) == entries
    assert all(before - 1 <= r.appended_at <= after + 1 for r in records)
    assert [r.size for r in records] == [len(e) for _, _, e in entries]
    assert {r.segment for r in records} == {1}
    await spool.close()


async def test_read_waits_until_something_is_appended(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path)

    async def later() -> None:
        await asyncio.sleep(0.05)
        await put(spool, [("k", None, ev(7))])

    writer = asyncio.create_task(later())
    started = time.monotonic()
    records = await read(spool)
    assert time.monotonic() - started >= 0.04
    assert triples(records) == [("k", None, ev(7))]
    await writer
    await spool.close()


async def test_read_respects_max_events_and_max_bytes_without_splitting_records(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path)
    events = [ev(i, pad=100) for i in range(20)]
    await put_each(spool, [("k", None, e) for e in events])
    got: list[Record] = []
    first = await read(spool, max_events=3)
    assert len(first) == 3
    got += first
    size = len(events[0])
    limit = size * 4 + size // 2  # room for 4 whole records, not 5
    second = await read(spool, max_events=100, max_bytes=limit)
    assert 1 <= len(second) <= 4 and sum(r.size for r in second) <= limit
    got += second
    while len(got) < 20:
        batch = await read(spool, max_events=5, max_bytes=limit)
        assert 1 <= len(batch) <= 5 and sum(r.size for r in batch) <= limit
        got += batch
    assert events_of(got) == events  # whole records, none split, none lost, in order
    await spool.close()


async def test_a_record_larger_than_max_bytes_is_still_returned_alone(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path)
    big = ev(1, pad=5000)
    await put_each(spool, [("k", None, ev(0)), ("k", None, big), ("k", None, ev(2))])
    assert events_of(await read(spool, max_bytes=len(ev(0)) + 10)) == [ev(0)]
    assert events_of(await read(spool, max_bytes=100)) == [big]  # alone, no endless empty reads
    assert events_of(await read(spool, max_bytes=100)) == [ev(2)]
    await spool.close()


async def test_a_record_larger_than_the_read_chunk_is_still_returned_alone(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path)
    big = b'"' + b"x" * (1536 * 1024) + b'"'
    await put_each(spool, [("k", None, big), ("k", None, ev(1))])
    records = await read(spool, max_events=10, max_bytes=480 * 1024)
    assert events_of(records) == [big]  # read() promises at least one record


async def test_linger_waits_for_more_records_when_few_are_ready(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path)
    await put(spool, [("k", None, ev(0))])

    async def later() -> None:
        await asyncio.sleep(0.05)
        await put(spool, [("k", None, ev(1))])

    writer = asyncio.create_task(later())
    records = await read(spool, max_events=10, linger=0.3)
    assert events_of(records) == [ev(0), ev(1)]
    await writer
    # no linger: what is ready is returned at once
    await put(spool, [("k", None, ev(2))])
    started = time.monotonic()
    assert events_of(await read(spool, max_events=10)) == [ev(2)]
    assert time.monotonic() - started < 0.2
    # enough ready for max_events: no lingering either
    await put(spool, [("k", None, ev(3)), ("k", None, ev(4))])
    started = time.monotonic()
    assert events_of(await read(spool, max_events=2, linger=5.0)) == [ev(3), ev(4)]
    assert time.monotonic() - started < 1.0
    await spool.close()


# -- acks, rotation, deletion -----------------------------------------------------------------------------------


async def test_acks_in_read_order_lower_pending_and_note_a_watermark(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path)
    await put_each(spool, [("k", None, ev(i)) for i in range(5)])
    await put(spool, [("k", None, ev(5)), ("k", None, ev(6))])  # one record of two events
    assert spool.pending == 7
    first = await read(spool, max_events=2)
    assert len(first) == 2
    spool.ack(first)
    assert spool.pending == 5
    assert (tmp_path / "000000000001.ack").read_text().strip() == "2"  # records, not events
    rest = await read(spool)
    assert spool.pending == 5  # read is not ack
    spool.ack(rest)
    assert spool.pending == 0
    assert (tmp_path / "000000000001.ack").read_text().strip() == "2"  # notes are rewritten at most every ACK_NOTE_INTERVAL
    assert (tmp_path / "000000000001.seg").exists()  # the active segment is kept for more appends
    await spool.close()
    assert (tmp_path / "000000000001.ack").read_text().strip() == "6"  # close() writes what is due


async def test_rotation_makes_several_segments_read_across_them_and_delete_fully_acked_ones(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path, segment_bytes=400)
    events = [ev(i, pad=100) for i in range(12)]
    for e in events:  # one append each: rotation happens between appends
        await put(spool, [("k", "198.51.100.1", e)])
    names = [n for n in seg_files(tmp_path) if n.endswith(".seg")]
    assert len(names) >= 4
    assert all((tmp_path / n).stat().st_size <= 400 for n in names)
    disk_before = spool.disk_bytes
    records = await read(spool)  # one read crosses every boundary
    assert events_of(records) == events
    assert len({r.segment for r in records}) == len(names)
    first_segment = [r for r in records if r.segment == records[0].segment]
    spool.ack(first_segment[:-1])
    assert (tmp_path / names[0]).exists() and (tmp_path / names[0].replace(".seg", ".ack")).exists()
    spool.ack(first_segment[-1:])
    assert names[0] not in seg_files(tmp_path) and names[0].replace(".seg", ".ack") not in seg_files(tmp_path)
    assert kept_files(tmp_path) == [names[0].replace(".seg", ".free")]  # kept to be written over, counted
    assert spool.disk_bytes == disk_before
    spool.ack(records[len(first_segment):])
    assert spool.pending == 0
    assert seg_files(tmp_path) == sorted([names[-1], names[-1].replace(".seg", ".ack")])  # only the active one is left
    kept = kept_files(tmp_path)
    assert len(kept) == REUSE_FILES  # the rest were deleted
    assert spool.disk_bytes == sum((tmp_path / name).stat().st_size for name in [names[-1], *kept])
    await spool.close()
    assert kept_files(tmp_path) == []  # a stop gives them up


async def test_a_delivered_segment_file_is_written_over_and_a_crash_recovers_only_the_new_records(tmp_path: Path) -> None:
    """A delivered segment's file is kept and reused by the next segment (its blocks are not freed,
    which stalls concurrent fsyncs): the earlier records past the new ones stay in it, whole and with
    valid crcs. After a crash, recovery reads only the new segment's own records (the tag), cuts the
    rest without calling it a tear, and a tear of the new records over the old ones is still one."""
    spool, _ = opened(tmp_path, segment_bytes=1000)
    old = [ev(10 + i, pad=100) for i in range(16)]
    for e in old:
        await put(spool, [("k", None, e)])
    spool.ack(await read_n(spool, len(old)))  # all delivered: every sealed segment's file is kept or deleted
    kept = kept_files(tmp_path)
    assert len(kept) == REUSE_FILES
    inodes = {(tmp_path / name).stat().st_ino for name in kept}
    new = [ev(50 + i, pad=100) for i in range(5)]  # as long as the earlier ones: their records start right where these end
    for e in new:
        await put(spool, [("k", None, e)])
    reused = [p for p in tmp_path.glob("*.seg") if p.stat().st_ino in inodes]
    assert reused
    for path in reused:
        assert path.stat().st_size > records_end(path)  # the earlier segment's records are still there
    leftover = kept_files(tmp_path)
    spool._files.close()  # a crash: no clean stop (which would cut them), the files as they are
    again, recovery = opened(tmp_path, segment_bytes=1000)
    assert (recovery.records, recovery.truncated_bytes) == (len(new), 0)
    assert leftover and kept_files(tmp_path) == []  # what the crashed run kept is removed: its ids may come again
    assert events_of(await read_n(again, len(new))) == new
    for path in reused:
        assert path.stat().st_size == records_end(path)
    await again.close()
    # a tear of a new record written over an earlier segment's: reported, the records before it kept
    third, _ = opened(tmp_path / "torn", segment_bytes=1000)
    for e in old:
        await put(third, [("k", None, e)])
    third.ack(await read_n(third, len(old)))
    reused_now: list[Path] = []
    for i in range(20):  # until a reused file holds some of the new records and the earlier ones after them
        await put(third, [("k", None, ev(70 + i, pad=100))])
        reused_now = [p for p in (tmp_path / "torn").glob("*.seg") if p.stat().st_size > records_end(p) > len(MAGIC)]
        if reused_now:
            break
    [path] = reused_now
    end = records_end(path)
    last = len(encode(0.0, "k", None, [ev(70, pad=100)]))
    with open(path, "r+b") as handle:  # the last record's payload half written: its crc fails
        handle.seek(end - last // 2)
        handle.write(b"\xff" * 8)
    third._files.close()
    _, torn = opened(tmp_path / "torn", segment_bytes=1000)
    assert torn.truncated_bytes > 0 and torn.truncated_segments == (path.name,)


async def test_reading_on_after_the_segment_under_the_cursor_was_deleted(tmp_path: Path) -> None:
    """The sender's normal rhythm: read what is there, appends rotate the segment meanwhile, then ack."""
    spool, _ = opened(tmp_path, segment_bytes=150)
    await put(spool, [("k", None, ev(0, pad=80))])
    first = await read(spool)  # caught up: the cursor sits at the end of segment 1
    await put(spool, [("k", None, ev(1, pad=80))])  # rotates: segment 1 is sealed
    spool.ack(first)  # sealed and fully acked: deleted
    assert "000000000001.seg" not in seg_files(tmp_path)
    assert events_of(await read(spool)) == [ev(1, pad=80)]


async def test_a_segment_fully_acked_before_rotation_is_deleted_when_sealed(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path, segment_bytes=150)
    await put(spool, [("k", None, ev(0, pad=80))])
    spool.ack(await read(spool))  # the sender kept up: all acked while the segment is active
    await put(spool, [("k", None, ev(1, pad=80))])  # rotation seals segment 1
    try:
        assert "000000000001.seg" not in seg_files(tmp_path)
        assert spool.disk_bytes == (tmp_path / "000000000002.seg").stat().st_size
    finally:
        await spool.close()


# -- crash recovery -------------------------------------------------------------------------------------------------


async def test_reopen_resumes_after_the_acked_records(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path)
    entries = [(f"key-{i}", None if i % 2 else f"10.0.0.{i}", ev(i)) for i in range(10)]
    await put(spool, entries)
    records = await read(spool)
    spool.ack(records[:3])
    spool.ack(records[3:4])  # K = 4 acked, 6 read but not acked
    await spool.close()  # a stop without acking the rest

    again, recovery = opened(tmp_path)
    assert (recovery.records, recovery.skipped, recovery.truncated_bytes, recovery.truncated_segments) == (6, 4, 0, ())
    assert again.pending == 6
    assert triples(await read_n(again, 6)) == entries[4:]
    await again.close()


async def test_reopen_without_close_sees_what_was_committed(tmp_path: Path) -> None:
    """A crash: no close(), another instance opens the same directory."""
    spool, _ = opened(tmp_path)
    entries = [("k", None, ev(i)) for i in range(5)]
    await put_each(spool, entries)
    spool.ack(await read(spool, max_events=2))
    again, recovery = opened(tmp_path)
    assert (recovery.records, recovery.skipped) == (3, 2)
    assert triples(await read_n(again, 3)) == entries[2:]
    await spool.close()
    await again.close()


async def test_a_segment_acked_in_full_before_the_stop_is_removed_at_open(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path, segment_bytes=200)
    for i in range(2):
        await put(spool, [("k", None, ev(i, pad=100))])  # one segment each
    spool.ack(await read(spool))  # segment 1 (sealed) is deleted now; segment 2 is active, acked in full
    assert seg_files(tmp_path) == ["000000000002.ack", "000000000002.seg"]
    await spool.close()

    again, recovery = opened(tmp_path, segment_bytes=200)
    assert (recovery.records, recovery.skipped, recovery.truncated_bytes) == (0, 1, 0)
    assert seg_files(tmp_path) == ["000000000003.seg"]  # both .seg and .ack of segment 2 are gone
    await put(again, [("k", None, ev(9))])
    assert events_of(await read(again)) == [ev(9)]
    await again.close()


async def test_everything_acked_leaves_nothing_to_replay(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path)
    await put(spool, [("k", None, ev(i)) for i in range(4)])
    spool.ack(await read(spool))
    await spool.close()
    again, recovery = opened(tmp_path)
    assert (recovery.segments, recovery.records, recovery.skipped) == (1, 0, 4)
    assert seg_files(tmp_path) == ["000000000002.seg"]  # only the new, empty active segment
    assert again.pending == 0 and again.oldest_age() == 0.0
    await again.close()


async def test_a_stale_earlier_segment_does_not_lose_the_pending_tail_of_the_next(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path, segment_bytes=100)
    await put(spool, [("k", None, b'"A' + b"a" * 60 + b'"')])
    segment_1 = (tmp_path / "000000000001.seg").read_bytes()
    await put_each(spool, [("k", None, b'"B"'), ("k", None, b'"C"')])  # segment 2
    records = await read(spool)
    spool.ack(records[:2])  # segment 1 deleted, segment 2 notes 1 acked
    await spool.close()
    (tmp_path / "000000000001.seg").write_bytes(segment_1)  # the unlink did not survive the crash

    again, recovery = opened(tmp_path, segment_bytes=100)
    assert (recovery.records, recovery.skipped) == (2, 1)
    got = await read(again, max_events=2)  # what recovery counted as pending: A (note lost) and C
    again.ack(got)
    assert b'"C"' in events_of(got) or again.pending > 0  # C is delivered or still pending, never dropped
    await put(again, [("k", None, b'"D"')])
    assert events_of(await read(again))[-1:] == [b'"D"']
    await again.close()


# -- torn and corrupt tails ---------------------------------------------------------------------------------------------


async def three_records(directory: Path) -> tuple[list[Entry], list[int]]:
    """Three committed records in segment 1, and the file's size after each."""
    spool, _ = opened(directory)
    entries = [("k", "192.0.2.1", ev(i, pad=20)) for i in range(3)]
    sizes = []
    for entry in entries:
        await put(spool, [entry])
        sizes.append((directory / "000000000001.seg").stat().st_size)
    await spool.close()
    return entries, sizes


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


def claim_4gb(data: bytes, start: int) -> bytes:
    return data[:start] + struct.pack("<I", 0xFFFFFFF0) + data[start + 4:]


@pytest.mark.parametrize("damage", ["garbage", "short_garbage", "cut", "crc", "length_4gb"])
async def test_a_torn_or_corrupt_tail_is_truncated_and_reported(tmp_path: Path, damage: str) -> None:
    entries, sizes = await three_records(tmp_path)
    path = tmp_path / "000000000001.seg"
    data = path.read_bytes()
    assert len(data) == sizes[-1]
    if damage == "garbage":
        path.write_bytes(data + b"\xde\xad\xbe\xef" * 7)
        survivors, valid = 3, sizes[2]
    elif damage == "short_garbage":
        path.write_bytes(data + b"\x01\x02\x03")  # less than a header
        survivors, valid = 3, sizes[2]
    elif damage == "cut":
        path.write_bytes(data[:-5])
        survivors, valid = 2, sizes[1]
    elif damage == "crc":
        path.write_bytes(flip_last_byte(data))  # the last byte of the last event: crc mismatch
        survivors, valid = 2, sizes[1]
    else:
        path.write_bytes(claim_4gb(data, sizes[1]))
        survivors, valid = 2, sizes[1]
    damaged_size = path.stat().st_size

    spool, recovery = opened(tmp_path)
    assert recovery.truncated_bytes == damaged_size - valid > 0
    assert recovery.truncated_segments == ("000000000001.seg",)
    assert recovery.records == survivors
    assert path.stat().st_size == valid
    assert triples(await read_n(spool, survivors)) == entries[:survivors]
    await spool.close()
    _, clean = opened(tmp_path)  # repaired for good: nothing more to cut at the next start
    assert clean.truncated_bytes == 0 and clean.records == survivors


async def test_corruption_in_the_middle_of_an_older_segment_keeps_what_precedes_it(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path, segment_bytes=300)
    entries = [("k", None, ev(i, pad=30)) for i in range(9)]
    sizes: dict[int, list[int]] = {}
    for entry in entries:
        await put(spool, [entry])
        newest = max(tmp_path.glob("*.seg"))
        sizes.setdefault(int(newest.stem), []).append(newest.stat().st_size)
    await spool.close()
    assert len(sizes) >= 3 and len(sizes[1]) >= 3
    per_segment = {segment: len(s) for segment, s in sizes.items()}
    path = tmp_path / "000000000001.seg"
    data = bytearray(path.read_bytes())
    data[sizes[1][0] + 12] ^= 0xFF  # inside the second record's payload
    path.write_bytes(bytes(data))

    again, recovery = opened(tmp_path, segment_bytes=300)
    assert recovery.truncated_segments == ("000000000001.seg",)
    assert recovery.truncated_bytes == sizes[1][-1] - sizes[1][0]
    assert path.stat().st_size == sizes[1][0]
    expected = entries[:1] + entries[per_segment[1]:]  # segment 1's first record, and all later segments
    assert recovery.records == len(expected)
    assert triples(await read_n(again, len(expected))) == expected
    await again.close()


async def test_a_segment_torn_while_being_created_is_dropped_at_open(tmp_path: Path) -> None:
    (tmp_path / "000000000001.seg").write_bytes(MAGIC[:3])
    spool, recovery = opened(tmp_path)
    assert (recovery.records, recovery.truncated_bytes) == (0, 0)
    assert seg_files(tmp_path) == ["000000000002.seg"]
    await spool.close()


async def test_a_segment_of_another_format_stops_the_open_with_its_path(tmp_path: Path) -> None:
    old = tmp_path / "000000000001.seg"
    old.write_bytes(struct.pack("<II", 20, 0) + b"\0" * 20)  # format 1 had no marker
    with pytest.raises(SpoolFormatError, match=r"000000000001\.seg is not a spool segment of format 2"):
        opened(tmp_path)
    assert old.stat().st_size == 28  # left as it was: not truncated as if it were corrupt


# -- quota ---------------------------------------------------------------------------------------------------------------


async def test_quota_refuses_a_batch_that_does_not_fit_and_writes_nothing(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path, quota_bytes=1000, segment_bytes=300)
    path = tmp_path / "000000000001.seg"
    await put(spool, [("k", None, ev(0, pad=100))])
    one = spool.disk_bytes
    assert one == path.stat().st_size > 100
    assert spool.has_room(1000 - one) and not spool.has_room(1000 - one + 1)
    with pytest.raises(SpoolFull):
        write_request(spool, "k", None, [ev(i, pad=100) for i in range(1, 10)])
    assert path.stat().st_size == one and spool.disk_bytes == one and spool.pending == 1
    assert seg_files(tmp_path) == ["000000000001.seg"]
    for i in range(1, 10):  # fill it up one by one, rotating
        try:
            await put(spool, [("k", None, ev(i, pad=100))])
        except SpoolFull:
            break
    assert not spool.has_room(one)
    total = sum(p.stat().st_size for p in tmp_path.glob("*.seg"))
    assert total == spool.disk_bytes <= 1000
    with pytest.raises(SpoolFull):
        write_request(spool, "k", None, [ev(99, pad=100)])
    assert sum(p.stat().st_size for p in tmp_path.glob("*.seg")) == total
    # the sender catches up: sealed segments are deleted and the room comes back
    spool.ack(await read(spool))
    assert spool.disk_bytes < total and spool.has_room(one)
    await put(spool, [("k", None, ev(100, pad=100))])
    assert events_of(await read(spool)) == [ev(100, pad=100)]
    await spool.close()


async def test_at_the_quota_a_fully_delivered_active_segment_makes_room(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path, quota_bytes=400)
    await put(spool, [("k", None, ev(0, pad=200))])
    assert not spool.has_room(300)  # the record is still waiting
    spool.ack(await read(spool))  # delivered: its bytes are still in the active segment, but reclaimable
    assert spool.has_room(300)
    await put(spool, [("k", None, ev(1, pad=200))])  # rotates: the delivered segment is deleted
    assert seg_files(tmp_path) == ["000000000002.seg"] and spool.disk_bytes == (tmp_path / "000000000002.seg").stat().st_size
    assert events_of(await read(spool)) == [ev(1, pad=200)]
    await spool.close()


# -- group commit -------------------------------------------------------------------------------------------------------------


async def test_fifty_concurrent_commits_complete_together(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path)

    async def request(i: int) -> int:
        ticket = write_request(spool, "k", None, [ev(i)])
        await synced(spool, ticket)
        return ticket

    started = time.monotonic()
    async with asyncio.timeout(10):
        tickets = await asyncio.gather(*(request(i) for i in range(50)))
    assert time.monotonic() - started < 5.0
    assert sorted(tickets) == list(range(1, 51))
    for ticket in tickets:  # all covered: committing again does not even yield to the loop
        coroutine = synced(spool, ticket)
        with pytest.raises(StopIteration):
            coroutine.send(None)
    assert events_of(await read(spool)) == [ev(i) for i in range(50)]
    await spool.close()


async def test_one_commit_covers_every_earlier_ticket(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path)
    tickets = [write_request(spool, "k", None, [ev(i)]) for i in range(50)]
    await synced(spool, tickets[-1])  # one fsync round for all of them
    for ticket in tickets:
        coroutine = synced(spool, ticket)
        with pytest.raises(StopIteration):
            coroutine.send(None)
    again, recovery = opened(tmp_path)  # and it is all on disk for another reader
    assert recovery.records == 50
    await spool.close()
    await again.close()


async def test_one_group_commit_covers_tickets_of_several_spools(tmp_path: Path) -> None:
    group = GroupCommit()
    first = Spool(tmp_path / "a", quota_bytes=BIG, group=group)
    second = Spool(tmp_path / "b", quota_bytes=BIG, group=group)
    first.open(), second.open()
    tickets = [(first, write_request(first, "k", None, [ev(1)])), (second, write_request(second, "k", None, [ev(2)]))]
    await group.wait(tickets)
    assert (first.committed, second.committed) == (1, 1)
    _, recovered = opened(tmp_path / "b")  # on disk for another reader
    assert recovered.records == 1
    await first.close()
    await second.close()


async def test_a_failed_sync_fails_the_waiting_request_and_the_next_round_recovers(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path)
    ticket = write_request(spool, "k", None, [ev(1)])
    fd = spool._files.active
    assert fd is not None
    saved = os.dup(fd)
    os.close(fd)  # the segment's descriptor goes bad under the spool: fsync fails with EBADF
    with pytest.raises(OSError):
        await synced(spool, ticket)
    os.dup2(saved, fd)  # the same descriptor works again
    os.close(saved)
    await synced(spool, write_request(spool, "k", None, [ev(2)]))  # later requests are not stuck behind the failure
    assert spool.committed == 2
    await spool.close()


async def test_a_descriptor_a_sync_round_uses_stays_open_until_every_round_using_it_is_over(tmp_path: Path) -> None:
    """A segment sealed while a worker thread fsyncs its descriptor: closed then, the fsync would hit
    a closed (or, worse, reused) descriptor and fail the round's requests with a 503 for nothing.
    Rounds overlap (`--durability fsync`), so a round that starts while the first still runs must not
    close it either: only one that starts after the first was released."""
    spool, _ = opened(tmp_path, segment_bytes=300)
    write_request(spool, "k", None, [ev(0, pad=120)])
    round_one = spool.take_dirty()  # a round starts: its thread will fsync these
    [first] = round_one[0]
    write_request(spool, "k", None, [ev(1, pad=120)])  # rotates: segment 1 is sealed while round one still runs
    write_request(spool, "k", None, [ev(2, pad=120)])  # and segment 2
    round_two = spool.take_dirty()  # starts while round one runs (rounds overlap)
    [second] = set(round_two[0]) - {spool._files.active}
    assert first not in round_two[0] and first not in round_two[2]  # not closed under round one's fsync
    spool.sync(round_one)  # round one's fsync of the sealed segment still works
    spool.sync(round_two)
    spool.release(round_two)  # round two is over before round one is
    write_request(spool, "k", None, [ev(3, pad=120)])
    round_three = spool.take_dirty()
    assert second in round_three[2]  # nothing uses segment 2's descriptor any more
    assert first not in round_three[2]  # round one still does
    spool.sync(round_three)
    spool.close_sealed(round_three)
    spool.release(round_three)
    os.fstat(first)
    with pytest.raises(OSError):
        os.fstat(second)
    spool.release(round_one)
    write_request(spool, "k", None, [ev(4, pad=120)])
    round_four = spool.take_dirty()  # the first round after every user of it is over closes it
    assert first in round_four[2]
    spool.sync(round_four)
    spool.close_sealed(round_four)
    with pytest.raises(OSError):
        os.fstat(first)
    await spool.close()


async def test_a_sync_round_closes_the_sealed_descriptors_it_was_handed_even_when_its_fsync_fails(tmp_path: Path) -> None:
    """Sealed descriptors are closed by a round's worker thread once its requests have their answer
    (closing the last descriptor of a delivered, unlinked segment frees it: work kept off the event
    loop and out of the answers' wait). A failed fsync must not leave them open: nobody else would
    ever close them."""
    spool, _ = opened(tmp_path, segment_bytes=300)
    for i in range(3):
        write_request(spool, "k", None, [ev(i, pad=120)])  # each one rotates: segments 1 and 2 are sealed
    await synced(spool, spool.appended)  # this round syncs their descriptors, so keeps them open
    ticket = write_request(spool, "k", None, [ev(3, pad=120)])  # rotates again
    sealed = list(spool._files._sealed)
    assert len(sealed) == 3
    active = spool._files.active
    assert active is not None
    saved = os.dup(active)
    os.close(active)  # the active descriptor goes bad: this round's fsync fails with EBADF
    try:
        with pytest.raises(OSError):
            await synced(spool, ticket)
        await spool.group.idle()  # the round's thread closes them after the answer
        for fd in sealed:
            with pytest.raises(OSError):
                os.fstat(fd)
    finally:
        os.dup2(saved, active)
        os.close(saved)
    await synced(spool, write_request(spool, "k", None, [ev(4, pad=120)]))  # a new segment after the failed sync: nothing stuck
    assert spool._files.active != active
    await spool.close()

# -- oldest age ---------------------------------------------------------------------------------------------------------------------


async def test_oldest_age_follows_the_oldest_unacked_record(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path)
    assert spool.oldest_age() == 0.0 and spool.oldest_age(now=time.time() + 100) == 0.0
    await put(spool, [("k", None, ev(0))])
    await asyncio.sleep(0.02)
    await put(spool, [("k", None, ev(1))])
    first, second = await read(spool)
    assert second.appended_at > first.appended_at
    assert spool.oldest_age(now=first.appended_at + 5) == pytest.approx(5.0)
    assert spool.oldest_age(now=first.appended_at + 60) == pytest.approx(60.0)
    assert spool.oldest_age(now=first.appended_at - 10) == 0.0  # never negative
    assert 0.0 <= spool.oldest_age() < 5.0
    spool.ack([first])
    assert spool.oldest_age(now=second.appended_at + 5) == pytest.approx(5.0)
    spool.ack([second])
    assert spool.oldest_age(now=second.appended_at + 5) == 0.0
    await spool.close()


async def test_oldest_age_survives_a_reopen(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path)
    await put_each(spool, [("k", None, ev(0)), ("k", None, ev(1))])
    first, second = await read(spool)
    spool.ack([first])
    await spool.close()
    again, _ = opened(tmp_path)
    assert again.oldest_age(now=second.appended_at + 7) == pytest.approx(7.0)
    await again.close()


# -- one owner per spool directory ------------------------------------------------------------------------------------------------


RULES = """\
version: 1
destinations:
  segment: {kind: segment, url: "http://127.0.0.1:9", timeout: 1}
  rudderstack: {kind: rudderstack, url: "http://127.0.0.1:9", timeout: 1}
sources:
  - name: web
    write_keys: ["web-key-0123456789"]
    credentials: {segment: "seg-web-key-0123456789", rudderstack: "rs-web-key-0123456789"}
cohort: {key: [anonymousId, userId], salt: "t"}
rules:
  - name: everyone
    route: {to: [segment, rudderstack]}
"""


async def test_a_second_delivery_on_the_same_spool_dir_is_refused(tmp_path: Path) -> None:
    rules = compile_rules(RULES)
    first = Delivery(Metrics(), spool_dir=tmp_path / "spool", dead_letter_dir=tmp_path / "dead")
    second = Delivery(Metrics(), spool_dir=tmp_path / "spool", dead_letter_dir=tmp_path / "dead")
    third = Delivery(Metrics(), spool_dir=tmp_path / "spool", dead_letter_dir=tmp_path / "dead")
    try:
        first.start(rules)
        assert {p.name for p in (tmp_path / "spool").iterdir()} >= {".lock", "segment", "rudderstack"}
        with pytest.raises(SpoolLocked):
            second.start(rules)
    finally:
        await first.close(0)
        await second.close(0)
    try:
        third.start(rules)  # released by close(): the next process may take it
    finally:
        await third.close(0)


# -- property: exactly the unacked events survive a reopen, in order -----------------------------------------------------


credentials = st.text(min_size=0, max_size=12)
forwarded = st.none() | st.text(min_size=1, max_size=20)
entries_strategy = st.lists(st.tuples(credentials, forwarded, st.binary(max_size=300)), min_size=1, max_size=25)


def roundtrip(entries: list[Entry], batches: list[int], rounds: int, acked_rounds: int, segment_bytes: int, one_append_each: bool,
              fresh_limit: int = FRESH_LIMIT) -> None:
    with tempfile.TemporaryDirectory() as name:
        asyncio.run(_roundtrip(Path(name), entries, batches, rounds, acked_rounds, segment_bytes, one_append_each, fresh_limit))


async def _roundtrip(directory: Path, entries: list[Entry], batches: list[int], rounds: int, acked_rounds: int,
                     segment_bytes: int, one_append_each: bool, fresh_limit: int) -> None:
    spool, _ = opened(directory, segment_bytes=segment_bytes, fresh_limit=fresh_limit)
    if one_append_each:
        tickets = [append(spool, [entry]) for entry in entries]
    else:
        tickets = [append(spool, part) for part in (entries[: len(entries) // 2], entries[len(entries) // 2:]) if part]
    await synced(spool, tickets[-1])
    sizes = itertools.cycle(batches)
    read_batches: list[list[Record]] = []
    seen = 0
    for _ in range(rounds):  # before the reopen: read some batches, ack a prefix of them in order
        if seen == len(entries):
            break
        batch = await read(spool, max_events=next(sizes))
        read_batches.append(batch)
        seen += sum(r.count for r in batch)
        if len(read_batches) <= acked_rounds:
            spool.ack(batch)
    acked = sum(r.count for b in read_batches[:acked_rounds] for r in b)
    assert triples([r for b in read_batches for r in b]) == entries[:seen]
    await spool.close()

    again, recovery = opened(directory, segment_bytes=segment_bytes)
    assert (recovery.records, recovery.truncated_bytes) == (len(entries) - acked, 0)
    if segment_bytes >= 16 * 1024 * 1024:
        assert recovery.skipped == acked  # one segment: all of its acks are in its note
    else:
        assert recovery.skipped <= acked  # segments deleted while running are not counted
    after: list[Record] = []
    while sum(r.count for r in after) < len(entries) - acked:
        batch = await read(again, max_events=next(sizes))
        after += batch
        again.ack(batch)
    assert triples(after) == entries[acked:]  # the acked ones are not returned, every other one is, in order
    assert again.pending == 0
    await again.close()


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=entries_strategy, batches=st.lists(st.integers(1, 6), min_size=1, max_size=5),
       rounds=st.integers(0, 10), acked_rounds=st.integers(0, 10), one_append_each=st.booleans())
def test_property_acked_events_are_gone_after_a_reopen_and_the_rest_come_back_in_order(
        entries: list[Entry], batches: list[int], rounds: int, acked_rounds: int, one_append_each: bool) -> None:
    roundtrip(entries, batches, rounds, acked_rounds, 16 * 1024 * 1024, one_append_each)


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@example(entries=[("k", None, b"x" * 80)] * 3, batches=[1], rounds=3, acked_rounds=3, segment_bytes=150, one_append_each=True)
@given(entries=entries_strategy, batches=st.lists(st.integers(1, 6), min_size=1, max_size=5),
       rounds=st.integers(0, 10), acked_rounds=st.integers(0, 10), segment_bytes=st.integers(50, 2000), one_append_each=st.booleans())
def test_property_the_same_across_many_small_segments(
        entries: list[Entry], batches: list[int], rounds: int, acked_rounds: int, segment_bytes: int, one_append_each: bool) -> None:
    roundtrip(entries, batches, rounds, acked_rounds, segment_bytes, one_append_each)


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=entries_strategy, batches=st.lists(st.integers(1, 6), min_size=1, max_size=5), rounds=st.integers(0, 10),
       acked_rounds=st.integers(0, 10), segment_bytes=st.integers(50, 2000), one_append_each=st.booleans(), fresh_limit=st.integers(0, 3000))
def test_property_the_same_whether_records_are_read_from_memory_or_from_the_files(
        entries: list[Entry], batches: list[int], rounds: int, acked_rounds: int, segment_bytes: int, one_append_each: bool, fresh_limit: int) -> None:
    roundtrip(entries, batches, rounds, acked_rounds, segment_bytes, one_append_each, fresh_limit)


async def test_a_reader_that_falls_behind_reads_the_files_and_then_memory_again(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path, fresh_limit=300)
    events = [ev(i, pad=100) for i in range(8)]  # ~150 bytes a record: the third overflows the memory
    for e in events[:5]:
        write_request(spool, "k", None, [e])
    assert events_of(await read(spool)) == events[:5]  # memory keeps the last one (300 bytes): the first four from the files
    write_request(spool, "k", None, [events[5]])  # caught up again: kept in memory
    (tmp_path / "000000000001.seg").write_bytes(b"")  # were it read from the file, nothing would be found
    assert events_of(await read(spool)) == [events[5]]
    await spool.close()


async def test_the_reader_lags_once_more_than_half_the_memory_is_unread_and_counts_what_it_reads_back(tmp_path: Path) -> None:
    """`lagging` (the pacer's sign, proxy/delivery/pacing.py) counts the unread bytes only: records
    read but still in memory do not make a caught-up reader lag. `read_back` counts the file bytes
    read because memory no longer had them."""
    spool, _ = opened(tmp_path, fresh_limit=1000)  # records of ~160 bytes: half the memory is three of them
    events = [ev(i, pad=100) for i in range(16)]
    assert not spool.lagging
    for e in events[:3]:
        write_request(spool, "k", None, [e])
    assert not spool.lagging
    write_request(spool, "k", None, [events[3]])
    assert spool.lagging
    assert events_of(await read(spool)) == events[:4]
    assert (spool.lagging, spool.read_back) == (False, 0)  # all from memory
    write_request(spool, "k", None, [events[4]])
    assert not spool.lagging  # one unread record; the four read are still in memory, and do not count
    for e in events[5:12]:
        write_request(spool, "k", None, [e])  # eight unread, more than memory holds: the oldest went to the files only
    assert spool.lagging
    first = await read(spool, max_events=3)
    assert events_of(first) == events[4:7]
    assert spool.read_back > 0  # from the file
    assert spool.lagging  # five left, still more than half
    rest = await read(spool)
    assert events_of(rest) == events[7:12]
    assert not spool.lagging
    spool.ack(first + rest)
    await spool.close()


async def test_a_reader_lags_across_segments_by_the_bytes_of_each(tmp_path: Path) -> None:
    """Behind by whole segments, the lag adds up each one's size from the cursor on; a delivered
    segment under the cursor is not counted."""
    spool, _ = opened(tmp_path, fresh_limit=1200, segment_bytes=400)  # records of 165 bytes, two a segment (after its 8-byte marker)
    events = [ev(i, pad=100) for i in range(8)]
    for e in events[:2]:
        write_request(spool, "k", None, [e])
    spool.ack(await read(spool))  # the first segment delivered
    for e in events[2:5]:
        write_request(spool, "k", None, [e])  # over the next two segments: 511 bytes with their markers, under half
    assert not spool.lagging
    write_request(spool, "k", None, [events[5]])
    assert spool.lagging  # 676 bytes over two segments
    assert events_of(await read(spool, max_events=2)) == events[2:4]
    assert not spool.lagging
    await spool.close()


async def test_a_reader_behind_takes_the_newest_records_from_memory_and_only_the_older_from_the_files(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path, fresh_limit=350)  # records of ~160 bytes: memory keeps the last two
    events = [ev(i, pad=100) for i in range(5)]
    offsets = []
    for e in events:
        offsets.append((tmp_path / "000000000001.seg").stat().st_size)
        write_request(spool, "k", None, [e])
    os.truncate(tmp_path / "000000000001.seg", offsets[3])  # the last two records are gone from the file: only memory has them
    assert events_of(await read_n(spool, 5)) == events
    await spool.close()


async def test_a_reader_behind_reads_each_record_of_the_files_once_though_its_reads_stop_short(tmp_path: Path) -> None:
    """A read from the file scans more than its limits take; the next read starts with what it checked
    then: the file emptied between the two does not matter, and the order and the limits hold."""
    spool, _ = opened(tmp_path, fresh_limit=0)  # everything from the files
    events = [ev(i, pad=100) for i in range(10)]
    for e in events:
        write_request(spool, "k", None, [e])
    first = await read(spool, max_events=3)  # one read of the file scans all ten records
    assert events_of(first) == events[:3]
    os.truncate(tmp_path / "000000000001.seg", 0)  # were they read again, nothing would be found
    second = await read(spool, max_events=4)
    third = await read(spool, max_events=100)
    assert (events_of(second), events_of(third)) == (events[3:7], events[7:])
    spool.ack(first + second + third)
    assert spool.pending == 0
    await spool.close()


async def test_reads_of_the_files_stopping_short_across_segments_hand_out_every_record_once_in_order(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path, fresh_limit=0, segment_bytes=600)  # ~150 bytes a record: four per segment
    events = [ev(i, pad=100) for i in range(8)]
    for e in events:
        write_request(spool, "k", None, [e])
    taken = await read(spool, max_events=2)
    assert events_of(taken) == events[:2]
    rest = await read_n(spool, 6, max_events=1)
    assert events_of(rest) == events[2:]
    spool.ack(taken + rest)
    assert spool.pending == 0
    await spool.close()


async def test_a_file_that_cannot_be_read_after_a_read_took_records_loses_none_of_them(tmp_path: Path) -> None:
    """A read that has taken records and then fails on the next segment's file hands out what it took;
    the next read meets the error (and retries), and once the file is back every record comes once."""
    spool, _ = opened(tmp_path, fresh_limit=0, segment_bytes=600)  # ~150 bytes a record: three per segment
    events = [ev(i, pad=100) for i in range(8)]
    for e in events:
        write_request(spool, "k", None, [e])
    second = tmp_path / "000000000002.seg"
    assert second.exists()
    taken = await read(spool, max_events=2)  # the first segment's file read: its third record kept for the next read
    second.rename(tmp_path / "away")  # the next read takes that record, then cannot open the second segment's file
    taken += await read(spool, max_events=100)
    assert events_of(taken) == events[:3]
    (tmp_path / "away").rename(second)
    taken += await read_n(spool, 5)
    assert events_of(taken) == events
    spool.ack(taken)
    assert spool.pending == 0
    await spool.close()


async def test_the_steady_state_reads_nothing_back_from_the_files(tmp_path: Path) -> None:
    """A reader keeping up takes every record from memory: the segment file emptied under it does not matter."""
    spool, _ = opened(tmp_path)
    segment = tmp_path / "000000000001.seg"
    for round_ in range(20):
        sent = [ev(10 * round_ + i, pad=200) for i in range(3)]
        for e in sent:
            write_request(spool, "k", None, [e])
        os.truncate(segment, 0)  # were anything read back from the file, it would be missing
        records = await read_n(spool, 3)
        assert events_of(records) == sent
        spool.ack(records)
    await spool.close()


# -- one write of several records (a request's primary and mirror copies), taken back whole ---------------------------------


async def test_retract_takes_back_every_record_of_a_write_of_several_and_the_reader_goes_on(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path, fresh_limit=400)  # records of ~160 bytes: memory keeps two, the first is then read from the file
    segment = tmp_path / "000000000001.seg"
    write_request(spool, "k", None, [ev(0, pad=100)])
    before = (segment.stat().st_size, spool.disk_bytes, spool.pending, spool._unread, spool._unread_events)
    ticket = spool.write([frame(time.time(), "k", None, [ev(1, pad=100)]), frame(time.time(), "m", None, [ev(2, pad=100), ev(3)])])
    assert spool.retract(ticket)
    assert (segment.stat().st_size, spool.disk_bytes, spool.pending, spool._unread, spool._unread_events) == before
    write_request(spool, "k", None, [ev(4, pad=100)])
    assert events_of(await read_n(spool, 2)) == [ev(0, pad=100), ev(4, pad=100)]
    await spool.close()
    again, recovery = opened(tmp_path)
    assert (recovery.records, recovery.truncated_bytes) == (2, 0)
    await again.close()


Op = tuple[str, int, int]
spool_ops = st.lists(st.tuples(st.sampled_from("wwwmrax"), st.integers(1, 5), st.integers(0, 250)), max_size=40)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=spool_ops, fresh_limit=st.integers(0, 1500), segment_bytes=st.integers(50, 3000))
def test_property_writes_of_one_or_several_records_retracts_reads_and_acks_keep_order_and_counters(
        ops: list[Op], fresh_limit: int, segment_bytes: int) -> None:
    """Against a model: every record written and not taken back is read once, in order, from memory or
    from the files, whatever the window and the segment size; the counters match the files."""
    with tempfile.TemporaryDirectory() as name:
        asyncio.run(_against_the_model(Path(name), ops, fresh_limit, segment_bytes))


async def _against_the_model(directory: Path, ops: list[Op], fresh_limit: int, segment_bytes: int) -> None:
    spool, _ = opened(directory, segment_bytes=segment_bytes, fresh_limit=fresh_limit)
    written: list[list[bytes]] = []  # records written and not taken back, in order
    done, acked, handed, last, n = 0, 0, list[Record](), None, 0
    for op, count, pad in ops:
        if op in "wm":  # one record, or two in one write (a primary and its mirror copy)
            records = [[ev(n + i, pad=pad) for i in range(count)]] + ([[ev(n + count, pad=pad // 2)]] if op == "m" else [])
            n += count + 1
            frames = [frame(time.time(), "k", None, events) for events in records]
            last = (spool.write(frames[0] if len(frames) == 1 else frames), len(written))
            written += records
        elif op == "x" and last is not None:  # right after its write, as Delivery does
            assert spool.retract(last[0])
            del written[last[1]:]
            last = None
        elif op == "r" and done < len(written):
            last = None
            got = await read(spool, max_events=count, max_bytes=pad * 3 + 1)
            assert [r.events() for r in got] == written[done:done + len(got)]
            done += len(got)
            handed += got
        elif op == "a":
            last = None
            spool.ack(handed)
            acked, handed = acked + sum(r.count for r in handed), []
        assert spool.disk_bytes == sum(map(records_end, directory.glob("*.seg"))) + sum(p.stat().st_size for p in directory.glob("*.free"))
        assert (spool._unread, spool._unread_events) == (len(written) - done, sum(map(len, written[done:])))
        assert spool.pending == sum(map(len, written)) - acked
    if spool.appended:
        await synced(spool, spool.appended)
    crashed = directory.parent / f"{directory.name}-crashed"
    shutil.copytree(directory, crashed)  # the files as a crash (not a power cut) leaves them, reused ones included
    again, recovery = opened(crashed, segment_bytes=segment_bytes)
    every = [event for events in written for event in events]
    assert recovery.truncated_bytes == 0 and spool.pending <= recovery.records <= len(every)
    replayed = await read_n(again, recovery.records) if recovery.records else []
    assert [e for r in replayed for e in r.events()] == every[len(every) - recovery.records:]  # a suffix: nothing stale
    await again.close()
    shutil.rmtree(crashed)
    rest = await read_n(spool, sum(map(len, written[done:]))) if done < len(written) else []
    assert [r.events() for r in rest] == written[done:]
    spool.ack(handed + rest)
    assert spool.pending == 0
    await spool.close()
