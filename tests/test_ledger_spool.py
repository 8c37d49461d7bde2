"""The spool's records carry the ledger's tags (format 3), and a spool the previous release wrote
(format 2, `tests/data/spool-format-2`, written by that release's own code) is still read, delivered
and counted, under `(unknown)`. What a request's records say of its events is the same whether it is
read from prepare()'s per-route counts or counted event by event."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from loadtest.receivers import RunningReceiver, start_receiver
from proxy.delivery import Delivery
from proxy.delivery.accounting import Accounting, RequestAccount, RoutedAccount
from proxy.delivery.batches import upstream_batches
from proxy.delivery.record_tags import UNKNOWN, describe, read_tags
from proxy.delivery.spool import Spool
from proxy.delivery.spool_format import FORMATS, MAGIC, MAGIC_2, MAGIC_3, REUSED, TAGGED, _first_frame_is_whole, check_format, decode, encode, frame, scan
from proxy.engine import EventContext, RuleSet, compile_rules
from proxy.ingress.prepare import CallShape, prepare
from proxy.metrics import Metrics
from proxy.observe.ledger import Ledger
from proxy.observe.ledger_files import LedgerKeeper, ledger_document

FIXTURE = Path(__file__).resolve().parent / "data" / "spool-format-2"
FIXTURE_3 = Path(__file__).resolve().parent / "data" / "spool-format-3"
RULES = """\
version: 1
destinations:
  segment: {kind: segment, url: "${SEGMENT_URL}", delivery: {retry_base: 0.02, retry_max: 0.2, flush_interval: 0.002}}
  rudderstack: {kind: rudderstack, url: "${RUDDERSTACK_URL}", delivery: {retry_base: 0.02, retry_max: 0.2, flush_interval: 0.002}}
sources:
  - name: web
    write_keys: ["web-key-0123456789"]
    credentials: {segment: "fixture-seg-key", rudderstack: "fixture-rs-key"}
cohort: {key: [anonymousId, userId], salt: "t"}
rules:
  - name: renamed
    when: {type: track, event: ["Order Done"]}
    route: {to: [segment], mirror: [rudderstack]}
    transforms:
      rudderstack:
        - rename_event: {from: "Order Done", to: "Order Completed"}
  - name: mirrored
    when: {type: track, event: ["Mirror *"]}
    route: {to: [segment], mirror: [rudderstack]}
  - name: split
    when: {type: track, event: ["Split *"]}
    route: {split: {rudderstack: 50, segment: 50}}
  - name: everyone
    route: {to: [segment, rudderstack]}
