"""Issue: a full disk must never turn a 200 into a lost event, nor wedge or poison splitter.

Every test runs the spool (or a whole `splitter serve`) on a real tiny tmpfs mounted for the test
and fills it with a filler file: the short writes, ENOSPC on a format marker and on an ack note are
the kernel's, nothing of splitter is mocked. Rules: a write is whole on disk and fsynced, or the
request is answered 503 with Retry-After and nothing of it is delivered; the spool stays readable
and recovers by itself when space returns; a descriptor is closed once and never written after.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import itertools
import os
import socket
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import orjson
import pytest

from loadtest.process import SplitterProcess, launch_splitter
from loadtest.receivers import RunningReceiver, start_receiver
from proxy.delivery import Chunk, Delivery, Submission
from proxy.delivery.spool import HEADER, MAGIC, Record, Spool, encode
from proxy.delivery.spool_format import REUSED, frame
from proxy.engine import Source, compile_rules
from proxy.metrics import Metrics
from tests.rules_texts import served_head
from tests.spooling import sync_round, synced, write_request
from tests.test_spool import RULES

PAGE = os.sysconf("SC_PAGE_SIZE")


# -- a tiny real filesystem ------------------------------------------------------------------------------------


@contextmanager
def tiny_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)], capture_output=True, text=True,
                          timeout=30)
    if done.returncode != 0:
        pytest.skip(f"these tests mount a tiny tmpfs to fill it for real, and mount was refused here: {done.stderr.strip()} "
                    "(run them as root, or with CAP_SYS_ADMIN)")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[Path]:
    with tiny_tmpfs(tmp_path / "fs", "256k") as mounted:
        yield mounted


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(directory: Path, leave: int = 0) -> Path:
    """Fill the filesystem to its last page, then give `leave` bytes (whole pages) back."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        chunk = b"\xff" * (16 * PAGE)
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        assert free_bytes(directory) == 0
        if leave:
            os.ftruncate(fd, os.fstat(fd).st_size - leave)
    finally:
        os.close(fd)
    assert free_bytes(directory) == leave
    return filler


def ev(i: int, pad: int = 0) -> bytes:
    return b'{"messageId":"m-%d","pad":"%s"}' % (i, b"p" * pad)


def events_of(records: list[Record]) -> list[bytes]:
    return [event for r in records for event in r.events()]


async def read_all(spool: Spool, count: int, timeout: float = 5.0) -> list[Record]:
    records: list[Record] = []
    async with asyncio.timeout(timeout):
        while sum(r.count for r in records) < count:
            records += await spool.read(1000, 1 << 30)
    return records


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


# -- unit level: the spool on a full disk ------------------------------------------------------------------------


async def test_a_short_record_write_is_cut_back_refused_and_the_spool_goes_on_when_space_returns(fs: Path) -> None:
    spool = Spool(fs / "spool", quota_bytes=1 << 30)
    spool.open()
    await synced(spool, write_request(spool, "k", None, [ev(0)]))
    path = segments(fs / "spool")[0]
    before = path.stat().st_size
    filler = fill(fs, leave=PAGE)  # the next record needs two more pages: the kernel writes part of it
    fds = open_fds()
    for attempt in range(5):  # every try is refused, none leaves a byte or a descriptor behind
        with pytest.raises(OSError) as refused:
            write_request(spool, "k", None, [ev(1, pad=2 * PAGE)])
        assert refused.value.errno == errno.ENOSPC, attempt
        assert path.stat().st_size == before and spool.disk_bytes == before and spool.pending == 1
    sync_round(spool)
    assert open_fds() <= fds
    os.unlink(filler)  # space returns: splitter goes on by itself
    await synced(spool, write_request(spool, "k", None, [ev(2, pad=2 * PAGE)]))
    assert events_of(await read_all(spool, 2)) == [ev(0), ev(2, pad=2 * PAGE)]  # no tear to stall at
    again = Spool(fs / "spool", quota_bytes=1 << 30)
    recovery = again.open()
    assert (recovery.records, recovery.truncated_bytes) == (2, 0)
    assert events_of(await read_all(again, 2)) == [ev(0), ev(2, pad=2 * PAGE)]
    await spool.close()
    await again.close()


