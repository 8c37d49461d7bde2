"""Delivery's small parts on their own: breaker, upstream bodies, dead letters, options."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.delivery.batches import MAX_UPSTREAM_BODY, Batch, upstream_batches
from proxy.delivery.breaker import Breaker
from proxy.delivery.deadletter import DeadLetters
from proxy.delivery.options import DeliveryOptions
from proxy.delivery.spool import Record, decode, encode
from proxy.delivery.spool_format import TAGGED

# -- breaker ---------------------------------------------------------------------------------------------------------


def opened_breaker(at: float = 100.0, *, failures: int = 3, cooldown: float = 2.0, max_cooldown: float = 10.0) -> Breaker:
    breaker = Breaker(failures=failures, cooldown=cooldown, max_cooldown=max_cooldown)
    for _ in range(failures):
        breaker.failure(now=at)
    assert breaker.state == "open"
    return breaker


def test_breaker_stays_closed_until_enough_consecutive_failures() -> None:
    breaker = Breaker(failures=3, cooldown=2.0, max_cooldown=10.0)
    assert breaker.state == "closed" and breaker.wait_time(now=0.0) == 0.0
    breaker.failure(now=1.0)
    breaker.failure(now=1.0)
    assert breaker.state == "closed" and breaker.wait_time(now=1.0) == 0.0
    breaker.success()  # not consecutive any more
    assert breaker.consecutive_failures == 0
    breaker.failure(now=2.0)
    breaker.failure(now=2.0)
    assert breaker.state == "closed"
    breaker.failure(now=2.0)
    assert breaker.state == "open"


def test_open_breaker_waits_out_its_cooldown_then_goes_half_open() -> None:
    breaker = opened_breaker(at=100.0, cooldown=2.0)
    assert breaker.wait_time(now=100.0) == pytest.approx(2.0)
    assert breaker.wait_time(now=101.5) == pytest.approx(0.5)
    assert breaker.state == "open"
    breaker.failure(now=101.6)  # more failures while open (other requests) do not push the probe back
    assert breaker.wait_time(now=101.6) == pytest.approx(0.4)
    assert breaker.wait_time(now=102.0) == 0.0
    assert breaker.state == "half_open"
    assert breaker.wait_time(now=102.0) == 0.0  # the probe may go


def test_a_failed_probe_reopens_with_a_doubled_cooldown_capped_at_the_max() -> None:
    breaker = opened_breaker(at=0.0, cooldown=2.0, max_cooldown=10.0)
    now, expected = 0.0, 2.0
    for cooldown in (4.0, 8.0, 10.0, 10.0):
        now += expected
        assert breaker.wait_time(now=now) == 0.0 and breaker.state == "half_open"
        breaker.failure(now=now)
        assert breaker.state == "open"
        assert breaker.wait_time(now=now) == pytest.approx(cooldown)
        assert breaker.wait_time(now=now + cooldown - 0.01) > 0
        expected = cooldown


def test_success_closes_the_breaker_and_resets_the_cooldown() -> None:
    breaker = opened_breaker(at=0.0, cooldown=2.0, max_cooldown=10.0)
    assert breaker.wait_time(now=2.0) == 0.0
    breaker.failure(now=2.0)  # probe failed: 4 s now
    assert breaker.wait_time(now=6.0) == 0.0 and breaker.state == "half_open"
    breaker.success()
    assert breaker.state == "closed" and breaker.consecutive_failures == 0
    for _ in range(2):
        breaker.failure(now=10.0)
    assert breaker.state == "closed"  # the count started over
    breaker.failure(now=10.0)
    assert breaker.state == "open"
    assert breaker.wait_time(now=10.0) == pytest.approx(2.0)  # the base cool-down again, not 4 or 8


def test_breaker_without_now_uses_the_monotonic_clock() -> None:
    breaker = Breaker(failures=1, cooldown=30.0, max_cooldown=60.0)
    breaker.failure()
    assert 29.0 < breaker.wait_time() <= 30.0


# -- upstream bodies -------------------------------------------------------------------------------------------------------


def record(events: list[bytes], forwarded_for: str | None = None) -> Record:
    """A record exactly as the sender gets it from the spool."""
    return decode(1, encode(0.0, "key", forwarded_for, events)[TAGGED.size:])


def batches(records: list[Record], max_events: int = 500, limit: int = MAX_UPSTREAM_BODY) -> list[Batch]:
    return list(upstream_batches(records, max_events, limit))


def ev(i: int, pad: int = 0) -> bytes:
    return orjson.dumps({"messageId": f"m-{i}", "pad": "p" * pad})


def test_records_share_one_body_in_order_joined_not_reserialised() -> None:
    first, second = [ev(0), ev(1), ev(2)], [ev(3), ev(4)]
    [batch] = batches([record(first), record(second)])
    assert batch.count == 5 and batch.credential == "key"
    assert batch.body() == b'{"batch":[' + b",".join(first + second) + b"]}"
    assert orjson.loads(batch.body()) == {"batch": [orjson.loads(e) for e in first + second]}
    assert batch.events() == first + second


def test_bodies_are_cut_between_records_at_the_byte_and_the_event_limits() -> None:
    records = [record([ev(i)]) for i in range(5)]
    one = len(records[0].joined)
    by_bytes = batches(records, limit=12 + one * 2 + 1)  # exactly two events per body
    assert [b.count for b in by_bytes] == [2, 2, 1]
    assert all(len(b.body()) <= 12 + one * 2 + 1 for b in by_bytes)
    by_count = batches([record([ev(0), ev(1)]), record([ev(2), ev(3)]), record([ev(4)])], max_events=3)
    assert [b.count for b in by_count] == [2, 3]
    assert [e for b in by_count for e in b.events()] == [ev(i) for i in range(5)]


def test_a_record_over_a_limit_is_split_into_its_events_and_an_oversized_event_goes_alone() -> None:
    huge = ev(9, pad=300)
    result = batches([record([ev(0)]), record([ev(1), ev(2), huge, ev(3)]), record([ev(4)])], limit=12 + len(ev(0)) * 2 + 1)
    assert [e for b in result for e in b.events()] == [ev(0), ev(1), ev(2), huge, ev(3), ev(4)]
    assert [b.count for b in result] == [2, 1, 1, 2]
    assert result[2].body() == b'{"batch":[' + huge + b"]}"
    many = batches([record([ev(i) for i in range(7)])], max_events=3)
    assert [b.count for b in many] == [3, 3, 1]


def test_forwarded_for_is_kept_only_when_every_event_shares_it() -> None:
    [same] = batches([record([ev(0)], "198.51.100.7"), record([ev(1)], "198.51.100.7")])
    assert same.forwarded_for == "198.51.100.7"
    [mixed] = batches([record([ev(0)], "198.51.100.7"), record([ev(1)], None)])
    assert mixed.forwarded_for is None


def test_halves_split_a_rejected_batch_into_its_events_in_order() -> None:
    [batch] = batches([record([ev(0), ev(1), ev(2)]), record([ev(3), ev(4)])])
    left, right = batch.halves()
    assert (left.events(), right.events()) == ([ev(0), ev(1)], [ev(2), ev(3), ev(4)])
    assert (left.count, right.count) == (2, 3)
    assert left.body() == b'{"batch":[' + ev(0) + b"," + ev(1) + b"]}"
    assert [h.events() for h in right.halves()] == [[ev(2)], [ev(3), ev(4)]]


events_strategy = st.lists(
    st.dictionaries(st.text(max_size=8), st.one_of(st.integers(-(2**53), 2**53), st.text(max_size=60), st.booleans(), st.none()), max_size=4)
    .map(orjson.dumps),
    min_size=1,
    max_size=8,
)


@settings(max_examples=200, deadline=None, database=None)
@given(chunks=st.lists(events_strategy, min_size=1, max_size=8), max_events=st.integers(1, 12), limit=st.integers(min_value=1, max_value=600))
def test_property_batches_hold_every_event_once_in_order_within_the_limits(chunks: list[list[bytes]], max_events: int, limit: int) -> None:
    events = [e for chunk in chunks for e in chunk]
    result = batches([record(chunk) for chunk in chunks], max_events, limit)
    assert sum(b.count for b in result) == len(events)
    decoded = []
    for batch in result:
        body = batch.body()
        parsed = orjson.loads(body)
        assert list(parsed) == ["batch"] and len(parsed["batch"]) == batch.count >= 1
        assert batch.count <= max_events
        assert len(body) <= limit or batch.count == 1  # only a lone event may be over the limit
        assert [orjson.loads(e) for e in batch.events()] == parsed["batch"]
        decoded += parsed["batch"]
    assert decoded == [orjson.loads(e) for e in events]


# -- dead letters -----------------------------------------------------------------------------------------------------------


async def test_dead_letters_are_ndjson_lines_with_the_event_embedded(tmp_path: Path) -> None:
    directory = tmp_path / "not" / "there" / "yet"
    letters = DeadLetters(directory, "segment")
    events = [b'{"messageId":"m-1","properties":{"n":1}}', b'{"messageId":"m-2","text":"caf\xc3\xa9 \xf0\x9f\x8e\x89"}']
    before = datetime.now(UTC)
    await letters.add(events, 400, b'  {"error":"bad event"}\n')
    after = datetime.now(UTC)
    path = directory / "segment.ndjson"
    assert letters.path == path
    raw = path.read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 2
    lines = [orjson.loads(line) for line in raw.splitlines()]
    for line, event in zip(lines, events):
        assert set(line) == {"time", "destination", "status", "response", "event"}
        assert line["destination"] == "segment" and line["status"] == 400
        assert line["response"] == '{"error":"bad event"}'  # text, stripped
        assert line["event"] == orjson.loads(event)  # a JSON object, not a string holding one
        stamp = datetime.fromisoformat(line["time"])
        assert stamp.tzinfo is not None and before - timedelta(seconds=1) <= stamp <= after + timedelta(seconds=1)


async def test_dead_letter_responses_are_truncated_and_writes_append(tmp_path: Path) -> None:
    letters = DeadLetters(tmp_path, "rudderstack")
    await letters.add([b'{"n":1}'], 413, b"x" * 5000)
    await letters.add([b'{"n":2}', b'{"n":3}'], 401, b"\xff\xfe not utf-8")
    await letters.add([], 400, b"nothing")
    lines = [orjson.loads(line) for line in (tmp_path / "rudderstack.ndjson").read_bytes().splitlines()]
    assert [line["event"] for line in lines] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert [line["status"] for line in lines] == [413, 401, 401]
    assert lines[0]["response"] == "x" * 2000
    assert lines[1]["response"] == "\ufffd\ufffd not utf-8"
    assert (tmp_path / "rudderstack.ndjson").stat().st_mode & 0o777 == 0o600


# -- options ----------------------------------------------------------------------------------------------------------------------


def test_options_from_mapping_ignore_unknown_keys_and_keep_defaults() -> None:
    options = DeliveryOptions.from_mapping({"batch_max_events": 50, "retry_max": 5.0, "not_an_option": 1, "url": "http://x"})
    assert options.batch_max_events == 50 and options.retry_max == 5.0
    defaults = DeliveryOptions()
    assert options.batch_max_bytes == defaults.batch_max_bytes and options.flush_interval == defaults.flush_interval
    assert DeliveryOptions.from_mapping({}) == defaults
    assert not hasattr(options, "not_an_option")


@pytest.mark.parametrize(("megabytes", "expected"), [(1024.0, 1024**3), (1, 1024**2), (0.5, 512 * 1024), (0.001, 1048), (0, 0)])
def test_spool_quota_bytes_converts_megabytes(megabytes: float, expected: int) -> None:
    options = DeliveryOptions.from_mapping({"spool_quota_mb": megabytes})
    assert options.spool_quota_bytes == expected
    assert isinstance(options.spool_quota_bytes, int)


def test_default_batch_bytes_fit_under_the_upstream_body_limit() -> None:
    assert DeliveryOptions().batch_max_bytes <= MAX_UPSTREAM_BODY