"""


def submission_of(rules: RuleSet, batch: list[dict[str, Any]]) -> Any:
    source = rules.sources["web"]
    body = orjson.loads(orjson.dumps({"batch": batch}))
    return prepare(rules, body, CallShape(True), source, EventContext("web"), None, presented_key="web-key-0123456789").submission


def mixed_batch(prefix: str) -> list[dict[str, Any]]:
    batch: list[dict[str, Any]] = []
    for i in range(12):
        name = ("Mirror Cart", "Split Click", "Order Done")[i % 3]
        batch.append({"type": "track", "event": name, "anonymousId": f"{prefix}-u{i}", "messageId": f"{prefix}-{i}"})
    batch += [{"type": "page", "name": "Home", "anonymousId": f"{prefix}-p", "messageId": f"{prefix}-page"},
              {"type": "identify", "userId": f"{prefix}-id", "messageId": f"{prefix}-identify"}]
    return batch


def test_the_format_markers_and_a_record_s_tags_round_trip() -> None:
    assert FORMATS == {MAGIC: 4, REUSED: 4, MAGIC_3: 3, MAGIC_2: 2} and len(set(FORMATS)) == 4 and {len(m) for m in FORMATS} == {len(MAGIC)}
    events = [b'{"messageId":"a","type":"track","event":"X"}', b'{"messageId":"b","type":"track","event":"X"}']
    tags = b'["web","mirror",[["track",{"X":2},2]],[["g.1",2]],null]'
    record = decode(7, encode(1.5, "cred", "198.51.100.1", events, tags)[TAGGED.size:])
    assert (record.segment, record.appended_at, record.credential, record.forwarded_for, record.events(), record.tags) == (
        7, 1.5, "cred", "198.51.100.1", events, tags)
    read = read_tags(record)
    assert (read.source, read.role, list(read.counts()), read.fan, read.members()) == ("web", "mirror", [(("track", "X"), 2)], [["g.1", 2]], [None])
    untagged = read_tags(decode(7, encode(1.5, "cred", None, events)[TAGGED.size:]))
    assert (untagged.source, untagged.role, list(untagged.counts()), untagged.known) == (UNKNOWN, UNKNOWN, [((UNKNOWN, UNKNOWN), 2)], False)
    assert describe(events[1]) == ("b", "track", "X")
    assert describe(b'{"type":"page","messageId":"p"}') == ("p", "page", "page") and describe(b"[]") == ("", UNKNOWN, UNKNOWN)
    for fixture in FIXTURE.glob("*/*.seg"):
        data = fixture.read_bytes()
        assert data.startswith(MAGIC_2) and check_format(fixture, data) == (len(MAGIC_2), 2)
    for fixture in FIXTURE_3.glob("*/*.seg"):
        data = fixture.read_bytes()
        assert data.startswith(MAGIC_3) and check_format(fixture, data) == (len(MAGIC_3), 3)
    for torn in (MAGIC[:3], MAGIC_2[:7], REUSED[:7], b""):
        assert check_format(Path("x.seg"), torn) == (len(torn), 4)  # torn while being created: no records either way


def test_a_release_reading_format_3_refuses_a_format_4_file_rather_than_cutting_it() -> None:
    """The format-3 release's check (tests/data/spool-format-3's writer, 11912e3): no marker of its own,
    no record of format 3 or 2 from the start, and a whole first frame means "another format's file":
    it stops naming it. A marker it read as a torn one would have been cut off with the records after
    it, which a downgrade must never do to events answered 200."""
    for marker in (MAGIC, REUSED):
        data = marker + encode(1.0, "k", None, [b'{"messageId":"m"}'], segment=1)
        assert not any(data.startswith(old) for old in (MAGIC_3, MAGIC_2))
        assert scan(data, 0, 3)[0] == [] and scan(data, 0, 2)[0] == []
        assert _first_frame_is_whole(data)  # the length it reads from the marker: 8 bytes, no record
        assert check_format(Path("x.seg"), data) == (len(MAGIC), 4)


async def test_records_of_the_previous_format_without_their_marker_are_read_as_format_2(tmp_path: Path) -> None:
    """What the release before the disk-full fix could leave: format-2 records in a file whose marker write failed."""
    (tmp_path / "spool").mkdir()
    old = (FIXTURE / "segment" / "000000000001.seg").read_bytes()
    (tmp_path / "spool" / "000000000001.seg").write_bytes(old[len(MAGIC_2):])
    spool = Spool(tmp_path / "spool", quota_bytes=1 << 30)
    assert spool.open().records == 5
    assert [orjson.loads(e)["messageId"] for r in await spool.read(100, 1 << 20) for e in r.events()] == [f"old-{i}" for i in range(5)]
    await spool.close()


async def test_a_spool_of_the_previous_format_is_read_in_order_with_no_tags(tmp_path: Path) -> None:
    shutil.copytree(FIXTURE, tmp_path / "spool")
    spool = Spool(tmp_path / "spool" / "segment", quota_bytes=1 << 30)
    seen = []
    recovery = spool.open(seen.append)
    assert (recovery.records, recovery.truncated_bytes) == (5, 0)
    assert [r.count for r in seen] == [3, 2] and all(r.tags == b"" for r in seen)
    records = await spool.read(100, 1 << 20)
    assert [orjson.loads(e)["messageId"] for r in records for e in r.events()] == [f"old-{i}" for i in range(5)]
    assert records[0].forwarded_for == "198.51.100.9" and records[0].credential == "fixture-seg-key"
    spool.write(frame(time.time(), "k", None, [b'{"messageId":"new"}'], b'["web","primary",[],[],null]'))
    newest = max((tmp_path / "spool" / "segment").glob("*.seg"))
    assert newest.read_bytes().startswith(MAGIC)  # what is written now is format 4, in a segment of its own
    more = await spool.read(100, 1 << 20)
    assert [r.tags for r in more] == [b'["web","primary",[],[],null]']
    await spool.close()


async def test_a_spool_of_format_3_is_read_with_its_tags_and_its_files_are_never_reused(tmp_path: Path) -> None:
    """The release before segment tags (format 3, `tests/data/spool-format-3`): its records are read and
    delivered with the ledger's tags; its file, whose records carry no segment tag, is deleted once
    delivered rather than written over (a scan could not tell its records from a new segment's)."""
    shutil.copytree(FIXTURE_3, tmp_path / "spool")
    directory = tmp_path / "spool" / "segment"
    spool = Spool(directory, quota_bytes=1 << 30, segment_bytes=600)
    seen = []
    recovery = spool.open(seen.append)
    assert (recovery.records, recovery.truncated_bytes) == (5, 0)
    assert [r.count for r in seen] == [3, 2]
    assert [(read_tags(r).source, read_tags(r).role) for r in seen] == [("web", "primary")] * 2
    records = await spool.read(100, 1 << 20)
    assert [orjson.loads(e)["messageId"] for r in records for e in r.events()] == [f"old3-{i}" for i in range(5)]
    assert records[0].forwarded_for == "198.51.100.9" and records[0].credential == "fixture-seg-key"
    for i in range(4):  # new records rotate past the old segment
        spool.write(frame(time.time(), "k", None, [b'{"messageId":"new-%d","pad":"%s"}' % (i, b"p" * 300)]))
    spool.ack(records)
    assert not (directory / "000000000001.seg").exists() and list(directory.glob("*.free")) == []  # deleted, not kept
    assert all(p.read_bytes().startswith(MAGIC) for p in directory.glob("*.seg"))
    more = await spool.read(100, 1 << 20)
    assert [orjson.loads(e)["messageId"] for r in more for e in r.events()] == [f"new-{i}" for i in range(4)]
    await spool.close()


@pytest.fixture
async def receivers():  # type: ignore[no-untyped-def]
    segment = await start_receiver("segment", record=True)
    rudder = await start_receiver("rudderstack", record=True, valid_keys=["fixture-rs-key"])
    yield segment, rudder
    await rudder.close()
    await segment.close()


async def wait_for(receiver: RunningReceiver, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while len(receiver.receiver.message_ids()) < count:
        assert time.monotonic() < deadline, (len(receiver.receiver.message_ids()), count)
        await asyncio.sleep(0.01)


async def test_an_old_spool_is_delivered_and_counted_as_unknown_beside_new_attributed_events(tmp_path: Path, receivers) -> None:  # type: ignore[no-untyped-def]
    segment, rudder = receivers
    shutil.copytree(FIXTURE, tmp_path / "spool")
    rules = compile_rules(RULES, env={"SEGMENT_URL": segment.url, "RUDDERSTACK_URL": rudder.url})
    keeper = LedgerKeeper(tmp_path / "state", None)
    keeper.load()
    delivery = Delivery(Metrics(), spool_dir=tmp_path / "spool", dead_letter_dir=tmp_path / "dead", ledger=keeper)
    delivery.start(rules)
    try:
        await wait_for(segment, 5)
        await wait_for(rudder, 2)
        assert sorted(segment.receiver.message_ids()) == [f"old-{i}" for i in range(5)]
        assert sorted(rudder.receiver.message_ids()) == ["old-3", "old-4"]
        submission = submission_of(rules, mixed_batch("new"))
        outcome = await delivery.accept(submission)
        assert outcome.ok
        expected = {name: sum(len(chunks.get(name, ())) for chunks in (submission.primary, submission.mirror)) for name in ("segment", "rudderstack")}
        await wait_for(segment, 5 + expected["segment"])
        await wait_for(rudder, 2 + expected["rudderstack"])
        deadline = time.monotonic() + 5
        while delivery.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        document = await ledger_document(tmp_path / "state", keeper)
    finally:
        await delivery.close(2)
    found = {(r["source"], r["event"], r["destination"], r["role"]): (r["accepted"], r["delivered"], r["pending"]) for r in document["rows"]}
    assert found[UNKNOWN, UNKNOWN, "segment", UNKNOWN] == (5, 5, 0)
    assert found[UNKNOWN, UNKNOWN, "rudderstack", UNKNOWN] == (2, 2, 0)
    assert found["web", "Order Done", "segment", "primary"] == (4, 4, 0)
    assert found["web", "Order Completed", "rudderstack", "mirror"] == (4, 4, 0)  # as the destination got it: renamed
    received = [r.event["event"] for r in rudder.receiver.events if r.event.get("messageId", "").startswith("new-") and r.event["type"] == "track"]
    assert received.count("Order Completed") == 4 and "Order Done" not in received
    assert sum(v[0] for v in found.values()) == len(segment.receiver.message_ids()) + len(rudder.receiver.message_ids())
    assert not list((tmp_path / "spool" / "segment").glob("000000000001.*"))  # the old segment is delivered and gone


def test_a_request_s_records_say_the_same_from_prepare_s_counts_and_from_their_events() -> None:
    rules = compile_rules(RULES.replace("  - name: renamed", "  - name: renamed-off\n    when: {type: alias}\n    route: segment\n  - name: renamed", 1),
                          env={"SEGMENT_URL": "http://127.0.0.1:9", "RUDDERSTACK_URL": "http://127.0.0.1:9"})
    without_renames = compile_rules("\n".join(line for line in RULES.splitlines() if "rename_event" not in line and "transforms" not in line and
                                              line.strip() != "rudderstack:") + "\n",
                                    env={"SEGMENT_URL": "http://127.0.0.1:9", "RUDDERSTACK_URL": "http://127.0.0.1:9"})
    for ruleset in (rules, without_renames):
        for n in range(6):
            submission = submission_of(ruleset, mixed_batch(f"r{n}")[n:])
            fast = summarise(Accounting(Ledger()).request(submission), submission)
            slow = summarise(Accounting(Ledger()).request(dataclasses.replace(submission, routed=None)), submission)
            assert fast == slow
            # Without transforms prepare()'s counts describe every chunk and are used; a renamed copy is counted from its events.
            assert isinstance(Accounting(Ledger()).request(submission), RoutedAccount) == (ruleset is without_renames)


def summarise(account: RequestAccount, submission: Any) -> tuple[dict[tuple[str, str], dict[tuple[str, str], int]], dict[tuple[str, str], list[tuple[int, int]]]]:
    """What a request's records say, without the group ids (which differ between two accounts)."""
    counts, fan = {}, {}
    for role, chunks in (("primary", submission.primary), ("mirror", submission.mirror)):
        for destination, chunk in chunks.items():
            if not chunk:
                continue
            tags = read_tags(decode(1, encode(0.0, "k", None, chunk.events, account.tags(destination, role, chunk))[TAGGED.size:]))
            counts[destination, role] = dict(tags.counts())
            members = tags.members()
            fan[destination, role] = sorted((int(count), len(m) if m is not None else -1) for (_, count), m in zip(tags.fan, members))
            for batch in upstream_batches([decode(1, encode(0.0, "k", None, chunk.events)[TAGGED.size:])], 1):  # each event alone
                assert describe(batch.parts[0])[1:] in counts[destination, role]
    return counts, fan