async def test_a_failed_format_marker_at_rotation_leaves_no_markerless_file_and_no_stray_descriptor(fs: Path) -> None:
    spool = Spool(fs / "spool", quota_bytes=1 << 30, segment_bytes=2 * PAGE)
    spool.open()
    await synced(spool, write_request(spool, "k", None, [ev(0, pad=PAGE)]))
    filler = fill(fs)
    fds = open_fds()
    for attempt in range(5):  # each record needs a new segment, whose marker finds no room
        with pytest.raises(OSError) as refused:
            write_request(spool, "k", None, [ev(1, pad=PAGE)])
        assert refused.value.errno == errno.ENOSPC, (attempt, refused.value)  # never "File exists"
        for path in segments(fs / "spool"):
            assert path.read_bytes().startswith(MAGIC), path
        sync_round(spool)  # sync rounds go on meanwhile
    assert open_fds() <= fds  # nothing leaked, and nothing the spool holds was closed under it
    spied_on = socket.socketpair()  # descriptors the spool may have closed are handed out again
    try:
        for s in spied_on:
            s.setblocking(False)
        os.unlink(filler)
        tickets = [write_request(spool, "k", None, [ev(i, pad=PAGE)]) for i in range(2, 6)]
        await synced(spool, tickets[-1])
        for s in spied_on:
            with pytest.raises(BlockingIOError):
                s.recv(1 << 16)  # no spool bytes on anybody else's descriptor
    finally:
        for s in spied_on:
            s.close()
    await spool.close()
    again = Spool(fs / "spool", quota_bytes=1 << 30, segment_bytes=2 * PAGE)
    recovery = again.open()  # starts: every segment has its marker
    assert (recovery.records, recovery.truncated_bytes) == (5, 0)
    assert events_of(await read_all(again, 5)) == [ev(0, pad=PAGE)] + [ev(i, pad=PAGE) for i in range(2, 6)]
    await again.close()


async def test_a_failed_ack_note_does_not_break_acking_and_is_written_once_there_is_room(fs: Path) -> None:
    spool = Spool(fs / "spool", quota_bytes=1 << 30)
    spool.open()
    await synced(spool, write_request(spool, "k", None, [ev(0)]))
    await synced(spool, write_request(spool, "k", None, [ev(1)]))
    await synced(spool, write_request(spool, "k", None, [ev(2)]))
    records = await read_all(spool, 3)
    filler = fill(fs)
    spool.ack(records[:1])  # the note is due and cannot be written: acking still works
    assert spool.pending == 2
    assert not list((fs / "spool").glob("*.tmp"))
    os.unlink(filler)
    spool.ack(records[1:2])  # the note failed last time: it is tried again at once
    note = (fs / "spool" / "000000000001.ack")
    assert note.read_text().strip() == "2"
    await spool.close()
    again = Spool(fs / "spool", quota_bytes=1 << 30)
    recovery = again.open()
    assert (recovery.records, recovery.skipped) == (1, 2)
    assert events_of(await read_all(again, 1)) == [ev(2)]
    await again.close()


async def test_a_spool_opened_on_a_full_disk_delivers_its_backlog_and_takes_writes_when_space_returns(fs: Path) -> None:
    spool = Spool(fs / "spool", quota_bytes=1 << 30)
    spool.open()
    for i in range(3):
        await synced(spool, write_request(spool, "k", None, [ev(i)]))
    await spool.close()
    filler = fill(fs)
    again = Spool(fs / "spool", quota_bytes=1 << 30)
    recovery = again.open()  # no room for a new segment: it starts anyway
    assert recovery.records == 3
    records = await read_all(again, 3)
    assert events_of(records) == [ev(i) for i in range(3)]
    with pytest.raises(OSError):
        write_request(again, "k", None, [ev(3)])
    again.ack(records)
    os.unlink(filler)
    await synced(again, write_request(again, "k", None, [ev(4)]))
    assert events_of(await read_all(again, 1)) == [ev(4)]
    await again.close()


async def test_restart_removes_an_empty_or_markerless_new_segment_and_keeps_whole_records_without_marker(fs: Path) -> None:
    """What splitter before this fix left after a failed marker write: an empty file, or records
    (whole or torn) in a file without its marker. It refused to start on the second and third."""
    directory = fs / "spool"
    spool = Spool(directory, quota_bytes=1 << 30)
    spool.open()
    await synced(spool, write_request(spool, "k", None, [ev(0)]))
    await spool.close()
    written = frame(time.time(), "k", None, [ev(1)])
    whole = written.header + written.head + written.joined  # a format-3 record: what that release wrote
    for name, content, records, truncated in [("000000000002.seg", b"", 1, 0),
                                              ("000000000003.seg", whole, 2, 0),
                                              ("000000000004.seg", whole[:HEADER.size + 5], 1, HEADER.size + 5)]:
        for path in segments(directory)[1:]:
            path.unlink()
        (directory / name).write_bytes(content)
        again = Spool(directory, quota_bytes=1 << 30)
        recovery = again.open()
        assert (recovery.records, recovery.truncated_bytes) == (records, truncated), name
        got = events_of(await read_all(again, records))
        assert got == [ev(0), ev(1)][:records], name
        await again.close()
        if records == 1:
            assert not (directory / name).exists(), name


async def test_a_tail_torn_by_a_full_disk_is_cut_at_restart(fs: Path) -> None:
    directory = fs / "spool"
    spool = Spool(directory, quota_bytes=1 << 30)
    spool.open()
    await synced(spool, write_request(spool, "k", None, [ev(0)]))
    await spool.close()
    path = segments(directory)[0]
    whole = path.stat().st_size
    fill(fs, leave=PAGE)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        written = os.write(fd, encode(time.time(), "k", None, [ev(1, pad=3 * PAGE)]))  # what a write the disk cut short leaves
    finally:
        os.close(fd)
    assert 0 < written < 3 * PAGE
    again = Spool(directory, quota_bytes=1 << 30)
    recovery = again.open()
    assert (recovery.records, recovery.truncated_bytes) == (1, written)
    assert path.stat().st_size == whole
    assert events_of(await read_all(again, 1)) == [ev(0)]
    await again.close()


async def test_the_reader_reports_and_skips_a_record_damaged_under_it_instead_of_stalling(fs: Path) -> None:
    """A tear can no longer be written by the spool itself; should the file be damaged under it anyway
    (a failing disk), the reader does what the next start would do, and says so, rather than stop."""
    directory = fs / "spool"
    spool = Spool(directory, quota_bytes=1 << 30, fresh_limit=0)  # the reader reads the files
    spool.open()
    tickets = [write_request(spool, "k", None, [ev(i, pad=50)]) for i in range(3)]
    await synced(spool, tickets[-1])
    path = segments(directory)[0]
    second_record = len(MAGIC) + len(encode(0.0, "k", None, [ev(0, pad=50)]))
    with open(path, "r+b") as handle:
        handle.seek(second_record + HEADER.size + 30)
        handle.write(b"\x00\xff")  # the second record's bytes no longer match their crc
    assert events_of(await read_all(spool, 1)) == [ev(0, pad=50)]
    assert spool.pending == 1  # the damaged record and the one after it are reported lost, not waited for
    await synced(spool, write_request(spool, "k", None, [ev(3)]))
    assert events_of(await read_all(spool, 1)) == [ev(3)]  # the sender goes on
    assert len(segments(directory)) == 2  # nothing was appended after the damage
    await spool.close()


# -- a request to two destinations: all or nothing ----------------------------------------------------------------------

TWO_PRIMARIES = RULES  # test_spool's: one source, every event to both destinations


def to_both(source: Source, event: bytes, message_id: str) -> Submission:
    """One event for both primaries, as prepare() hands it over (type and name matter to no one here)."""
    chunk = Chunk()
    chunk.add(event, message_id, "track", "track")
    return Submission(source, "web-key-0123456789", None, {"segment": chunk, "rudderstack": chunk}, {})


async def test_a_request_refused_for_one_destination_leaves_nothing_in_the_other(fs: Path, tmp_path: Path) -> None:
    rules = compile_rules(TWO_PRIMARIES)
    delivery = Delivery(Metrics(), spool_dir=fs / "spool", dead_letter_dir=tmp_path / "dead")
    delivery.start(rules)
    source = rules.sources["web"]
    try:
        first = await delivery.accept(to_both(source, ev(0), "m-0"))
        assert first.ok
        sizes = {p: p.stat().st_size for p in (fs / "spool").glob("*/*.seg")}
        pending = {name: p.spool.pending for name, p in delivery._pipelines.items()}
        fill(fs, leave=PAGE)  # room for one destination's copy, not for both
        big = ev(1, pad=PAGE + PAGE // 2)
        outcome = await delivery.accept(to_both(source, big, "m-1"))
        assert (outcome.ok, outcome.status) == (False, 503) and outcome.retry_after
        assert {p: p.stat().st_size for p in (fs / "spool").glob("*/*.seg")} == sizes  # not in either spool
        assert {name: p.spool.pending for name, p in delivery._pipelines.items()} == pending
    finally:
        await delivery.close(0)


def primary_and_mirror(source: Source, primary: bytes, mirror: bytes) -> Submission:
    """One event for segment as primary, another mirrored to it: two records for one spool."""
    chunks = []
    for i, event in enumerate((primary, mirror)):
        chunk = Chunk()
        chunk.add(event, f"m-{i}", "track", "track")
        chunks.append(chunk)
    return Submission(source, "web-key-0123456789", None, {"segment": chunks[0]}, {"segment": chunks[1]})


async def test_a_request_primary_and_mirror_copy_for_one_destination_go_in_one_write(tmp_path: Path) -> None:
    rules = compile_rules(TWO_PRIMARIES)
    delivery = Delivery(Metrics(), spool_dir=tmp_path / "spool", dead_letter_dir=tmp_path / "dead")
    delivery.start(rules)
    spool = delivery._pipelines["segment"].spool
    try:
        outcome = await delivery.accept(primary_and_mirror(rules.sources["web"], ev(0), ev(1)))
        assert outcome.ok and not outcome.dropped_mirrors
        assert (spool.appended, spool.pending) == (1, 2)  # one write (one ticket), both events
    finally:
        await delivery.close(0)


async def test_a_disk_with_room_for_the_primary_copy_alone_keeps_it_and_drops_the_mirror_copy(fs: Path, tmp_path: Path) -> None:
    rules = compile_rules(TWO_PRIMARIES)
    delivery = Delivery(Metrics(), spool_dir=fs / "spool", dead_letter_dir=tmp_path / "dead")
    delivery.start(rules)
    spool = delivery._pipelines["segment"].spool
    try:
        fill(fs, leave=PAGE)  # with the rest of the segment's first page: room for one copy, not for both
        primary, mirror = ev(0, pad=PAGE + PAGE // 2), ev(1, pad=PAGE + PAGE // 2)
        outcome = await delivery.accept(primary_and_mirror(rules.sources["web"], primary, mirror))
        assert outcome.ok and outcome.dropped_mirrors == frozenset({"segment"})
        assert events_of(await read_all(spool, 1)) == [primary]
        assert spool.pending == 1
    finally:
        await delivery.close(0)


async def test_a_primary_copy_that_fits_the_active_segment_is_kept_when_only_both_copies_need_a_new_one(fs: Path, tmp_path: Path) -> None:
    """Found in review of the one-write primary+mirror path: the two copies together were over the
    segment size, so their write sealed the active segment and failed to start the next one (no room
    for its marker); the primary alone then found no segment either, and the request got 503, where
    the primary alone fits the active segment (200, the mirror copy dropped, as before that change)."""
    rules = compile_rules(TWO_PRIMARIES)
    delivery = Delivery(Metrics(), spool_dir=fs / "spool", dead_letter_dir=tmp_path / "dead")
    delivery.start(rules)
    spool = delivery._pipelines["segment"].spool
    try:
        assert (await delivery.accept(primary_and_mirror(rules.sources["web"], ev(0), ev(1)))).ok
        size = segments(fs / "spool" / "segment")[0].stat().st_size  # the marker and two records, within its first page
        spool.segment_bytes = size + (size - len(MAGIC)) // 2 + 10  # room for one more record of that size, not two
        fill(fs)  # the segment's page has room; a new segment's marker has none
        outcome = await delivery.accept(primary_and_mirror(rules.sources["web"], ev(2), ev(3)))
        assert outcome.ok and outcome.dropped_mirrors == frozenset({"segment"})
        assert len(segments(fs / "spool" / "segment")) == 1
        assert events_of(await read_all(spool, 3)) == [ev(0), ev(1), ev(2)]
        assert spool.pending == 3
    finally:
        await delivery.close(0)


# -- real processes: `splitter serve` with its spool on a tiny tmpfs ------------------------------------------------------

WRITE_KEY = "diskfull-web-key-0123"
RUDDER_KEY = "diskfull-rs-key-0123"
SERVE_RULES = served_head(WRITE_KEY, RUDDER_KEY, timeout=2, delivery="retry_base: 0.05, retry_max: 0.3, breaker_cooldown: 0.1, flush_interval: 0.005") + """\
cohort: {key: [anonymousId], salt: diskfull}
rules:
  - name: both
    route: {to: [segment, rudderstack]}
"""
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode(), "Content-Type": "application/json"}
PHASE_SECONDS = 15.0  # an upper bound for each phase, never a measurement


@pytest.fixture
async def upstreams() -> AsyncIterator[tuple[RunningReceiver, RunningReceiver]]:
    segment = await start_receiver("segment", record=True)
    rudder = await start_receiver("rudderstack", record=True, valid_keys=[RUDDER_KEY])
    yield segment, rudder
    await segment.close()
    await rudder.close()


class Traffic:
    """Clients sending batches of unique messageIds, keeping what each answer said about which ids."""

    def __init__(self) -> None:
        self.accepted: set[str] = set()
        self.refused: set[str] = set()
        self.statuses: Counter[str] = Counter()
        self.problems: list[str] = []  # anything a client must never see
        self.codes: Counter[str] = Counter()  # of the 503s
        self._n = 0

    async def send(self, splitter: SplitterProcess, client: aiohttp.ClientSession, tag: str, size: int = 20, pad: int = 60) -> int:
        self._n += 1
        ids = [f"{tag}-{self._n}-{i}" for i in range(size)]
        body = {"batch": [{"type": "track", "event": "E", "anonymousId": m, "messageId": m, "properties": {"pad": "p" * pad}} for m in ids]}
        try:
            async with client.post(splitter.ingress + "/v1/batch", data=orjson.dumps(body), headers=AUTH,
                                   timeout=aiohttp.ClientTimeout(total=10)) as response:
                text = await response.read()
                status = response.status
                retry_after = response.headers.get("Retry-After")
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.statuses["connection_error"] += 1
            self.problems.append(f"connection error: {exc!r}")
            return 0
        self.statuses[str(status)] += 1
        if RUDDER_KEY.encode() in text or any(marker in text for marker in (b"SPL4", b"SPLR", b"SPLSPL")):
            self.problems.append(f"spool bytes in an answer: {text[:200]!r}")
        if status == 200:
            self.accepted.update(ids)
        elif status == 503:
            self.refused.update(ids)
            self.codes[orjson.loads(text).get("code", "?") if text.startswith(b"{") else "?"] += 1
            if not retry_after or int(retry_after) < 1:
                self.problems.append(f"503 without Retry-After: {text[:200]!r}")
        else:
            self.problems.append(f"unexpected {status}: {text[:200]!r}")
        return status

    async def until(self, splitter: SplitterProcess, tag: str, done: Callable[[], bool], workers: int = 3,
                    spies: list[socket.socket] | None = None, shapes: tuple[tuple[int, int], ...] = ((20, 60),)) -> None:
        """Send from `workers` clients until `done()` or PHASE_SECONDS; each request on a new connection
        (new descriptors in splitter, where a wrongly closed spool descriptor would be reused)."""
        deadline = time.monotonic() + PHASE_SECONDS

        async def worker() -> None:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as client:
                for size, pad in itertools.cycle(shapes):
                    if done() or time.monotonic() > deadline:
                        break
                    await self.send(splitter, client, tag, size, pad)
                    if spies is not None and len(spies) < 40:
                        spies.append(idle_connection(splitter))

        await asyncio.gather(*(worker() for _ in range(workers)))


def idle_connection(splitter: SplitterProcess) -> socket.socket:
    """A client connection that sends nothing: splitter must never write anything to it."""
    host, port = splitter.ingress.removeprefix("http://").rsplit(":", 1)
    spy = socket.create_connection((host, int(port)), timeout=5)
    spy.setblocking(False)
    return spy


def spied_bytes(spies: list[socket.socket]) -> list[bytes]:
    found = []
    for spy in spies:
        try:
            data = spy.recv(1 << 16)
        except BlockingIOError:
            continue
        except OSError:
            continue  # reset by the server: no bytes either
        if data:
            found.append(data[:100])
    return found


def delivered(upstreams: tuple[RunningReceiver, RunningReceiver]) -> dict[str, set[str]]:
    return {u.receiver.kind: set(u.receiver.message_ids()) for u in upstreams}


async def all_delivered(upstreams: tuple[RunningReceiver, RunningReceiver], ids: set[str], splitter: SplitterProcess) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if all(ids <= got for got in delivered(upstreams).values()):
            return
        await asyncio.sleep(0.1)
    missing = {name: len(ids - got) for name, got in delivered(upstreams).items()}
    raise AssertionError(f"answered 200 but never delivered: {missing}; last log lines: {splitter.log[-8:]}")


async def test_splitter_on_a_full_disk_answers_503_loses_nothing_acknowledged_and_recovers_by_itself(
        tmp_path: Path, upstreams: tuple[RunningReceiver, RunningReceiver]) -> None:
    segment, rudder = upstreams
    rules = tmp_path / "rules.yaml"
    rules.write_text(SERVE_RULES)
    env = dict(os.environ, SEGMENT_URL=segment.url, RUDDERSTACK_DATA_PLANE_URL=rudder.url, PYTHONUNBUFFERED="1")
    with tiny_tmpfs(tmp_path / "fs", "2m") as fs:
        args = ["--spool-dir", str(fs / "spool"), "--dead-letter-dir", str(tmp_path / "dead"), "--drain-timeout", "1"]
        segment.receiver.faults.down = rudder.receiver.faults.down = True  # a backlog builds up in the spool
        first = await launch_splitter(str(rules), env, args)
        traffic = Traffic()
        spies: list[socket.socket] = []
        try:
            filler = fill(fs, leave=16 * PAGE)  # the first requests fit, then the disk refuses, part-way through records too
            await traffic.until(first, "full", lambda: traffic.statuses["503"] >= 30, spies=spies)
            assert traffic.statuses["503"] >= 30 and traffic.statuses["200"] > 0, traffic.statuses
            assert first.events("spool_write_refused")  # the disk did refuse records, not only the quota
            os.unlink(filler)  # space returns: no restart needed
            accepted_before = len(traffic.accepted)
            await traffic.until(first, "freed", lambda: len(traffic.accepted) >= accepted_before + 20 * 20)
            assert len(traffic.accepted) >= accepted_before + 20 * 20, traffic.statuses
            fill(fs, leave=8 * PAGE)  # full again, then a crash with the backlog on disk
            await traffic.until(first, "again", lambda: traffic.statuses["503"] >= 60, spies=spies)
            assert not spied_bytes(spies)
        finally:
            first.process.kill()
            await first.process.wait()
        fill(fs)  # not a page left for the restart
        segment.receiver.faults.down = rudder.receiver.faults.down = False
        second = await launch_splitter(str(rules), env, args)  # starts on the leftover spool and the full disk
        try:
            await all_delivered(upstreams, traffic.accepted, second)
            os.unlink(fs / "filler")
            accepted_before = len(traffic.accepted)
            await traffic.until(second, "after", lambda: len(traffic.accepted) >= accepted_before + 5 * 20)
            await all_delivered(upstreams, traffic.accepted, second)
            assert not traffic.problems, traffic.problems[:5]
            assert not spied_bytes(spies)
            for name, got in delivered(upstreams).items():  # a 503 left nothing behind in either spool
                assert not (traffic.refused - traffic.accepted) & got, name
        finally:
            for spy in spies:
                spy.close()
            assert await second.stop() == 0


class Competitor:
    """Another program on the same disk taking every page that frees up, so that splitter meets a
    full disk exactly when it starts a new segment (after deleting a delivered one)."""

    def __init__(self, directory: Path) -> None:
        self.fd = os.open(directory / "competitor", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.path = directory / "competitor"
        self.task: asyncio.Task[None] | None = None

    def grab(self) -> None:
        while True:
            try:
                os.write(self.fd, b"\xee" * PAGE)
            except OSError:
                return

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.grab()
            await asyncio.sleep(0.001)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            os.unlink(self.path)
            self.fd = -1


async def test_splitter_replacing_delivered_segments_on_a_contended_disk_loses_nothing(
        tmp_path: Path, upstreams: tuple[RunningReceiver, RunningReceiver]) -> None:
    segment, rudder = upstreams
    rules = tmp_path / "rules.yaml"
    # a small quota: delivered segments are sealed, deleted and replaced by new ones all the time
    rules.write_text(SERVE_RULES.replace("flush_interval: 0.005", "flush_interval: 0.005, spool_quota_mb: 0.03"))
    env = dict(os.environ, SEGMENT_URL=segment.url, RUDDERSTACK_DATA_PLANE_URL=rudder.url, PYTHONUNBUFFERED="1")
    with tiny_tmpfs(tmp_path / "fs", "1m") as fs:
        args = ["--spool-dir", str(fs / "spool"), "--dead-letter-dir", str(tmp_path / "dead"), "--drain-timeout", "1"]
        first = await launch_splitter(str(rules), env, args)
        traffic = Traffic()
        spies: list[socket.socket] = []
        competitor = Competitor(fs)
        try:
            await traffic.until(first, "warm", lambda: len(traffic.accepted) >= 200)
            stop = asyncio.Event()
            competing = asyncio.create_task(competitor.run(stop))
            try:
                await traffic.until(first, "contended", lambda: traffic.statuses["503"] >= 100, spies=spies)
            finally:
                stop.set()
                await competing
            assert traffic.statuses["503"] >= 100, traffic.statuses
            for path in sorted((fs / "spool").glob("*/*.seg")):
                assert path.read_bytes()[:len(MAGIC)] in (MAGIC, REUSED, b""), path  # a marker, or a file being created
            competitor.close()  # space returns: splitter goes on by itself
            accepted_before = len(traffic.accepted)
            await traffic.until(first, "freed", lambda: len(traffic.accepted) >= accepted_before + 200)
            assert len(traffic.accepted) >= accepted_before + 200, (traffic.statuses, first.log[-5:])
            await all_delivered(upstreams, traffic.accepted, first)
        finally:
            competitor.close()
            assert await first.stop() == 0
        assert not spied_bytes(spies)
        second = await launch_splitter(str(rules), env, args)  # starts on what the first left
        try:
            accepted_before = len(traffic.accepted)
            await traffic.until(second, "after", lambda: len(traffic.accepted) >= accepted_before + 100)
            await all_delivered(upstreams, traffic.accepted, second)
            assert not traffic.problems, traffic.problems[:5]
            for name, got in delivered(upstreams).items():
                assert not (traffic.refused - traffic.accepted) & got, name
        finally:
            for spy in spies:
                spy.close()
            assert await second.stop() == 0


SEGMENT_BYTES = 16 * 1024 * 1024  # Spool's default segment size, which Delivery uses


async def test_splitter_on_a_disk_full_when_a_segment_is_full_keeps_no_markerless_file_and_writes_no_client_socket(
        tmp_path: Path, upstreams: tuple[RunningReceiver, RunningReceiver]) -> None:
    """The campaign's second finding: the disk fills just as a segment is full, so the next one's
    format marker cannot be written. Before the fix: `File exists` and 503 forever, small records
    written into the marker-less file, a descriptor closed several times and its number reused by
    client sockets (spool records, credential included, sent to clients), and no restart."""
    segment, rudder = upstreams
    rules = tmp_path / "rules.yaml"
    rules.write_text(SERVE_RULES)
    env = dict(os.environ, SEGMENT_URL=segment.url, RUDDERSTACK_DATA_PLANE_URL=rudder.url, PYTHONUNBUFFERED="1")
    with tiny_tmpfs(tmp_path / "fs", "40m") as fs:
        args = ["--spool-dir", str(fs / "spool"), "--dead-letter-dir", str(tmp_path / "dead"), "--drain-timeout", "1"]
        segment.receiver.faults.down = rudder.receiver.faults.down = True  # nothing is delivered: the segments fill up

        def nearly_full() -> bool:
            sizes = [p.stat().st_size for p in (fs / "spool").glob("*/*.seg")]
            return len(sizes) == 2 and min(sizes) > SEGMENT_BYTES - 150 * 1024

        first = await launch_splitter(str(rules), env, args)
        traffic = Traffic()
        spies: list[socket.socket] = []
        try:
            await traffic.until(first, "fill", nearly_full, workers=1, shapes=((20, 2000),))  # ~40 KB records
            assert nearly_full() and traffic.statuses == {"200": traffic.statuses["200"]}, traffic.statuses
            filler = fill(fs)
            # a 200 KB record needs a new segment, whose marker finds no room; a small one would still fit the full one
            await traffic.until(first, "full", lambda: traffic.statuses["503"] >= 40, spies=spies, shapes=((20, 10_000), (1, 10)))
            assert traffic.statuses["503"] >= 40, traffic.statuses
            assert first.events("spool_segment_not_started")  # the marker of a new segment found no room
            for path in sorted((fs / "spool").glob("*/*.seg")):
                assert path.read_bytes()[:len(MAGIC)] in (MAGIC, REUSED), path
            os.unlink(filler)  # space returns: no restart needed
            accepted_before = len(traffic.accepted)
            await traffic.until(first, "freed", lambda: len(traffic.accepted) >= accepted_before + 10 * 20,
                                spies=spies, shapes=((20, 10_000), (1, 10)))
            assert len(traffic.accepted) >= accepted_before + 10 * 20, (traffic.statuses, first.log[-5:])
            assert not spied_bytes(spies)
        finally:
            assert await first.stop() == 0
        segment.receiver.faults.down = rudder.receiver.faults.down = False
        second = await launch_splitter(str(rules), env, args)  # every segment has its marker: it starts
        try:
            await all_delivered(upstreams, traffic.accepted, second)
            assert not traffic.problems, traffic.problems[:5]
            assert not spied_bytes(spies)
            for name, got in delivered(upstreams).items():
                assert not (traffic.refused - traffic.accepted) & got, name
        finally:
            for spy in spies:
                spy.close()
            assert await second.stop() == 0
